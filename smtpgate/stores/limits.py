"""The limits store: rate counters over sliding windows and concurrent connections per client.

**Rates: the sliding-window counter.** Each counter is two fixed buckets of the window's
length, aligned on the epoch (bucket ``k`` covers ``[k*W, (k+1)*W)``): the count of the
current bucket and of the one before. The number of hits in the sliding window ending now
is estimated as ``previous * (1 - elapsed/W) + current``, where ``elapsed`` is how far we
are into the current bucket — as if the previous bucket's hits were spread evenly over it.
Chosen over the alternatives because a check is O(1) in time *and* space whatever the
rate: two integers and a bucket number per key, read and written in one operation.
An exact log of hit times costs memory per hit (a million keys at 500/day each would not
fit); a ring of sub-buckets is more precise but costs N fields per key and N reads per
check for a gain mail does not need. The estimate is exact when hits are spread evenly,
and otherwise off by at most the previous bucket's share of a burst: fine for mail limits,
which are orders of magnitude, not a billing meter.

A check that would go past a limit is *not* counted (a client hammering a closed limit
does not keep it closed), and several checks (a transaction's rates) are decided together:
all pass and are counted, or none is. When refused, ``retry_at`` is the earliest time at
which every refusing counter lets one more through, if nothing else is counted meanwhile.

**Connections**: per client, one member per open session (``member``: unique in the fleet)
with an expiry; ``connect`` drops expired members, counts the rest and adds one when under
the cap. A gate that dies without saying goodbye leaks nothing for longer than the TTL;
live sessions refresh theirs with ``touch``.

Times are seconds since the epoch and come from the caller: stores never read a clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections import Counter as TallyCounter
from typing import AsyncIterator, NamedTuple

KINDS = ("client", "client_net", "sender", "sender_domain", "recipient")
CONNECTIONS = "connections"  # the CLI's kind for the connection counts


class RateCheck(NamedTuple):
    """One limit to check: at most ``max`` hits on (``kind``, ``value``) within ``window``
    seconds; ``count`` False checks without counting (already counted in this transaction).
    A plain tuple in that order does as well (rules pass tuples: no import of this module)."""

    kind: str
    value: str
    window: float
    max: int
    count: bool = True


@dataclass
class Counter:
    """A stored counter: ``bucket`` is the number of the current fixed bucket."""

    kind: str
    value: str
    window: float
    bucket: int
    previous: int
    current: int

    @property
    def expires(self) -> float:
        return (self.bucket + 2) * self.window

    def slid(self, now: float) -> "Counter":
        """The counter as seen from ``now`` (buckets moved on, nothing counted)."""
        k = bucket_of(now, self.window)
        if k == self.bucket:
            return self
        previous = self.current if k == self.bucket + 1 else 0
        return Counter(self.kind, self.value, self.window, k, previous, 0)

    def estimate(self, now: float) -> float:
        c = self.slid(now)
        return c.previous * (1 - (now - c.bucket * c.window) / c.window) + c.current

    def as_dict(self, now: float) -> dict:
        c = self.slid(now)
        return {"kind": self.kind, "value": self.value, "window": self.window,
                "estimate": round(self.estimate(now), 3), "current": c.current, "previous": c.previous,
                "bucket_start": c.bucket * c.window, "expires": c.expires}


@dataclass
class RateOutcome:
    """``allowed`` (and then counted); ``estimates``: each check's estimate before this hit;
    ``refused``: indexes of the checks that refused; ``retry_at``: when all would pass."""

    allowed: bool
    estimates: list[float] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    retry_at: float | None = None


def bucket_of(now: float, window: float) -> int:
    return math.floor(now / window)


def retry_time(counter: Counter, limit: int, need: int = 1) -> float:
    """When the estimate of ``counter`` (slid to its current bucket) drops to ``limit - need``,
    so that one more hit fits (``need`` 0: the hit is already counted), if nothing else is."""
    w, start = counter.window, counter.bucket * counter.window
    room = limit - need
    if counter.current <= room:  # the previous bucket's share has to fade enough
        return start + w * (1 - (room - counter.current) / counter.previous)
    return start + w + w * (1 - room / counter.current)  # into the next bucket


def decide(counters: list[Counter | None], checks: list[RateCheck], now: float
           ) -> tuple[RateOutcome, list[Counter]]:
    """The decision both backends make (Redis in Lua, line for line): the outcome, and the
    counters to write (empty when refused)."""
    checks = [RateCheck(*c) for c in checks]
    outcome = RateOutcome(True)
    slid = []
    for stored, check in zip(counters, checks):
        c = (stored or Counter(check.kind, check.value, check.window, bucket_of(now, check.window), 0, 0)).slid(now)
        est = c.previous * (1 - (now - c.bucket * c.window) / c.window) + c.current
        outcome.estimates.append(est)
        need = 1 if check.count else 0  # not counting: this transaction's hit is in est already
        if est + need > check.max:
            outcome.allowed = False
            outcome.refused.append(len(slid))
            at = retry_time(c, check.max, need)
            outcome.retry_at = at if outcome.retry_at is None else max(outcome.retry_at, at)
        slid.append(c)
    if not outcome.allowed:
        return outcome, []
    writes = []
    for c, check in zip(slid, checks):
        if check.count:
            writes.append(Counter(c.kind, c.value, c.window, c.bucket, c.previous, c.current + 1))
    return outcome, writes


class LimitsStore:
    """The interface both backends implement. Every method is a coroutine; errors of the
    database below come out as ``smtpgate.StoreError``."""

    async def hit(self, checks: list[RateCheck], now: float) -> RateOutcome:
        """Check every limit and, if all pass, count one hit on each (atomically)."""
        raise NotImplementedError

    async def counters(self, kind: str | None = None, value: str | None = None,
                       limit: int | None = None) -> list[Counter]:
        """Stored counters (of one kind, of one value), busiest bucket first."""
        raise NotImplementedError

    async def reset(self, kind: str, value: str) -> int:
        """Forget every counter of (``kind``, ``value``) — ``kind`` ``connections``: the
        client's open connections; how many were dropped."""
        raise NotImplementedError

    async def connect(self, client: str, member: str, cap: int, now: float, ttl: float) -> tuple[bool, int]:
        """Add ``member`` to ``client``'s open connections if fewer than ``cap`` are live:
        (added, live connections before)."""
        raise NotImplementedError

    async def touch(self, client: str, member: str, now: float, ttl: float) -> None:
        """Keep ``member`` live for ``ttl`` more seconds (a long session's heartbeat)."""
        raise NotImplementedError

    async def disconnect(self, client: str, member: str) -> None:
        raise NotImplementedError

    async def connections(self, client: str | None = None, now: float = 0.0,
                          limit: int | None = None) -> dict[str, int]:
        """Live connections per client (of one client), most first."""
        raise NotImplementedError

    # -- moving to another store (``portable.py``: ``smtpgate state copy``) -----------------
    def export_batches(self) -> AsyncIterator[list[Counter]]:
        """Every rate counter, in bounded batches. Open connections are not state to move:
        they belong to the sessions of the gate that holds them."""
        raise NotImplementedError

    async def import_batch(self, items: list[Counter], now: float) -> TallyCounter[str]:
        """Store counters as they are, replacing what is stored under the same key; counts
        ``counters``, and ``skipped`` for those whose two buckets have passed."""
        raise NotImplementedError

    async def close(self) -> None:
        pass
