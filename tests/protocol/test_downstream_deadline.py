"""A silent downstream times out on every exchange after it is open, from the session's one
reply deadline (idletimer.ReplyDeadline; aiosmtplib is given no timeout there): each one
at a time command, the pipelined MAIL + RCPT, DATA, the reply after the final dot or the
BDAT, the RSET of an abandoned transaction. The client's reply (451 4.4.2), the log line
and the closed session stay what aiosmtplib's own timeout gave. Without the deadline these
exchanges wait for ever (the test's own timeout fails them)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from smtpgate.config import load_gate_config
from smtpgate.errors import RelayError
from smtpgate.mail.session import Session
from smtpgate.smtp import relay
from smtpgate.smtp.pool import SessionPool
from smtpgate.smtp.relay import Downstream
from tests.support.downstream import CapturingDownstream

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 0.3
MSG = b"Subject: t\r\n\r\nbody\r\n"
READ_TIMEOUT = "downstream connection failed: Timed out waiting for server response"
# the pipelined group's: a TimeoutError without a text, logged by its name
GROUP_TIMEOUT = "downstream connection failed: TimeoutError"


def _downstream(ds: CapturingDownstream, pool: SessionPool | None = None,
                xclient: bool = True, timeout: float = TIMEOUT) -> Downstream:
    cfg = load_gate_config(None)
    return Downstream(dataclasses.replace(cfg.downstream, host=ds.host, port=ds.port,
                                          timeout=timeout, xclient=xclient), cfg.hostname,
                      pool=pool)


def _session(esmtp: bool = True) -> Session:
    return Session(id="T1", client_ip="127.0.0.1", client_port=2525, helo="client.test",
                   esmtp=esmtp, proto="ESMTP" if esmtp else "SMTP")


async def _until_stalled(down: Downstream, ds: CapturingDownstream, caplog, exchange, logged,
                         raises: bool = True):
    await down.open(_session())
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.WARNING, logger="smtpgate.relay"):
        async with asyncio.timeout(TIMEOUT * 20):  # without the deadline: waits for ever
            if raises:
                with pytest.raises(RelayError) as raised:
                    await exchange(down)
                assert raised.value.reply == relay.LOST
                assert str(raised.value) == "downstream failed: " + logged.split("failed: ")[1]
            else:
                await exchange(down)
    assert loop.time() - began >= TIMEOUT - 0.01
    assert [r.getMessage() for r in caplog.records if r.name == "smtpgate.relay"] == [logged]
    assert not down.connected and ds.stalled == 1


async def _mail(down):
    await down.mail("a@sender.test", [], ident="T1")  # XFORWARD IDENT first


async def _rcpt(down):
    assert (await down.mail("a@sender.test", [])).code == 250
    await down.rcpt("user@example.com", [])


async def _mail_rcpt(down):
    await down.mail_rcpt("a@sender.test", [], "user@example.com", [])


async def _data(down):
    await _rcpt_ok(down)
    await down.data(MSG)


async def _rcpt_ok(down):
    assert (await down.mail("a@sender.test", [])).code == 250
    assert (await down.rcpt("user@example.com", [])).code == 250


@pytest.mark.parametrize("stall_at, exchange, pipelining, chunking, logged", [
    ("XFORWARD", _mail, False, False, READ_TIMEOUT),
    ("MAIL", _mail, False, False, READ_TIMEOUT),
    ("RCPT", _rcpt, False, False, READ_TIMEOUT),
    ("RCPT", _mail_rcpt, True, False, GROUP_TIMEOUT),
    ("DATA", _data, False, False, READ_TIMEOUT),
    ("DATA_END", _data, False, False, READ_TIMEOUT),
    ("DATA_END", _data, False, True, READ_TIMEOUT),  # the BDAT's reply
], ids=["xforward", "mail", "rcpt", "pipelined", "data", "final-dot", "bdat"])
async def test_a_silent_downstream_times_out_at_the_deadline(caplog, stall_at, exchange,
                                                             pipelining, chunking, logged):
    with CapturingDownstream(stall_at=stall_at, pipelining=pipelining, chunking=chunking) as ds:
        down = _downstream(ds)
        try:
            await _until_stalled(down, ds, caplog, exchange, logged)
        finally:
            await down.close()


async def test_the_rset_of_an_abandoned_transaction_times_out(caplog):
    """reset() keeps its failure to itself (the next transaction reconnects): the log line
    and the closed session show the deadline fired."""
    with CapturingDownstream(stall_at="RSET") as ds:
        down = _downstream(ds)
        try:
            async def abandon(down):
                await _rcpt_ok(down)
                await down.reset()
            await _until_stalled(down, ds, caplog, abandon, READ_TIMEOUT, raises=False)
        finally:
            await down.close()


async def test_an_idle_session_outlives_the_deadline():
    """Between exchanges nothing is awaited: the deadline passing fails nothing, and the
    next exchange gets its whole timeout again, each of its replies too: DATA's and the
    final dot's each come after 0.7 of it, the second past the time the first armed."""
    timeout = 1.0  # (the downstream's delays keep a margin on a busy machine)
    with CapturingDownstream(delays={"DATA": 0.7 * timeout, "DATA_END": 0.7 * timeout}) as ds:
        down = _downstream(ds, timeout=timeout)
        try:
            await down.open(_session())
            await _rcpt_ok(down)
            timer, passed = down._deadline._timer, asyncio.Event()
            expired = timer._callback
            timer._callback = lambda: (expired(), passed.set())
            async with asyncio.timeout(timeout * 20):
                await passed.wait()  # the deadline passed with nothing awaited
            assert down.connected
            async with asyncio.timeout(timeout * 20):
                assert (await down.data(MSG)).code == 250
        finally:
            await down.close()
        assert len(ds.wait_for_messages(1)) == 1


@pytest.mark.parametrize("stall_at, xclient, esmtp", [
    ("XCLIENT", True, True), ("EHLO", True, True), ("HELO", True, False), ("RSET", False, True),
], ids=["xclient", "ehlo", "helo", "rset"])
async def test_a_pooled_session_silent_at_its_resume_fails_its_check_at_the_deadline(
        caplog, stall_at, xclient, esmtp):
    """The pool's reuse commands (XCLIENT then the client's greeting, or RSET) time out
    from the deadline: the session fails its check and is not used; a new connection is
    opened instead (silent too at XCLIENT or the greeting: 451 4.4.1; a new one is not
    RSET: it serves)."""
    with CapturingDownstream() as ds:
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        first = _downstream(ds, pool, xclient)
        await first.open(_session(esmtp))
        await _rcpt_ok(first)
        assert (await first.data(MSG)).code == 250
        await first.close()
        assert len(pool) == 1
        ds.stall_at = stall_at
        second = _downstream(ds, pool, xclient)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            with caplog.at_level(logging.INFO, logger="smtpgate.relay"):
                async with asyncio.timeout(TIMEOUT * 20):  # without the deadline: for ever
                    if stall_at == "RSET":
                        await second.open(_session(esmtp))
                        assert second.connected and ds.connections == 2
                    else:
                        with pytest.raises(RelayError) as raised:
                            await second.open(_session(esmtp))
                        assert raised.value.reply == relay.UNREACHABLE
        finally:
            await second.close()
            await pool.close()
        assert loop.time() - began >= TIMEOUT - 0.01
        logged = [r.getMessage() for r in caplog.records if r.name == "smtpgate.relay"]
        assert logged[0] == (f"downstream {ds.host}:{ds.port}: pooled session failed its check "
                             "(Timed out waiting for server response); not used"), logged
        if stall_at != "RSET":
            assert logged[-1] == (f"downstream {ds.host}:{ds.port} unavailable: "
                                  "Timed out waiting for server response"), logged


@pytest.mark.parametrize("change", ["second read", "waiter replaced"])
async def test_a_read_on_a_new_waiter_is_bounded_too(caplog, change):
    """Were a later aiosmtplib to read a second reply in one command, or to replace its reply
    waiter before reading, the deadline still ends that read: it fails the protocol's waiter
    as it is when the deadline passes (here MAIL's reply comes, a second never does; or MAIL
    is never answered). Watching the waiter there at the start, these waited for ever."""
    with CapturingDownstream(stall_at="MAIL" if change == "waiter replaced" else None) as ds:
        down = _downstream(ds)
        try:
            await down.open(_session())
            protocol = down._smtp.protocol
            execute = protocol.execute_command

            async def changed_aiosmtplib(*args, timeout=None):
                if change == "second read":
                    await execute(*args, timeout=timeout)
                    return await protocol.read_response(timeout=timeout)
                protocol._response_waiter = asyncio.get_running_loop().create_future()
                return await execute(*args, timeout=timeout)

            protocol.execute_command = changed_aiosmtplib
            with caplog.at_level(logging.WARNING, logger="smtpgate.relay"):
                async with asyncio.timeout(TIMEOUT * 20):
                    with pytest.raises(RelayError) as raised:
                        await down.mail("a@sender.test", [])
            assert raised.value.reply == relay.LOST and not down.connected
            assert [r.getMessage() for r in caplog.records
                    if r.name == "smtpgate.relay"] == [READ_TIMEOUT]
        finally:
            await down.close()


@pytest.mark.parametrize("ending", ["closed", "dropped"])
async def test_a_session_closed_or_dropped_leaves_no_timer_armed(ending):
    """close() and a failure's _drop() stop the deadline's timer: none stays in the loop for
    a session that is gone (nor for a pooled one idle, until the next client's watch)."""
    with CapturingDownstream(drop_at="RCPT" if ending == "dropped" else None) as ds:
        down = _downstream(ds, timeout=30)  # armed well past the test
        try:
            await down.open(_session())
            assert (await down.mail("a@sender.test", [])).code == 250
            assert down._deadline._timer._handle is not None  # armed by MAIL's reply
            if ending == "closed":
                await down.close()
            else:
                with pytest.raises(RelayError):
                    await down.rcpt("user@example.com", [])
                assert not down.connected
            assert down._deadline._timer._handle is None
        finally:
            await down.close()


async def test_a_pooled_session_cancelled_at_its_resume_is_closed():
    """A client gone (its task cancelled) while its pooled session answers XCLIENT: that
    session is closed, not left open outside the pool (a reply still due on it could
    never be paired with a command)."""
    with CapturingDownstream() as ds:
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        first = _downstream(ds, pool, timeout=30)  # no deadline ends the resume first
        await first.open(_session())
        await _rcpt_ok(first)
        assert (await first.data(MSG)).code == 250
        await first.close()
        [entry] = pool._idle
        ds.stall_at = "XCLIENT"
        second = _downstream(ds, pool, timeout=30)
        try:
            opening = asyncio.create_task(second.open(_session()))
            await asyncio.to_thread(ds.wait_for, lambda: ds.stalled == 1, 5, "XCLIENT stalled")
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            assert not entry.smtp.is_connected and len(pool) == 0
            await asyncio.to_thread(ds.wait_for, lambda: ds.sessions[0].closed, 5,
                                    "the pooled session closed")
        finally:
            await second.close()
            await pool.close()
