"""The `real` policy's message rules (attachments strip, rewrite add one header) on a plain
message, as the front hands it over (one piece): read where it lies, never copied or joined,
its header block read once (by the attachments rule's MIME parse); Message's own header
fields, which no rule there asks for, are never parsed (issue 13: "parse once")."""
from __future__ import annotations

from smtpgate import Message
from smtpgate.testing import Harness
from smtpgate_rules.attachments import Attachments, mime
from smtpgate_rules.rewrite import Rewrite

PLAIN = (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\nSubject: bench\r\n"
         b"Message-Id: <1@bench.test>\r\n\r\n" + b"1XXXXXXXXXX\r\n" * 400)


def counting(monkeypatch, owner, name: str) -> list:
    calls, real = [], getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, spy)
    return calls


async def test_the_message_rules_read_one_piece_where_it_lies_and_its_fields_once(monkeypatch):
    fields = counting(monkeypatch, Message, "_parse_fields")
    header_reads = counting(monkeypatch, mime, "_plain_fields")
    h = Harness([(Attachments, {"action": "strip"}), (Rewrite, {"add_headers": {"X-Bench": "real"}})],
                domains=["bench.test"])
    piece = bytes(PLAIN)  # (a piece of its own, as the DATA reader's)
    d = await h.send([piece], sender="sender@bench.test", recipients=["rcpt@bench.test"])
    assert d.reply.code == 250
    assert d.relayed.received is piece  # never copied: the quarantine's copy is the piece
    assert b"".join(d.relayed.pieces()) == b"X-Bench: real\r\n" + PLAIN == h.relayed[0].data
    assert header_reads == ["_plain_fields"] and fields == []
