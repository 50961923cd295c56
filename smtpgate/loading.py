"""Build a whole Runtime from a config path: config, plugins, policies, rule instances."""
from __future__ import annotations

from .clock import Clock
from .config import load_all
from .gate import Runtime
from .rule import GateContext


def load_runtime(cli_path: str | None, clock: Clock | None = None, resolver=None) -> Runtime:
    """Raises ConfigError / PluginError; never returns a half-built runtime."""
    clock = clock or Clock()

    def context(config) -> GateContext:
        return GateContext(clock=clock, resolver=resolver)

    config, registry, policies = load_all(cli_path, context)
    return Runtime(config, registry, policies)
