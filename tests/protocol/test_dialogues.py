"""Whole dialogues in process: bad orders, refusals, postmaster, the policy split, the downstream
refusing or lost — each a few commands to a Conversation and its FakeRelay, no sockets."""
from __future__ import annotations

from smtpgate import Rule, Verdict
from smtpgate.errors import RelayError
from smtpgate.smtp.relay import UNREACHABLE, failure
from smtpgate.smtp.relay_api import Capabilities

from .driver import Client

EHLO, MAIL = "EHLO client.example", "MAIL FROM:<a@sender.example>"


class Refuses(Rule):
    """Refuses at the stages named in its ``stages`` attribute; records what it saw."""

    name = "refuses"
    stages: tuple = ()

    def setup(self):
        self.seen = []

    async def on_mail(self, tx):
        self.seen.append(("mail", tx.sender))
        return Verdict.reject("no sender like that") if "mail" in self.stages else None

    async def on_rcpt(self, tx, rcpt):
        self.seen.append(("rcpt", rcpt.address))
        return Verdict.reject("no recipient like that") if "rcpt" in self.stages else None


def refusing(*stages) -> Refuses:
    rule = Refuses({}, None)
    rule.stages = stages
    return rule


async def test_bad_orders_are_refused_and_change_nothing():
    client = await Client().connect()
    assert await client.walk("RCPT TO:<user@example.com>", "DATA") == [
        "503 5.5.1 Error: send HELO first"] * 2
    await client.send(EHLO)
    assert await client.walk("RCPT TO:<user@example.com>", "DATA") == [
        "503 5.5.1 Error: need MAIL command"] * 2
    assert await client.walk(MAIL, "DATA", MAIL) == [
        "250 2.1.0 Ok", "503 5.5.1 Error: need RCPT command", "503 5.5.1 Error: nested MAIL command"]
    assert client.conv.tx.sender == "a@sender.example"  # the nested MAIL did not replace it
    assert await client.walk("RCPT TO:<user@example.com>", "DATA") == ["250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    [relayed] = client.relayed
    assert (relayed.sender, relayed.recipients) == ("a@sender.example", ["user@example.com"])
    await client.close()


async def test_commands_after_a_refused_mail():
    rule = refusing("mail")
    client = await Client([rule]).connect()
    await client.send(EHLO)
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", "DATA", "RSET", MAIL) == [
        "550 5.7.1 no sender like that", "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok", "550 5.7.1 no sender like that"]
    assert client.state == "READY" and not client.relay.in_transaction
    assert rule.seen == [("mail", "a@sender.example")] * 2
    await client.close()


async def test_a_connect_or_helo_refusal_is_given_at_mail_every_time():
    class NoHelo(Rule):
        name = "nohelo"

        async def on_helo(self, session):
            return Verdict.reject("go away", code=554)

    client = await Client([(NoHelo, {})]).connect()
    assert (await client.send(EHLO)).startswith("250-")  # refused later, where clients log it
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", MAIL) == [
        "554 5.7.1 go away", "503 5.5.1 Error: need MAIL command", "554 5.7.1 go away"]
    assert client.relayed == [] and not client.relay.connected
    await client.close()


async def test_unreachable_downstream_refuses_mail_and_the_next_mail_tries_again():
    client = await Client(relay_replies={"open": RelayError("refused", UNREACHABLE)}).connect()
    await client.send(EHLO)
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>") == [
        "451 4.4.1 Downstream server unavailable, try again later", "503 5.5.1 Error: need MAIL command"]
    del client.relay.replies["open"]  # the downstream is back
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", "DATA") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    await client.close()


async def test_helo_ends_a_transaction_with_recipients():
    client = await Client().connect()
    await client.walk(EHLO, MAIL, "RCPT TO:<user@example.com>")
    assert client.relay.in_transaction
    assert (await client.send("HELO other.example")).startswith("250 ")
    assert client.state == "READY" and not client.relay.in_transaction
    assert client.session.helo == "other.example" and not client.session.esmtp
    assert await client.walk("RCPT TO:<user@example.com>", "DATA") == ["503 5.5.1 Error: need MAIL command"] * 2
    assert client.relayed == []
    await client.close()


async def test_starttls_means_greeting_again():
    client = await Client().connect()
    await client.walk(EHLO, MAIL)
    client.conv.tls_started()
    assert client.state == "GREET"
    assert await client.send("RCPT TO:<user@example.com>") == "503 5.5.1 Error: send HELO first"
    await client.send(EHLO)  # the transaction begun before STARTTLS ends here
    assert client.state == "READY" and client.conv.tx is None
    await client.close()


async def test_postmaster_is_taken_whatever_the_rules_say():
    rule = refusing("rcpt")
    client = await Client([rule]).connect()
    await client.walk(EHLO, MAIL)
    assert await client.walk("RCPT TO:<user@example.com>", "RCPT TO:<postmaster@example.com>",
                             "RCPT TO:<Postmaster>") == [
        "550 5.7.1 no recipient like that", "250 2.1.5 Ok", "250 2.1.5 Ok"]
    assert rule.seen == [("mail", "a@sender.example"), ("rcpt", "user@example.com")]
    assert await client.send("DATA") == "250 2.0.0 Ok: queued"
    assert client.relayed[0].recipients == ["postmaster@example.com", "Postmaster"]
    await client.close()


async def test_postmaster_of_an_ungoverned_domain_is_relaying():
    client = await Client().connect()
    await client.walk(EHLO, MAIL)
    assert await client.send("RCPT TO:<postmaster@elsewhere.test>") == "554 5.7.1 Relay access denied"
    assert client.state == "MAIL"
    await client.close()


async def test_policy_split_asks_for_another_transaction():
    client = await Client(policies={"other.test": []}).connect()
    await client.walk(EHLO, MAIL)
    assert await client.walk("RCPT TO:<a@example.com>", "RCPT TO:<b@other.test>",
                             "RCPT TO:<Postmaster>", "RCPT TO:<c@example.com>") == [
        "250 2.1.5 Ok",
        "452 4.5.3 Recipient governed by another policy, send it in a separate transaction",
        "250 2.1.5 Ok", "250 2.1.5 Ok"]  # bare postmaster: the transaction's policy
    assert await client.walk("DATA", MAIL, "RCPT TO:<b@other.test>", "DATA") == [
        "250 2.0.0 Ok: queued", "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    assert [r.recipients for r in client.relayed] == [
        ["a@example.com", "Postmaster", "c@example.com"], ["b@other.test"]]
    await client.close()


async def test_a_refused_first_recipient_leaves_the_transaction_without_a_policy():
    client = await Client(policies={"other.test": []},
                          relay_replies={"rcpt:nobody@example.com": "550 5.1.1 no such user"}).connect()
    await client.walk(EHLO, MAIL)
    assert await client.walk("RCPT TO:<nobody@example.com>", "RCPT TO:<b@other.test>") == [
        "550 5.1.1 no such user", "250 2.1.5 Ok"]
    await client.close()


async def test_downstream_refusals_pass_through_unchanged():
    client = await Client(relay_replies={"rcpt:nobody@example.com": "550 5.1.1 <nobody@example.com>: unknown",
                                         "data": "554 5.7.1 spam, go away"}).connect()
    await client.walk(EHLO, MAIL)
    assert await client.walk("RCPT TO:<nobody@example.com>", "DATA") == [
        "550 5.1.1 <nobody@example.com>: unknown", "503 5.5.1 Error: need RCPT command"]
    assert await client.walk("RCPT TO:<user@example.com>", "DATA") == ["250 2.1.5 Ok", "554 5.7.1 spam, go away"]
    assert client.state == "READY" and client.relayed == []
    await client.close()


async def test_downstream_refusing_mail_is_the_first_recipients_reply():
    client = await Client(relay_replies={"mail": "451 4.3.0 try later"}).connect()
    await client.walk(EHLO)
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", "DATA") == [
        "250 2.1.0 Ok", "451 4.3.0 try later", "503 5.5.1 Error: need RCPT command"]
    await client.close()


async def test_downstream_lost_at_data_is_a_451_and_the_session_goes_on():
    client = await Client(relay_replies={"data": failure(ConnectionResetError("reset"))}).connect()
    await client.walk(EHLO, MAIL, "RCPT TO:<user@example.com>")
    assert await client.send("DATA") == "451 4.4.2 Downstream connection failed, try again later"
    assert client.state == "READY" and not client.relay.connected
    del client.relay.replies["data"]
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", "DATA") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]  # reopened at MAIL
    await client.close()


async def test_ehlo_offers_what_the_downstream_takes():
    caps = Capabilities()
    caps.update({"size": "1000", "smtputf8": ""})
    client = await Client(capabilities=caps).connect()
    assert (await client.conv.helo("client.example", True, starttls=True)).text.split("\n") == [
        "localhost", "PIPELINING", "SIZE 1000", "SMTPUTF8", "STARTTLS", "ENHANCEDSTATUSCODES"]
    await client.close()


async def test_a_verdict_of_a_mail_that_failed_downstream_does_not_outlive_it():
    """A quarantine decided at a MAIL the unreachable downstream then refused belongs to that
    MAIL only: the next transaction is relayed."""
    class HoldsSome(Rule):
        name = "holds"

        async def on_mail(self, tx):
            return Verdict.quarantine("held") if tx.sender.startswith("hold@") else None

    client = await Client([(HoldsSome, {})], relay_replies={"open": RelayError("refused", UNREACHABLE)}).connect()
    await client.send(EHLO)
    assert (await client.send("MAIL FROM:<hold@sender.example>")).startswith("451 4.4.1")
    del client.relay.replies["open"]
    assert await client.walk(MAIL, "RCPT TO:<user@example.com>", "DATA") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    assert len(client.relayed) == 1 and client.harness.quarantine.held == []
    await client.close()
