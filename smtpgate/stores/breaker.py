"""A circuit breaker for a store reached over the network (Redis).

Without it, every command of every session finds a dead store on its own: a refused
connection is cheap, but an unreachable host or a frozen server costs each call the whole
connect or read timeout (2 s by default), once per RCPT. With it, the first failure marks
the server down; calls then fail at once with StoreError, without touching the network,
until a back-off passes (1 s, doubled after every failed probe, at most 30 s). Then one call
is let through as a probe while the others still fail at once: its success closes the
circuit, its failure starts a longer back-off. The log says once that the store is down and
once that it is back, never once per command.

One breaker per server and process (``breaker_for``): the greylist and the sender stores of
a gate share it, so whichever notices first spares the other the timeout. Only network
faults open it; an error the server itself answered (a bad script, a wrong key type) shows
the server is up.

Behind Redis Sentinel (``redis+sentinel://``) the back-off stops growing at 2 s instead of
30: there an outage is most often a failover, and the Sentinels name the new primary within
seconds (``down-after-milliseconds`` plus the election). Each probe asks the Sentinels
afresh, so the store is back at most ~2 s after the promotion; meanwhile one call in 2 s
pays a refused connection or, for a host gone from the network, a connect timeout.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import StoreError

log = logging.getLogger("smtpgate.stores")

FIRST_BACKOFF = 1.0
LONGEST_BACKOFF = 30.0
SENTINEL_LONGEST_BACKOFF = 2.0

T = TypeVar("T")


class Breaker:
    """Closed (calls go through), or down: calls fail at once until ``retry_at``, then one
    probe at a time goes through."""

    def __init__(self, name: str, first: float = FIRST_BACKOFF, longest: float = LONGEST_BACKOFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.first, self.longest = first, longest
        self._clock = clock
        self.down_since: float | None = None
        self.backoff = 0.0
        self.retry_at = 0.0
        self.reason = ""
        self._probing = False
        #: calls refused without trying, during the current (or last) outage
        self.refused = 0
        #: outages noticed so far: a connection opened before the last one is not to be trusted
        self.outages = 0

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def check(self) -> None:
        """StoreError while the store is down and no probe may go now; else nothing."""
        if self.down_since is None:
            return
        now = self._clock()
        if now < self.retry_at or self._probing:
            self.refused += 1
            raise StoreError(f"{self.name}: down since {self.down_for(now):.0f}s ({self.reason}); "
                             f"not retried for {max(0.0, self.retry_at - now):.1f}s")

    async def run(self, operation: Callable[[], Awaitable[T]],
                  is_outage: Callable[[BaseException], bool]) -> T:
        """Run ``operation`` unless the store is down; ``is_outage(exc)`` tells a network
        fault (opens or keeps the circuit open) from an error the server answered."""
        self.check()
        probe = self.down_since is not None
        if probe:
            self._probing = True
        try:
            result = await operation()
        except BaseException as exc:
            self.ended(probe, exc, is_outage)
            raise
        self.ended(probe, None, is_outage)
        return result

    def ended(self, probe: bool, exc: BaseException | None,
              is_outage: Callable[[BaseException], bool]) -> None:
        """Account the end of a call ``run`` let through (or one made without it while the
        circuit was closed): a success (``exc`` None) or an answer shows the server up, a
        network fault opens the circuit, a cancelled probe leaves the next call to probe."""
        if exc is None:
            self._succeeded()
        elif is_outage(exc):
            self._failed(probe, exc)
        elif isinstance(exc, Exception):
            self._succeeded()  # the server answered: it is up
        elif probe:
            self._probing = False

    def down_for(self, now: float | None = None) -> float:
        if self.down_since is None:
            return 0.0
        return (self._clock() if now is None else now) - self.down_since

    def _failed(self, probe: bool, exc: BaseException) -> None:
        now = self._clock()
        self._probing = False
        if self.down_since is None:
            self.down_since, self.backoff, self.refused = now, self.first, 0
            self.outages += 1
            self.reason = _describe(exc)
            log.error("store %s is down (%s): failing at once, retrying every %g-%gs until it answers",
                      self.name, self.reason, self.first, self.longest)
        elif probe:
            self.backoff = min(self.backoff * 2, self.longest)
            self.reason = _describe(exc)
        else:
            return  # a call that started before the outage was noticed: no new information
        self.retry_at = now + self.backoff

    def _succeeded(self) -> None:
        self._probing = False
        if self.down_since is not None:
            log.warning("store %s is back after %.1fs (%d calls failed at once meanwhile)",
                        self.name, self.down_for(), self.refused)
            self.down_since, self.backoff, self.reason = None, 0.0, ""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_BREAKERS: dict[str, Breaker] = {}


def breaker_for(server: str, longest: float | None = None) -> Breaker:
    """The process's breaker for ``server`` (a name like ``Redis redis://host:port/db``);
    ``longest``: its longest back-off (default ``LONGEST_BACKOFF``)."""
    found = _BREAKERS.get(server)
    if found is None:
        found = _BREAKERS[server] = Breaker(server, longest=LONGEST_BACKOFF if longest is None else longest)
    return found
