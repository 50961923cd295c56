"""The process-wide state a conversation needs: the current runtime (swapped on reload),
the clock, what the downstream can do, and how to open a relay."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..clock import Clock
from ..smtp.relay import Capabilities, Downstream


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

    def swap(self, runtime: Runtime) -> None:
        """Conversations pick the new runtime up at their next transaction."""
        self.runtime = runtime

    def new_relay(self):
        return self.relay_factory(self)


def _downstream(gate: Gate) -> Downstream:
    cfg = gate.runtime.config
    return Downstream(cfg.downstream, cfg.hostname, gate.capabilities)
