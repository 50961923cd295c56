"""TCP_NODELAY on client connections is the event loop's doing: GateSMTP.connection_made no
longer sets it (a socket object and a syscall per connection), so both loops the gate runs
on must keep setting it on every accepted TCP connection (else each reply written after the
previous one's ACK is pending waits for Nagle: tens of milliseconds per command)."""
import asyncio
import socket

import pytest
import uvloop

from smtpgate.smtp.connections import ConnectionTracker
from smtpgate.smtp.front import GateSMTP
from smtpgate.testing import Harness

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


async def accepted_nodelay() -> int:
    """TCP_NODELAY on the gate's side of one accepted connection (a real GateSMTP)."""
    harness = Harness(domains=("example.com",))
    made = asyncio.get_running_loop().create_future()

    class Probe(GateSMTP):
        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            made.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    tracker = ConnectionTracker()
    server = await asyncio.get_running_loop().create_server(
        lambda: Probe(harness.gate, tracker), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        nodelay = await asyncio.wait_for(made, 10)
        await reader.readline()  # the greeting
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 10)
        return nodelay
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)  # the gate's side of it ended too
        await harness.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_event_loop_sets_nodelay_on_accepted_connections(loop_name):
    loop = LOOPS[loop_name]()
    try:
        assert loop.run_until_complete(accepted_nodelay()) != 0
    finally:
        loop.close()
