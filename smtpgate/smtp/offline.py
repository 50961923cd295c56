"""Drive a whole SMTP dialogue through a Conversation without sockets.

``smtpgate try`` and ``smtpgate.testing`` both use this, so an author's unit test, the
operator's dry run and the live server all run the same code and read the same trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..mail.addresses import parse_path
from .conversation import Conversation
from ..mail.session import Session, TraceEntry, Transaction, new_id
from ..errors import RelayError
from ..mail.reply import Reply


@dataclass
class Relayed:
    """What a fake downstream received for one message."""

    sender: str
    params: list[str]
    recipients: list[str]
    data: bytes | None = None


class FakeRelay:
    """A scripted downstream: says 250 to everything unless ``replies`` says otherwise.

    ``replies`` keys: ``"open"`` (a Reply or RelayError to raise), ``"mail"``, ``"rcpt"``,
    ``"rcpt:<address>"``, ``"data"``. Values are Reply objects or reply strings
    (``"550 5.1.1 no such user"``); an exception instance is raised instead.
    """

    def __init__(self, replies: dict | None = None, capabilities=None):
        self.replies = dict(replies or {})
        self.capabilities = capabilities
        self.relayed: list[Relayed] = []
        self.connected = False
        self.in_transaction = False
        self._current: Relayed | None = None

    def _scripted(self, *keys: str, default: Reply) -> Reply:
        for key in keys:
            if key in self.replies:
                value = self.replies[key]
                if isinstance(value, BaseException):
                    raise value
                return value if isinstance(value, Reply) else Reply.parse(value)
        return default

    async def open(self, session) -> None:
        value = self.replies.get("open")
        if isinstance(value, BaseException):
            raise value
        self.connected = True

    async def mail(self, wire_sender, params, ident=None, utf8=False) -> Reply:
        reply = self._scripted("mail", default=Reply(250, "Ok", "2.1.0"))
        if reply.is_positive:
            self._current = Relayed(wire_sender.strip("<>"), list(params), [])
            self.in_transaction = True
        return reply

    async def rcpt(self, wire_recipient, params, utf8=False) -> Reply:
        address = wire_recipient.strip("<>")
        reply = self._scripted(f"rcpt:{address}", "rcpt", default=Reply(250, "Ok", "2.1.5"))
        if reply.is_positive:
            self._current.recipients.append(address)
        return reply

    async def data(self, raw) -> Reply:
        """``raw``: the message's bytes, or its pieces in order (as the real relay takes it)."""
        reply = self._scripted("data", default=Reply(250, "Ok: queued", "2.0.0"))
        self._current.data = raw if isinstance(raw, bytes) else b"".join(raw)
        if reply.is_positive:
            self.relayed.append(self._current)
        self._current, self.in_transaction = None, False
        return reply

    async def reset(self) -> None:
        self._current, self.in_transaction = None, False

    async def close(self) -> None:
        self.connected = False


@dataclass
class Dialogue:
    """The outcome of one simulated transaction."""

    replies: dict[str, object] = field(default_factory=dict)  # stage -> Reply (rcpt: list)
    trace: list[TraceEntry] = field(default_factory=list)
    transaction: Transaction | None = None
    message: bytes | None = None  # as it would be relayed

    @property
    def reply(self) -> Reply:
        """The reply that decided the transaction: the last one given."""
        for stage in ("data", "rcpt", "mail", "connect"):
            value = self.replies.get(stage)
            if isinstance(value, list):  # RCPT decides only when no recipient got through
                value = value[-1] if value and not any(r.is_positive for r in value) else None
            if value is not None:
                return value
        raise LookupError("no reply recorded")


async def simulate(gate, message: bytes, sender: str, recipients: list[str], *,
                   client_ip: str = "192.0.2.1", helo: str = "client.example",
                   client_name: str | None = None) -> Dialogue:
    """Run connect, EHLO, MAIL, each RCPT and DATA for one message; stop where the client would."""
    session = Session(new_id(), client_ip, 0, client_name)
    conv = Conversation(gate, session)
    out = Dialogue()
    captured: list[Transaction] = []
    refusal = await conv.connect()
    if refusal is not None:  # 421 at connect: the gate closes the connection
        out.replies["connect"] = refusal
        out.trace = session.data.get("trace", [])
        await conv.close()
        return out
    await conv.helo(helo, True)
    sender_path = parse_path(f"<{sender}>" if not sender.startswith("<") else sender, smtputf8=True)
    out.replies["mail"] = reply = await conv.mail(sender_path.address, sender_path.params)
    if conv.last_tx is not None:
        captured.append(conv.last_tx)
    if reply.is_positive:
        out.replies["rcpt"] = []
        for rcpt in recipients:
            path = parse_path(f"<{rcpt}>" if not rcpt.startswith("<") else rcpt, smtputf8=True)
            out.replies["rcpt"].append(await conv.rcpt(path.address, path.params))
        tx = conv.tx
        if tx is not None and tx.recipients:
            out.replies["data"] = await conv.data(message)
            out.message = tx.message.raw if tx.message else None
        elif tx is not None:
            await conv.rset()
    if captured:
        out.transaction = captured[0]
        out.trace = captured[0].trace
    elif session.data.get("trace"):
        out.trace = session.data["trace"]
    await conv.close()
    return out


__all__ = ["FakeRelay", "Relayed", "Dialogue", "simulate", "RelayError"]
