"""The replies to a pipelined group are read in order however the downstream's bytes are cut
into segments (aiosmtplib alone leaves a second reply of one segment unparsed and drops one
that arrives early), and the connection is handed back to the SMTP client afterwards."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from smtpgate.smtp import pipelining
from smtpgate.smtp.idletimer import ReplyDeadline
from smtpgate.smtp.pipelining import MAX_LINE, MAX_REPLY, MalformedReply, _Replies

pytestmark = pytest.mark.timeout(10)

WIRE = (b"250 2.0.0 Ok\r\n"
        b"250-2.1.0 first\r\n250 2.1.0 second\r\n"
        b"550 5.1.1 no such user\r\n")
PARSED = [(250, "2.0.0 Ok"), (250, "2.1.0 first\n2.1.0 second"), (550, "5.1.1 no such user")]


class Client(asyncio.Protocol):
    """Stands for aiosmtplib's protocol: what it is told once the group is done."""

    def __init__(self):
        self.data, self.lost = b"", []
        self.changed = asyncio.Event()

    def data_received(self, data):
        self.data += data
        self.changed.set()

    def connection_lost(self, exc):
        self.lost.append(exc)
        self.changed.set()

    async def until(self, done) -> None:
        async with asyncio.timeout(5):
            while not done():
                self.changed.clear()
                await self.changed.wait()


def fed(cuts: list[bytes], wanted: int = 3) -> _Replies:
    replies = _Replies(Client(), wanted)
    for cut in cuts:
        replies.data_received(cut)
    return replies


@pytest.mark.parametrize("cuts", [
    [WIRE],
    [WIRE[i:i + 1] for i in range(len(WIRE))],
    [WIRE[:15], WIRE[15:16], WIRE[16:40], WIRE[40:]],
], ids=["one segment", "byte by byte", "cut mid line"])
def test_replies_in_order_however_cut(cuts):
    replies = fed(cuts)
    assert replies.replies == PARSED and replies.problem is None and replies.finished


def test_bytes_past_the_group_are_not_taken_as_replies():
    replies = fed([WIRE + b"250 unasked\r\n"])
    assert replies.replies == PARSED


@pytest.mark.parametrize("wire", [b"250 ok\r\nhello\r\n", b"250 ok\r\n25"+ b"0-x" * MAX_REPLY])
def test_malformed_or_endless_reply_ends_the_exchange(wire):
    replies = fed([wire])
    assert replies.replies == [(250, "ok")] and isinstance(replies.problem, MalformedReply)


def test_a_line_longer_than_aiosmtplib_takes_ends_the_exchange():
    """aiosmtplib refuses one reply line over MAX_LINE_LENGTH bytes (its CRLF included):
    pipelined, the same line fails the exchange as it would one at a time."""
    from aiosmtplib.protocol import MAX_LINE_LENGTH

    assert MAX_LINE == MAX_LINE_LENGTH

    def line(length: int) -> bytes:
        return b"250-" + b"x" * (length - 6) + b"\r\n"

    replies = fed([line(MAX_LINE) + b"250 ok\r\n"], wanted=1)
    assert replies.replies == [(250, "x" * (MAX_LINE - 6) + "\nok")] and replies.problem is None
    replies = fed([line(MAX_LINE + 1) + b"250 ok\r\n"], wanted=1)
    assert replies.replies == [] and isinstance(replies.problem, MalformedReply)


def test_eof_mid_group_keeps_the_replies_before_it():
    replies = fed([b"250 2.1.0 Ok\r\n"])
    assert replies.eof_received() is False
    assert replies.replies == [(250, "2.1.0 Ok")] and isinstance(replies.problem, ConnectionError)


async def _loopback(answer: bytes, serve=None):
    """A real loopback connection whose server answers the first line it reads with ``answer``
    (written in one go, then, after the next line, ``250 later``), or runs ``serve``."""
    async def answering(reader, writer):
        await reader.readline()
        writer.write(answer)
        await reader.readline()
        writer.write(b"250 later\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve or answering, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    client = Client()
    transport, _ = await loop.create_connection(lambda: client, "127.0.0.1",
                                                server.sockets[0].getsockname()[1])
    return server, transport, client


def _replies(client, transport, wanted, timeout):
    """The replies, under a fresh session deadline (what Downstream keeps per session)."""
    deadline = ReplyDeadline(asyncio.get_running_loop())
    return pipelining.replies(client, transport, wanted, deadline, timeout)


async def test_the_client_gets_its_connection_back():
    server, transport, client = await _loopback(WIRE)
    try:
        transport.write(b"MAIL\r\n")
        got, problem = await _replies(client, transport, 3, 5)
        assert got == PARSED and problem is None
        transport.write(b"NOOP\r\n")
        await client.until(lambda: client.data == b"250 later\r\n")
    finally:
        transport.close()
        server.close()


async def test_silence_is_a_timeout_and_loss_reaches_the_client():
    server, transport, client = await _loopback(b"250 2.1.0 Ok\r\n")
    try:
        transport.write(b"MAIL\r\n")
        got, problem = await _replies(client, transport, 2, 0.2)
        assert got == [(250, "2.1.0 Ok")] and isinstance(problem, asyncio.TimeoutError)
        assert transport.get_protocol() is client
        transport.close()
        await client.until(lambda: client.lost)
    finally:
        transport.close()
        server.close()


async def test_each_complete_reply_gets_the_whole_timeout_again():
    """The group's replies come 0.7 of the timeout apart, together past it: none is late,
    so none times out (the deadline moves at each complete reply, not once per group)."""
    timeout = 1.0  # (0.7 of it apart: a margin on a busy machine)

    async def paced(reader, writer):
        await reader.readline()
        for reply in (b"250 2.0.0 Ok\r\n", b"250-2.1.0 first\r\n250 2.1.0 second\r\n",
                      b"550 5.1.1 no such user\r\n"):
            await asyncio.sleep(0.7 * timeout)  # the downstream's pace, not the test's wait
            writer.write(reply)
        await writer.drain()
        await reader.read()
        writer.close()

    server, transport, client = await _loopback(b"", serve=paced)
    try:
        transport.write(b"MAIL\r\n")
        async with asyncio.timeout(timeout * 8):
            got, problem = await _replies(client, transport, 3, timeout)
        assert got == PARSED and problem is None
    finally:
        transport.close()
        server.close()


async def test_a_downstream_dribbling_bytes_is_timed_out_at_the_timeout():
    """Each reply gets the whole timeout, as one at a time: bytes that never complete a
    reply do not restart it."""
    sent, stop, stopped = [], asyncio.Event(), asyncio.Event()

    async def dribble(reader, writer):
        await reader.readline()
        with contextlib.suppress(ConnectionError):
            for byte in b"250-" + b"x" * MAX_REPLY:
                if stop.is_set():
                    break
                writer.write(bytes([byte]))
                sent.append(byte)
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.close()
        stopped.set()

    timeout = 0.4
    server, transport, client = await _loopback(b"", serve=dribble)
    loop = asyncio.get_running_loop()
    try:
        transport.write(b"MAIL\r\n")
        began = loop.time()
        async with asyncio.timeout(timeout * 10):  # without the fix: dribbled for ever
            got, problem = await _replies(client, transport, 1, timeout)
        took = loop.time() - began
        assert got == [] and isinstance(problem, asyncio.TimeoutError)
        assert timeout * 0.9 <= took < timeout * 5 and len(sent) > 3, (took, len(sent))
        assert transport.get_protocol() is client
    finally:
        stop.set()
        transport.close()
        server.close()
        async with asyncio.timeout(5):
            await stopped.wait()


async def test_cancelled_mid_group_hands_the_connection_back():
    """Cancelled as the group's first reply completes (3.11's wait_for swallowed a cancel
    then and waited on): the cancel goes through and the client has its connection back."""
    server, transport, client = await _loopback(b"250 2.1.0 Ok\r\n")
    try:
        waiting = asyncio.create_task(_replies(client, transport, 2, 5))
        await asyncio.sleep(0)  # the task starts and takes the transport over
        collector = transport.get_protocol()
        assert isinstance(collector, _Replies)
        transport.write(b"MAIL\r\n")
        first_in = asyncio.Event()
        received = collector.data_received

        def noting(data):
            received(data)
            if collector.replies:
                first_in.set()

        collector.data_received = noting
        async with asyncio.timeout(5):
            await first_in.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert transport.get_protocol() is client
        transport.write(b"NOOP\r\n")  # the client reads again
        await client.until(lambda: client.data == b"250 later\r\n")
    finally:
        transport.close()
        server.close()
