"""Per-key state machines (Lamson's idea, at SMTP time): the model.

A ``Machine`` is an explicit table ``{STATE: {event: NEXT}}`` where NEXT is a state name or
one or more guarded ``Transition``s (the first whose guards hold wins), plus TTL decays
``{STATE: (ttl, NEXT)}``. It validates itself when built (unknown or unreachable states,
bad guards), prints as Graphviz DOT, and knows how one key's record changes:

- **An event** at time ``t`` is counted (``counts``; its time kept in ``recent``, bounded by
  the largest ``count`` any guard needs), then the current state's transitions for it are
  tried in order. A guard holds when the key has been in the state at least ``min_time``
  and has had at least ``count`` of that event *since entering the state* and, with
  ``within``, in the last ``within`` seconds — the current event included. Entering a
  state restarts those counts.
- **TTL decay** is lazy: whenever a record is read or written at ``now``, a state whose
  ``ttl`` has run out since the key's last event (or since it entered the state, if later)
  becomes its decay target, at the moment it ran out; chains (trusted -> probation -> new)
  unfold the same way. The history records each decay as event ``decay``.
- A key idle for ``forget_after`` is forgotten: it starts again in the initial state.

Everything here is pure (``now`` comes from the caller); ``feed``, ``current``, ``move``
and ``hit`` run it through a store's atomic ``update``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..pipeline.results import Event, check_event_name
from ..pipeline.rule import Rule
from ..stores.senders import Change, SenderRecord
from ..units import parse_duration

#: events the gate and the first-party rules publish; plugins add theirs with ``publishes``
KNOWN_EVENTS = frozenset({"delivered", "rejected", "greylisted", "greylist_passed", "banned_attachment",
                          "downstream_rejected", "dnsbl_listed", "manual"})
MAX_COUNT = 1000  # the largest `count` a guard may ask for (event times kept per key are bounded by it)
DEFAULT_FORGET_AFTER = 90 * 86400.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
_STATE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


class MachineError(ValueError):
    """A problem in a machine's declaration, located by state / event / transition index /
    field so each front end (YAML, Python) can name the place its own way."""

    def __init__(self, message: str, state: str | None = None, event: str | None = None,
                 index: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message, self.state, self.event, self.index, self.field = message, state, event, index, field

    @property
    def detail(self) -> str:
        """The message without the leading ``field: `` (for front ends that name the field)."""
        return self.message.removeprefix(f"{self.field}: ") if self.field else self.message


def known_events() -> set[str]:
    """KNOWN_EVENTS plus every event a loaded rule class declares in ``publishes``."""
    out, todo = set(KNOWN_EVENTS), [Rule]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            declared = vars(sub).get("publishes") or ()
            out.update(e for e in ([declared] if isinstance(declared, str) else declared) if isinstance(e, str))
    return out


def duration_text(seconds: float) -> str:
    """30d, 1h, 90s, 1.5h -> the shortest exact unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _seconds(value: Any, what: str, state: str | None = None) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise MachineError(f"{what}: {e}", state=state, field=what) from None


@dataclass(frozen=True)
class Transition:
    """``Transition("trusted", count=5, within="30d", min_time="1d")``: go to ``to`` when at
    least ``count`` of the event happened since entering the current state (and, with
    ``within``, in that window), and the key has been in the state ``min_time``."""

    to: str
    count: int = 1
    within: float | None = None
    min_time: float = 0.0

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise MachineError(f"count: expected a whole number 1-{MAX_COUNT}, got {self.count!r}", field="count")
        if self.within is not None:
            within = _seconds(self.within, "within")
            if within <= 0:
                raise MachineError("within: must be longer than zero", field="within")
            if self.count == 1:
                raise MachineError("within: has no effect with count 1 (the event itself is always within)",
                                   field="within")
            object.__setattr__(self, "within", within)
        min_time = _seconds(self.min_time, "min_time")
        if min_time < 0:
            raise MachineError("min_time: must not be negative", field="min_time")
        object.__setattr__(self, "min_time", min_time)
        if not isinstance(self.to, str) or not self.to:
            raise MachineError(f"to: expected a state name, got {self.to!r}", field="to")

    def holds(self, rec: SenderRecord, event: str, now: float) -> bool:
        if now - rec.since < self.min_time:
            return False
        if self.count == 1:
            return True
        start = rec.since if self.within is None else max(rec.since, now - self.within)
        return sum(1 for t in rec.recent.get(event, ()) if t >= start) >= self.count

    def describe(self, event: str) -> str:
        text = event + (f" x{self.count}" if self.count > 1 else "")
        if self.within is not None:
            text += f" within {duration_text(self.within)}"
        if self.min_time:
            text += f", after {duration_text(self.min_time)} in state"
        return text


@dataclass(frozen=True, init=False)
class SenderState:
    """One key's state as a machine sees it now (decays applied). ``tracked`` is False for a
    key never seen (or forgotten): it is in the initial state."""

    machine: str
    key: str
    state: str
    since: float | None = None
    seen: float | None = None
    counts: dict = field(default_factory=dict)
    tracked: bool = False

    def __init__(self, machine: str, key: str, state: str, since: float | None = None,
                 seen: float | None = None, counts: dict | None = None, tracked: bool = False):
        # What the frozen dataclass's own __init__ does (one object.__setattr__ per field), in
        # half the time, as mail/message.py's Change: a message views its sender twice.
        self.__dict__.update(machine=machine, key=key, state=state, since=since, seen=seen,
                             counts={} if counts is None else counts, tracked=tracked)

    def as_dict(self) -> dict:
        return {"machine": self.machine, "key": self.key, "state": self.state, "since": self.since,
                "seen": self.seen, "counts": dict(self.counts), "tracked": self.tracked}


class Machine:
    """A declared state machine; see the module documentation.

    ``table``: ``{STATE: {event: NEXT | Transition | [Transition, ...]}}`` (a state with no
    way out is ``{}``); ``decay``: ``{STATE: (ttl, NEXT)}``; ``labels``: ``{STATE: text}``
    shown in the DOT graph (what the state does). Raises ``MachineError``."""

    def __init__(self, name: str, table: Mapping[str, Mapping[str, Any]], *, initial: str,
                 decay: Mapping[str, tuple[Any, str]] | None = None,
                 forget_after: Any = DEFAULT_FORGET_AFTER, labels: Mapping[str, str] | None = None):
        if not isinstance(name, str) or not _NAME.match(name):
            raise MachineError(f"a machine name is lower-case letters, digits, _ . - (up to 64), got {name!r}",
                               field="machine")
        self.name = name
        if not isinstance(table, Mapping) or not table:
            raise MachineError("a machine needs at least one state", field="states")
        self.states: dict[str, dict[str, tuple[Transition, ...]]] = {}
        for state, events in table.items():
            if not isinstance(state, str) or not _STATE.match(state):
                raise MachineError(f"a state name is lower-case letters, digits and _, got {state!r}", state=str(state))
            if events is None:
                events = {}
            if not isinstance(events, Mapping):
                raise MachineError(f"expected a mapping of event: next state, got {events!r}", state=state)
            self.states[state] = {ev: self._transitions(state, ev, nxt) for ev, nxt in events.items()}
        if initial not in self.states:
            raise MachineError(f"initial state {initial!r} is not one of the states ({', '.join(self.states)})",
                               field="initial")
        self.initial = initial
        self.decay: dict[str, tuple[float, str]] = {}
        for state, spec in (decay or {}).items():
            if state not in self.states:
                raise MachineError(f"decay of an unknown state {state!r}", state=str(state), field="ttl")
            try:
                ttl, target = spec
            except (TypeError, ValueError):
                raise MachineError(f"expected (ttl, next state), got {spec!r}", state=state, field="ttl") from None
            ttl = _seconds(ttl, "ttl", state)
            if ttl <= 0:
                raise MachineError("ttl: must be longer than zero", state=state, field="ttl")
            if target not in self.states:
                raise MachineError(f"decay_to: unknown state {target!r} (states: {', '.join(self.states)})",
                                   state=state, field="decay_to")
            if target == state:
                raise MachineError("decay_to: a state cannot decay to itself", state=state, field="decay_to")
            self.decay[state] = (ttl, target)
        self.forget_after = _seconds(forget_after, "forget_after")
        if self.forget_after <= 0:
            raise MachineError("forget_after: must be longer than zero", field="forget_after")
        self.labels = dict(labels or {})
        self._check_reachable()
        # how many times of each event to keep per key: the most any guard counts
        self.keep: dict[str, int] = {}
        for events in self.states.values():
            for ev, transitions in events.items():
                for t in transitions:
                    if t.count > 1:
                        self.keep[ev] = max(self.keep.get(ev, 0), t.count)

    def _transitions(self, state: str, event: Any, nxt: Any) -> tuple[Transition, ...]:
        try:
            check_event_name(event)
        except ValueError as e:
            raise MachineError(str(e), state=state, event=str(event)) from None
        items = list(nxt) if isinstance(nxt, (list, tuple)) else [nxt]
        if not items:
            raise MachineError("expected a next state or a list of guarded transitions", state=state, event=event)
        out = []
        for i, item in enumerate(items):
            index = i if isinstance(nxt, (list, tuple)) else None
            if isinstance(item, str):
                item = Transition(item)
            if not isinstance(item, Transition):
                raise MachineError(f"expected a state name or a Transition, got {item!r}", state=state, event=event,
                                   index=index)
            if item.to == state:
                raise MachineError(f"to: a transition from {state} to itself does nothing", state=state, event=event,
                                   index=index, field="to")
            out.append(item)  # targets are checked once every state is known (_check_reachable)
        return tuple(out)

    def _check_reachable(self) -> None:
        for state, events in self.states.items():
            for ev, transitions in events.items():
                for i, t in enumerate(transitions):
                    if t.to not in self.states:
                        raise MachineError(f"to: unknown state {t.to!r} (states: {', '.join(self.states)})",
                                           state=state, event=ev, index=i if len(transitions) > 1 else None,
                                           field="to")
        seen, todo = {self.initial}, [self.initial]
        while todo:
            state = todo.pop()
            nexts = [t.to for ts in self.states[state].values() for t in ts]
            if state in self.decay:
                nexts.append(self.decay[state][1])
            for n in nexts:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        for state in self.states:
            if state not in seen:
                raise MachineError(f"unreachable: no transition or decay leads here from the initial state "
                                   f"{self.initial!r}", state=state)

    def check_events(self, known: Iterable[str]) -> None:
        """MachineError for the first event in the table no rule can send."""
        known = set(known)
        for state, events in self.states.items():
            for ev in events:
                if ev not in known:
                    raise MachineError(f"no rule publishes the event {ev!r} (known: {', '.join(sorted(known))})",
                                       state=state, event=ev)

    # --- as documentation ---------------------------------------------------------------
    @property
    def table(self) -> dict[str, dict[str, str | list[Transition]]]:
        """``{STATE: {event: NEXT}}`` (a list where guards choose between several)."""
        return {s: {ev: (ts[0].to if len(ts) == 1 and ts[0] == Transition(ts[0].to) else list(ts))
                    for ev, ts in events.items()} for s, events in self.states.items()}

    def to_dot(self) -> str:
        """The machine as a Graphviz digraph: states (initial marked, labels below the name),
        guarded transitions as solid edges, decays as dashed ones."""
        lines = [f"digraph {_q(self.name)} {{", "  rankdir=LR;",
                 '  node [shape=box, style=rounded, fontname="Helvetica"];',
                 '  edge [fontname="Helvetica", fontsize=10];',
                 '  "__start__" [shape=point, label=""];',
                 f'  "__start__" -> {_q(self.initial)};']
        for state in self.states:
            label = state + (f"\n{self.labels[state]}" if self.labels.get(state) else "")
            extra = ", peripheries=2" if state == self.initial else ""
            lines.append(f"  {_q(state)} [label={_q(label)}{extra}];")
        for state, events in self.states.items():
            for ev, transitions in events.items():
                for t in transitions:
                    lines.append(f"  {_q(state)} -> {_q(t.to)} [label={_q(t.describe(ev))}];")
            if state in self.decay:
                ttl, target = self.decay[state]
                lines.append(f"  {_q(state)} -> {_q(target)} [label={_q('idle ' + duration_text(ttl))}, "
                             "style=dashed];")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # --- one key's record ---------------------------------------------------------------
    def new_record(self, key: str, now: float) -> SenderRecord:
        return SenderRecord(self.name, key, self.initial, now, now, now, now + self.forget_after)

    def settle(self, rec: SenderRecord | None, now: float) -> SenderRecord | None:
        """Apply forgetting and TTL decays up to ``now``, in place; None if forgotten or never seen."""
        if rec is None or rec.expires < now:
            return None
        if rec.state not in self.states:  # the machine changed under a stored key: start over
            rec.add_history(Change(now, "decay", rec.state, self.initial, "state no longer declared"))
            rec.state, rec.since, rec.recent = self.initial, now, {}
        while (due := self._decay_due(rec, now)) is not None:
            at, ttl, target = due
            rec.add_history(Change(at, "decay", rec.state, target, f"idle for {duration_text(ttl)}"))
            rec.state, rec.since, rec.recent = target, at, {}
        return rec

    def _decay_due(self, rec: SenderRecord, now: float) -> tuple[float, float, str] | None:
        """The decay of the record's state that has run out by ``now``: (when, ttl, target)."""
        decay = self.decay.get(rec.state)
        if decay is None:
            return None
        at = max(rec.since, rec.seen) + decay[0]
        return None if at > now else (at, *decay)

    def _view_now(self, rec: SenderRecord | None, key: str, now: float) -> SenderState:
        """The view of ``rec`` settled at ``now``, leaving ``rec`` as it is (the store's own,
        ``SenderStore.read``): settled on a copy only when that would change it."""
        if rec is None or rec.expires < now:
            return self.view(key, None)
        if rec.state in self.states and self._decay_due(rec, now) is None:
            return self.view(key, rec)  # only read: the store's record is never settled in place
        # (a copy: the database thread may take the store's record meanwhile; settle writes)
        return self.view(key, self.settle(rec.copy(), now))

    def fire(self, rec: SenderRecord, event: Event, now: float) -> Change | None:
        """Count ``event`` and take the first transition whose guards hold, in place.

        Events are applied in the order the store serialises them; one stamped before the
        key entered its state (another gate's clock, a transaction that started earlier)
        counts as happening in it, at the moment it entered."""
        now = max(now, rec.since)
        name = event.name
        rec.counts[name] = rec.counts.get(name, 0) + 1
        keep = self.keep.get(name, 0)
        if keep:
            times = rec.recent.setdefault(name, [])
            times.append(now)
            del times[:-keep]
        rec.seen = max(rec.seen, now)
        rec.expires = rec.seen + self.forget_after
        for t in self.states[rec.state].get(name, ()):
            if t.holds(rec, name, now):
                why = event.why or t.describe(name)
                change = Change(now, name, rec.state, t.to, why if t.count == 1 else f"{t.describe(name)}: {why}",
                                event.rule)
                rec.add_history(change)
                rec.state, rec.since, rec.recent = t.to, now, {}
                return change
        return None

    def view(self, key: str, rec: SenderRecord | None) -> SenderState:
        if rec is None:
            return SenderState(self.name, key, self.initial)
        return SenderState(self.name, key, rec.state, rec.since, rec.seen, dict(rec.counts), True)

    # --- through a store (atomic) -------------------------------------------------------
    async def current(self, store, key: str, now: float) -> SenderState:
        """The key's state now (decays applied in memory; written at the next update)."""
        return await store.read(self.name, key, self._view_now, key, now)

    async def feed(self, store, key: str, events: Iterable[Event], now: float) -> tuple[SenderState, list[Change]]:
        """Apply ``events`` to the key atomically: (its state after, the transitions made)."""
        events = list(events)

        def change(stored):
            rec = self.settle(stored, now) or self.new_record(key, now)
            made = []
            for ev in events:
                c = self.fire(rec, ev, now)
                if c is not None:
                    made.append(c)
            return rec, (self.view(key, rec), made)
        return await store.update(self.name, key, change, now=now)

    async def move(self, store, key: str, state: str, now: float, why: str, rule: str | None = "cli") -> Change:
        """Put the key in ``state`` by hand (event ``manual``, recorded in its history)."""
        if state not in self.states:
            raise MachineError(f"unknown state {state!r} (states: {', '.join(self.states)})")

        def change(stored):
            rec = self.settle(stored, now) or self.new_record(key, now)
            rec.counts["manual"] = rec.counts.get("manual", 0) + 1
            made = Change(now, "manual", rec.state, state, why, rule)
            rec.add_history(made)
            rec.state, rec.since, rec.recent = state, now, {}
            rec.seen = max(rec.seen, now)
            rec.expires = rec.seen + self.forget_after
            return rec, made
        return await store.update(self.name, key, change, now=now)

    async def hit(self, store, key: str, now: float, limit: int, per: float) -> tuple[bool, int]:
        """Count one transaction of the key against a rate of ``limit`` per ``per`` seconds:
        (over the rate?, transactions in the window). Refused ones are not counted."""
        def change(stored):
            rec = self.settle(stored, now) or self.new_record(key, now)
            rec.hits = [t for t in rec.hits if t > now - per][-limit:]
            over = len(rec.hits) >= limit
            if not over:
                rec.hits.append(now)
            return rec, (over, len(rec.hits))
        return await store.update(self.name, key, change, now=now)

    def __repr__(self):
        return f"<Machine {self.name}: {', '.join(self.states)}>"


def _q(text: str) -> str:
    """A DOT double-quoted ID."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
