"""Build a whole Runtime from a config path: config, plugins, policies, rule instances."""
from __future__ import annotations

from ..clock import Clock
from ..config import load_all
from .gate import Runtime
from ..resolver import Resolver
from ..pipeline.rule import GateContext
from ..stores import Stores, open_stores


_resolver: Resolver | None = None  # this process's: a reload keeps it (and its cache) while dns: holds


def process_resolver(dns_config, clock: Clock) -> Resolver:
    """The one resolver of this process, made from gate.yaml's ``dns:`` (workers fork after
    loading, so each worker process gets a copy of its own)."""
    global _resolver
    if _resolver is None or _resolver.config != dns_config:
        _resolver = Resolver.from_config(dns_config, clock)
    return _resolver


def load_runtime(cli_path: str | None, clock: Clock | None = None, resolver=None,
                 stores: Stores | None = None, scratch_state: bool = False) -> Runtime:
    """Raises ConfigError / PluginError; never returns a half-built runtime.

    ``stores`` (the running gate's, on reload) is kept when ``state:`` still names it.
    ``scratch_state`` gives the rules an empty in-memory state instead (``smtpgate try``
    must never change what the running gate remembers)."""
    clock = clock or Clock()
    opened: list[Stores] = []

    def context(config) -> GateContext:
        if scratch_state:
            opened.append(open_stores("sqlite://:memory:", clock))
        else:
            keep = stores if stores is not None and stores.url == config.state else None
            opened.append(keep or open_stores(config.state, clock))
        dns = resolver if resolver is not None else process_resolver(config.dns, clock)
        return GateContext(clock=clock, resolver=dns, stores=opened[0])

    config, registry, policies = load_all(cli_path, context)
    return Runtime(config, registry, policies, opened[0] if opened else None)
