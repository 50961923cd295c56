"""The process-wide state a conversation needs: the current runtime (swapped on reload),
the clock, what the downstream can do, and how to open a relay."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..clock import Clock
from ..smtp.pool import SessionPool
from ..smtp.relay import Capabilities, Downstream, farewell


@dataclass(frozen=True)
class Runtime:
    """One loaded configuration: built whole, then swapped in whole (never half-applied)."""

    config: Any  # GateConfig
    registry: Any  # PluginRegistry
    policies: Any  # PolicySet
    stores: Any = None  # Stores, shared by every runtime of this process while state: holds


class Gate:
    def __init__(self, runtime: Runtime, clock: Clock | None = None,
                 relay_factory: Callable[["Gate"], Any] | None = None, quarantine=None):
        self.runtime = runtime
        self.clock = clock or Clock()
        self.capabilities = Capabilities()
        self.relay_factory = relay_factory or _downstream
        self.quarantine = quarantine
        pool = runtime.config.downstream.pool
        # This process's idle downstream sessions (the real relay's; a FakeRelay ignores it).
        self.pool = SessionPool(pool.size, pool.idle, pool.max_uses, farewell)

    def swap(self, runtime: Runtime) -> None:
        """Conversations pick the new runtime up at their next transaction; idle downstream
        sessions opened under the old configuration are closed."""
        self.runtime = runtime
        pool = runtime.config.downstream.pool
        self.pool.renew(pool.size, pool.idle, pool.max_uses)

    def new_relay(self):
        return self.relay_factory(self)


def _downstream(gate: Gate) -> Downstream:
    cfg = gate.runtime.config
    return Downstream(cfg.downstream, cfg.hostname, gate.capabilities, gate.pool)
