"""The one channel rules report through: per rule, outcomes, messages, data and events.

Modelled on Haraka's ``txn.results``. Each ``Transaction`` and ``Session`` has a ``results``
(a ``Results``); a rule writes its own record with ``add`` and publishes events for the sender
state machines with ``event``; later rules read any record with ``get``. Authentication
methods (spf, dkim, dmarc, iprev, arc) also report their RFC 8601 result with ``auth``: the
gate writes them all into its one ``Authentication-Results`` header (``pipeline/authheader.py``).
A hook reports in its stage's results
(``session.results`` at CONNECT and HELO, ``tx.results`` from MAIL on); the pipeline writes
what it added there into the hook's trace entry (hence the log line and ``smtpgate try``),
and marks the records and events of a shadow rule as shadow: a shadow rule's events never
reach the state machines.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..logs import LogField

#: the outcome kinds, in the order a record is summarised
OUTCOMES = ("fail", "err", "pass", "skip", "msg")
_EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def check_event_name(name: str) -> str:
    """An event name: lower-case letters, digits and ``_``, starting with a letter. ValueError if not."""
    if not isinstance(name, str) or not _EVENT_NAME.match(name):
        raise ValueError(f"an event name is lower-case letters, digits and _ (like dnsbl_listed), got {name!r}")
    return name


def one_line(text, limit: int = 200) -> str | None:
    """``text`` as one printable line of at most ``limit`` characters (None stays None)."""
    if text is None:
        return None
    text = str(text)
    if (text.isprintable() and len(text) <= limit and "  " not in text
            and not text.startswith(" ") and not text.endswith(" ")):
        return text  # already one clean line, the usual case: no copies
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass(frozen=True)
class Event:
    """Something that happened in a transaction, for the sender state machines: ``name``
    (``delivered``, ``greylisted``, ...), the ``rule`` that published it and ``why``."""

    name: str
    rule: str | None = None
    why: str | None = None


#: RFC 8601 result keywords a method may report (§2.7; arc adds none of its own)
AUTH_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy")
_AUTH_METHOD = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
_AUTH_PROPERTY = re.compile(r"^([a-z][a-z0-9-]*)_([a-z][a-z0-9_-]*)\Z")


@dataclass(frozen=True)
class AuthResult:
    """One authentication method's result for the gate's ``Authentication-Results`` header
    (RFC 8601): ``dkim=fail reason="body hash" header.d=example.org header.s=sel``.
    ``properties`` are ``(ptype, property, value)``: ``("header", "d", "example.org")``.
    ``header``: this result asks for the header to be written (an iprev result alone does
    not, so a policy with only fcrdns keeps messages byte-identical); once written, the
    header carries every result, asked or not. ``rule`` and ``shadow`` as in ``RuleResult``."""

    method: str
    result: str
    reason: str | None = None
    comment: str | None = None
    properties: tuple[tuple[str, str, str], ...] = ()
    header: bool = True
    rule: str | None = None
    shadow: bool = False

    def get(self, ptype: str, name: str) -> str | None:
        """A property's value: ``r.get("header", "d")``."""
        return next((v for t, n, v in self.properties if (t, n) == (ptype, name)), None)


@dataclass
class RuleResult:
    """What one rule reported. Outcome lists hold one-line texts, each once, in order:
    ``pass_`` (checked and fine), ``fail`` (checked and bad), ``skip`` (not checked, and why),
    ``err`` (could not check), ``msg`` (anything else worth a line). ``data`` is free-form,
    for later rules (JSON-friendly values: it goes to the JSON log line). ``events``: the
    names this rule published. ``auth``: its authentication results (``Results.auth``).
    ``shadow``: the rule runs in shadow mode."""

    rule: str
    pass_: list[str] = field(default_factory=list)
    fail: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    msg: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    auth: list[AuthResult] = field(default_factory=list)
    shadow: bool = False

    @property
    def outcome(self) -> str | None:
        """The record in one word: ``fail`` beats ``err`` beats ``pass`` beats ``skip``;
        None when it holds only messages or data."""
        # OUTCOMES' order, written out: this runs for every record of every log line
        return ("fail" if self.fail else "err" if self.err else "pass" if self.pass_
                else "skip" if self.skip else None)

    def as_dict(self) -> dict:
        out: dict[str, Any] = {}  # OUTCOMES' order, written out (once per record per JSON line)
        if self.fail:
            out["fail"] = list(self.fail)
        if self.err:
            out["err"] = list(self.err)
        if self.pass_:
            out["pass"] = list(self.pass_)
        if self.skip:
            out["skip"] = list(self.skip)
        if self.msg:
            out["msg"] = list(self.msg)
        if self.data:
            out["data"] = self.data
        if self.events:
            out["events"] = list(self.events)
        if self.auth:
            out["auth"] = [_auth_text(a) for a in self.auth]
        if self.shadow:
            out["shadow"] = True
        return out


def _auth_text(a: AuthResult) -> str:
    """``dkim=fail header.d=example.org (body hash)``: for logs and the trace."""
    props = "".join(f" {t}.{n}={v}" for t, n, v in a.properties)
    return f"{a.method}={a.result}{props}" + (f" ({a.reason})" if a.reason else "")


class Results:
    """Every rule's record for one transaction (``tx.results``) or connection
    (``session.results``), and the events published for the sender state machines."""

    def __init__(self) -> None:
        self._records: dict[str, RuleResult] = {}
        self._events: list[Event] = []
        self._journal: list[tuple[str, str, str]] = []  # (rule, kind, text): for the trace
        # (rule name, shadow) of the hook running now: set by the pipeline (runner.py)
        self._current: tuple[str, bool] | None = None

    def add(self, rule, *, pass_: str | None = None, fail: str | None = None, skip: str | None = None,
            err: str | None = None, msg: str | None = None,
            data: Mapping[str, Any] | None = None) -> RuleResult:
        """Add to ``rule``'s record (a rule or its name): each given text is appended to its
        outcome list (once: the same text twice is kept once), ``data`` is merged into
        ``record.data``. Returns the record. ``tx.results.add(self, fail="listed in zen",
        data={"score": 2})``."""
        record = self._record(rule)
        if pass_ is not None:
            self._note(record, "pass", record.pass_, pass_)
        if fail is not None:
            self._note(record, "fail", record.fail, fail)
        if skip is not None:
            self._note(record, "skip", record.skip, skip)
        if err is not None:
            self._note(record, "err", record.err, err)
        if msg is not None:
            self._note(record, "msg", record.msg, msg)
        if data:
            record.data.update(data)
        return record

    def _note(self, record: RuleResult, kind: str, bucket: list[str], text) -> None:
        line = one_line(text) or ""
        if line not in bucket:
            bucket.append(line)
            self._journal.append((record.rule, kind, line))

    def event(self, rule, name: str, why: str | None = None) -> Event:
        """Publish event ``name`` for the sender state machines (``rules/senders``), from
        ``rule`` (a rule or its name), with a short ``why``: ``tx.results.event(self,
        "banned_attachment", why="invoice.exe")``. Noted in the rule's record too. A shadow
        rule's event is noted but not published."""
        ev = Event(check_event_name(name), _name(rule), one_line(why))
        record = self._record(rule)
        record.events.append(ev.name)
        self._journal.append((record.rule, "event", ev.name))
        if not record.shadow:
            self._events.append(ev)
        return ev

    def auth(self, rule, method: str, result: str, *, reason: str | None = None,
             comment: str | None = None, header: bool = True, **properties: str | None) -> AuthResult:
        """Report ``method``'s RFC 8601 ``result`` from ``rule`` (a rule or its name) for the
        gate's ``Authentication-Results`` header. Properties are keyword arguments named
        ``ptype_property``, as the ``authres`` package names them (None values are left out)::

            tx.results.auth(self, "dkim", "fail", reason="body hash did not verify",
                            header_d="example.org", header_s="sel1")

        ``header=False``: record it, but do not ask for the header on its own (see
        ``AuthResult``). Noted in the rule's record (``record.auth``) and the trace; a shadow
        rule's result is recorded but never written. ValueError on a bad method, result or
        property name."""
        if not isinstance(method, str) or not _AUTH_METHOD.match(method):
            raise ValueError(f"an authentication method is a lower-case token like dkim, got {method!r}")
        if result not in AUTH_RESULTS:
            raise ValueError(f"an authentication result is one of {', '.join(AUTH_RESULTS)}, got {result!r}")
        props = []
        for key, value in properties.items():
            m = _AUTH_PROPERTY.match(key)
            if m is None:
                raise ValueError(f"a property is named ptype_property (header_d, smtp_mailfrom), got {key!r}")
            if value is not None:
                props.append((m.group(1), m.group(2).replace("_", "-"), one_line(value, 300)))
        record = self._record(rule)
        entry = AuthResult(method, result, one_line(reason), one_line(comment), tuple(props), bool(header),
                           record.rule, record.shadow)
        record.auth.append(entry)
        self._journal.append((record.rule, "auth", _auth_text(entry)))
        return entry

    def auth_results(self, method: str | None = None) -> list[AuthResult]:
        """Every authentication result reported here, in order (shadow ones left out),
        ``method``'s only when given: ``tx.results.auth_results("dkim")``."""
        return [a for r in self._records.values() for a in r.auth
                if not a.shadow and (method is None or a.method == method)]

    def get(self, rule) -> RuleResult | None:
        """``rule``'s record (a rule or its name), None if it reported nothing here."""
        return self._records.get(_name(rule))

    @property
    def events(self) -> list[Event]:
        """The published events in order: those of rules, then the pipeline's own when the
        transaction ends (``rejected``, ``downstream_rejected``, ``delivered``)."""
        return list(self._events)

    def __iter__(self) -> Iterator[RuleResult]:
        return iter(list(self._records.values()))

    def __contains__(self, rule) -> bool:
        return _name(rule) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def as_dict(self) -> dict[str, dict]:
        return {name: r.as_dict() for name, r in self._records.items()}

    def summary(self) -> str:
        """``spf:pass,dnsbl:fail``: each rule with an outcome, for the text log line."""
        return ",".join(f"{r.rule}:{'shadow-' if r.shadow else ''}{r.outcome}"
                        for r in self._records.values() if r.outcome)

    # --- for the pipeline ----------------------------------------------------------------
    def _record(self, rule) -> RuleResult:
        name = rule if rule.__class__ is str else _name(rule)
        record = self._records.get(name)
        current = self._current  # (name, shadow) of the hook running now, without a tuple to compare
        shadow = current is not None and current[1] and current[0] == name
        if record is None:
            # every field given, by position: the generated __init__ neither runs its
            # default factories nor binds keywords (~0.8 -> ~0.5 µs a record)
            record = self._records[name] = RuleResult(name, [], [], [], [], [], {}, [], [], shadow)
        elif shadow:
            record.shadow = True
        return record

    def since(self, mark: int) -> str | None:
        """What was added since ``mark`` (the journal's length before a hook ran), as one
        trace line (``fail: listed; event x``)."""
        added = self._journal[mark:]
        return "; ".join(f"{kind} {text}" if kind in ("event", "auth") else f"{kind}: {text}"
                         for _, kind, text in added) or None

    def pipeline_event(self, name: str, rule: str | None, why) -> None:
        """The pipeline's own events (``delivered``, ``rejected``, ...): published, in no record."""
        self._events.append(Event(name, rule, one_line(why)))


def _name(rule) -> str:
    return str(getattr(rule, "name", rule))


class ResultsLog(LogField):
    """The ``results`` field of the transaction line: the session's records, then the
    transaction's (a rule's transaction record replaces its session one), rendered only by
    the formatter that writes the line."""

    def __init__(self, session: Results, tx: Results):
        self._parts = (session, tx)

    def _merged(self) -> dict[str, RuleResult]:
        session, tx = self._parts
        return {**session._records, **tx._records} if session._records else tx._records

    def text(self) -> str:
        """``spf:pass,dnsbl:shadow-fail`` (what ``Results.summary`` says, for both)."""
        out = []
        for r in self._merged().values():
            outcome = r.outcome
            if outcome:
                out.append(f"{r.rule}:shadow-{outcome}" if r.shadow else f"{r.rule}:{outcome}")
        return ",".join(out)

    def json(self) -> dict[str, dict]:
        return {name: r.as_dict() for name, r in self._merged().items()}
