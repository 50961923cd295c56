"""Test doubles and harnesses for rule authors (and for smtpgate's own tests).

Run a rule, or a whole policy, on a message and an envelope in a unit test without a
network, with a clock you move by hand and a scripted downstream — and read the same trace
the server logs::

    from smtpgate.testing import Harness, FakeClock

    async def test_my_rule():
        h = Harness([(MyRule, {"threshold": 3})], domains=["example.com"])
        result = await h.send(b"Subject: hi\\r\\n\\r\\nbody\\r\\n",
                              sender="a@sender.example", recipients=["bob@example.com"])
        assert result.reply.code == 250
        assert [e.rule for e in result.trace] == ["my_rule"]
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Iterable

from .clock import Clock
from .config import load_gate_config
from .errors import RelayError
from .runtime.gate import Gate, Runtime
from .mail.reply import Reply
from .smtp.offline import Dialogue, simulate
from .smtp.relay_api import Capabilities, mail_then_rcpt
from .pipeline.policy import Policy, PolicySet
from .resolver import DEFAULT_SESSION_BUDGET, BaseResolver, DnsAnswer, DnsError
from .pipeline.rule import GateContext, Rule, check_rule_class
from .stores import Stores, open_stores

__all__ = ["CommandResult", "run_command", "FakeClock", "FakeQuarantine", "FakeRelay", "FakeResolver", "Harness", "Dialogue", "Relayed", "run_rule",
           "message", "load_plugin"]


class FakeClock(Clock):
    """A clock that moves only when told: ``clock.advance(300)``."""

    def __init__(self, start: float = 1_767_225_600.0):  # 2026-01-01T00:00:00Z
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds


class FakeQuarantine:
    """Keeps held messages in a list: ``harness.quarantine.held[0]["raw"]`` (and ``["id"]``,
    ``["verdict"]``, ``["tx"]``). ``deleted`` lists the ids the gate dropped again."""

    def __init__(self):
        self.held: list[dict] = []
        self.deleted: list[str] = []

    def put(self, tx, raw: bytes, verdict) -> str:
        qid = str(len(self.held) + len(self.deleted) + 1)
        self.held.append({"id": qid, "tx": tx, "raw": raw, "verdict": verdict})
        return qid

    def delete(self, qid: str) -> None:
        self.held = [h for h in self.held if h["id"] != qid]
        self.deleted.append(qid)


@dataclass
class Relayed:
    """What a fake downstream received for one message."""

    sender: str
    params: list[str]
    recipients: list[str]
    #: the pieces the gate handed over (``data`` joins them once, when a test asks): a join
    #: here would be harness work the real relay does not do, and bench/rulecost_profile.py
    #: would charge it to every rule that edits the message
    pieces: list | None = field(default=None, repr=False)

    @property
    def data(self) -> bytes | None:
        if self.pieces is not None and len(self.pieces) != 1:
            self.pieces = [b"".join(self.pieces)]
        return bytes(self.pieces[0]) if self.pieces is not None else None


class FakeRelay:
    """A scripted downstream: says 250 to everything unless ``replies`` says otherwise.

    The same interface as the real downstream (``smtpgate.smtp.relay_api.Relay``, a test
    checks it), so a conversation given one runs exactly as in the server. ``replies`` keys:
    ``"open"`` (a ``RelayError`` to raise: the downstream cannot be reached), ``"mail"``,
    ``"rcpt"``, ``"rcpt:<address>"``, ``"data"``. Values are Reply objects or reply strings
    (``"550 5.1.1 no such user"``); an exception instance (``RelayError(..., reply)``: the
    downstream lost) is raised instead. ``capabilities``: what its EHLO offered (by default
    the safe minimum). Every message it accepted is in ``relayed``.
    """

    def __init__(self, replies: dict | None = None, capabilities: Capabilities | None = None):
        self.replies = dict(replies or {})
        self.capabilities = capabilities or Capabilities()
        self.relayed: list[Relayed] = []
        self.connected = False
        self.in_transaction = False
        self._current: Relayed | None = None

    def _scripted(self, *keys: str, default: Reply) -> Reply:
        for key in keys:
            if key in self.replies:
                value = self.replies[key]
                if isinstance(value, RelayError):  # the downstream lost: as the real relay, drop it
                    self.connected, self.in_transaction, self._current = False, False, None
                if isinstance(value, BaseException):
                    raise value
                return value if isinstance(value, Reply) else Reply.parse(value)
        return default

    async def open(self, session) -> None:
        value = self.replies.get("open")
        if isinstance(value, BaseException):
            raise value
        self.connected = True

    async def mail(self, wire_sender: str, params: list[str], ident: str | None = None,
                   utf8: bool = False) -> Reply:
        reply = self._scripted("mail", default=Reply(250, "Ok", "2.1.0"))
        if reply.is_positive:
            self._current = Relayed(wire_sender.strip("<>"), list(params), [])
            self.in_transaction = True
        return reply

    async def rcpt(self, wire_recipient: str, params: list[str], utf8: bool = False) -> Reply:
        address = wire_recipient.strip("<>")
        reply = self._scripted(f"rcpt:{address}", "rcpt", default=Reply(250, "Ok", "2.1.5"))
        if reply.is_positive:
            self._current.recipients.append(address)
        return reply

    mail_rcpt = mail_then_rcpt  # one command at a time, as a relay without pipelining

    async def data(self, raw) -> Reply:
        """``raw``: the message's bytes, or its pieces in order (as the real relay takes it)."""
        reply = self._scripted("data", default=Reply(250, "Ok: queued", "2.0.0"))
        self._current.pieces = [raw] if isinstance(raw, bytes) else list(raw)
        if reply.is_positive:
            self.relayed.append(self._current)
        self._current, self.in_transaction = None, False
        return reply

    async def reset(self) -> None:
        self._current, self.in_transaction = None, False

    async def close(self) -> None:
        self.connected = False


class FakeResolver(BaseResolver):
    """DNS answers from a dict: ``{("4.3.2.1.zen.test", "A"): ["127.0.0.2"]}``; missing = NXDOMAIN.

    The same interface as the real resolver (``resolve``, ``ptr``, ``fcrdns``,
    ``for_session``, ``DnsError``). A value ``"SERVFAIL"``, ``"TIMEOUT"`` or ``"REFUSED"`` (or
    a ``DnsError``) makes that lookup fail. ``latency={("name", "TYPE"): seconds}`` moves the
    clock by that much per lookup, so session budgets are tested without waiting. Every lookup
    is recorded in ``queries``; no cache unless ``cache=True``."""

    def __init__(self, records: dict[tuple[str, str], list[str] | str] | None = None, *,
                 clock: FakeClock | None = None, latency: dict | None = None,
                 session_budget: float = DEFAULT_SESSION_BUDGET, cache: bool = False, ttl: float = 300.0):
        super().__init__(clock, session_budget=session_budget, cache=cache)
        self.records = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in (records or {}).items()}
        self.latency = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in (latency or {}).items()}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rdtype: str, values: list[str] | str) -> None:
        self.records[name.lower().rstrip("."), rdtype.upper()] = values

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        key = (name, rdtype)
        self.queries.append(key)
        if key in self.latency and hasattr(self._clock(), "advance"):
            self._clock().advance(self.latency[key])
        value = self.records.get(key, [])
        if isinstance(value, DnsError):
            raise value
        if isinstance(value, str) and value.upper() in ("SERVFAIL", "TIMEOUT", "REFUSED"):
            raise DnsError(value.lower(), name, rdtype, "scripted by FakeResolver")
        values = tuple([value] if isinstance(value, str) else value)
        return DnsAnswer(name, rdtype, values, self.ttl, nxdomain=not values)


def message(subject: str = "test", body: str = "hello\r\n", headers: dict | None = None) -> bytes:
    """A small well-formed message (CRLF line ends) for tests."""
    lines = [f"From: sender@sender.example", "To: rcpt@example.com", f"Subject: {subject}",
             "Message-ID: <test@sender.example>"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


class Harness:
    """A gate with a fake downstream, built from rules in code or from a gate.yaml.

    Keep one harness across sends to test state that lives between transactions (move
    ``harness.clock`` between them). ``hostname``: the gate's name (default: this host's),
    the authserv-id of the Authentication-Results header the gate writes."""

    def __init__(self, rules: Iterable[tuple[type[Rule], dict] | Rule] = (), *,
                 domains: Iterable[str] = ("example.com",), clock: FakeClock | None = None,
                 resolver: FakeResolver | None = None, relay_replies: dict | None = None,
                 session_rules: bool = True, config=None, stores: Stores | None = None,
                 state: str = "sqlite://:memory:", hostname: str | None = None):
        self.clock = clock or FakeClock()
        self.resolver = _with_clock(resolver or FakeResolver(), self.clock)
        # The gate's stores: `stores=` to share them between harnesses (two "gates"), else
        # opened from `state` — by default an in-memory SQLite database, nothing on disk.
        self._own_stores = stores is None
        self.stores = stores if stores is not None else open_stores(state, self.clock)
        self.context = GateContext(clock=self.clock, resolver=self.resolver, stores=self.stores)
        rules = list(rules)
        for r in rules:  # refused as the gate would at load time (hook arguments, options)
            cls = type(r) if isinstance(r, Rule) else r[0]
            check_rule_class(cls, _source_of(cls))
        built = [r if isinstance(r, Rule) else r[0](r[1], self.context) for r in rules]
        domains = tuple(domains)
        exact = tuple(d.lower() for d in domains if not d.startswith("."))
        suffixes = tuple(d.lower() for d in domains if d.startswith("."))
        # One policy named "default": its rules run at every stage, as in a one-policy gate.
        policy = Policy("default" if session_rules else "test", exact, suffixes, built, "<test>")
        config = config or load_gate_config(None)
        if hostname is not None:  # the gate's name: its greeting, its Authentication-Results id
            config = replace(config, hostname=hostname)
        self.runtime = Runtime(config, None, PolicySet([policy]), self.stores)
        self.relay_replies = relay_replies
        self._make_gate()

    @classmethod
    def from_config(cls, path: str, **kwargs) -> "Harness":
        """The policies, plugins and options of a real gate.yaml, with fakes for the outside."""
        from .runtime.loading import load_runtime
        h = cls.__new__(cls)
        h.clock = kwargs.get("clock") or FakeClock()
        h.resolver = _with_clock(kwargs.get("resolver") or FakeResolver(), h.clock)
        h.runtime = load_runtime(path, clock=h.clock, resolver=h.resolver, stores=kwargs.get("stores"))
        h.stores = h.runtime.stores
        h._own_stores = h.stores is not kwargs.get("stores")
        h.context = GateContext(clock=h.clock, resolver=h.resolver, stores=h.stores)
        h.relay_replies = kwargs.get("relay_replies")
        h._make_gate()
        return h

    def _make_gate(self) -> None:
        self.relays: list[FakeRelay] = []

        def relay(gate):
            r = FakeRelay(self.relay_replies)
            self.relays.append(r)
            return r

        self.quarantine = FakeQuarantine()
        self.gate = Gate(self.runtime, self.clock, relay, self.quarantine)

    @property
    def relayed(self) -> list[Relayed]:
        """Every message the fake downstream accepted, across sends."""
        return [m for r in self.relays for m in r.relayed]

    async def send(self, raw: bytes | None = None, *, sender: str = "sender@sender.example",
                   recipients: Iterable[str] = ("rcpt@example.com",), client_ip: str = "192.0.2.1",
                   helo: str = "mail.sender.example", client_name: str | None = None) -> Dialogue:
        return await simulate(self.gate, raw if raw is not None else message(), sender,
                              list(recipients), client_ip=client_ip, helo=helo,
                              client_name=client_name)

    async def aclose(self) -> None:
        """Close the stores the harness opened itself (not ones passed in with ``stores=``)."""
        if self._own_stores and self.stores is not None:
            await self.stores.close()

    async def __aenter__(self) -> "Harness":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def run_rule(rule: type[Rule], options: dict | None = None, raw: bytes | None = None,
                   **envelope) -> Dialogue:
    """One message through one rule: ``await run_rule(MyRule, {"x": 1}, raw, sender=...)``."""
    domains = envelope.pop("domains", None)
    if domains is None:
        rcpts = envelope.get("recipients", ("rcpt@example.com",))
        domains = sorted({r.rpartition("@")[2].strip("<>").lower() for r in rcpts})
    harness = Harness([(rule, options or {})], domains=domains, clock=envelope.pop("clock", None),
                      stores=envelope.pop("stores", None),
                      relay_replies=envelope.pop("relay_replies", None))
    try:
        return await harness.send(raw, **envelope)
    finally:
        await harness.aclose()


def _with_clock(resolver, clock):
    """A resolver without a clock of its own takes the harness's (cache TTLs, DNS budgets)."""
    if getattr(resolver, "clock", False) is None:
        resolver.clock = clock
    return resolver


def load_plugin(path) -> ModuleType:
    """Load a plugin file by its path, as the gate loads a file of a ``plugins:`` folder,
    and return its module: ``SubjectWords = load_plugin(HERE / "subject_words.py").SubjectWords``.
    The gate's load-time checks apply (hooks, signatures, options, a name another installed
    rule has): PluginError naming the file and line, as ``smtpgate check-config`` would."""
    from .errors import PluginError
    from .pipeline.plugins import PluginRegistry
    installed: list = []  # an installed rule's own problems are not this plugin's
    registry = PluginRegistry.load(problems=installed)
    problems: list = []
    module = registry.load_file(os.fspath(path), problems)
    if problems:
        raise PluginError("\n".join(map(str, problems)))
    return module


@dataclass
class CommandResult:
    """What ``run_command`` saw: the exit status and what was printed."""

    code: int
    stdout: str
    stderr: str


def run_command(argv: list[str], commands: dict | None = None) -> CommandResult:
    """Run ``smtpgate ARGV`` in this process, with ``commands`` (``{name: add_parser}``)
    added as a package's ``smtpgate.commands`` entry points would add them, so a plugin's
    tests try its own command without installing it:
    ``run_command(["subject-words", "--json", "-c", cfg], {"subject-words": add_parser})``."""
    import contextlib
    import io
    from .cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv, commands)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    return CommandResult(code, out.getvalue(), err.getvalue())


def _source_of(cls: type) -> str:
    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:  # made at run time
        return cls.__module__
