"""What the conversation needs from a downstream: the ``Relay`` protocol and its ``Capabilities``
(and ``mail_then_rcpt``, the one-at-a-time ``mail_rcpt`` both implementations share).

The conversation is given a relay and talks to it only through this interface; the real one
is ``relay.Downstream`` (aiosmtplib), the scripted one ``smtpgate.testing.FakeRelay``. A relay
answers with ``Reply`` values to pass through, and raises ``RelayError`` (carrying the 451 the
client gets) when the downstream cannot be reached or is lost — never a 250 it did not say.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

from ..mail.reply import Reply


class Capabilities:
    """What the downstream said in its last EHLO; the gate's EHLO offers no more than this."""

    def __init__(self):
        self.known = False
        self.size: int | None = None
        self.eightbitmime = True
        self.smtputf8 = False

    def update(self, extensions: dict[str, str]) -> None:
        self.known = True
        size = extensions.get("size", "")
        self.size = int(size) if size.isdigit() and int(size) > 0 else None
        self.eightbitmime = "8bitmime" in extensions
        self.smtputf8 = "smtputf8" in extensions


@runtime_checkable
class Relay(Protocol):
    """One client session's downstream: opened at the first MAIL, kept for later transactions."""

    capabilities: Capabilities

    @property
    def connected(self) -> bool:
        """An open session the next transaction can use."""

    async def open(self, session) -> None:
        """Connect and greet as the client did (XCLIENT where offered); a no-op when connected.
        Raises ``RelayError`` (451 4.4.1) when the downstream cannot be reached."""

    async def mail(self, wire_sender: str, params: list[str], ident: str | None = None,
                   utf8: bool = False) -> Reply:
        """``MAIL FROM:<wire_sender>``; the downstream's reply."""

    async def rcpt(self, wire_recipient: str, params: list[str], utf8: bool = False) -> Reply:
        """``RCPT TO:<wire_recipient>``; the downstream's reply."""

    async def mail_rcpt(self, wire_sender: str, sender_params: list[str], wire_recipient: str,
                        rcpt_params: list[str], ident: str | None = None,
                        utf8: bool = False) -> tuple[Reply, Reply | None]:
        """``mail`` then the transaction's first ``rcpt`` (None for it when MAIL is refused),
        with the same replies; pipelined (one round trip) when the downstream offers it."""

    async def data(self, raw: bytes | Iterable[bytes]) -> Reply:
        """Relay one message (its bytes, or its pieces in order); the downstream's final reply."""

    async def reset(self) -> None:
        """End a transaction the client or a rule abandoned (the final dot never sent)."""

    async def close(self) -> None:
        """Say goodbye to the downstream; never raises."""


async def mail_then_rcpt(relay: Relay, wire_sender: str, sender_params: list[str],
                         wire_recipient: str, rcpt_params: list[str], ident: str | None = None,
                         utf8: bool = False) -> tuple[Reply, Reply | None]:
    """``mail_rcpt`` one command at a time: ``mail``, then ``rcpt`` only if MAIL was taken."""
    mail = await relay.mail(wire_sender, sender_params, ident, utf8)
    return mail, (await relay.rcpt(wire_recipient, rcpt_params, utf8)
                  if mail.is_positive else None)
