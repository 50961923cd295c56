"""The message to a CHUNKING downstream goes as one ``BDAT <size> LAST`` (RFC 3030).

The real ``Downstream`` (relay.py) against the CapturingDownstream with and without
CHUNKING: the same messages (lines opening with '.', bare CR and LF, a last line without
CRLF, an empty one) reach the downstream byte-identical either way; a refused BDAT is the
client's reply and the next transaction on the session works; a session greeted with HELO
(a HELO client named with XCLIENT) gets DATA, since a HELO answer offers nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from smtpgate.config import load_gate_config
from smtpgate.errors import RelayError
from smtpgate.smtp import relay
from smtpgate.mail.session import Session
from smtpgate.smtp.relay import Downstream
from tests.support.downstream import CapturingDownstream

pytestmark = pytest.mark.timeout(30)

MESSAGES = {
    "dots": b"Subject: dots\r\n\r\n.one\r\n..two\r\n.\r\n.\r\nend\r\n",
    "bare-cr": b"Subject: cr\r\n\r\na\rb\r\rc\r\n",
    "bare-lf": b"Subject: lf\n\na\nb\n\n.c\n",
    "no-final-crlf": b"Subject: tail\r\n\r\nlast line",
    "bare-cr-at-the-end": b"Subject: tail\r\n\r\nlast\r",
    "terminator-inside": b"Subject: smuggle\r\n\r\na\r\n.\r\nMAIL FROM:<x@y.test>\r\n",
    "empty": b"",
}
PIECES = [b"X-Head: 1\r", b"\nSubject: split\r\n\r\n.", b"", b"body\n", memoryview(b"tail")]


def _session(esmtp: bool = True) -> Session:
    return Session(id="T1", client_ip="127.0.0.1", client_port=2525, helo="client.test",
                   esmtp=esmtp, proto="ESMTP" if esmtp else "SMTP")


async def _deliver(ds: CapturingDownstream, messages, esmtp: bool = True) -> list:
    """Each message in its own transaction on one downstream session; the replies."""
    cfg = load_gate_config(None)
    down = Downstream(dataclasses.replace(cfg.downstream, host=ds.host, port=ds.port), cfg.hostname)
    replies = []
    try:
        await down.open(_session(esmtp))
        for message in messages:
            assert (await down.mail("a@sender.test", [])).code == 250
            assert (await down.rcpt("user@example.com", [])).code == 250
            replies.append(await down.data(message))
    finally:
        await down.close()
    return replies


async def test_bdat_stores_what_data_stores():
    messages = list(MESSAGES.values()) + [PIECES]
    arrived = {}
    for chunking in (False, True):
        with CapturingDownstream(chunking=chunking) as ds:
            replies = await _deliver(ds, messages)
            got = ds.wait_for_messages(len(messages))
        assert [r.code for r in replies] == [250] * len(messages)
        arrived[chunking] = [m.data for m in got]
        verbs = [line.split()[0] for line in ds.transcript if line.split()[:1] in ([b"DATA"], [b"BDAT"])]
        # the empty message keeps today's DATA and lone dot (Postfix takes BDAT 0 LAST too)
        assert verbs == [b"BDAT" if chunking and m else b"DATA" for m in messages], ds.transcript
        assert all(m.bdat == (chunking and bool(m.data)) for m in got)
    assert arrived[True] == arrived[False]
    assert arrived[True][:3] == [MESSAGES["dots"], b"Subject: cr\r\n\r\na\r\nb\r\n\r\nc\r\n",
                                 b"Subject: lf\r\n\r\na\r\nb\r\n\r\n.c\r\n"]
    assert arrived[True][3:5] == [MESSAGES["no-final-crlf"] + b"\r\n", b"Subject: tail\r\n\r\nlast\r\n"]
    assert arrived[True][5] == MESSAGES["terminator-inside"]
    assert arrived[True][7] == b"X-Head: 1\r\nSubject: split\r\n\r\n.body\r\ntail\r\n"


async def test_a_refused_bdat_is_the_reply_and_the_session_goes_on():
    with CapturingDownstream(chunking=True, replies={"DATA_END": ["554 5.7.1 no thanks"]}) as ds:
        replies = await _deliver(ds, [MESSAGES["dots"], MESSAGES["dots"]])
        [delivered] = ds.wait_for_messages(1)
    assert [str(r) for r in replies][0] == "554 5.7.1 no thanks"
    assert replies[1].code == 250 and delivered.bdat and delivered.data == MESSAGES["dots"]
    assert [m.data for m in ds.rejected] == [MESSAGES["dots"]]
    # RFC 3030 §4.3 (and harmless where the server ended the transaction itself, as Postfix does)
    commands = [line.split()[0] for line in ds.transcript]
    assert commands[commands.index(b"BDAT"):] == [b"BDAT", b"RSET", b"MAIL", b"RCPT", b"BDAT", b"QUIT"]


async def test_a_session_greeted_with_helo_gets_data():
    # XCLIENT names a HELO client and the gate greets as it did: that answer lists no
    # CHUNKING (aiosmtplib still holds the earlier EHLO's keywords).
    with CapturingDownstream(chunking=True) as ds:
        await _deliver(ds, [MESSAGES["dots"]], esmtp=False)
        [msg] = ds.wait_for_messages(1)
    assert not msg.bdat and msg.data == MESSAGES["dots"] and msg.helo == "client.test"


@pytest.mark.parametrize("off_by", [-1, 1])
async def test_bytes_that_differ_from_the_announced_size_drop_the_session(monkeypatch, off_by):
    # Cannot happen (crlf_size is checked against crlf_chunks in tests/unit); if it did, the
    # surplus byte must never be written (it would be read as a command), nor the session
    # left waiting for a missing one: the connection goes, the client gets 451 4.4.2.
    counted = relay.crlf_size
    monkeypatch.setattr(relay, "crlf_size", lambda pieces: counted(pieces) + off_by)
    with CapturingDownstream(chunking=True) as ds:
        with pytest.raises(RelayError) as raised:
            await _deliver(ds, [MESSAGES["dots"]])
        # in a thread: the close happens on this test's event loop
        await asyncio.to_thread(ds.wait_for, lambda: ds.sessions[0].closed, 5, "the session closed")
    assert str(raised.value.reply).startswith("451 4.4.2")
    assert ds.messages == [] and ds.rejected == []
    assert b"BDAT" not in ds.sessions[0].raw_in if off_by < 0 else ds.aborted
