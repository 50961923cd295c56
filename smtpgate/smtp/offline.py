"""Drive a whole SMTP dialogue through a Conversation without sockets.

``smtpgate try`` and ``smtpgate.testing`` both use this, so an author's unit test, the
operator's dry run and the live server all run the same code and read the same trace. The
downstream is whatever relay the gate's factory makes (``smtpgate.testing.FakeRelay`` there).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..mail.addresses import parse_path
from .conversation import Conversation
from ..mail.message import Message
from ..mail.session import Session, TraceEntry, Transaction, new_id
from ..mail.reply import Reply


@dataclass
class Dialogue:
    """The outcome of one simulated transaction."""

    replies: dict[str, object] = field(default_factory=dict)  # stage -> Reply (rcpt: list)
    trace: list[TraceEntry] = field(default_factory=list)
    transaction: Transaction | None = None
    #: the relayed transaction's Message: ``message`` joins its bytes only when asked for
    relayed: Message | None = field(default=None, repr=False)

    @property
    def message(self) -> bytes | None:
        """The message as it would be relayed (None when DATA was not reached)."""
        return self.relayed.raw if self.relayed is not None else None

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
    conv = Conversation(gate, session, gate.new_relay())
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
            out.relayed = tx.message
        elif tx is not None:
            await conv.rset()
    if captured:
        out.transaction = captured[0]
        out.trace = captured[0].trace
    elif session.data.get("trace"):
        out.trace = session.data["trace"]
    await conv.close()
    return out


__all__ = ["Dialogue", "simulate"]
