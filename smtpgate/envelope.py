"""The core nouns a rule sees: Session (one connection), Transaction (MAIL..DATA), Recipient."""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .addresses import Address
from .message import Message


def _id_source():
    # Short, unique per process and sortable-ish: base36 of start time, pid and a counter.
    base = f"{int(time.time()):x}{os.getpid() % 0xFFFF:04x}"
    for n in itertools.count(1):
        yield f"{base}{n:05x}".upper()


_ids = _id_source()


def new_id() -> str:
    return next(_ids)


@dataclass
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

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


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
    proto: str = "SMTP"
    #: rules may keep per-connection results here (e.g. DNS answers started at connect)
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
    #: rules publish results here for later rules (``tx.data["spf"] = "pass"``)
    data: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""
