"""The gate in front of real Postfix, deployed the way a user would.

client (smtplib or a raw socket) -> the real gate (child process) -> a private Postfix
instance (tests/support/postfixproc.py: smtpd on 127.0.0.1, XCLIENT/XFORWARD allowed from
127.0.0.0/8, accepts example.com, rejects nobody@example.com at RCPT) -> Postfix relays what
it queued to a CapturingDownstream (`postfix.relay`), so the tests see what Postfix
delivered, and read Postfix's own log (maillog_file) for what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import smtplib
import socket

import pytest

from tests.support.waiting import wait_until
from tests.support.postfixproc import MYHOSTNAME, REJECTED_RECIPIENT, postfix_downstream, start_postfix  # noqa: F401 (fixture)
from smtpgate.stores.quarantine import MaildirQuarantine
from smtpgate.testing import Harness
from smtpgate_rules.attachments import Attachments
from tests.support.quarantine import RAW, cli, write_config

SENDER = "alice@sender.test"
# after BDAT, Postfix says how many bytes it took: "Ok: 9779 bytes queued as QUEUEID"
QUEUED = re.compile(r"^2\.0\.0 Ok: (?:\d+ bytes )?queued as ([0-9A-F]{6,})$")

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: User <user@example.com>\r\n"
    b"Subject: through the gate and Postfix\r\n"
    b"Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <intact-1@sender.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"X-Folded: first part\r\n"
    b"\tsecond part\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".a line that starts with a dot (stuffed on the wire, one dot on arrival)\r\n"
    b"..two dots\r\n"
    b".\tdot-tab\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"8-bit text: gr\xc3\xbc\xc3\x9fe, \xe2\x82\xac 10\r\n"
    + b"x" * 900 + b"\r\n"
    + b"".join(b"line %04d of a longer body\r\n" % i for i in range(300))
    + b"last line\r\n"
)


# ---------------------------------------------------------------------------- helpers
def _text(msg: bytes | str) -> str:
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def stuff(data: bytes) -> bytes:
    """SMTP dot stuffing for a CRLF-only message (what smtplib does for the other tests)."""
    return re.sub(rb"(?m)^\.", b"..", data)


def queue_id(reply: tuple[int, bytes]) -> str:
    """The QUEUEID in Postfix's final `250 2.0.0 Ok: queued as QUEUEID` (asserting that form)."""
    code, text = reply
    m = QUEUED.match(_text(text))
    assert code == 250 and m, f"not Postfix's own final reply: {reply!r}"
    return m.group(1)


def split_received(arrived: bytes, original: bytes) -> bytes:
    """Assert `arrived` is `original` with Received header(s) put on top; return those."""
    assert arrived.endswith(original), (
        f"the message did not arrive intact\n--- arrived ---\n{arrived!r}\n--- sent ---\n{original!r}")
    added = arrived[: len(arrived) - len(original)]
    assert re.fullmatch(rb"(Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+", added), (
        f"Postfix added more than Received headers on top: {added!r}")
    return added


def gate_log_tx(gate, pattern: str, timeout: float = 10.0) -> re.Match:
    """Wait for the gate's transaction log line matching `pattern` (a regex)."""
    rx = re.compile(pattern, re.M)
    return wait_until(lambda: rx.search(gate.log_text()), timeout,
                      what=lambda: f"the gate log to match {pattern!r}\n--- gate log ---\n{gate.log_text()}")


class Raw:
    """A raw socket SMTP client: exact bytes out, whole (multi-line) replies in."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.f = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.f.readline()
            assert line, f"connection closed after {b''.join(lines)!r}"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()


# ---------------------------------------------------------------------------- tests
def test_message_arrives_intact_with_postfix_final_reply(gate_factory, postfix_downstream):
    """gate -> Postfix -> relay: the bytes arrive unchanged under Postfix's Received header,
    and the client's final reply is Postfix's own `250 2.0.0 Ok: queued as QUEUEID`."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with gate.smtp() as c:
        code, ehlo = c.ehlo()
        assert code == 250
        # The gate's EHLO is built from Postfix's: 8BITMIME and SMTPUTF8 offered, never
        # CHUNKING/XCLIENT/XFORWARD although Postfix offers them to the gate.
        words = {w.split()[0].upper() for w in _text(ehlo).splitlines()[1:]}
        assert {"8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"} <= words
        assert not words & {"CHUNKING", "XCLIENT", "XFORWARD", "AUTH"}
        assert c.mail(SENDER, ["BODY=8BITMIME"])[0] == 250
        assert c.rcpt("user@example.com")[0] == 250
        final = c.data(MESSAGE)
    qid = queue_id(final)

    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    assert msg.mail_from == SENDER
    assert msg.rcpts == ["user@example.com"]
    received = split_received(msg.data, MESSAGE)
    assert received.count(b"Received:") == 1
    assert f"by {MYHOSTNAME} (Postfix) with ESMTP id {qid}".encode() in received
    # The wire bytes Postfix sent are correctly dot-stuffed (the relay's unstuffing matches).
    assert b"\r\n..a line that starts with a dot" in msg.data_raw
    assert b"\r\n...two dots\r\n" in msg.data_raw

    # Postfix's log: that queue id, handed on to the relay.
    postfix.wait_for_log(rf"{qid}: to=<user@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                         rf"{postfix.relay.port}, .*status=sent")


def test_xclient_postfix_sees_the_real_client_and_its_helo(gate_factory, postfix_downstream):
    """Postfix accepts the gate's XCLIENT: its log names the client's own address, port and
    HELO (not the gate's connection), and so does the Received header it adds."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with gate.smtp(local_hostname="helo.client.test") as c:
        client_port = c.sock.getsockname()[1]
        c.ehlo()
        c.mail(SENDER)
        c.rcpt("user@example.com")
        qid = queue_id(c.data(MESSAGE))

    # client=NAME[ADDR]:PORT (smtpd_client_port_logging): the port is the client's socket's,
    # which only XCLIENT PORT can have told Postfix; NAME is unknown (the gate sends
    # NAME=[UNAVAILABLE]).
    postfix.wait_for_log(rf"smtpd\[\d+\]: {qid}: client=unknown\[127\.0\.0\.1\]:{client_port}\b")
    # Postfix's own record of the RCPT: the HELO is the client's, not the gate's (gate.test).
    postfix.wait_for_log(r"info: RCPT from unknown\[127\.0\.0\.1\]:%d: .*to=<user@example\.com> "
                         r"proto=ESMTP helo=<helo\.client\.test>" % client_port)
    assert "helo=<gate.test>" not in postfix.log_text()
    # The session's counters include the XCLIENT (Postfix 3.7 prints `xclient=0/1` even for
    # an accepted one: its effect is what the lines above prove).
    postfix.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]:%d .*xclient=" % client_port)

    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    received = split_received(msg.data, MESSAGE)
    assert received.startswith(b"Received: from helo.client.test (unknown [127.0.0.1])"), received


def test_a_starttls_client_is_named_with_a_proto_postfix_takes(gate_factory, postfix_downstream,
                                                               tmp_path, require_tool):
    """A client that used STARTTLS is ESMTPS in the gate's log, but XCLIENT PROTO takes only
    SMTP or ESMTP (Postfix answered ESMTPS with 501, and the client got 451 4.4.1 at MAIL)."""
    import ssl
    from tests.support.testca import TestCA
    postfix = postfix_downstream
    ca = TestCA(tmp_path / "ca", require_tool("openssl"))
    cert, key = ca.issue("served", ["127.0.0.1"], serial=1)
    gate = gate_factory(downstream_port=postfix.port, config={"tls": {"cert": str(cert), "key": str(key)}})
    with gate.smtp(local_hostname="tls.client.test") as c:
        client_port = c.sock.getsockname()[1]
        c.starttls(context=ssl.create_default_context(cafile=str(ca.cert)))
        c.ehlo()
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt("user@example.com")[0] == 250
        queue_id(c.data(MESSAGE))
    postfix.wait_for_log(r"info: RCPT from unknown\[127\.0\.0\.1\]:%d: .*proto=ESMTP "
                         r"helo=<tls\.client\.test>" % client_port)


def _proxied_delivery(gate, proxy: bytes, greeting: bytes) -> str:
    """One client connection through the gate (its address from a PROXY header): the queue id."""
    raw = Raw(gate.address)
    try:
        raw.send(proxy + b"\r\n")
        assert raw.reply().startswith(b"220 ")
        assert raw.cmd(greeting).startswith(b"250")
        assert raw.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
        assert raw.cmd(b"RCPT TO:<user@example.com>").startswith(b"250")
        assert raw.cmd(b"DATA").startswith(b"354")
        final = raw.cmd(stuff(MESSAGE) + b".")
        assert raw.cmd(b"QUIT").startswith(b"221")
    finally:
        raw.close()
    return queue_id((int(final[:3]), final[4:].rstrip(b"\r\n")))


def test_xclient_with_proxy_protocol_client(gate_factory, postfix_downstream):
    """With `proxy_protocol: true`, the address from the PROXY v1 header is what the gate
    hands Postfix: Postfix logs client=unknown[203.0.113.7] and its Received header names it."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port, config={"proxy_protocol": True})
    qid = _proxied_delivery(gate, b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 25", b"EHLO proxied.client.test")

    postfix.wait_for_log(rf"smtpd\[\d+\]: {qid}: client=unknown\[203\.0\.113\.7\]:40123\b")
    postfix.wait_for_log(r"info: RCPT from unknown\[203\.0\.113\.7\]:40123: .*helo=<proxied\.client\.test>")
    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    received = split_received(msg.data, MESSAGE)
    assert received.startswith(b"Received: from proxied.client.test (unknown [203.0.113.7])"), received
    assert b"127.0.0.1" not in received


POOL = {"downstream": {"pool": {"size": 8}}}


@contextlib.contextmanager
def _renaming_postfix(gate_factory, downstream_factory, tmp_path):
    """A Postfix whose gate-facing smtpd allows XCLIENT from any address (only the gate can
    reach it), relaying to a capturing downstream, and a gate in front with the pool and
    PROXY on: (gate, postfix, relay)."""
    relay = downstream_factory()
    postfix = start_postfix(tmp_path / "postfix", relay_port=relay.port,
                            smtpd_options=("smtpd_authorized_xclient_hosts=0.0.0.0/0,[::]/0",))
    try:
        yield (gate_factory(downstream_port=postfix.port,
                            config={"proxy_protocol": True, **POOL, "log": {"level": "debug"}}),
               postfix, relay)
    finally:
        postfix.stop()


FIRST_GREETINGS = pytest.mark.parametrize("first_greeting", [b"EHLO", b"HELO"])


@FIRST_GREETINGS
def test_pooled_session_greeted_again_carries_only_the_next_clients_attributes(
        gate_factory, downstream_factory, tmp_path, first_greeting):
    """downstream.pool against Postfix, which authorises XCLIENT after an XCLIENT by the
    *named* client's address: with the gate-facing smtpd allowing XCLIENT from any address
    (only the gate can reach it), the second client's message goes through the same smtpd
    session, re-greeted with XCLIENT + HELO, and Postfix sees only the second client. After
    a HELO client the gate's own EHLO is what shows that XCLIENT is still offered."""
    with _renaming_postfix(gate_factory, downstream_factory, tmp_path) as (gate, postfix, relay):
        first = _proxied_delivery(gate, b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 25",
                                  first_greeting + b" first.client.test")
        # given back once the client left (after a HELO client: once the gate's EHLO answered)
        gate.wait_for_log("session given back to the pool")
        second = _proxied_delivery(gate, b"PROXY TCP4 198.51.100.8 127.0.0.1 40999 25",
                                   b"HELO second.client.test")
        a = postfix.wait_for_log(rf"smtpd\[(\d+)\]: {first}: client=unknown\[203\.0\.113\.7\]:40123\b")
        b = postfix.wait_for_log(rf"smtpd\[(\d+)\]: {second}: client=unknown\[198\.51\.100\.8\]:40999\b")
        assert a.group(1) == b.group(1)
        # one session served both: the start-up probe's connection, then only this one
        assert len(re.findall(r": connect from ", postfix.log_text())) == 2
        postfix.wait_for_log(r"info: RCPT from unknown\[198\.51\.100\.8\]:40999: .*proto=SMTP "
                             r"helo=<second\.client\.test>")
        assert "pooled session failed" not in gate.log_text()
        msgs = relay.wait_for_messages(2, timeout=10)
        [received] = [split_received(m.data, MESSAGE) for m in msgs
                      if f" id {second}".encode() in m.data[:400]]
        assert received.startswith(b"Received: from second.client.test (unknown [198.51.100.8])"), received
        assert b"first.client.test" not in received and b"203.0.113.7" not in received


def test_helo_clients_named_alike_share_a_session_with_one_ehlo_check(
        gate_factory, downstream_factory, tmp_path):
    """Three HELO clients from one address through one pooled smtpd session: the gate's EHLO
    after the first showed XCLIENT offered for that NAME and ADDR, and Postfix decides by
    those alone, so the next two are kept without asking again (one EHLO check, not three),
    and each XCLIENT is taken."""
    with _renaming_postfix(gate_factory, downstream_factory, tmp_path) as (gate, postfix, relay):
        ids = []
        for n in range(3):
            logged = len(gate.log_text())
            ids.append(_proxied_delivery(gate, b"PROXY TCP4 203.0.113.7 127.0.0.1 %d 25" % (40123 + n),
                                         b"HELO client.test"))
            gate.wait_for_log("session given back to the pool", start=logged)
        pids = {postfix.wait_for_log(rf"smtpd\[(\d+)\]: {qid}: client=unknown\[203\.0\.113\.7\]:"
                                     rf"{40123 + n}\b").group(1) for n, qid in enumerate(ids)}
        assert len(pids) == 1
        assert len(re.findall(r": connect from ", postfix.log_text())) == 2  # the probe, this one
        assert "insufficient authorization" not in postfix.log_text()
        assert "pooled session failed" not in gate.log_text()
        assert gate.log_text().count("is XCLIENT still offered after a HELO client?") == 1
        relay.wait_for_messages(3, timeout=10)


@FIRST_GREETINGS
def test_a_session_postfix_will_not_let_rename_is_not_pooled(gate_factory, postfix_downstream,
                                                             first_greeting):
    """With Postfix's XCLIENT allowed from the gate's address only (the usual set-up), a session
    named as an outside client cannot take another XCLIENT: the gate closes it instead of
    pooling it, and the next client gets a new session, without any error."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port, config={"proxy_protocol": True, **POOL})
    first = _proxied_delivery(gate, b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 25",
                              first_greeting + b" first.client.test")
    second = _proxied_delivery(gate, b"PROXY TCP4 198.51.100.8 127.0.0.1 40999 25", b"EHLO second.client.test")
    postfix.wait_for_log(rf"smtpd\[(\d+)\]: {first}: client=unknown\[203\.0\.113\.7\]:40123\b")
    postfix.wait_for_log(rf"smtpd\[(\d+)\]: {second}: client=unknown\[198\.51\.100\.8\]:40999\b")
    postfix.wait_for_log(r"disconnect from unknown\[203\.0\.113\.7\]:40123 .*quit=1")  # said QUIT
    assert "insufficient authorization" not in postfix.log_text()
    assert "pooled session failed" not in gate.log_text()
    # the start-up probe, the first client's session, the second's
    assert len(re.findall(r": connect from ", postfix.log_text())) == 3


def test_xforward_ident_carries_the_gate_transaction_id(gate_factory, postfix_downstream):
    """The gate's `tx=` id (its one log line per transaction) reaches Postfix as XFORWARD
    IDENT and shows in Postfix's log line for that very queue id."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with gate.smtp() as c:
        c.ehlo()
        c.mail(SENDER)
        c.rcpt("user@example.com")
        qid = queue_id(c.data(MESSAGE))

    tx = gate_log_tx(gate, rf"transaction tx=(\S+) .*reply=.*queued as {qid}").group(1)
    line = postfix.wait_for_log(rf"^.*smtpd\[\d+\]: {qid}: client=.*$").group(0)
    assert f"orig_queue_id={tx}" in line, line
    postfix.relay.wait_for_messages(1, timeout=10)


@pytest.mark.parametrize("order", ["rejected-first", "rejected-between"])
def test_postfix_recipient_check_passes_through_at_rcpt(gate_factory, postfix_downstream, order):
    """Postfix's RCPT-time rejection reaches the client unchanged (code, enhanced code,
    text: the same reply Postfix gives a direct client), while the transaction's other
    recipients are delivered."""
    postfix = postfix_downstream
    # What Postfix itself answers a direct client for that recipient.
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname="direct.test", timeout=10) as d:
        d.ehlo()
        d.mail(SENDER)
        direct = d.rcpt(REJECTED_RECIPIENT)
        d.rset()
    assert direct[0] == 550 and _text(direct[1]).startswith("5.1.1 "), direct
    assert "User unknown" in _text(direct[1])

    gate = gate_factory(downstream_port=postfix.port)
    if order == "rejected-first":
        rcpts = [REJECTED_RECIPIENT, "user@example.com", "other@example.com"]
    else:
        rcpts = ["user@example.com", REJECTED_RECIPIENT, "other@example.com"]
    with gate.smtp() as c:
        c.ehlo()
        assert c.mail(SENDER)[0] == 250
        replies = {r: c.rcpt(r) for r in rcpts}
        qid = queue_id(c.data(MESSAGE))
    assert replies[REJECTED_RECIPIENT] == direct
    assert replies["user@example.com"][0] == 250
    assert replies["other@example.com"][0] == 250

    postfix.relay.wait_for_messages(1, timeout=10)
    postfix.wait_for_log(rf"{qid}: removed")  # every recipient of that queue file handled
    msgs = list(postfix.relay.messages)
    assert sorted(r for m in msgs for r in m.rcpts) == ["other@example.com", "user@example.com"]
    assert all(m.data.endswith(MESSAGE) for m in msgs)
    postfix.wait_for_log(r"reject: RCPT from unknown\[127\.0\.0\.1\]:\d+: 550 5\.1\.1 <nobody@example\.com>: "
                         r"Recipient address rejected: User unknown; .*helo=<client\.test>")


def test_several_transactions_share_one_postfix_session(gate_factory, postfix_downstream):
    """Three transactions over one client connection: one downstream session (the gate
    reuses it), three distinct queue ids, three messages delivered."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    qids = []
    with gate.smtp() as c:
        client_port = c.sock.getsockname()[1]
        c.ehlo()
        for n in range(3):
            assert c.mail(f"sender{n}@sender.test")[0] == 250
            assert c.rcpt(f"user{n}@example.com")[0] == 250
            qids.append(queue_id(c.data(MESSAGE.replace(b"intact-1@", b"intact-%d@" % n))))
    assert len(set(qids)) == 3

    msgs = postfix.relay.wait_for_messages(3, timeout=10)
    assert sorted(m.mail_from for m in msgs) == [f"sender{n}@sender.test" for n in range(3)]
    assert sorted(r for m in msgs for r in m.rcpts) == [f"user{n}@example.com" for n in range(3)]

    # One smtpd session carried all three: its disconnect line counts them, and it is the
    # only session with any MAIL (the other one is the gate's start-up EHLO probe).
    end = postfix.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]:%d .*" % client_port)
    counts = dict(re.findall(r"(\w+)=(\d+)", end.group(0)))
    # (each message as BDAT: Postfix offers CHUNKING to the gate)
    assert (counts.get("mail"), counts.get("rcpt"), counts.get("bdat")) == ("3", "3", "3"), end.group(0)
    log = postfix.log_text()
    assert len(re.findall(r"disconnect from .* mail=", log)) == 1, log
    pids = {re.search(rf"smtpd\[(\d+)\]: {q}: client=", log).group(1) for q in qids}
    assert len(pids) == 1, log


SMUGGLING_BODY = (
    b"From: alice@sender.test\r\nTo: user@example.com\r\nSubject: smuggle\r\n\r\n"
    b"first line"
    b"\n.\n"
    b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"From: evil@evil.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n")


def test_control_this_postfix_alone_is_smugglable(postfix_downstream):
    """Control for the next test: the private Postfix (smtpd_forbid_bare_newline = no) takes
    `\\n.\\n` as end of data when talked to directly, so the smuggled MAIL/RCPT/DATA become a
    second message. What keeps it out in the next test is the gate."""
    postfix = postfix_downstream
    raw = Raw(postfix.address)
    try:
        assert raw.reply().startswith(b"220 ")
        assert raw.cmd(b"EHLO client.test").startswith(b"250")
        assert raw.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
        assert raw.cmd(b"RCPT TO:<user@example.com>").startswith(b"250")
        assert raw.cmd(b"DATA").startswith(b"354")
        raw.send(SMUGGLING_BODY + b"\r\n.\r\n")
        # end of data, then the smuggled MAIL, RCPT, DATA and the smuggled message's end
        replies = [raw.reply() for _ in range(5)]
        assert raw.cmd(b"QUIT").startswith(b"221")
    finally:
        raw.close()
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250"], replies
    msgs = postfix.relay.wait_for_messages(2, timeout=10)
    assert sorted(r for m in msgs for r in m.rcpts) == ["user@example.com", "victim@example.com"]


def test_smuggling_attempt_yields_exactly_one_postfix_message(gate_factory, postfix_downstream):
    """`\\n.\\n` then `MAIL FROM` inside DATA, over a raw socket: through the gate, Postfix
    queues and delivers exactly one message, which carries the would-be commands as text."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    body = SMUGGLING_BODY
    raw = Raw(gate.address)
    try:
        assert raw.reply().startswith(b"220 ")
        assert raw.cmd(b"EHLO client.test").startswith(b"250")
        assert raw.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
        assert raw.cmd(b"RCPT TO:<user@example.com>").startswith(b"250")
        assert raw.cmd(b"DATA").startswith(b"354")
        raw.send(body + b"\r\n.\r\n")
        final = raw.reply()
        client_port = raw.sock.getsockname()[1]
        assert raw.cmd(b"QUIT").startswith(b"221")
    finally:
        raw.close()
    assert final.count(b"\r\n") == 1, final  # one reply: nothing after the real end of data
    qid = queue_id((int(final[:3]), final[4:].rstrip(b"\r\n")))

    # Wait for the whole Postfix session to be over, then count what it queued.
    postfix.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]:%d .* mail=1 rcpt=1 bdat=1 " % client_port)
    postfix.wait_for_log(rf"{qid}: removed")
    assert postfix.queue_ids() == [qid], postfix.log_text()
    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    assert postfix.relay.messages == [msg]
    assert msg.mail_from == "alice@sender.test" and msg.rcpts == ["user@example.com"]
    assert b"\r\n.\r\nMAIL FROM:<evil@evil.test>\r\n" in msg.data  # text, normalised to CRLF
    assert b"smuggled body\r\n" in msg.data
    assert "victim@example.com" not in postfix.log_text()


def test_helo_client_stays_smtp_in_postfix(gate_factory, postfix_downstream):
    """A client that said HELO (not EHLO) is greeted downstream the same way after XCLIENT,
    so Postfix records proto=SMTP and writes "with SMTP", as if the client had come direct."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with gate.smtp(local_hostname="old.client.test") as c:
        client_port = c.sock.getsockname()[1]
        c.helo()
        c.mail(SENDER)
        c.rcpt("user@example.com")
        queue_id(c.data(MESSAGE))
    postfix.wait_for_log(r"RCPT from unknown\[127\.0\.0\.1\]:%d: .*proto=SMTP "
                         r"helo=<old\.client\.test>" % client_port)
    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    assert b"with SMTP id" in split_received(msg.data, MESSAGE)


# ---------------------------------------------------------------------------- XCLIENT injection
# This Postfix variant lets a SASL login relay anywhere (permit_sasl_authenticated first), as
# a submission-minded Postfix would: a client able to set XCLIENT LOGIN= through the gate
# could relay through it. elsewhere.test is governed by the gate's policy but not relayed by
# Postfix, so whether Postfix takes it shows whether it believes in a login.
SASL_RELAY = ("smtpd_sasl_auth_enable=yes",
              "smtpd_recipient_restrictions=permit_sasl_authenticated,"
              "check_recipient_access,texthash:{etc}/recipient_access,reject_unauth_destination")
VICTIM = "victim@elsewhere.test"
BOTH_DOMAINS = {"default.yaml": "domains: [example.com, elsewhere.test]\nrules: []\n"}


@pytest.fixture
def postfix_sasl(tmp_path, downstream_factory):
    relay = downstream_factory()
    pf = start_postfix(tmp_path / "postfix-sasl", relay_port=relay.port, smtpd_options=SASL_RELAY)
    pf.relay = relay
    yield pf
    code = pf.stop()
    print(f"--- postfix master pid {pf.pid} exited {code} ---\n{pf.log_text()[-6000:]}")


def test_control_xclient_login_lets_a_client_relay_through_this_postfix(postfix_sasl):
    """Control: the XCLIENT LOGIN= an injection would add makes this Postfix relay to
    elsewhere.test and log the login; and an xtext-encoded address literal HELO is decoded
    back to the literal (`+5B192.0.2.1+5D` -> `[192.0.2.1]`)."""
    raw = Raw(postfix_sasl.address)
    try:
        assert raw.reply().startswith(b"220 ")
        assert b"LOGIN" in raw.cmd(b"EHLO gate.test")
        assert raw.cmd(b"XCLIENT HELO=+5B192.0.2.1+5D LOGIN=admin").startswith(b"220 ")
        assert raw.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
        assert raw.cmd(f"RCPT TO:<{VICTIM}>".encode()).startswith(b"250")
        assert raw.cmd(b"QUIT").startswith(b"221")
    finally:
        raw.close()
    postfix_sasl.wait_for_log(r"client=unknown\[127\.0\.0\.1\]:\d+, sasl_method=XCLIENT, sasl_username=admin")
    postfix_sasl.wait_for_log(r"disconnect from .* rcpt=1 ")


def test_hostile_greeting_sets_no_login_in_postfix_and_cannot_relay(gate_factory, postfix_sasl):
    """`EHLO [x LOGIN=admin` (and the like) get 501 5.5.2; the greeting the gate accepts goes
    to Postfix as one encoded attribute: Postfix never logs a login, refuses to relay, and
    records the client's address literal HELO as sent."""
    postfix = postfix_sasl
    gate = gate_factory(downstream_port=postfix.port, policies=BOTH_DOMAINS)
    raw = Raw(gate.address)
    try:
        assert raw.reply().startswith(b"220 ")
        for hostile in (b"[x LOGIN=admin", b"[x LOGIN=admin]", b"x LOGIN=admin DESTADDR=192.0.2.9",
                        b"LOGIN=admin", b"[192.0.2.1]\tLOGIN=admin"):
            r = raw.cmd(b"EHLO " + hostile)
            assert r.startswith(b"501 5.5.2 "), (hostile, r)
        assert raw.cmd(b"EHLO [192.0.2.1]").startswith(b"250")
        assert raw.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
        denied = raw.cmd(f"RCPT TO:<{VICTIM}>".encode())
        assert denied.startswith(b"554 5.7.1 ") and b"Relay access denied" in denied, denied
        assert raw.cmd(b"RCPT TO:<user@example.com>").startswith(b"250")
        assert raw.cmd(b"DATA").startswith(b"354")
        final = raw.cmd(stuff(MESSAGE) + b".")
        client_port = raw.sock.getsockname()[1]
        assert raw.cmd(b"QUIT").startswith(b"221")
    finally:
        raw.close()
    queue_id((int(final[:3]), final[4:].rstrip(b"\r\n")))
    postfix.wait_for_log(r"reject: RCPT from unknown\[127\.0\.0\.1\]:%d: 554 5\.7\.1 <victim@elsewhere\.test>: "
                         r"Relay access denied; .*helo=<\[192\.0\.2\.1\]>" % client_port)
    postfix.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]:%d " % client_port)
    log = postfix.log_text()
    assert "sasl_username" not in log and "sasl_method" not in log and "LOGIN" not in log, log
    [msg] = postfix.relay.wait_for_messages(1, timeout=10)
    assert msg.rcpts == ["user@example.com"]


def _hold_both_domains(folder, **send) -> str:
    """Like test_quarantine.hold, with elsewhere.test governed too; returns the held id."""
    store = MaildirQuarantine(str(folder))
    h = Harness([(Attachments, {"action": "quarantine"})], domains=["example.com", "elsewhere.test"])
    h.gate.quarantine = store
    result = asyncio.run(h.send(RAW, client_ip="198.51.100.7", **send))
    assert result.reply.code == 554 and [r.address for r in result.transaction.recipients] == send["recipients"]
    return result.trace[-1].reason.removeprefix("held as ")


def test_quarantine_release_of_a_stored_hostile_helo_sets_no_login(tmp_path, capsys, postfix_sasl):
    """A held message whose stored greeting is `[x LOGIN=admin` (a session from before the
    greeting check) is released through the same encoding: no login, no relaying."""
    postfix = postfix_sasl
    config = write_config(tmp_path, postfix.port)
    qid = _hold_both_domains(tmp_path / "q", helo="[x LOGIN=admin", sender="alice@sender.test",
                             recipients=[VICTIM, "user@example.com"])
    code, out, err = cli(capsys, "quarantine", "release", qid, "--json", "-c", config)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["recipients"][VICTIM].startswith("554 5.7.1"), doc
    assert doc["recipients"]["user@example.com"].startswith("250"), doc
    postfix.wait_for_log(r"reject: RCPT from .*<victim@elsewhere\.test>: Relay access denied")
    log = postfix.log_text()
    assert "sasl_username" not in log and "LOGIN" not in log, log


@FIRST_GREETINGS
def test_postfix_sees_no_improper_pipelining(gate_factory, postfix_downstream, first_greeting):
    """The gate pipelines XFORWARD IDENT, MAIL and the first RCPT only after an EHLO whose
    answer offered PIPELINING (RFC 2920): after XCLIENT + HELO for a HELO client Postfix has
    offered nothing, and flags commands sent ahead (`reject_unauth_pipelining`; from 3.9,
    `smtpd_forbid_unauth_pipelining` disconnects)."""
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with gate.smtp(local_hostname="client.test") as c:
        assert (c.ehlo() if first_greeting == b"EHLO" else c.helo())[0] == 250
        c.mail(SENDER)
        c.rcpt("user@example.com")
        qid = queue_id(c.data(MESSAGE))
    postfix.wait_for_log(rf"{qid}: client=")
    postfix.wait_for_log(r"disconnect from ")
    assert "improper command pipelining" not in postfix.log_text()


# ---------------------------------------------------------------------------- BDAT (RFC 3030)
BDAT_BODIES = {
    "dots-and-8bit": MESSAGE,
    # bare CR and bare LF: the gate's front makes them CRLF before anything relays them
    "bare-line-ends": b"Subject: bare\r\n\r\nlf\nand cr\rand both\r\n.dot after lf\n..\r\nend\r\n",
    "smuggling": SMUGGLING_BODY,
    "empty": b"",
}


def _relayed(gate, postfix, bodies: list[bytes]) -> tuple[list[bytes], dict[str, str]]:
    """Each body (exact client bytes, dot-stuffed here) in its own transaction of one EHLO
    client session: what Postfix relayed, its Received header taken off, in order; and the
    command counts of Postfix's session for that client."""
    c = Raw(gate.address)
    try:
        c.reply()
        client_port = c.sock.getsockname()[1]
        assert c.cmd(b"EHLO client.test").startswith(b"250")
        for n, body in enumerate(bodies):
            assert c.cmd(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
            assert c.cmd(b"RCPT TO:<user%d@example.com>" % n).startswith(b"250")
            assert c.cmd(b"DATA").startswith(b"354")
            c.send(stuff(body) + (b".\r\n" if body.endswith(b"\r\n") or not body else b"\r\n.\r\n"))
            final = c.reply()
            queue_id((int(final[:3]), final[4:].rstrip()))
        assert c.cmd(b"QUIT").startswith(b"221")
    finally:
        c.close()
    msgs = postfix.relay.wait_for_messages(len(bodies), timeout=10)
    by_rcpt = {m.rcpts[0]: re.sub(rb"\A(Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+", b"", m.data)
               for m in msgs}
    end = postfix.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]:%d .*" % client_port)
    return [by_rcpt[f"user{n}@example.com"] for n in range(len(bodies))], dict(
        re.findall(r"(\w+)=(\d+)", end.group(0)))


def test_bdat_to_postfix_delivers_what_data_delivers(gate_factory, postfix_downstream, tmp_path,
                                                     downstream_factory):
    """Postfix offers CHUNKING: the gate sends each message as one BDAT (the empty one
    keeps DATA and its lone dot); a Postfix told not to offer it gets DATA. What Postfix
    relays on is byte-identical either way, for the dot, bare line-end, smuggling and empty
    messages and a sample of the corpus."""
    from tests.process.test_corpus import FILES, wire_bytes
    bodies = list(BDAT_BODIES.values()) + [wire_bytes(path) for path in FILES[::10]]
    relay = downstream_factory()
    plain = start_postfix(tmp_path / "no-chunking", relay_port=relay.port,
                          main_cf="smtpd_discard_ehlo_keywords = chunking\n")
    plain.relay = relay
    try:
        by_data, data_counts = _relayed(gate_factory(downstream_port=plain.port), plain, bodies)
    finally:
        plain.stop()
    by_bdat, bdat_counts = _relayed(gate_factory(downstream_port=postfix_downstream.port),
                                    postfix_downstream, bodies)
    n = str(len(bodies) - 1)
    assert (data_counts.get("data"), data_counts.get("bdat")) == (str(len(bodies)), None), data_counts
    assert (bdat_counts.get("data"), bdat_counts.get("bdat")) == ("1", n), bdat_counts
    assert by_bdat == by_data
    assert by_bdat[0] == MESSAGE and by_bdat[3] == b""


def test_a_bdat_postfix_refuses_is_the_clients_reply_and_the_session_goes_on(gate_factory, tmp_path,
                                                                             downstream_factory):
    """Postfix's data restrictions refuse at the BDAT: the client gets that reply, and its
    next transaction on the same session is delivered."""
    relay = downstream_factory()
    postfix = start_postfix(tmp_path / "postfix", relay_port=relay.port, main_cf=(
        "smtpd_data_restrictions = check_sender_access inline:{ refused@sender.test=REJECT }\n"))
    try:
        gate = gate_factory(downstream_port=postfix.port)
        with gate.smtp() as c:
            c.ehlo()
            assert c.mail("refused@sender.test")[0] == 250
            assert c.rcpt("user@example.com")[0] == 250
            code, text = c.data(MESSAGE)
            assert (code, _text(text)) == (554, "5.7.1 <refused@sender.test>: Sender address rejected: "
                                                "Access denied")
            assert c.mail(SENDER)[0] == 250
            assert c.rcpt("user@example.com")[0] == 250
            queue_id(c.data(MESSAGE))
        [msg] = relay.wait_for_messages(1, timeout=10)
        assert msg.mail_from == SENDER
        log = postfix.log_text()
        assert re.search(r"disconnect from .* bdat=1/2 ", log), log
    finally:
        postfix.stop()
