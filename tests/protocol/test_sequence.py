"""SMTP sequencing, in-process: a Conversation driven command by command, to the fake downstream
of ``smtpgate.testing`` — no sockets, no gate process (the real-process cases are in process/)."""
from __future__ import annotations

from smtpgate.mail.addresses import parse_path
from smtpgate.mail.session import Session, new_id
from smtpgate.smtp.conversation import Conversation
from smtpgate.testing import Harness

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


async def greeted() -> tuple[Harness, Conversation]:
    h = Harness()
    conv = Conversation(h.gate, Session(new_id(), "192.0.2.1"), h.gate.new_relay())
    await conv.connect()
    await conv.helo("client.example", True)
    return h, conv


async def mail(conv: Conversation, sender: str = "a@sender.example") -> str:
    path = parse_path(f"<{sender}>")
    return str(await conv.mail(path.address, path.params))


async def rcpt(conv: Conversation, recipient: str = "user@example.com") -> str:
    path = parse_path(f"<{recipient}>")
    return str(await conv.rcpt(path.address, path.params))


async def test_one_transaction_reaches_the_downstream():
    h, conv = await greeted()
    assert await mail(conv) == "250 2.1.0 Ok"
    assert await rcpt(conv) == "250 2.1.5 Ok"
    assert str(await conv.data(MESSAGE)).startswith("250 2.0.0")
    await conv.close()
    [relayed] = h.relayed
    assert (relayed.sender, relayed.recipients, relayed.data) == ("a@sender.example", ["user@example.com"], MESSAGE)


async def test_rcpt_and_data_need_mail_first():
    h, conv = await greeted()
    assert await rcpt(conv) == "503 5.5.1 Error: need MAIL command"
    assert str(await conv.data(MESSAGE)) == "503 5.5.1 Error: need MAIL command"
    assert h.relayed == []


async def test_data_needs_a_recipient_and_mail_is_not_nested():
    h, conv = await greeted()
    assert await mail(conv) == "250 2.1.0 Ok"
    assert await mail(conv) == "503 5.5.1 Error: nested MAIL command"
    assert str(await conv.data(MESSAGE)) == "503 5.5.1 Error: need RCPT command"
    assert h.relayed == []


async def test_rset_ends_the_transaction():
    h, conv = await greeted()
    assert await mail(conv) == "250 2.1.0 Ok"
    assert await rcpt(conv) == "250 2.1.5 Ok"
    await conv.rset()
    assert await rcpt(conv) == "503 5.5.1 Error: need MAIL command"
    assert await mail(conv) == "250 2.1.0 Ok"  # a new transaction may start at once
    assert h.relayed == []
