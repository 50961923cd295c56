"""The aiosmtplib internals relay.py's reply deadline relies on
(``Downstream._within_deadline``: commands, EHLO and HELO, a reply read), checked against the
installed aiosmtplib: a release that changes them fails here, by name, rather than a silent
downstream quietly hanging a session.

With ``timeout=None`` a command reads its reply once, awaiting ``protocol._response_waiter``
(the future there before the command is sent) with no timer of its own; a ``TimeoutError``
set on that future ends the command as aiosmtplib's own timeout does:
``SMTPReadTimeoutError`` with its message, and ``SMTP.execute_command`` closes the
connection. The session's own timeout (OWN_TIMEOUT) is longer than the test's bound on each
read (BOUND): aiosmtplib's timer, were it armed after all, could not make a test pass."""
from __future__ import annotations

import asyncio
import contextlib

import aiosmtplib
import pytest

pytestmark = pytest.mark.timeout(30)

OWN_TIMEOUT = 60  # aiosmtplib's, for a command not given one: longer than the tests run
BOUND = 5  # the test's wait for a read the waiter's failure ends at once


@contextlib.asynccontextmanager
async def _silent_session():
    """An aiosmtplib session (its own timeout OWN_TIMEOUT) to a server that greets and then
    never answers."""
    async def greet(reader, writer):
        writer.write(b"220 silent.test ESMTP\r\n")
        await writer.drain()
        await reader.read()  # until the client goes
        writer.close()
    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1],
                           timeout=OWN_TIMEOUT, local_hostname="gate.test", start_tls=False)
    try:
        await smtp.connect()
        yield smtp
    finally:
        smtp.close()
        server.close()


def _reads(protocol) -> list:
    """The reply waiter each of the protocol's reply reads begins on, as they begin."""
    began = []
    read = protocol.read_response

    async def counted(*args, **kwargs):
        began.append(protocol._response_waiter)
        return await read(*args, **kwargs)

    protocol.read_response = counted
    return began


async def _expire_the_waiter(protocol, awaited):
    """Fails the reply waiter there now, soon; ``awaited`` ends with aiosmtplib's read
    timeout. The waiter failed."""
    future = protocol._response_waiter
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, future.set_exception, TimeoutError())
    async with asyncio.timeout(BOUND):  # no timer of aiosmtplib's own: only the waiter ends it
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError) as raised:
            await awaited
    assert str(raised.value) == "Timed out waiting for server response"
    return future


async def test_a_command_without_timeout_ends_when_its_waiter_times_out_and_closes():
    async with _silent_session() as smtp:
        await _expire_the_waiter(smtp.protocol, smtp.execute_command(b"NOOP", timeout=None))
        assert not smtp.is_connected  # closed: a late reply can never pair with a later command


@pytest.mark.parametrize("greeting", ["ehlo", "helo"])
async def test_a_greeting_without_timeout_reads_once_on_the_waiter_there_and_closes(greeting):
    """``ehlo(timeout=None)`` and ``helo(timeout=None)``, as ``Downstream._xclient`` sends
    the client's greeting: one reply read, on the waiter there before the call; it timing
    out ends the greeting with aiosmtplib's read timeout, the connection closed."""
    async with _silent_session() as smtp:
        began = _reads(smtp.protocol)
        send = getattr(smtp, greeting)
        waiter = await _expire_the_waiter(smtp.protocol,
                                          send(hostname="client.test", timeout=None))
        assert len(began) == 1 and began[0] is waiter
        assert not smtp.is_connected


async def test_a_reply_read_without_timeout_ends_when_its_waiter_times_out():
    async with _silent_session() as smtp:
        protocol = smtp.protocol
        protocol.write(b"NOOP\r\n")
        await _expire_the_waiter(protocol, protocol.read_response(timeout=None))


async def test_without_timeout_a_reply_arms_no_timer():
    """timeout=None: read_response's wait_for awaits the waiter itself (no timer, no task)."""
    async with _silent_session() as smtp:
        loop = asyncio.get_running_loop()
        armed = []
        call_at, call_later = loop.call_at, loop.call_later
        loop.call_at = lambda *a, **k: (armed.append(a), call_at(*a, **k))[1]
        loop.call_later = lambda *a, **k: (armed.append(a), call_later(*a, **k))[1]
        try:
            reading = asyncio.ensure_future(smtp.execute_command(b"NOOP", timeout=None))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert armed == [] and not reading.done()
        finally:
            loop.call_at, loop.call_later = call_at, call_later
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
