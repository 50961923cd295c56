"""A finished client connection is freed by reference counting alone (issue 13).

Objects in reference cycles wait for the cyclic collector, whose passes cost the gate CPU
per message; so the real front (GateSMTP on a loopback listener, relaying to a real
downstream, with real SMTP clients) must leave none of its connection objects in cycles.
The collector is off while the connections run: whatever of them is still alive once the
gate is done with them is held by a cycle (or leaked)."""
from __future__ import annotations

import asyncio
import gc
import functools
import smtplib
import socket
import ssl
import struct

import pytest
from aiosmtpd import smtp as aiosmtpd_smtp

from smtpgate.mail.session import Session
from smtpgate.smtp.conversation import Conversation
from smtpgate.smtp.front import GateSMTP
from tests.support.downstream import CapturingDownstream
from tests.support.inprocess import start_front
from tests.support.testca import TestCA

pytestmark = pytest.mark.timeout(30)

CONNECTION_CLASSES = (GateSMTP, Conversation, Session, aiosmtpd_smtp.Session,
                      aiosmtpd_smtp.Envelope)
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
ROUNDS = 3


def _alive() -> list[str]:
    return [type(o).__qualname__ for o in gc.get_objects() if isinstance(o, CONNECTION_CLASSES)]


async def _freed_without_the_collector(tmp_path, client, tls: str = "") -> list[str]:
    """Run ``client(port)`` (blocking, in a thread) ROUNDS times against a real gate with the
    collector off; what of the connections is still alive once the gate let them go.
    ``tls``: the gate.yaml's ``tls:`` line (STARTTLS offered)."""
    with CapturingDownstream() as downstream:
        async with start_front(
                tmp_path, downstream.port, "\n  - senders: {}\n  - attachments: {action: strip}\n"
                "  - rewrite: {add_headers: {X-Test: cycles}}", tls) as port:
            await asyncio.to_thread(client, port)  # a first one: caches, lazy imports
            gc.collect()
            gc.disable()
            try:
                for _ in range(ROUNDS):
                    await asyncio.to_thread(client, port)
                # The gate lets a connection go a few loop turns after the client's end
                # (connection_lost, the conversation's close): look until it did.
                async with asyncio.timeout(5):
                    while alive := _alive():
                        await asyncio.sleep(0.02)
            except TimeoutError:
                pass
            finally:
                gc.enable()
            return alive


def _relay_and_quit(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("a@sender.test", ["user@example.com"], MESSAGE)


def _refused_and_quit(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@sender.test")
        code, _ = c.rcpt("user@elsewhere.test")  # not a governed domain: no open relay
        assert code == 554


def _hang_up_mid_transaction(port: int) -> None:
    c = smtplib.SMTP("127.0.0.1", port, timeout=10)
    c.ehlo("client.test")
    c.mail("a@sender.test")
    c.sock.shutdown(socket.SHUT_RDWR)  # gone without QUIT
    c.close()


def _reset_mid_transaction(port: int) -> None:
    c = smtplib.SMTP("127.0.0.1", port, timeout=10)
    c.ehlo("client.test")
    c.mail("a@sender.test")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # linger 0: a TCP reset, the gate reads ConnectionResetError


def _hang_up_mid_data(port: int) -> None:
    c = smtplib.SMTP("127.0.0.1", port, timeout=10)
    c.ehlo("client.test")
    c.mail("a@sender.test")
    c.rcpt("user@example.com")
    code, _ = c.docmd("DATA")
    assert code == 354
    c.send(MESSAGE[:len(MESSAGE) // 2])  # half a body, no final dot
    c.sock.shutdown(socket.SHUT_RDWR)  # gone mid-DATA: smtp_DATA's finally resets the timer
    c.close()


@pytest.mark.parametrize("client", [_relay_and_quit, _refused_and_quit, _hang_up_mid_transaction,
                                    _reset_mid_transaction, _hang_up_mid_data])
async def test_a_finished_connection_leaves_nothing_to_the_collector(tmp_path, client):
    assert await _freed_without_the_collector(tmp_path, client) == []


def _starttls_relay_and_quit(port: int, ca: TestCA) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.starttls(context=ssl.create_default_context(cafile=str(ca.cert)))
        c.sendmail("a@sender.test", ["user@example.com"], MESSAGE)


async def test_a_finished_starttls_connection_leaves_nothing_to_the_collector(tmp_path, require_tool):
    ca = TestCA(tmp_path / "ca", require_tool("openssl"))
    cert, key = ca.issue("served", ["127.0.0.1", "gate.test"], serial=1)
    tls = f"tls: {{cert: {cert}, key: {key}}}\n"
    client = functools.partial(_starttls_relay_and_quit, ca=ca)
    assert await _freed_without_the_collector(tmp_path, client, tls) == []


async def test_the_idle_timer_is_closed_when_the_connection_is_lost(tmp_path, monkeypatch):
    """aiosmtpd's connection_lost only cancels the timer; whatever resets it afterwards (a
    command still ending, as smtp_DATA's finally) must arm nothing that calls back the lost
    connection."""
    armed_after_loss = []
    connection_lost = GateSMTP.connection_lost

    def lost_then_reset(self, error):
        connection_lost(self, error)
        if self._handler_coroutine is not None:  # the first call, not aiosmtpd's repeat
            self._reset_timeout()
            armed_after_loss.append(self._timeout_handle._handle is not None)

    monkeypatch.setattr(GateSMTP, "connection_lost", lost_then_reset)
    assert await _freed_without_the_collector(tmp_path, _hang_up_mid_data) == []
    assert armed_after_loss == [False] * (ROUNDS + 1)
