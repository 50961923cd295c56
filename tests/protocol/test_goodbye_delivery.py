"""The replies before a goodbye reach a client that pipelined past it.

The flake of test_fuzz_smtp's command streams (a transaction's 250, then the end of the
connection, none of the replies after it, nothing logged): the gate had answered every
command and said 421 (BDAT without CHUNKING), then closed the socket; the client's next
piece arrived at the closed socket, the kernel answered it with a reset and dropped what
was still queued to send — every reply the client had not yet taken. (The client saw that
reset on its send, so its reads ended as at a clean close.) Reproduced 4 times in ~120,000
runs of that session's script, 12 clients at once; deterministic here with a client that reads
slowly (a small receive window keeps the replies queued at the gate) and sends one more
command once the gate is done with the goodbye.

The real front (GateSMTP on a loopback listener) relays to a real downstream."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from smtpgate.smtp.front import GateSMTP
from tests.support.downstream import CapturingDownstream
from tests.support.inprocess import start_front

pytestmark = pytest.mark.timeout(30)

HELPS = 90  # replies (~5 kB) beyond what the client's receive window takes
GOODBYE = b"421 4.7.0 gate.test BDAT without CHUNKING, closing\r\n"


def _slow_client(port: int, goodbye_done: threading.Event) -> tuple[bytes, bool]:
    """Pipeline HELPs and a bad BDAT without reading, one more command once the gate is
    done with the goodbye; then everything the gate sent, and whether it ended in a reset."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the window
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(b"EHLO client.test\r\n" + b"HELP\r\n" * HELPS + b"BDAT x\r\n")
        assert goodbye_done.wait(10)
        s.sendall(b"NOOP\r\n")
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, False
            got += chunk


async def test_replies_before_a_goodbye_reach_a_slow_client_that_pipelined_past_it(
        tmp_path, monkeypatch):
    goodbye_done = threading.Event()
    bdat = GateSMTP.smtp_BDAT

    async def bdat_then_signal(self, arg):
        await bdat(self, arg)
        goodbye_done.set()  # the 421 is written and the connection closed (or closing)

    monkeypatch.setattr(GateSMTP, "smtp_BDAT", bdat_then_signal)
    with CapturingDownstream() as downstream:
        async with start_front(tmp_path, downstream.port) as port:
            got, reset = await asyncio.to_thread(_slow_client, port, goodbye_done)
    lines = got.split(b"\r\n")
    assert sum(1 for line in lines if line.startswith(b"214 ")) == HELPS, (reset, got[-300:])
    assert got.endswith(GOODBYE) and not reset, (reset, got[-300:])
