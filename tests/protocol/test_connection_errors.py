"""A ConnectionError that is not the client's never closes the client's connection silently.

aiosmtpd takes any ConnectionError out of a command for the client gone: a
ConnectionResetError is re-raised past the front's handle_exception and ends the session,
the others reach handle_exception, which closes the connection (nobody to answer). Either
way the client is hung up on with no reply, and nothing is logged. Only the front touches
the client's connection, so one raised by a conversation step (the relay, a rule, a store)
must be the gate's own failure: a 4xx for the command, a log line, the session goes on.

The real front (GateSMTP on a loopback listener) relays to a real downstream; the fault is
the relay letting a ConnectionError through instead of its RelayError (relay.py's
``_failures`` translates every one it knows of), injected at the command that needs the
downstream, and at the downstream's close after a HELO that ends a transaction."""
from __future__ import annotations

import asyncio
import logging

import pytest

from smtpgate.smtp.relay import Downstream
from tests.support.downstream import CapturingDownstream
from tests.support.inprocess import start_front
from tests.support.rawsmtp import RawSMTP

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def _leak(error: type[ConnectionError]):
    async def failing(self, *args, **kwargs):
        raise error("the downstream's, not the client's")
    return failing


def _two_replies_or_close(c: RawSMTP) -> tuple[bytes, bytes]:
    """What comes before the second reply line, or before the gate closes: the bytes, and
    b"closed" or b"open"."""
    got = b""
    while got.count(b"\r\n") < 2:
        chunk = c.sock.recv(65536)
        if not chunk:
            return got, b"closed"
        got += chunk
    return got, b"open"


def _rcpt_then_noop(port: int) -> list[bytes]:
    with RawSMTP(("127.0.0.1", port)) as c:
        replies = [c.reply(), c.cmd("EHLO client.test"), c.cmd("MAIL FROM:<a@sender.test>")]
        c.send(b"RCPT TO:<user@example.com>\r\nNOOP\r\n")  # the NOOP is read before any close
        return replies + list(_two_replies_or_close(c))


def _delivered_then_helo(port: int) -> list[bytes]:
    with RawSMTP(("127.0.0.1", port)) as c:
        replies = [c.reply(), c.cmd("EHLO client.test"), c.cmd("MAIL FROM:<a@sender.test>"),
                   c.cmd("RCPT TO:<user@example.com>"), c.data(MESSAGE)]
        c.send(b"HELO client.test\r\nNOOP\r\n")
        return replies + list(_two_replies_or_close(c))


async def _session(tmp_path, client) -> list[bytes]:
    with CapturingDownstream() as downstream:
        async with start_front(tmp_path, downstream.port) as port:
            return await asyncio.to_thread(client, port)


@pytest.mark.parametrize("error", [ConnectionResetError, BrokenPipeError, ConnectionRefusedError])
async def test_a_connection_error_from_the_downstream_is_a_4xx_and_the_session_goes_on(
        tmp_path, monkeypatch, caplog, error):
    monkeypatch.setattr(Downstream, "mail_rcpt", _leak(error))
    with caplog.at_level(logging.ERROR, logger="smtpgate.front"):
        *_, rest, state = await _session(tmp_path, _rcpt_then_noop)
    assert rest == (b"451 4.3.0 Local error in processing, try again later\r\n"
                    b"250 2.0.0 OK\r\n"), rest
    assert state == b"open"
    [logged] = [r for r in caplog.records if r.name == "smtpgate.front"]
    assert logged.getMessage().startswith("unexpected error in session ")
    assert f"RCPT: {error.__name__}: the downstream's, not the client's" in str(logged.exc_info[1])


async def test_a_failed_downstream_close_after_helo_is_logged_and_the_session_goes_on(
        tmp_path, monkeypatch, caplog):
    """HELO after a delivered message closes the downstream session (greeted with the old
    name) after HELO's reply: a failure there is logged; the client, answered, goes on."""
    monkeypatch.setattr(Downstream, "close", _leak(ConnectionResetError))
    with caplog.at_level(logging.ERROR, logger="smtpgate.transaction"):
        *replies, rest, state = await _session(tmp_path, _delivered_then_helo)
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as "), replies
    assert rest == b"250 gate.test\r\n250 2.0.0 OK\r\n", rest
    assert state == b"open"
    [logged] = [r for r in caplog.records if r.name == "smtpgate.transaction"]
    assert "closing the downstream session after HELO/EHLO failed" in logged.getMessage()
