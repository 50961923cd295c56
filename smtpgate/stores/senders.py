"""The sender-state store: one record per (machine, key), and one atomic operation.

A record is what a state machine (``smtpgate.machines.machine``) knows of one key — a sender
address, a domain, a client address or network: its state, since when, its event counts,
the recent event times its guards count, and its history of transitions.

The store does not know the machines. Its decisive operation is ``update(machine, key,
change)``: read the record, call ``change(record or None)`` — a pure function returning
``(new record or None to delete, result)``; it gets a freshly read record of its own and
may change it in place, and the record it returns is the store's from then on (``ChangeFn``)
— and write what it returned, *atomically*: SQLite runs it inside one
``BEGIN IMMEDIATE`` transaction (or, first, as a compare-and-set on the record this process
last read or wrote), Redis as a compare-and-set on the record's version, retried when
another gate wrote in between. So gates and workers updating one sender at once never lose
an event and never decide on a stale record. ``change`` may be called more than once (a
lost compare-and-set, on either store, runs it again); it must not have side effects.

Times are seconds since the epoch and come from the caller: stores never read a clock.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, AsyncIterator, Callable

#: transitions kept per record (the oldest are dropped)
HISTORY_MAX = 100
#: records kept parsed by their JSON text (``SenderRecord.from_json``; oldest out first)
PARSED_MAX = 1024
#: keys a store remembers as this process last read or wrote them (``Seen``)
SEEN_MAX = 4096

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once, not per call
#: time texts remembered (``_number``; all forgotten at once when full): those of the
#: PARSED_MAX records kept parsed, ~10 each (since, seen, created, expires, recent times,
#: hits), and the 2-3 new ones each event brings; about 2 MB when full
NUMBER_TEXTS_MAX = 16 * PARSED_MAX


@dataclass(frozen=True)  # shared between copies of a record (SenderRecord.copy): never changed
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

    @cached_property
    def json(self) -> str:
        """``as_dict()`` as the record's JSON writes it: made once (a record's history is
        written again with every event of its key)."""
        return _encode(self.as_dict())

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
    version: int = 0  # bumped by every update; Redis's compare-and-set compares it (SQLite's, the whole row)

    def to_json(self, handed_over: bool = False) -> str:
        """The record's JSON text (the one _encode gives of ``as_json_dict()``, built from its
        parts: _record_json), kept parsed: what a store writes now, it reads back at the next
        event. ``handed_over``: the caller (a store writing what ``change`` returned, which is
        then the store's: ChangeFn) never touches the record again, so it is kept itself, not
        a copy of it."""
        text = _record_json(self)
        _keep_parsed(text, self if handed_over else self.copy())
        return text

    def as_json_dict(self) -> dict:
        """What ``to_json`` writes, as the mapping the JSON encoder would be given."""
        return {"machine": self.machine, "key": self.key, "state": self.state, "since": self.since,
                "seen": self.seen, "created": self.created, "expires": self.expires, "counts": self.counts,
                "recent": self.recent, "hits": self.hits, "history": [c.as_dict() for c in self.history],
                "version": self.version}

    @classmethod
    def from_json(cls, text: str | bytes, take: bool = False) -> "SenderRecord":
        """The record of a JSON text, the caller's own. ``take``: the caller is about to
        change it and write it (``update``): the record kept parsed for that text is handed
        over, not copied (the text is then parsed again if it is ever read again)."""
        # A key's record is read at MAIL and again when the transaction's events are applied,
        # usually as this process last wrote it: the same text is the same record, so the one
        # parsed before stands for it (a text written by anyone else misses and is parsed). A
        # take gets that record itself and it leaves _parsed; any other reader a copy, exact
        # unless a take on another thread was changing it meanwhile (then the text is parsed).
        if not take:
            return cls.look(text, copy_of)  # a look whose answer is a copy: the caller's own
        known = _parsed.pop(text, None)
        return known if known is not None else cls._parse(text)

    @classmethod
    def look(cls, text: str | bytes, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(record, *args)`` of the record of a JSON text, for a reader that only looks
        at it: ``fn`` changes nothing and what it returns holds no part of the record. It is
        given the record kept parsed itself, not a copy (the MAIL read's view needs none),
        and its answer stands if that record is still kept once ``fn`` is done (no lock: a
        take, on the other thread, which may change it meanwhile, pops it first and never puts
        it back). Else the text is parsed (and that record kept)."""
        known = _parsed.get(text)
        if known is not None:
            try:
                answer = fn(known, *args)
            except Exception:  # read as a take changed it (a state gone meanwhile, ...)?
                if _parsed.get(text) is known:
                    raise
            else:
                if _parsed.get(text) is known:
                    return answer
        rec = cls._parse(text)
        answer = fn(rec, *args)
        _keep_parsed(text, rec)  # after fn: no take has it while fn looks at it
        return answer

    @classmethod
    def _parse(cls, text: str | bytes) -> "SenderRecord":
        d = json.loads(text)
        d["history"] = [Change.from_dict(c) for c in d.get("history", ())]
        return cls(**d)

    def copy(self) -> "SenderRecord":
        """An independent record equal to this one (its mutable parts copied; changes are immutable)."""
        return SenderRecord(self.machine, self.key, self.state, self.since, self.seen, self.created, self.expires,
                            dict(self.counts), {event: list(times) for event, times in self.recent.items()},
                            list(self.hits), list(self.history), self.version)

    def add_history(self, change: Change) -> None:
        self.history.append(change)
        del self.history[:-HISTORY_MAX]

    def as_dict(self) -> dict:
        return {"machine": self.machine, "key": self.key, "state": self.state, "since": self.since,
                "seen": self.seen, "created": self.created, "expires": self.expires,
                "counts": dict(self.counts), "history": [c.as_dict() for c in self.history]}


# -- the record's JSON, by parts ---------------------------------------------------------
# The text json gives (separators "," ":", no indent, keys in order, ensure_ascii off) is
# each value's text joined by those separators, so a record is written piece by piece: the
# values of the types records hold by their own rules (below), anything else by _encode
# itself. What this saves: most of the encoder's time was float.__repr__ of the times
# (~0.5 µs each, ten per record), and all but two of them (the event's time and the expiry
# it sets) are the same as at the key's last write; a history entry's text never changes.
_string = json.encoder.encode_basestring  # the encoder's own, for ensure_ascii=False
_numbers: dict[float, str] = {}  # finite, non-zero float -> its text (0.0 and -0.0 are one key)


def _number(x) -> str:
    """A JSON scalar's text (a time, a count), as _encode(x) gives it."""
    kind = type(x)
    if kind is float:
        text = _numbers.get(x)
        if text is None:
            if not x or x - x != 0:  # zeros (one key, two texts), inf and nan (json's own words)
                return _encode(x)
            if len(_numbers) >= NUMBER_TEXTS_MAX:
                _numbers.clear()
            text = _numbers[x] = float.__repr__(x)
        return text
    if kind is int:
        return int.__repr__(x)
    return _encode(x)


def _list(items) -> str:
    """A list of scalars (event times)."""
    if type(items) is not list:
        return _encode(items)
    return "[" + ",".join([_number(x) for x in items]) + "]"


def _mapping(d, value) -> str:
    """A dict of string keys, each value written by ``value``."""
    if type(d) is not dict:
        return _encode(d)
    parts = []
    for k, v in d.items():
        if type(k) is not str:
            return _encode(d)  # json's own rules for other keys (numbers, None, bools as strings)
        parts.append(_string(k) + ":" + value(v))
    return "{" + ",".join(parts) + "}"


def _text(x) -> str:
    """A name (machine, key, state)."""
    return _string(x) if type(x) is str else _encode(x)


def _record_json(rec: SenderRecord) -> str:
    """``_encode(rec.as_json_dict())``, from the parts' texts."""
    if type(rec.history) is not list:
        return _encode(rec.as_json_dict())
    history = []
    for change in rec.history:
        if type(change) is not Change:
            return _encode(rec.as_json_dict())
        history.append(change.json)
    return "".join((
        '{"machine":', _text(rec.machine), ',"key":', _text(rec.key), ',"state":', _text(rec.state),
        ',"since":', _number(rec.since), ',"seen":', _number(rec.seen),
        ',"created":', _number(rec.created), ',"expires":', _number(rec.expires),
        ',"counts":', _mapping(rec.counts, _number), ',"recent":', _mapping(rec.recent, _list),
        ',"hits":', _list(rec.hits), ',"history":[', ",".join(history),
        '],"version":', _number(rec.version), "}"))


#: JSON text -> its record, as parsed or written. Handed out whole only to ``take`` (popped
#: first: never put back, a text is kept with a new copy), else copied. SQLite reads and
#: writes on two threads (the loop's and the database's), so a reader may be looking at a
#: record that another thread has just taken and is changing: see SenderRecord.look.
_parsed: dict[str | bytes, SenderRecord] = {}


def _keep_parsed(text: str | bytes, rec: SenderRecord) -> None:
    _parsed[text] = rec
    _drop_oldest(_parsed, PARSED_MAX)


def _drop_oldest(d: dict, most: int) -> None:
    """Drop ``d``'s oldest entries until it holds ``most``: without a lock, as the other
    thread (SQLite's) may be changing ``d`` meanwhile."""
    while len(d) > most:
        try:
            d.pop(next(iter(d)), None)
        except (RuntimeError, StopIteration):  # changed (or emptied) as it was looked at: again
            pass


class Seen:
    """What a store last read or wrote of each key, as it stores it (what ``update`` tries its
    compare-and-set on first), for the SEEN_MAX keys remembered last: oldest out first."""

    def __init__(self) -> None:
        # a plain dict, in the order keys were last remembered: 0.43 against 0.67 µs per
        # remember for an OrderedDict (twice a message)
        self._rows: dict[tuple[str, str], Any] = {}

    def remember(self, machine: str, key: str, row: Any) -> None:
        rows = self._rows
        slot = (machine, key)
        rows.pop(slot, None)
        rows[slot] = row
        _drop_oldest(rows, SEEN_MAX)

    def get(self, machine: str, key: str) -> Any:
        return self._rows.get((machine, key))

    def forget(self, machine: str, key: str) -> Any:
        """Drop the key's row; it (None if none)."""
        return self._rows.pop((machine, key), None)


#: ``change(record or None) -> (record to store or None to delete it, anything to return)``.
#: The record it returns is the store's from then on (kept parsed as written, then taken by
#: the key's next update): neither ``change`` nor what it returns may hold on to it or to its
#: mutable parts (its counts, times, history list).
ChangeFn = Callable[["SenderRecord | None"], "tuple[SenderRecord | None, Any]"]


def copy_of(rec: SenderRecord | None) -> SenderRecord | None:
    """The caller's own copy of a record looked at (``SenderStore.read``)."""
    return rec.copy() if rec is not None else None


class SenderStore:
    """The interface both backends implement. Every method is a coroutine; errors of the
    database below come out as ``smtpgate.StoreError``."""

    async def get(self, machine: str, key: str) -> SenderRecord | None:
        """The key's record, the caller's own (None if none)."""
        raise NotImplementedError

    async def read(self, machine: str, key: str, look: Callable[..., Any], *args: Any) -> Any:
        """``look(record or None, *args)`` of the key's record as stored: for a reader that
        only looks at it (``look`` changes nothing, and what it returns holds no part of
        it), so a store may hand it the record it keeps parsed, not a copy (the stores' ``get``
        is their ``read`` with ``copy_of``; this default, for a store without a parse cache,
        looks at ``get``'s copy)."""
        return look(await self.get(machine, key), *args)

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
