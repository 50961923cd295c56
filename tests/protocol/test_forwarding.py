"""XCLIENT and XFORWARD in process: only from a trusted forwarder, only outside a transaction,
and the rules (CONNECT again, HELO, MAIL) and the downstream see the real client afterwards."""
from __future__ import annotations

import pytest

from smtpgate import Rule, Verdict
from smtpgate.smtp import forwarding

from .driver import Client

EHLO, MAIL, RCPT = "EHLO forwarder.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<user@example.com>"


class Watcher(Rule):
    """Records the client each stage saw; refuses sessions from 192.0.2.66 at CONNECT."""

    name = "watcher"

    def setup(self):
        self.seen = []

    async def on_connect(self, session):
        self.seen.append(("connect", session.client_ip, session.client_name))
        session.data["mark"] = session.client_ip
        return Verdict.reject("blocked client") if session.client_ip == "192.0.2.66" else None

    async def on_helo(self, session):
        self.seen.append(("helo", session.client_ip, session.helo))

    async def on_mail(self, tx):
        s = tx.session
        self.seen.append(("mail", s.client_ip, s.client_port, s.client_name, s.helo, s.proto,
                          s.data.get("mark")))


async def client_with(watcher, forwarder=True) -> Client:
    return await Client([watcher], forwarder=forwarder, client_ip="127.0.0.1").connect()


async def test_untrusted_peers_are_refused_in_every_state_and_offered_nothing():
    client = await client_with(Watcher({}, None), forwarder=False)
    assert await client.send("XCLIENT ADDR=192.0.2.7") == "550 5.7.0 XCLIENT is not accepted from clients"
    ehlo = await client.send(EHLO)
    assert "XCLIENT" not in ehlo and "XFORWARD" not in ehlo
    await client.walk(MAIL, RCPT)
    assert await client.send("XFORWARD ADDR=192.0.2.7") == "550 5.7.0 XFORWARD is not accepted from clients"
    assert client.session.client_ip == "127.0.0.1"
    await client.close()


async def test_xclient_starts_a_new_session_as_the_real_client():
    watcher = Watcher({}, None)
    client = await client_with(watcher)
    ehlo = await client.send(EHLO)
    assert "250-XCLIENT NAME ADDR PORT PROTO HELO" in ehlo and "XFORWARD NAME ADDR" in ehlo
    await client.walk(MAIL, RCPT, "DATA")  # the forwarder's own transaction, downstream kept open
    assert client.relay.connected
    reply = await client.send("XCLIENT ADDR=192.0.2.7 PORT=4711 NAME=mx.client+2Eexample "
                              "HELO=real.client.example PROTO=ESMTP LOGIN=[UNAVAILABLE]")
    assert reply == "220 localhost ESMTP smtpgate" and client.state == "GREET"
    assert not client.relay.connected  # it was told the forwarder: the next MAIL opens it anew
    assert await client.send(MAIL) == "503 5.5.1 Error: send HELO first"
    await client.send(EHLO)  # the forwarder's own name does not replace the HELO= it gave
    assert await client.walk(MAIL, RCPT, "DATA") == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: queued"]
    # CONNECT about the forwarder ran at its own first MAIL (it had named nobody yet)
    assert [e for e in watcher.seen if e[0] == "connect"][0] == ("connect", "127.0.0.1", None)
    assert ("connect", "192.0.2.7", "mx.client.example") in watcher.seen
    assert watcher.seen[-1] == ("mail", "192.0.2.7", 4711, "mx.client.example", "real.client.example",
                                "ESMTP", "192.0.2.7")
    await client.close()


async def test_a_connect_refusal_follows_the_real_client_not_the_forwarder():
    client = await client_with(Watcher({}, None))
    await client.send(EHLO)
    assert await client.send("XFORWARD ADDR=192.0.2.66 NAME=[UNAVAILABLE]") == "250 2.0.0 Ok"
    assert (await client.send(MAIL)).startswith("550 5.7.1 blocked client")
    await client.send("RSET")
    assert await client.send("XFORWARD ADDR=IPV6:2001:db8::5") == "250 2.0.0 Ok"
    assert await client.walk(MAIL, RCPT) == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
    assert client.session.client_ip == "2001:db8::5"
    await client.close()


async def test_xforward_keeps_the_greeting_and_reruns_connect_and_helo_rules():
    watcher = Watcher({}, None)
    client = await client_with(watcher)
    await client.send(EHLO)
    assert await client.send("XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.8 PORT=25000 PROTO=ESMTP "
                             "HELO=real.client.example IDENT=4XyZ12 SOURCE=REMOTE") == "250 2.0.0 Ok"
    assert client.state == "READY"
    assert watcher.seen[-2:] == [("connect", "192.0.2.8", None), ("helo", "192.0.2.8", "real.client.example")]
    await client.walk(MAIL, RCPT)
    assert await client.send("XFORWARD ADDR=192.0.2.9") == "503 5.5.1 Error: MAIL transaction in progress"
    assert client.session.client_ip == "192.0.2.8"
    assert client.conv.tx.session.data["forwarder_ident"] == "4XyZ12"
    await client.close()


@pytest.mark.parametrize("line,reply", [
    ("XCLIENT", "501 5.5.4 Syntax: XCLIENT attribute=value..."),
    ("XCLIENT ADDR=not-an-address", "501 5.5.4 Bad XCLIENT address syntax"),
    ("XCLIENT ADDR=999.0.0.1", "501 5.5.4 Bad XCLIENT address syntax"),
    ("XCLIENT IDENT=abc", "501 5.5.4 Bad XCLIENT attribute name"),
    ("XCLIENT ADDR", "501 5.5.4 Bad XCLIENT attribute name"),
    ("XFORWARD PORT=70000", "501 5.5.4 Bad XFORWARD port syntax"),
    ("XFORWARD HELO=a+20b", "501 5.5.4 Bad XFORWARD helo syntax"),
    ("XFORWARD NAME=a+0Db", "501 5.5.4 Bad XFORWARD attribute value"),
    ("XFORWARD NAME=a+zz", "501 5.5.4 Bad XFORWARD attribute value"),
    ("XFORWARD PROTO=UUCP", "501 5.5.4 Bad XFORWARD protocol syntax"),
])
async def test_malformed_arguments_change_nothing(line, reply):
    client = await client_with(Watcher({}, None))
    await client.send(EHLO)
    assert await client.send(line) == reply
    assert client.session.client_ip == "127.0.0.1" and client.state == "READY"
    await client.close()


def test_xtext_and_special_values():
    got = forwarding.parse("XFORWARD", "ADDR=[UNAVAILABLE] NAME=[TEMPUNAVAIL] HELO=a+2Bb IDENT=Q1")
    assert (got.addr, got.name, got.helo, got.ident) == (None, None, "a+b", "Q1")
    assert forwarding.parse("XCLIENT", "addr=::ffff:192.0.2.1").addr == "192.0.2.1"


class Slots(Rule):
    """A connection slot per client taken at CONNECT, given back at disconnect (as limits)."""

    name = "slots"

    def setup(self):
        self.held = []

    async def on_connect(self, session):
        self.held.append(session.client_ip)
        session.data["slot"] = session.client_ip

    async def on_disconnect(self, session):
        self.held.remove(session.data.pop("slot"))


async def test_connect_waits_for_the_real_client_and_the_slot_follows_it():
    slots = Slots({}, None)
    client = await Client([slots], forwarder=True, client_ip="127.0.0.1").connect()
    await client.send(EHLO)
    assert slots.held == []  # nothing taken for the forwarder itself
    await client.send("XFORWARD ADDR=192.0.2.8")
    assert slots.held == ["192.0.2.8"]
    await client.walk(MAIL, RCPT, "DATA")
    await client.send("XFORWARD ADDR=192.0.2.9")  # the next client on the same connection
    assert slots.held == ["192.0.2.9"]
    await client.close()
    assert slots.held == []


async def test_a_forwarder_that_names_nobody_runs_connect_at_mail_about_itself():
    slots = Slots({}, None)
    client = await Client([slots], forwarder=True, client_ip="127.0.0.1").connect()
    await client.send(EHLO)
    assert await client.walk(MAIL, RCPT) == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
    assert slots.held == ["127.0.0.1"]
    await client.close()
    assert slots.held == []


async def test_an_unknown_value_replaces_the_previous_clients():
    client = await client_with(Watcher({}, None))
    await client.send(EHLO)
    await client.send("XFORWARD ADDR=192.0.2.8 NAME=mx.one.example HELO=one.example")
    assert (client.session.client_name, client.session.helo) == ("mx.one.example", "one.example")
    await client.send("XFORWARD ADDR=192.0.2.9 NAME=[UNAVAILABLE] HELO=[UNAVAILABLE]")
    assert (client.session.client_name, client.session.helo) == (None, None)
    await client.close()


async def test_on_disconnect_gets_the_arguments_it_names():
    # on_disconnect, like every hook, may ask for `results` by name (rule.HOOKS): it gets the
    # session's results, not the session in their place.
    seen = []

    class ByName(Rule):
        name = "byname"

        async def on_connect(self, results):
            pass

        async def on_disconnect(self, results):
            seen.append(results)

    client = await Client([ByName({}, None)], client_ip="192.0.2.8").connect()
    await client.send(EHLO)
    session = client.session
    await client.close()
    assert seen == [session.results]
