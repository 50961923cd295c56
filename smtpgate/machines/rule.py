"""``MachineRule``: a rule that keeps a ``Machine`` per key, Lamson style, at SMTP time.

A subclass names its ``machine`` (a ``smtpgate.Machine``), the ``key`` it tracks
(``sender``, ``sender_domain``, ``client_ip`` or ``client_net``) and, optionally, state
handlers decorated with ``@state("NAME")`` (``at="mail"`` by default, or ``"rcpt"`` /
``"data"``) that run while the key is in that state and may return a ``Verdict``::

    class Reputation(MachineRule):
        name = "reputation"
        key = "sender_domain"
        machine = Machine("reputation", {"unknown": {...}, ...}, initial="unknown")

        @state("bad")
        async def refuse(self, tx, sender):
            return Verdict.reject(f"Mail from {sender.key} is refused for now", 554)

The base class does the rest: at MAIL it loads the key's state (``tx.sender_state(machine)``
for every later rule), at each stage it runs the handlers of that state, and when the
transaction ends (``on_end``) it feeds the transaction's events — what rules published with
``tx.results.event`` and the pipeline's own — to the machine, atomically in the gate's store
(``self.gate.stores.senders``). Each event name counts once per transaction; the rule's
own refusals are not fed back to it.
"""
from __future__ import annotations

import inspect
import ipaddress
from typing import Callable

from ..mail.keys import client_key, sender_key
from ..pipeline.results import Event
from ..errors import OptionError, PluginError, StoreError
from .machine import Machine, MachineError, SenderState, known_events
from ..pipeline.rule import Rule

KEY_KINDS = ("sender", "sender_domain", "client_ip", "client_net")
STAGES = ("mail", "rcpt", "data")


def state(name: str, at: str = "mail") -> Callable:
    """Mark an ``async def handler(self, tx, sender)`` (at ``rcpt``: ``(self, tx, rcpt,
    sender)``) to run while the key is in state ``name``, at stage ``at``."""
    if at not in STAGES:
        raise ValueError(f"at: expected one of {', '.join(STAGES)}, got {at!r}")

    def mark(fn):
        fn.__smtpgate_state__ = (name, at)
        return fn
    return mark


class MachineRule(Rule):
    """Base class of rules that keep a state machine per key; see the module documentation."""

    #: the state machine (a ``smtpgate.Machine``); set on the class or in ``setup``
    machine: Machine | None = None
    #: what a key is: sender | sender_domain | client_ip | client_net
    key: str = "sender"
    #: the networks ``client_net`` keys by
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    #: events this rule (or its machine's users) publish beyond the known ones
    publishes: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        try:
            where = f"{inspect.getsourcefile(cls) or cls.__module__}: {cls.__qualname__}"
        except TypeError:  # made at run time, without a file
            where = f"{cls.__module__}: {cls.__qualname__}"
        handlers: dict[tuple[str, str], list[str]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                mark = getattr(value, "__smtpgate_state__", None)
                if mark is None:
                    continue
                if not inspect.iscoroutinefunction(value):
                    raise PluginError(f"{where}: state handler {attr} must be 'async def'")
                want = 4 if mark[1] == "rcpt" else 3
                params = [p for p in inspect.signature(value).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                if len(params) != want:
                    args = "self, tx, rcpt, sender" if want == 4 else "self, tx, sender"
                    raise PluginError(f"{where}: state handler {attr} must take ({args})")
                handlers.setdefault(mark, []).append(attr)
        cls._state_handlers = handlers
        if isinstance(vars(cls).get("machine"), Machine):
            unknown = sorted({s for s, _ in handlers} - set(cls.machine.states))
            if unknown:
                raise PluginError(f"{where}: state handler for unknown state(s) {', '.join(unknown)} "
                                  f"(states: {', '.join(cls.machine.states)})")

    def __init__(self, options: dict | None = None, gate=None):
        super().__init__(options, gate)
        if not hasattr(self, "_handlers"):  # a setup() of the subclass's own did not call ours
            self.check_machine()

    def setup(self) -> None:
        self.check_machine()

    def check_machine(self) -> None:
        """Refuse, at load time, a machine that is missing or sends events no rule publishes."""
        if not isinstance(self.machine, Machine):
            raise OptionError("machine", "this rule has no state machine (set `machine = Machine(...)`)")
        if self.key not in KEY_KINDS:
            raise OptionError("key", f"expected one of {', '.join(KEY_KINDS)}, got {self.key!r}")
        try:
            self.machine.check_events(known_events() | set(self.publishes))
        except MachineError as e:
            raise OptionError(self.error_key(e), e.detail) from None
        self._handlers: dict[tuple[str, str], list[Callable]] = {
            mark: [getattr(self, attr) for attr in attrs] for mark, attrs in type(self)._state_handlers.items()}
        for stage in ("rcpt", "data"):  # no handler at a stage: the pipeline need not call us there
            if not any(at == stage for _, at in self._handlers) and getattr(type(self), f"on_{stage}") is \
                    getattr(MachineRule, f"on_{stage}"):
                setattr(self, f"on_{stage}", None)

    def error_key(self, e: MachineError) -> str:
        """Where a MachineError points, as an option path (the YAML rule overrides it)."""
        return "machine"

    def add_handler(self, state_name: str, at: str, fn: Callable) -> None:
        """Register ``async fn(tx, sender)`` (at rcpt: ``fn(tx, rcpt, sender)``) for a state,
        in ``setup`` (the policy reads the rule's hooks once, after it: later, a stage whose
        hook was cleared would stay uncalled); decorated methods come first."""
        if at not in STAGES:
            raise ValueError(f"at: expected one of {', '.join(STAGES)}, got {at!r}")
        self._handlers.setdefault((state_name, at), []).append(fn)
        self.__dict__.pop(f"on_{at}", None)  # the stage's hook is needed again

    # --- keys ---------------------------------------------------------------------------
    def normalise_key(self, text: str) -> str | None:
        """A key as the rule stores it, from what a user typed (the CLI) or the envelope."""
        text = text.strip()
        if self.key == "sender":
            return sender_key(text)
        if self.key == "sender_domain":
            domain = text.rpartition("@")[2].strip("<>").lower().rstrip(".")
            return domain or None
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                return None
            text = str(net.network_address)
        if self.key == "client_ip":
            return client_key(text)
        return client_key(text, self.ipv4_prefix, self.ipv6_prefix)

    def key_of(self, tx) -> str | None:
        """The key of a transaction (None: not tracked, like the null sender)."""
        if self.key in ("sender", "sender_domain"):
            return self.normalise_key(tx.sender) if tx.sender else None
        return self.normalise_key(tx.session.client_ip)

    def _store(self):
        store = getattr(getattr(self.gate, "stores", None), "senders", None)
        if store is None:
            raise StoreError(f"the {self.name} rule needs the gate's sender-state store (state:)")
        return store

    def _owns(self, tx) -> bool:
        """Whether this instance feeds its machine in this transaction: not when another rule
        instance of the same machine name does (a policy re-listing the rule): events count once."""
        return tx.machine_owners.setdefault(self.machine.name, self) is self

    # --- the Python API -----------------------------------------------------------------
    async def current(self, key: str) -> SenderState:
        """A key's state now."""
        return await self.machine.current(self._store(), key, self.clock.now())

    async def feed(self, key: str, events, why: str | None = None):
        """Apply events (names or ``Event``s) to a key now: (state after, transitions)."""
        events = [e if isinstance(e, Event) else Event(e, self.name, why) for e in events]
        return await self.machine.feed(self._store(), key, events, self.clock.now())

    async def move(self, key: str, state_name: str, why: str, rule: str | None = "cli"):
        return await self.machine.move(self._store(), key, state_name, self.clock.now(), why, rule)

    async def hit(self, key: str, limit: int, per: float) -> tuple[bool, int]:
        return await self.machine.hit(self._store(), key, self.clock.now(), limit, per)

    # --- hooks --------------------------------------------------------------------------
    async def on_mail(self, tx):
        if not self._owns(tx):
            return None
        key = self.key_of(tx)
        if key is None:
            tx.results.add(self, data={"key": key})
            return None
        try:
            view = await self.current(key)
        except BaseException:
            tx.results.add(self, data={"key": key})  # on_end feeds the key the store could not read
            raise
        tx.states[self.machine.name] = view
        # one entry for what the two steps above would add (the same record, data and trace)
        tx.results.add(self, msg=f"{key}: {view.state}", data={"key": key, "state": view.state})
        if (view.state, "mail") not in self._handlers:
            return None
        return await self._run(tx, "mail", view, ())

    async def on_rcpt(self, tx, rcpt):
        view = tx.states.get(self.machine.name)
        if view is None or (view.state, "rcpt") not in self._handlers or not self._owns(tx):
            return None
        return await self._run(tx, "rcpt", view, (rcpt,))

    async def on_data(self, tx):
        view = tx.states.get(self.machine.name)
        if view is None or (view.state, "data") not in self._handlers or not self._owns(tx):
            return None
        return await self._run(tx, "data", view, ())

    async def _run(self, tx, stage: str, view: SenderState, extra: tuple):
        # Shadow mode is the pipeline's: it ignores the verdict and undoes tx.skip calls.
        for fn in self._handlers.get((view.state, stage), ()):
            verdict = await fn(tx, *extra, view)
            if verdict is not None:
                return verdict
        return None

    def events_of(self, tx) -> list[Event]:
        """The transaction's events for this machine: each name once (its first
        occurrence), without this rule's own refusals."""
        out, names = [], set()
        for ev in tx.results.events:
            if ev.name in names or (ev.name == "rejected" and ev.rule == self.name):
                continue
            names.add(ev.name)
            out.append(ev)
        return out

    async def on_end(self, tx, reply):
        if not self._owns(tx):
            return None
        record = tx.results.get(self)
        key = record.data["key"] if record is not None and "key" in record.data else self.key_of(tx)
        events = self.events_of(tx) if key is not None else []
        if not events:
            return None
        view, made = await self.feed(key, events)
        tx.results.add(self, data={"fed": [e.name for e in events], "after": view.state,
                                   "transitions": [c.as_dict() for c in made]})
        moves = "; ".join(f"{c.src} -> {c.dst} ({c.event})" for c in made)
        return f"{key}: {moves or view.state}"
