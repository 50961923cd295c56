"""The core nouns a rule sees: Session (one connection), Transaction (MAIL..DATA), Recipient."""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..logs import LogField
from ..pipeline.results import Event, Results, one_line
from .addresses import Address
from .message import Message

__all__ = ["Event", "Recipient", "Results", "Session", "TraceEntry", "Transaction", "new_id"]


def _id_source():
    # Short, unique per process and sortable-ish: base36 of start time, pid and a counter.
    base = f"{int(time.time()):x}{os.getpid() % 0xFFFF:04x}"
    for n in itertools.count(1):
        yield f"{base}{n:05x}".upper()


_ids = _id_source()


def new_id() -> str:
    return next(_ids)


@dataclass(slots=True)  # one per rule run: slots make them quicker to build
class TraceEntry:
    """One rule run: what the log line, ``smtpgate try`` and metrics all read."""

    stage: str
    rule: str
    action: str  # continue | accept | reject | tempfail | discard | quarantine | error
    reason: str | None = None
    reply: str | None = None
    ms: float = 0.0
    shadow: bool = False
    recipient: str | None = None
    #: what the rule reported in this run (``tx.results``): ``fail: listed in zen; event dnsbl_listed``
    result: str | None = None

    def as_dict(self) -> dict:
        """The fields in their order, without those that are None or False (so a duration of
        0.0 too). Written out: the JSON log line builds one per entry."""
        out = {"stage": self.stage, "rule": self.rule, "action": self.action}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.reply is not None:
            out["reply"] = self.reply
        if self.ms:
            out["ms"] = self.ms
        if self.shadow:
            out["shadow"] = self.shadow
        if self.recipient is not None:
            out["recipient"] = self.recipient
        if self.result is not None:
            out["result"] = self.result
        return out


class TraceLog(LogField):
    """The ``rules`` field of the transaction line: ``rule:stage:action`` per entry in the
    text line, every entry's ``as_dict()`` in the JSON one."""

    def __init__(self, trace: list[TraceEntry]):
        self._trace = trace

    def text(self) -> str:
        # (a list, not a generator: join makes one anyway; one f-string per kind of entry)
        return ",".join([f"{e.rule}:{e.stage}:shadow-{e.action}" if e.shadow else f"{e.rule}:{e.stage}:{e.action}"
                         for e in self._trace])

    def json(self) -> list[dict]:
        return [e.as_dict() for e in self._trace]


@dataclass
class Session:
    """One client connection. ``client_ip`` is the real client (after PROXY / XCLIENT)."""

    id: str
    client_ip: str
    client_port: int = 0
    client_name: str | None = None  # verified reverse DNS name, when a resolver supplies one
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_version: str | None = None  # what STARTTLS negotiated: "TLSv1.3"
    tls_cipher: str | None = None   # and the cipher: "TLS_AES_256_GCM_SHA384"
    proto: str = "SMTP"
    #: what rules reported at CONNECT and HELO (``fcrdns``); transactions have their own
    results: Results = field(default_factory=Results)
    #: per-connection caches of the gate and of rules (the DNS budget, lookups started at
    #: CONNECT): internal working state, never a way to report — report with ``results``
    data: dict[str, Any] = field(default_factory=dict)
    #: a CONNECT/HELO verdict that refuses every transaction of this session
    verdict: Any = None
    transactions: int = 0


@dataclass
class Recipient:
    """A recipient being decided (``on_rcpt``) or accepted (``tx.recipients``)."""

    parsed: Address
    params: list[str] = field(default_factory=list)
    policy: Any = None
    #: what goes downstream; a rewrite rule may change it
    address: str = ""
    discard: bool = False

    def __post_init__(self):
        if not self.address:
            self.address = str(self.parsed)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]


@dataclass
class Transaction:
    """One MAIL..DATA. ``sender`` is the address as text ("" for the null sender)."""

    id: str
    session: Session
    sender: str
    sender_params: list[str] = field(default_factory=list)
    recipients: list[Recipient] = field(default_factory=list)
    policy: Any = None
    message: Message | None = None
    trace: list[TraceEntry] = field(default_factory=list)
    #: what each rule reported, for later rules, the trace and the log line; and the events
    #: published for the sender state machines (``tx.results.event``)
    results: Results = field(default_factory=Results)
    started: float = 0.0
    #: rule name -> why it is skipped for the rest of this transaction (``skip``)
    skipped: dict[str, str] = field(default_factory=dict)
    #: machine name -> the sender state a state machine loaded for this transaction
    states: dict[str, Any] = field(default_factory=dict)
    #: machine name -> the rule instance that feeds it in this transaction (a policy may list it twice)
    machine_owners: dict[str, Any] = field(default_factory=dict, repr=False)
    #: (stage, Reply) for each answer of the downstream, for the pipeline's own events
    downstream_replies: list = field(default_factory=list)
    #: the value of the Authentication-Results header the gate wrote after DATA (its
    #: authserv-id first), None when it wrote none; what a later stage (an ARC seal) reads
    authentication_results: str | None = None

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""

    def skip(self, rule: str, why: str) -> None:
        """Skip the rule named ``rule`` for the rest of this transaction (its MAIL, RCPT and
        DATA hooks are not called; the trace says why)."""
        self.skipped.setdefault(str(getattr(rule, "name", rule)), one_line(why) or "skipped")

    def sender_state(self, machine: str | None = None):
        """The sender state that machine ``machine`` (the only or first one when None)
        loaded for this transaction — a ``smtpgate.SenderState`` — or None when no such
        machine tracks this transaction (yet: machines load it in their ``on_mail``)."""
        if machine is None:
            return next(iter(self.states.values()), None)
        return self.states.get(machine)
