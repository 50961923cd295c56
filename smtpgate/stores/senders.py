"""The sender-state store: one record per (machine, key), and one atomic operation.

A record is what a state machine (``smtpgate.machines.machine``) knows of one key — a sender
address, a domain, a client address or network: its state, since when, its event counts,
the recent event times its guards count, and its history of transitions.

The store does not know the machines. Its decisive operation is ``update(machine, key,
change)``: read the record, call ``change(record or None)`` — a pure function returning
``(new record or None to delete, result)``; it gets a freshly read record of its own and
may change it in place — and write what it returned, *atomically*:
SQLite runs it inside one ``BEGIN IMMEDIATE`` transaction, Redis as a compare-and-set on
the record's version, retried when another gate wrote in between. So gates and workers
updating one sender at once never lose an event and never decide on a stale record.
``change`` may be called more than once (Redis retries); it must not have side effects.

Times are seconds since the epoch and come from the caller: stores never read a clock.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

#: transitions kept per record (the oldest are dropped)
HISTORY_MAX = 100


@dataclass
class Change:
    """One transition in a record's history."""

    at: float
    event: str  # the event (``delivered``, ``manual``, ``ttl`` for a decay)
    src: str  # the state before ("" when the key was first seen)
    dst: str
    why: str = ""
    rule: str | None = None  # the rule that published the event ("cli" for a hand-made move)

    def as_dict(self) -> dict:
        return {"at": self.at, "event": self.event, "from": self.src, "to": self.dst,
                "why": self.why, "rule": self.rule}

    @classmethod
    def from_dict(cls, d: dict) -> "Change":
        return cls(d["at"], d["event"], d["from"], d["to"], d.get("why", ""), d.get("rule"))


@dataclass
class SenderRecord:
    """What a machine knows of one key."""

    machine: str
    key: str
    state: str
    since: float  # when it entered ``state``
    seen: float  # its last event (the idle clock of TTL decay)
    created: float
    expires: float  # forgotten after this (``forget_after`` idle)
    counts: dict[str, int] = field(default_factory=dict)  # event -> total since created
    recent: dict[str, list[float]] = field(default_factory=dict)  # event -> times since `since`, bounded
    hits: list[float] = field(default_factory=list)  # MAIL times, for a state's rate, bounded
    history: list[Change] = field(default_factory=list)
    version: int = 0  # bumped by every write (Redis compare-and-set)

    def to_json(self) -> str:
        d = {"machine": self.machine, "key": self.key, "state": self.state, "since": self.since,
             "seen": self.seen, "created": self.created, "expires": self.expires, "counts": self.counts,
             "recent": self.recent, "hits": self.hits, "history": [c.as_dict() for c in self.history],
             "version": self.version}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "SenderRecord":
        d = json.loads(text)
        d["history"] = [Change.from_dict(c) for c in d.get("history", ())]
        return cls(**d)

    def add_history(self, change: Change) -> None:
        self.history.append(change)
        del self.history[:-HISTORY_MAX]

    def as_dict(self) -> dict:
        return {"machine": self.machine, "key": self.key, "state": self.state, "since": self.since,
                "seen": self.seen, "created": self.created, "expires": self.expires,
                "counts": dict(self.counts), "history": [c.as_dict() for c in self.history]}


#: ``change(record or None) -> (record to store or None to delete it, anything to return)``
ChangeFn = Callable[["SenderRecord | None"], "tuple[SenderRecord | None, Any]"]


class SenderStore:
    """The interface both backends implement. Every method is a coroutine; errors of the
    database below come out as ``smtpgate.StoreError``."""

    async def get(self, machine: str, key: str) -> SenderRecord | None:
        raise NotImplementedError

    async def update(self, machine: str, key: str, change: ChangeFn, now: float | None = None) -> Any:
        """Atomically: read the record, ``change`` it, write the result; return what
        ``change`` returned second. The stored version goes up by one on every update
        (Redis writes a process's concurrent updates of one key at once, versions and all).
        ``now`` (optional) lets the store drop long-expired records as it goes."""
        raise NotImplementedError

    async def records(self, machine: str | None = None, state: str | None = None,
                      limit: int | None = None) -> list[SenderRecord]:
        """Stored records (of one machine, in one state), most recently seen first."""
        raise NotImplementedError

    async def delete(self, machine: str, key: str) -> bool:
        raise NotImplementedError

    async def purge(self, now: float) -> int:
        """Drop records past their ``expires``; how many."""
        raise NotImplementedError

    # -- moving to another store (``portable.py``: ``smtpgate state copy``) -----------------
    def export_batches(self) -> AsyncIterator[list[SenderRecord]]:
        """Every record (history included), in bounded batches."""
        raise NotImplementedError

    async def import_batch(self, items: list[SenderRecord], now: float) -> Counter[str]:
        """Store records as they are (version, times, expiry, history), replacing what is
        stored under the same key; counts ``records``, and ``skipped`` for expired ones."""
        raise NotImplementedError

    async def close(self) -> None:
        pass
