"""XCLIENT / XFORWARD from ``trusted_forwarders`` only: the real gate, raw sockets from chosen
loopback source addresses, the capturing downstream told the real client."""
from __future__ import annotations

from tests.support.rawsmtp import connect, reply

BODY = b"Subject: forwarded\r\n\r\nhello\r\n"


def ehlo(s, f, name=b"forwarder.test") -> list[bytes]:
    s.sendall(b"EHLO " + name + b"\r\n")
    lines = []
    while True:
        line = f.readline()
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def transaction(s, f) -> list[bytes]:
    out = []
    for line in (b"MAIL FROM:<a@sender.test>", b"RCPT TO:<user@example.com>", b"DATA"):
        s.sendall(line + b"\r\n")
        out.append(reply(f)[:3])
    s.sendall(BODY + b".\r\n")
    out.append(reply(f)[:3])
    return out


def test_xclient_from_a_trusted_forwarder_names_the_real_client(gate_factory, downstream):
    gate = gate_factory(config={"trusted_forwarders": ["127.0.0.2/32"]})
    s, f = connect(gate, "127.0.0.2")
    with s:
        assert reply(f).startswith(b"220 ")
        assert b"250-XCLIENT NAME ADDR PORT PROTO HELO\r\n" in ehlo(s, f)
        s.sendall(b"XCLIENT ADDR=203.0.113.9 PORT=40001 NAME=[UNAVAILABLE] HELO=real.client.test PROTO=ESMTP\r\n")
        assert reply(f).startswith(b"220 ")
        ehlo(s, f)
        assert transaction(s, f) == [b"250", b"250", b"354", b"250"]
    [msg] = downstream.wait_for_messages(1)
    assert (msg.xclient["ADDR"], msg.xclient["PORT"], msg.xclient["HELO"]) == (
        "203.0.113.9", "40001", "real.client.test")
    assert msg.helo == "real.client.test"


def test_xforward_from_a_trusted_forwarder_and_its_ident_logged(gate_factory, downstream):
    gate = gate_factory(config={"trusted_forwarders": ["127.0.0.2"]})
    s, f = connect(gate, "127.0.0.2")
    with s:
        reply(f)
        assert any(line.startswith(b"250-XFORWARD ") for line in ehlo(s, f))
        s.sendall(b"XFORWARD NAME=[UNAVAILABLE] ADDR=198.51.100.4 PORT=1234 HELO=real.client.test "
                  b"PROTO=ESMTP IDENT=4ABCDEF SOURCE=REMOTE\r\n")
        assert reply(f) == b"250 2.0.0 Ok\r\n"
        assert transaction(s, f) == [b"250", b"250", b"354", b"250"]
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == "198.51.100.4" and msg.xclient["HELO"] == "real.client.test"
    log = gate.wait_for_log("forwarder_id")
    assert "client=198.51.100.4" in log and "4ABCDEF" in log


def test_everyone_else_is_refused_as_before(gate_factory, downstream):
    gate = gate_factory(config={"trusted_forwarders": ["127.0.0.2/32"]})
    s, f = connect(gate, "127.0.0.3")
    with s:
        reply(f)
        listing = b"".join(ehlo(s, f))
        assert b"XCLIENT" not in listing and b"XFORWARD" not in listing
        s.sendall(b"XCLIENT ADDR=203.0.113.9\r\nXFORWARD ADDR=203.0.113.9\r\n")
        assert reply(f) == b"550 5.7.0 XCLIENT is not accepted from clients\r\n"
        assert reply(f) == b"550 5.7.0 XFORWARD is not accepted from clients\r\n"
        assert transaction(s, f) == [b"250", b"250", b"354", b"250"]
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == "127.0.0.3"


def test_a_forwarder_is_not_held_to_the_per_client_limit_its_clients_are(gate_factory, downstream):
    gate = gate_factory(config={"trusted_forwarders": ["127.0.0.2/32"],
                                "limits": {"max_connections_per_client": 1}})
    first, f1 = connect(gate, "127.0.0.2")
    second, f2 = connect(gate, "127.0.0.2")
    with first, second:
        assert reply(f1).startswith(b"220 ") and reply(f2).startswith(b"220 ")
        ehlo(first, f1), ehlo(second, f2)
        first.sendall(b"XFORWARD ADDR=192.0.2.1\r\n")
        assert reply(f1) == b"250 2.0.0 Ok\r\n"
        second.sendall(b"XFORWARD ADDR=192.0.2.1\r\n")  # the same real client twice: one too many
        assert reply(f2).startswith(b"421 4.7.0 ")
