"""Tests of the test harness itself: the capturing downstream and the process helpers."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys

import pytest
import yaml

from tests.support import gateproc
from tests.support.constants import LOOPBACK
from tests.support.downstream import CapturingDownstream, decode_xtext, unstuff
from tests.support.gateproc import (
    deep_merge,
    free_port as free_port_fn,
    require_tool as require_tool_fn,
    start_gate,
    stop_pid,
    wait_listening,
    write_gate_folder,
)
from tests.support.waiting import wait_until

MSG = b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def client(ds: CapturingDownstream, timeout: float = 5.0) -> smtplib.SMTP:
    return smtplib.SMTP(ds.host, ds.port, local_hostname="client.test", timeout=timeout)


class Raw:
    """A raw socket client: send exact bytes, read replies (multi-line aware)."""

    def __init__(self, ds: CapturingDownstream, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(ds.address, timeout=timeout)
        self.f = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.f.readline()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


# ---------------------------------------------------------------------------- basics
def test_records_envelope_message_and_transcript(downstream):
    with client(downstream) as c:
        code, text = c.ehlo()
        assert code == 250
        for kw in (b"PIPELINING", b"SIZE 52428800", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES",
                   b"XCLIENT ADDR NAME PORT PROTO HELO", b"XFORWARD NAME ADDR PROTO HELO IDENT"):
            assert kw in text
        c.sendmail("a@sender.test", ["user@example.com", "two@example.com"], MSG,
                   mail_options=["BODY=8BITMIME"])
    [m] = downstream.wait_for_messages(1)
    assert m.mail_from == "a@sender.test"
    assert m.mail_params == {"SIZE": str(len(MSG)), "BODY": "8BITMIME"}
    assert m.rcpts == ["user@example.com", "two@example.com"]
    assert m.helo == "client.test" and m.esmtp
    assert m.data == MSG and m.data_raw == MSG
    assert m.message()["Subject"] == "hi"
    assert m.header_block.endswith(b"Subject: hi\r\n")
    assert m.reply.startswith("250 2.0.0")
    assert downstream.connections == 1
    assert downstream.transcript[0] == b"ehlo client.test"
    assert downstream.transcript[1] == b"mail FROM:<a@sender.test> size=%d BODY=8BITMIME" % len(MSG)
    assert downstream.transcript[-1].upper() == b"QUIT"
    downstream.wait_for(lambda: downstream.sessions[0].closed, what="session closed")
    assert downstream.sessions[0].raw_in.endswith(b"QUIT\r\n")


def test_flags_turn_extensions_off(downstream_factory):
    ds = downstream_factory(xclient=False, xforward=False, size=1000)
    with client(ds) as c:
        _, text = c.ehlo()
        assert b"XCLIENT" not in text and b"XFORWARD" not in text and b"SIZE 1000" in text
        assert c.docmd("XCLIENT", "ADDR=192.0.2.1")[0] == 550
        assert c.mail("a@sender.test", ["SIZE=2000"])[0] == 552
        c.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as e:  # smtplib declares SIZE=
            c.sendmail("a@sender.test", ["user@example.com"], MSG + b"x" * 1000)
        assert e.value.smtp_code == 552
    r = Raw(ds)  # no SIZE= declared: refused after the dot
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    r.send(b"x" * 1001 + b"\r\n.\r\n")
    assert r.reply().startswith(b"552 5.3.4")
    r.close()
    ds.wait_for(lambda: ds.rejected, what="rejected message")
    assert not ds.messages and len(ds.rejected[0].data) == 1003


def test_helo_and_command_order(downstream):
    with client(downstream) as c:
        assert c.mail("a@sender.test")[0] == 503          # no HELO yet
        assert c.helo()[0] == 250
        assert c.rcpt("user@example.com")[0] == 503       # no MAIL
        assert c.mail("a@sender.test")[0] == 250
        assert c.mail("a@sender.test")[0] == 503          # nested
        assert c.docmd("DATA")[0] == 554                   # no recipients
        assert c.docmd("BDAT", "10 LAST")[0] == 502
        assert c.noop()[0] == 250
        assert c.rset()[0] == 250
        c.sendmail("<>", ["user@example.com"], MSG)
    [m] = downstream.wait_for_messages(1)
    assert m.mail_from == "" and not m.esmtp


def test_smtputf8_addresses(downstream):
    with client(downstream) as c:
        c.sendmail("jörg@sender.test", ["用户@example.com"], MSG, mail_options=["SMTPUTF8"])
    [m] = downstream.wait_for_messages(1)
    assert m.mail_from == "jörg@sender.test" and m.rcpts == ["用户@example.com"]
    assert m.mail_params == {"SIZE": str(len(MSG)), "SMTPUTF8": None}


def test_quoted_local_part_with_angle_bracket(downstream):
    r = Raw(downstream)
    r.reply()
    r.send(b"EHLO c\r\n")
    r.reply()
    r.send(b'MAIL FROM:<"a>b c"@sender.test> BODY=7BIT\r\nRCPT TO:<@relay.test:user@example.com>\r\n')
    assert r.reply().startswith(b"250") and r.reply().startswith(b"250")
    r.send(b"DATA\r\n")
    assert r.reply().startswith(b"354")
    r.send(b"x\r\n.\r\nQUIT\r\n")
    assert r.reply().startswith(b"250")
    r.close()
    [m] = downstream.wait_for_messages(1)
    assert m.mail_from == '"a>b c"@sender.test' and m.mail_params == {"BODY": "7BIT"}
    assert m.rcpts == ["@relay.test:user@example.com"]


# ---------------------------------------------------------------------------- XCLIENT / XFORWARD
def test_xclient_flow_requires_new_ehlo(downstream):
    with client(downstream) as c:
        c.ehlo()
        code, text = c.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=mail.client.test PORT=40000 PROTO=ESMTP")
        assert code == 220 and b"downstream.test" in text
        assert c.docmd("XCLIENT", "HELO=odd+20name")[0] == 220   # xtext; attributes accumulate
        assert c.mail("a@sender.test")[0] == 503                   # EHLO again first
        c.ehlo_resp = c.esmtp_features = None
        c.ehlo("gate.test")
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    [m] = downstream.wait_for_messages(1)
    assert m.xclient == {"ADDR": "192.0.2.7", "NAME": "mail.client.test", "PORT": "40000",
                         "PROTO": "ESMTP", "HELO": "odd name"}
    assert m.helo == "gate.test"
    assert downstream.wait_for_command("xclient").startswith(b"XCLIENT ADDR=192.0.2.7")


def test_xclient_refused_in_transaction_and_bad_attribute(downstream):
    with client(downstream) as c:
        c.ehlo()
        assert c.docmd("XCLIENT", "LOGIN=bob")[0] == 501         # not advertised
        assert c.docmd("XCLIENT", "ADDR")[0] == 501              # no '='
        c.mail("a@sender.test")
        assert c.docmd("XCLIENT", "ADDR=192.0.2.1")[0] == 503
        assert c.docmd("XFORWARD", "ADDR=192.0.2.1")[0] == 503


def test_xforward_recorded_and_reset_after_transaction(downstream):
    with client(downstream) as c:
        c.ehlo()
        assert c.docmd("XFORWARD", "NAME=[UNAVAILABLE] ADDR=192.0.2.9")[0] == 250
        assert c.docmd("XFORWARD", "PROTO=ESMTP HELO=h.test IDENT=abc")[0] == 250
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    m1, m2 = downstream.wait_for_messages(2)
    assert m1.xforward == {"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.9", "PROTO": "ESMTP",
                           "HELO": "h.test", "IDENT": "abc"}
    assert m2.xforward == {} and m1.session == m2.session == 0


def _relay_as_client(ds: CapturingDownstream, port: int, reject: bool = False) -> None:
    """What a gate does for its client on source port `port`: XCLIENT PORT=, then the message."""
    ds.replies["DATA_END"] = "554 5.7.1 no" if reject else None
    with client(ds) as c:
        c.ehlo()
        assert c.docmd("XCLIENT", f"PORT={port}")[0] == 220
        c.ehlo()
        c.mail("a@sender.test")
        c.rcpt("user@example.com")
        assert c.data(MSG)[0] == (554 if reject else 250)
    ds.wait_for(lambda: all(s.closed for s in ds.sessions), 5, "the sessions to close")


def test_records_of_one_client_port_after_a_mark(downstream):
    """An earlier client with the same source port (loopback reuses ports in TIME_WAIT) is
    not taken for the one that came after the mark."""
    _relay_as_client(downstream, 40001)
    _relay_as_client(downstream, 40001, reject=True)
    since = downstream.mark()
    assert downstream.messages_from(40001, since) == downstream.rejected_from(40001, since) == []
    assert downstream.sessions_from(40001, since) == []
    _relay_as_client(downstream, 40002)
    _relay_as_client(downstream, 40001)
    _relay_as_client(downstream, 40001, reject=True)
    [msg] = downstream.wait_for_messages_from("40001", since)
    assert msg is downstream.messages[-1] and msg.session == 3
    [refused] = downstream.rejected_from(40001, since)
    assert refused is downstream.rejected[-1] and refused.session == 4
    assert [s.index for s in downstream.sessions_from(40001, since)] == [3, 4]
    assert [m.session for m in downstream.messages_from(40002, since)] == [2]
    waited = r"2 message\(s\) from client port 40001 after Mark\(messages=1, rejected=1, sessions=2\)"
    with pytest.raises(AssertionError, match=waited):
        downstream.wait_for_messages_from(40001, since, n=2, timeout=0.2)


# ---------------------------------------------------------------------------- DATA bytes
def test_dot_stuffed_raw_versus_unstuffed_data(downstream):
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nnot.a.dot\r\n.\r\nend\r\n"
    with client(downstream) as c:
        c.sendmail("a@sender.test", ["user@example.com"], body)   # smtplib stuffs dots
    [m] = downstream.wait_for_messages(1)
    assert m.data_raw == b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\nnot.a.dot\r\n..\r\nend\r\n"
    assert m.data == body
    assert unstuff(m.data_raw) == body


def test_data_reads_to_strict_crlf_dot_crlf_and_keeps_bare_lf(downstream):
    r = Raw(downstream)
    r.reply()
    # Pipelined, with a body that contains bare-LF "dot" lines that must NOT end the data.
    r.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    payload = b"Subject: x\r\n\r\nA\n.\nB\r.\rC\n.\r\nD\r\n"
    r.send(payload + b".\r\nNOOP\r\n")        # terminator and the next command in one write
    assert r.reply().startswith(b"250 2.0.0")
    assert r.reply().startswith(b"250")
    r.send(b"QUIT\r\n")
    r.reply()
    r.close()
    [m] = downstream.wait_for_messages(1)
    assert m.data_raw == payload
    assert m.data == b"Subject: x\r\n\r\nA\n.\nB\r.\rC\n.\r\nD\r\n"
    assert downstream.transcript[-2:] == [b"NOOP", b"QUIT"]


def test_empty_message_and_split_terminator(downstream):
    r = Raw(downstream)
    r.reply()
    r.send(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
    r.send(b".\r\n")
    assert r.reply().startswith(b"250")
    r.send(b"MAIL FROM:<>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    for piece in (b"line\r", b"\n", b".", b"\r", b"\n"):   # terminator split over writes
        r.send(piece)
    assert r.reply().startswith(b"250")
    r.close()
    m1, m2 = downstream.wait_for_messages(2)
    assert m1.data_raw == b"" and m1.data == b"" and m1.mail_from == ""
    assert m2.data_raw == b"line\r\n"


def test_unfinished_data_is_recorded_as_aborted(downstream):
    r = Raw(downstream)
    r.reply()
    r.send(b"EHLO c\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
    for _ in range(4):
        r.reply()
    r.send(b"Subject: cut\r\n\r\npartial\r\n")
    r.close()
    downstream.wait_for(lambda: downstream.aborted, what="aborted data")
    assert downstream.aborted == [b"Subject: cut\r\n\r\npartial\r\n"] and not downstream.messages


# ---------------------------------------------------------------------------- scripting
def test_scripted_replies(downstream):
    downstream.replies = {
        "MAIL": ["451 4.3.0 busy"],                # first MAIL only
        "rcpt:Bad@Example.com": "550 5.1.1 no such user",
        "DATA_END": "452 4.3.1 full",
    }
    with client(downstream) as c:
        c.ehlo()
        assert c.mail("a@sender.test") == (451, b"4.3.0 busy")
        assert c.mail("a@sender.test")[0] == 250   # list exhausted: normal behaviour
        assert c.rcpt("BAD@example.com") == (550, b"5.1.1 no such user")
        assert c.rcpt("good@example.com")[0] == 250
        assert c.data(MSG) == (452, b"4.3.1 full")
        downstream.replies = {"DATA": "554 5.7.1 no"}
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@sender.test", ["good@example.com"], MSG)
        assert (e.value.smtp_code, e.value.smtp_error) == (554, b"5.7.1 no")
        downstream.replies = {"EHLO": "250 only\nSIZE 10"}  # code-less lines get the first code
        c.ehlo_resp = None
        assert c.ehlo() == (250, b"only\nSIZE 10")
    assert not downstream.messages
    [rej] = downstream.rejected
    assert rej.rcpts == ["good@example.com"] and rej.reply == "452 4.3.1 full"


def test_callable_reply_and_421_closes(downstream):
    downstream.replies = {"RCPT": lambda line: "421 4.3.2 bye" if "last" in line else None}
    with client(downstream) as c:
        c.ehlo()
        c.mail("a@sender.test")
        assert c.rcpt("first@example.com")[0] == 250
        assert c.rcpt("last@example.com")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.noop()


def test_greeting_421(downstream):
    downstream.replies = {"GREETING": "421 4.3.2 not now"}
    with pytest.raises(smtplib.SMTPConnectError):
        client(downstream)
    downstream.wait_for_connections(1)


def test_stall_at_data_end_times_out_client(downstream):
    downstream.stall_at = "DATA_END"
    c = client(downstream, timeout=0.5)
    c.ehlo()
    with pytest.raises((socket.timeout, smtplib.SMTPServerDisconnected)):
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    c.close()
    assert downstream.stalled == 1
    assert downstream.aborted == [MSG] and not downstream.messages


def test_drop_at_rcpt(downstream):
    downstream.drop_at = {"RCPT"}
    with client(downstream) as c:
        c.ehlo()
        c.mail("a@sender.test")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.rcpt("user@example.com")
    assert downstream.dropped == 1


def test_drop_at_data_body_resets_mid_message(downstream):
    downstream.drop_at = "DATA_BODY"
    with client(downstream) as c:
        c.ehlo()
        c.mail("a@sender.test")
        c.rcpt("user@example.com")
        assert c.docmd("DATA")[0] == 354
        c.send(b"Subject: half\r\n\r\nfirst part\r\n")
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            c.send(b"x" * 1_000_000)
            c.send(b"\r\n.\r\n")
            c.getreply()
    downstream.wait_for(lambda: downstream.dropped == 1)
    assert downstream.messages == [] and downstream.aborted[0].startswith(b"Subject: half")


def test_delay_and_wait_timeout_message(downstream):
    downstream.delays = {"NOOP": 0.2}
    with client(downstream) as c:
        assert c.noop()[0] == 250
    with pytest.raises(AssertionError, match="1 message"):
        downstream.wait_for_messages(1, timeout=0.05)


def test_clear_and_restartable_context():
    with CapturingDownstream() as ds:
        with client(ds) as c:
            c.sendmail("a@sender.test", ["user@example.com"], MSG)
        ds.wait_for_messages(1)
        ds.clear()
        assert ds.messages == [] and ds.transcript == []
    with pytest.raises(OSError):
        socket.create_connection(ds.address, timeout=1).close()


def test_binds_loopback_only():
    with pytest.raises(ValueError):
        CapturingDownstream(host="0.0.0.0")
    with CapturingDownstream(host="127.0.0.1") as ds:
        assert ds.host == "127.0.0.1" and ds.port > 0


def test_helpers():
    assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
    assert unstuff(b"..a\r\n.\r\nb..\r\n") == b".a\r\n\r\nb..\r\n"


# ---------------------------------------------------------------------------- real clients
def test_swaks_pipelining_against_downstream(downstream, require_tool):
    swaks = require_tool("swaks")
    out = subprocess.run([swaks, "--server", f"127.0.0.1:{downstream.port}", "--helo", "swaks.test",
                          "--from", "a@sender.test", "--to", "user@example.com", "--pipeline",
                          "--body", ".dot line\nsecond", "--timeout", "5"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    [m] = downstream.wait_for_messages(1)
    assert b"\r\n..dot line\r\n" in m.data_raw and b"\r\n.dot line\r\n" in m.data
    assert m.helo == "swaks.test"


def test_smtp_sink_fixture(smtp_sink):
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as c:
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    assert smtp_sink.wait_for_messages(1)["mesg"] >= 1


# ---------------------------------------------------------------------------- gateproc
def test_write_gate_folder(tmp_path):
    path, cfg = write_gate_folder(
        tmp_path, port=2599, downstream_port=10099,
        plugins={"myrule": "from smtpgate import Rule\n"},
        config={"downstream": {"timeout": "2s"}, "limits": {"max_recipients": 3}},
    )
    on_disk = yaml.safe_load(path.read_text())
    assert on_disk == cfg
    assert cfg["listen"] == ["127.0.0.1:2599"] and cfg["workers"] == 1 and cfg["hostname"] == "gate.test"
    assert cfg["downstream"] == {"host": "127.0.0.1", "port": 10099, "xclient": True, "timeout": "2s"}
    assert cfg["state"] == f"sqlite://{tmp_path}/state.db"
    assert cfg["plugins"] == [str(tmp_path / "plugins")]
    assert (tmp_path / "plugins" / "myrule.py").read_text().startswith("from smtpgate")
    assert (tmp_path / "policies" / "default.yaml").read_text() == "domains: [example.com]\nrules: []\n"
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": [1]}) == {"a": {"b": 1, "c": 3}, "d": [1]}


LISTENER = """
import signal, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sys.argv[3:] == ["reuseport"]:  # as the gate binds: another may share the port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    signal.pause()  # until SIGTERM (or SIGKILL)
"""


def test_wait_listening_and_stop_by_pid(free_port):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port), "exit0"])
    wait_listening(proc, [("127.0.0.1", port)], 10, lambda: "listener")
    assert stop_pid(proc) == 0

    port = free_port()
    stubborn = subprocess.Popen([sys.executable, "-c", LISTENER, str(port), "ignore"])
    wait_listening(stubborn, [("127.0.0.1", port)], 10, lambda: "stubborn")
    assert stop_pid(stubborn, timeout=0.3) == -signal.SIGKILL


def test_wait_listening_fails_when_process_exits(free_port):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(2)"],
                            stderr=subprocess.DEVNULL)
    with pytest.raises(pytest.fail.Exception, match="exited with 2"):
        wait_listening(proc, [("127.0.0.1", free_port())], 10, lambda: "log text here")


def stranger(port: int = 0, reuse_port: bool = False) -> socket.socket:
    """A listener of this test's process: another process than the child under test, as one
    of another test run that took the child's port between its choosing and its binding."""
    s = socket.socket()
    if reuse_port:  # as a gate binds: a second gate of the same user may share the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((LOOPBACK, port))
    s.listen()
    return s


def test_wait_listening_fails_when_another_process_listens_there():
    """Something listening on the port is not enough: it must be the child (or its own child)."""
    with stranger() as other:
        port = other.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        taken = f"{LOOPBACK}:{port} is listened on by another process than pid {proc.pid}'s: {os.getpid()} "
        with pytest.raises(pytest.fail.Exception, match=taken):
            wait_listening(proc, [(LOOPBACK, port)], 10, lambda: "child")
        assert proc.poll() is not None  # stopped by its PID


def test_wait_listening_fails_when_the_port_is_shared(free_port):
    """SO_REUSEPORT on both sides: the child listens, but connections would go to either."""
    port = free_port()
    with stranger(port, reuse_port=True):
        proc = subprocess.Popen([sys.executable, "-c", LISTENER, str(port), "exit0", "reuseport"])
        with pytest.raises(pytest.fail.Exception, match=f"{LOOPBACK}:{port} is also listened on by another process"):
            wait_listening(proc, [(LOOPBACK, port)], 10, lambda: "child")
        assert proc.poll() is not None


def test_start_gate_again_when_its_port_was_taken_meanwhile(tmp_path, monkeypatch, downstream):
    """A whole module's tests once failed alike: its shared gate's port had been taken before
    the gate bound it, the gate exited ("cannot listen"), and the tests talked to the stranger."""
    with stranger() as other:
        taken = other.getsockname()[1]
        chosen = iter([taken])
        monkeypatch.setattr(gateproc, "free_port", lambda host=LOOPBACK: next(chosen, None) or free_port_fn(host))
        with pytest.warns(UserWarning, match=f"port {taken} taken by another process"):
            gate = start_gate(tmp_path / "gate", downstream_port=downstream.port)
        try:
            assert gate.port != taken and gate.unhealthy() is None
            with gate.smtp() as c:
                c.sendmail("a@sender.test", ["user@example.com"], MSG)
            downstream.wait_for_messages(1)
        finally:
            gate.stop()
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.accept()  # nobody came to the stranger


def test_unhealthy_says_why_a_shared_gate_cannot_serve(gate):
    assert gate.unhealthy() is None
    with stranger(gate.port, reuse_port=True):
        shared = f"{LOOPBACK}:{gate.port} is also listened on by another process than pid {gate.pid}'s: {os.getpid()} "
        assert shared in (gate.unhealthy() or "")
    assert gate.unhealthy() is None
    gate.stop()
    assert (gate.unhealthy() or "").startswith("the gate exited with 0")


def test_require_tool_skips_or_fails(monkeypatch):
    assert require_tool_fn("sh").endswith("/sh")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool_fn("no-such-tool-smtpgate")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_tool_fn("no-such-tool-smtpgate")
    assert free_port_fn() > 0


def test_wait_until_returns_what_held_or_says_what_it_waited_for():
    seen = iter([None, 0, "ready"])
    assert wait_until(lambda: next(seen), 5, interval=0) == "ready"
    assert wait_until(lambda: [], 0.05) == []  # no `what`: the caller decides what a timeout means
    with pytest.raises(pytest.fail.Exception, match=r"waited 0.05s in vain for the moon"):
        wait_until(lambda: False, 0.05, what=lambda: "the moon")
