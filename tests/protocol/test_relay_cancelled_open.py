"""A downstream connection being opened when the client's task is cancelled (the client left,
the gate stops) is closed, not left half-open until the downstream's own timeout."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from smtpgate.config import load_gate_config
from smtpgate.mail.session import Session
from smtpgate.smtp.relay import Downstream

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("greets", [False, True], ids=["before the greeting", "at the EHLO"])
async def test_a_connection_cancelled_while_it_opens_is_closed(greets):
    accepted, closed = asyncio.Event(), asyncio.Event()

    async def silent(reader, writer):  # greets or not, then answers nothing; tells when the gate hangs up
        if greets:
            writer.write(b"220 silent.test ESMTP\r\n")
            await reader.readline()  # the EHLO
        accepted.set()
        await reader.read()  # b"" once the other side closed
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    cfg = load_gate_config(None)
    down = Downstream(dataclasses.replace(cfg.downstream, host=host, port=port, timeout=60.0),
                      cfg.hostname)
    opening = asyncio.ensure_future(down.open(Session(id="T1", client_ip="127.0.0.1", client_port=2525)))
    try:
        await asyncio.wait_for(accepted.wait(), 10)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        await asyncio.wait_for(closed.wait(), 10)  # long before the 60 s downstream.timeout
        assert not down.connected
    finally:
        server.close()
        await server.wait_closed()
