"""Build a whole Runtime from a config path: config, plugins, policies, rule instances."""
from __future__ import annotations

from .clock import Clock
from .config import load_all
from .gate import Runtime
from .rule import GateContext
from .stores import Stores, open_stores


def load_runtime(cli_path: str | None, clock: Clock | None = None, resolver=None,
                 stores: Stores | None = None) -> Runtime:
    """Raises ConfigError / PluginError; never returns a half-built runtime.

    ``stores`` (the running gate's, on reload) is kept when ``state:`` still names it."""
    clock = clock or Clock()
    opened: list[Stores] = []

    def context(config) -> GateContext:
        keep = stores if stores is not None and stores.url == config.state else None
        opened.append(keep or open_stores(config.state, clock))
        return GateContext(clock=clock, resolver=resolver, stores=opened[0])

    config, registry, policies = load_all(cli_path, context)
    return Runtime(config, registry, policies, opened[0] if opened else None)
