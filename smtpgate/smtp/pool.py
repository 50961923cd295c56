"""Idle downstream sessions kept for the next client (``downstream.pool``), one pool per worker.

A client connection that ends after a delivered message gives its downstream session back
here instead of QUIT; the next client's first MAIL takes it (``relay.Downstream.open``) and
greets it again as itself (XCLIENT + EHLO, or RSET when no XCLIENT is sent), which is also
the health check: a session that fails it is closed and the next one (or a new connection)
is used, so a dead pooled session never reaches a client. A session is held by one client
at a time (taking removes it), lives at most ``max_uses`` clients, waits at most ``idle``
seconds, and the pool keeps at most ``size`` of them. A reload (``renew``), a drain or a
shutdown (``close``) closes the idle ones; sessions in use then close when their client
leaves (``refusal``, asked by relay.py before its own checks).

Metrics (metrics.py, when ``metrics:`` is set): the idle sessions now, and every session
closed instead of reused, by one of the reasons below (docs/operations.md lists them),
counted here only: ``discard`` closes and counts, for the pool and for relay.py's checks.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .. import metrics

# Why a session was closed instead of reused (smtpgate_downstream_pool_closed_total's label):
IDLE = "idle"  # unused for ``idle`` seconds
MAX_USES = "max_uses"  # served ``max_uses`` clients
CHECK_FAILED = "check_failed"  # failed its check (XCLIENT + greeting, RSET, the gate's EHLO)
CLIENT_LEFT = "client_left"  # taken, and its client left during that check (relay.py)
NO_XCLIENT = "no_xclient"  # the downstream no longer offers XCLIENT to it (relay.py)
DOWNSTREAM_CLOSED = "downstream_closed"  # the downstream closed it while it waited
POOL_FULL = "pool_full"  # given back to a pool already holding ``size``
RELOAD = "reload"  # opened under the configuration before a reload
SHUTDOWN = "shutdown"  # idle, or its client leaving, at a drain or shutdown


@dataclass(eq=False)
class Pooled:
    """One downstream connection (an ``aiosmtplib.SMTP``) and what the pool knows of it."""

    smtp: Any
    generation: int
    xclient: bool  # opened with XCLIENT: every later client is named with it too
    # The XCLIENT NAME and ADDR under which the gate's own EHLO last showed XCLIENT still
    # offered (relay.Downstream.close): Postfix decides that by those two alone, from
    # settings one smtpd process keeps for its life, so the same naming needs no new EHLO.
    renamable_as: tuple[str | None, str | None] | None = None
    uses: int = 0  # clients it served
    idle_since: float = field(default_factory=time.monotonic)


class SessionPool:
    def __init__(self, size: int, idle: float, max_uses: int,
                 farewell: Callable[[Any], Awaitable[None]]):
        """``farewell(smtp)``: QUIT a session leaving the pool, never raising (relay.py's:
        only it speaks to aiosmtplib)."""
        self.size, self.idle, self.max_uses = size, idle, max_uses
        self._farewell = farewell
        self.generation = 0  # bumped by renew(): older sessions are not taken back
        self._idle: list[Pooled] = []  # most recently given back last (taken first)
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.size > 0 and not self._closed

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> Pooled | None:
        """The most recently used idle session still inside ``idle``, or None; expired ones
        found on the way are closed."""
        if not self._idle:  # nothing to take: not even the gauge to write
            return None
        now = time.monotonic()
        taken = None
        while self._idle:
            entry = self._idle.pop()
            if now - entry.idle_since <= self.idle and entry.smtp.is_connected:
                taken = entry
                break
            self.discard(entry, _why_stale(entry))
        metrics.pool_idle(len(self._idle))
        return taken

    def give(self, entry: Pooled) -> None:
        """Back from a client: kept for the next one, or closed (``refusal``; asked again here:
        a reload or a shutdown may have come while relay.py checked it), the oldest idle one
        making room when the pool is full."""
        refused = self.refusal(entry)
        entry.uses += 1
        if refused:
            self.discard(entry, refused)
            return
        entry.idle_since = time.monotonic()
        self._idle.append(entry)
        while len(self._idle) > self.size:
            self.discard(self._idle.pop(0), POOL_FULL)
        metrics.pool_idle(len(self._idle))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle, self._sweep)

    def refusal(self, entry: Pooled) -> str | None:
        """Why a session whose client is leaving would not be kept (a reason above), or None.
        relay.py asks before its own checks: a session the pool closes anyway costs no EHLO
        and is counted under this reason, not under the check's."""
        if self._closed:
            return SHUTDOWN
        # a session is the pool's only when opened with it on: off now means a reload
        if entry.generation != self.generation or not self.enabled:
            return RELOAD
        if not entry.smtp.is_connected:
            return DOWNSTREAM_CLOSED
        if entry.uses + 1 >= self.max_uses:  # this client was its last
            return MAX_USES
        return None

    def renew(self, size: int, idle: float, max_uses: int) -> None:
        """A reload, with its settings: the downstream ones may have changed too; idle
        sessions are closed and sessions in use are not taken back."""
        self.size, self.idle, self.max_uses = size, idle, max_uses
        self.generation += 1
        self._retire_all(RELOAD)

    async def close(self, timeout: float = 5.0) -> None:
        """Drain or shutdown: no session is kept from now on; the idle ones say QUIT."""
        self._closed = True
        self._retire_all(SHUTDOWN)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=timeout)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle
        expired = [e for e in self._idle if e.idle_since < cutoff]
        self._idle = [e for e in self._idle if e.idle_since >= cutoff]
        for entry in expired:
            self.discard(entry, _why_stale(entry))
        metrics.pool_idle(len(self._idle))
        if self._idle:
            wait = self._idle[0].idle_since + self.idle - time.monotonic()
            self._sweeper = asyncio.get_running_loop().call_later(max(wait, 0.05), self._sweep)

    def _retire_all(self, reason: str) -> None:
        entries, self._idle = self._idle, []
        for entry in entries:
            self.discard(entry, reason)
        metrics.pool_idle(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def discard(self, entry: Pooled, reason: str) -> None:
        """Close a session instead of reusing it, counted under ``reason`` (one above). One
        still connected says QUIT in the background (Postfix logs a clean disconnect, not a
        lost connection); one its caller closed already (a failed or cut exchange, where a
        reply may still come) is only counted."""
        metrics.pool_closed(reason)
        if not entry.smtp.is_connected:
            entry.smtp.close()
            return
        task = asyncio.ensure_future(self._farewell(entry.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _why_stale(entry: Pooled) -> str:
    """Why an idle session found unusable (closed, or past ``idle``) goes: the downstream
    closed it, else it waited ``idle`` out."""
    return IDLE if entry.smtp.is_connected else DOWNSTREAM_CLOSED
