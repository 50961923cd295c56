"""The work after a transaction's reply, in the conversation: on_delivered, on_end and the
log line run once the driver says the reply is written (``after_reply``); the session's next
step waits for them, ``close()`` never loses them, and nothing of theirs reaches the client."""
from __future__ import annotations

import asyncio
import logging

import pytest

from smtpgate import Rule
from smtpgate.smtp import conversation
from tests.protocol.driver import Client

pytestmark = pytest.mark.timeout(10)


def held():
    """A rule whose on_end waits until the test sets ``release`` (a class per test: fresh events)."""
    class Held(Rule):
        name = "held"
        got: list[str] = []
        started, release = asyncio.Event(), asyncio.Event()

        async def on_mail(self, tx):
            self.got.append("mail")

        async def on_delivered(self, tx, reply):
            self.got.append("delivered")

        async def on_end(self, tx, reply):
            self.started.set()
            await self.release.wait()
            self.got.append(f"end {reply.code if reply else None}")
    return Held



async def test_the_reply_comes_before_the_end_hooks_and_the_next_mail_after_them(caplog):
    rule = held()
    c = await Client([(rule, {})]).connect()
    await c.walk("EHLO c.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<b@example.com>")
    with caplog.at_level(logging.INFO, "smtpgate.transaction"):
        assert (await c.send("DATA")).startswith("250")
        assert rule.got == ["mail"] and not rule.started.is_set()  # nothing ran before the reply
        assert "transaction" not in caplog.messages
        c.conv.after_reply()  # the driver wrote the reply
        await rule.started.wait()
        assert rule.got == ["mail", "delivered"]
        mail = asyncio.ensure_future(c.send("MAIL FROM:<a@sender.example>"))
        for _ in range(20):  # let the MAIL run as far as it can: it waits for the hook
            await asyncio.sleep(0)
        assert not mail.done() and rule.got == ["mail", "delivered"]
        rule.release.set()
        assert await mail == "250 2.1.0 Ok"
    assert rule.got == ["mail", "delivered", "end 250", "mail"]
    [line] = [r for r in caplog.records if r.getMessage() == "transaction"]
    assert "held:end:continue" in line.fields["rules"].text()
    await c.close()


async def test_close_runs_the_work_of_a_reply_never_written():
    rule = held()
    c = await Client([(rule, {})]).connect()
    await c.walk("EHLO c.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<b@example.com>")
    assert (await c.send("DATA")).startswith("250")  # the client left before its reply was written
    rule.release.set()
    await c.close()
    assert rule.got == ["mail", "delivered", "end 250"]


async def test_a_command_cancelled_while_it_waits_does_not_cancel_the_work():
    rule = held()
    c = await Client([(rule, {})]).connect()
    await c.walk("EHLO c.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<b@example.com>")
    await c.send("DATA")
    c.conv.after_reply()
    await rule.started.wait()
    mail = asyncio.ensure_future(c.send("RSET"))
    await asyncio.sleep(0)
    mail.cancel()  # the connection was lost while RSET waited
    with pytest.raises(asyncio.CancelledError):
        await mail
    rule.release.set()
    await c.close()
    assert rule.got == ["mail", "delivered", "end 250"]


async def test_a_failure_after_the_reply_is_logged_and_the_session_goes_on(monkeypatch, caplog):
    class Crashing(Rule):
        name = "crashing"

        async def on_end(self, tx, reply):
            raise RuntimeError("kaboom in on_end")

    def broken_log_line(*args):
        raise ValueError("the log line broke")

    c = await Client([(Crashing, {})]).connect()
    monkeypatch.setattr(conversation, "log_transaction", broken_log_line)
    await c.walk("EHLO c.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<b@example.com>")
    tx = c.conv.tx
    with caplog.at_level(logging.ERROR):
        assert (await c.send("DATA")).startswith("250")
        c.conv.after_reply()
        assert await c.send("MAIL FROM:<a@sender.example>") == "250 2.1.0 Ok"
    assert [(e.stage, e.action) for e in tx.trace if e.rule == "crashing"] == [("end", "error")]
    assert any("the work after the reply failed" in r.getMessage() for r in caplog.records)
    await c.close()


async def test_without_end_hooks_the_log_line_follows_the_reply_at_once(caplog):
    class OnlyDelivered(Rule):
        name = "only_delivered"
        got: list[str] = []

        async def on_delivered(self, tx, reply):
            self.got.append("delivered")

    for rules, delivered in (((), []), ([(OnlyDelivered, {})], ["delivered"])):
        OnlyDelivered.got = []
        c = await Client(rules).connect()
        await c.walk("EHLO c.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<b@example.com>")
        with caplog.at_level(logging.INFO, "smtpgate.transaction"):
            caplog.clear()
            assert (await c.send("DATA")).startswith("250")
            assert caplog.messages == [] and OnlyDelivered.got == []  # not before the reply
            c.conv.after_reply()
            if delivered:  # a hook to run: in a task of its own, awaited by the next step
                assert c.conv.after_pending
                await c.conv.settled()
            assert not c.conv.after_pending
            assert caplog.messages == ["transaction"] and OnlyDelivered.got == delivered
        await c.close()
