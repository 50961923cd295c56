"""The real gate (``smtpgate serve`` as a subprocess) relaying inline to the CapturingDownstream.

What is proved here: the client's final reply is the downstream's; XCLIENT / XFORWARD carry
the real client and the transaction id; MAIL parameters are mirrored; downstream replies
pass through byte for byte; every downstream failure is a 451 4.4.x and never a 250; rules
that reject, crash or run in shadow mode do what the contract says; one downstream
connection serves a client session's transactions; EHLO offers exactly the agreed keywords.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import smtplib
import socket
import time

import pytest

from tests.support.rawsmtp import RawSMTP
from tests.support.downstream import CapturingDownstream
from tests.support.constants import PLUGINS
from tests.support.gateproc import GateProcess, in_ci
from tests.support.waiting import wait_until

MSG = b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nhello world\r\n"

# --------------------------------------------------------------------------- plugins
REJECTOR = [PLUGINS / "rejector.py"]
CRASHER = [PLUGINS / "crasher.py"]


def policy(rule_line: str) -> dict[str, str]:
    return {"default.yaml": f"domains: [example.com]\nrules:\n  - {rule_line}\n"}


# --------------------------------------------------------------------------- raw client
class Raw(RawSMTP):
    """The shared raw client, plus whole transactions and QUIT on close."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        super().__init__((host, port), timeout)
        self.greeting = self.reply()

    def data(self, body: bytes = MSG) -> bytes:
        return super().data(body)

    def send_mail(self, sender: str = "a@sender.test", rcpt: str = "user@example.com",
                  body: bytes = MSG) -> bytes:
        """One whole transaction that must get to DATA; returns the final reply."""
        r = self.cmd(f"MAIL FROM:<{sender}>")
        assert r.startswith(b"250"), r
        r = self.cmd(f"RCPT TO:<{rcpt}>")
        assert r.startswith(b"250"), r
        return self.data(body)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, AssertionError):
            pass
        super().close()


def raw(gate: GateProcess, helo: str = "client.test") -> Raw:
    client = Raw(gate.host, gate.port)
    assert client.greeting.startswith(b"220 "), client.greeting
    r = client.cmd(f"EHLO {helo}")
    assert r.startswith(b"250"), r
    return client


def commands(ds: CapturingDownstream, session: int | None = None) -> list[str]:
    """The verbs the downstream received (from all sessions, or one), in order."""
    lines = ds.transcript if session is None else ds.sessions[session].transcript
    return [line.split(b" ", 1)[0].decode().upper() for line in lines]


def relay_sessions(ds: CapturingDownstream) -> list[int]:
    """Indexes of downstream sessions that carried a transaction (the start-up probe did not)."""
    return [s.index for s in ds.sessions
            if any(line.upper().startswith((b"MAIL", b"XCLIENT")) for line in s.transcript)]


def tx_ids(gate: GateProcess) -> list[str]:
    return re.findall(r"\btransaction tx=(\S+)", gate.log_text())


def wait_tx_logged(gate: GateProcess, n: int = 1, timeout: float = 5.0) -> list[str]:
    wait_until(lambda: len(tx_ids(gate)) >= n, timeout,
               what=lambda: f"{n} transaction lines; the gate logged {len(tx_ids(gate))}\n{gate.log_text()}")
    return tx_ids(gate)


# =========================================================================== plain relay
def test_final_reply_is_exactly_the_downstreams(gate_factory, downstream):
    downstream.replies["DATA_END"] = "250 2.0.0 Ok: queued as ABC123"
    gate = gate_factory()
    with raw(gate) as c:
        assert c.send_mail() == b"250 2.0.0 Ok: queued as ABC123\r\n"
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == "a@sender.test"
    assert msg.rcpts == ["user@example.com"]
    assert msg.data == MSG  # an unchanged message arrives byte-identical


def test_smtplib_sendmail_relays(gate, downstream):
    with gate.smtp() as c:
        refused = c.sendmail("a@sender.test", ["user@example.com", "Other.User@EXAMPLE.com"], MSG)
    assert refused == {}
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["user@example.com", "Other.User@EXAMPLE.com"]  # case kept as sent
    assert msg.data == MSG


# =========================================================================== XCLIENT
def test_xclient_carries_the_real_client_then_ehlo_again(gate, downstream):
    with gate.smtp(local_hostname="client.test") as c:
        client_port = c.sock.getsockname()[1]
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient == {"ADDR": "127.0.0.1", "NAME": "[UNAVAILABLE]", "HELO": "client.test",
                           "PROTO": "ESMTP", "PORT": str(client_port)}
    sess = downstream.sessions[msg.session]
    # PORT, PROTO, HELO, NAME, ADDR in that order (NAME and ADDR last, as Postfix applies them)
    xclient_line = f"XCLIENT PORT={client_port} PROTO=ESMTP HELO=client.test NAME=[UNAVAILABLE] ADDR=127.0.0.1"
    assert xclient_line.encode() in sess.transcript
    verbs = commands(downstream, msg.session)
    i = verbs.index("XCLIENT")
    assert verbs[i - 1] == "EHLO" and verbs[i + 1] == "EHLO"  # EHLO again after XCLIENT's 220
    assert verbs.index("MAIL") > i + 1
    assert msg.helo == "client.test" and msg.esmtp  # EHLO after XCLIENT repeats the client's name (Postfix takes it from there)


def test_xclient_proto_smtp_for_a_helo_client(gate, downstream):
    with raw(gate) as c:
        assert c.cmd("HELO old.client.test").startswith(b"250 ")
        assert c.send_mail().startswith(b"250 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["PROTO"] == "SMTP"
    assert msg.xclient["HELO"] == "old.client.test"


def test_no_xclient_when_configured_off(gate_factory, downstream):
    gate = gate_factory(config={"downstream": {"xclient": False}})
    with gate.smtp() as c:
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient == {}
    assert "XCLIENT" not in commands(downstream)


def test_no_xclient_when_downstream_does_not_offer_it(gate_factory, downstream_factory):
    ds = downstream_factory(xclient=False)
    gate = gate_factory(downstream_port=ds.port)
    with gate.smtp() as c:
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    [msg] = ds.wait_for_messages(1)
    assert msg.xclient == {}
    assert "XCLIENT" not in commands(ds)


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_xclient_addr_for_an_ipv6_client(gate_factory, downstream, free_port):
    if not _ipv6_loopback_usable():
        if in_ci():
            pytest.fail("::1 is not usable on this machine [CI=true: a failure]", pytrace=False)
        pytest.skip("::1 is not usable on this machine")
    port = free_port("::1")
    gate = gate_factory(config={"listen": [f"[::1]:{port}"]})
    with smtplib.SMTP("::1", port, local_hostname="client.test", timeout=10) as c:
        client_port = c.sock.getsockname()[1]
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == "IPV6:::1"
    assert msg.xclient["PORT"] == str(client_port)
    sess = downstream.sessions[msg.session]
    [xclient_line] = [line for line in sess.transcript if line.startswith(b"XCLIENT ")]
    assert xclient_line.endswith(b" ADDR=IPV6:::1")
    wait_tx_logged(gate)  # the log line follows the client's reply
    assert "client=::1" in gate.log_text()


# =========================================================================== XFORWARD IDENT
def test_xforward_ident_is_the_logged_transaction_id(gate, downstream):
    with gate.smtp() as c:
        c.sendmail("a@sender.test", ["user@example.com"], MSG)
        c.sendmail("b@sender.test", ["user@example.com"], MSG)
    msgs = downstream.wait_for_messages(2)
    ids = wait_tx_logged(gate, 2)
    assert [m.xforward.get("IDENT") for m in msgs] == ids[:2]
    assert ids[0] != ids[1]
    verbs = commands(downstream, msgs[0].session)
    assert verbs.index("XFORWARD") + 1 == verbs.index("MAIL")  # sent right before MAIL


# =========================================================================== MAIL parameters
def test_mail_parameters_are_mirrored(gate, downstream):
    body = "Subject: grüße\r\n\r\nnaïve café\r\n".encode()
    sender, rcpt = "jörg@sender.test", "rené@example.com"
    with raw(gate) as c:
        r = c.cmd(f"MAIL FROM:<{sender}> SIZE={len(body)} BODY=8BITMIME SMTPUTF8")
        assert r == b"250 2.1.0 Ok\r\n"
        assert c.cmd(f"RCPT TO:<{rcpt}>").startswith(b"250 ")
        assert c.data(body).startswith(b"250 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == sender and msg.rcpts == [rcpt]
    assert msg.mail_params == {"SIZE": str(len(body)), "BODY": "8BITMIME", "SMTPUTF8": None}
    assert f"MAIL FROM:<{sender}> SIZE={len(body)} BODY=8BITMIME SMTPUTF8".encode() in downstream.transcript
    assert msg.data == body


def test_unsupported_mail_parameter_refused_and_nothing_downstream(gate, downstream):
    before = downstream.connections
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test> RET=HDRS").startswith(b"555 5.5.4 ")
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"503 5.5.1")  # no transaction
        # the session is still fine
        assert c.send_mail().startswith(b"250 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_params == {}
    assert not any(b"RET=" in line.upper() for line in downstream.transcript)
    assert commands(downstream).count("MAIL") == 1
    assert downstream.connections - before == 1


# =========================================================================== pass-through
@pytest.mark.parametrize("key, scripted, wire", [
    ("RCPT", "550 5.1.1 <user@example.com>: Recipient address rejected: User unknown",
     b"550 5.1.1 <user@example.com>: Recipient address rejected: User unknown\r\n"),
    ("RCPT", "450 4.2.0 <user@example.com>: Recipient address rejected: Greylisted, try later",
     b"450 4.2.0 <user@example.com>: Recipient address rejected: Greylisted, try later\r\n"),
    ("RCPT", "550 5.1.1 first line of the refusal\n550 5.1.1 second line of the refusal",
     b"550-5.1.1 first line of the refusal\r\n550 5.1.1 second line of the refusal\r\n"),
    ("MAIL", "553 5.7.1 <a@sender.test>: Sender address rejected: Access denied",
     b"553 5.7.1 <a@sender.test>: Sender address rejected: Access denied\r\n"),
])
def test_downstream_envelope_replies_pass_through(gate, downstream, key, scripted, wire):
    downstream.replies[key] = scripted
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>") == b"250 2.1.0 Ok\r\n"  # answered by the gate
        assert c.cmd("RCPT TO:<user@example.com>") == wire
        assert c.cmd("DATA").startswith(b"503 ")  # no recipient was accepted
    assert downstream.messages == []
    assert "DATA" not in commands(downstream)


def test_one_refused_recipient_among_accepted_ones(gate, downstream):
    downstream.replies["RCPT:nobody@example.com"] = \
        "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown in virtual mailbox table"
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        assert c.cmd("RCPT TO:<user@example.com>") == b"250 2.1.5 Ok\r\n"
        assert c.cmd("RCPT TO:<nobody@example.com>") == (
            b"550 5.1.1 <nobody@example.com>: Recipient address rejected: "
            b"User unknown in virtual mailbox table\r\n")
        assert c.data().startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["user@example.com"]


@pytest.mark.parametrize("key, scripted, wire", [
    ("DATA_END", "554 5.7.1 spam", b"554 5.7.1 spam\r\n"),
    ("DATA_END", "451 4.3.0 Error: queue file write error", b"451 4.3.0 Error: queue file write error\r\n"),
    ("DATA_END", "554 5.7.1 rejected\n554 5.7.1 see https://example.net/why",
     b"554-5.7.1 rejected\r\n554 5.7.1 see https://example.net/why\r\n"),
    ("DATA", "554 5.5.1 Error: no valid recipients", b"554 5.5.1 Error: no valid recipients\r\n"),
])
def test_downstream_data_replies_pass_through(gate, downstream, key, scripted, wire):
    downstream.replies[key] = scripted
    with raw(gate) as c:
        assert c.send_mail() == wire
        # and the client session goes on
        downstream.replies.pop(key)
        assert c.send_mail().startswith(b"250 2.0.0 ")
    assert len(downstream.wait_for_messages(1)) == 1


# =========================================================================== failures: never 250
def test_downstream_not_listening_gives_451_441_at_mail(gate_factory, free_port):
    gate = gate_factory(downstream_port=free_port())
    with raw(gate) as c:
        r = c.cmd("MAIL FROM:<a@sender.test>")
        assert r.startswith(b"451 4.4.1 "), r
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"503 ")
        assert c.cmd("DATA").startswith(b"503 ")
        assert c.cmd("NOOP").startswith(b"250 ")  # the client session is fine


def test_drop_at_rcpt_gives_451_442_and_the_session_recovers(gate, downstream):
    downstream.drop_at = "RCPT"
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        r = c.cmd("RCPT TO:<user@example.com>")
        assert r.startswith(b"451 4.4.2 "), r
        assert not c.cmd("DATA").startswith((b"2", b"3"))
        assert c.cmd("RSET").startswith(b"250 ")
        downstream.drop_at = None
        assert c.send_mail().startswith(b"250 2.0.0 ")
    assert len(downstream.wait_for_messages(1)) == 1
    assert downstream.dropped == 1


def test_drop_at_data_end_gives_451_442(gate, downstream):
    downstream.drop_at = "DATA_END"
    with raw(gate) as c:
        r = c.send_mail()
        assert r.startswith(b"451 4.4.2 "), r
        downstream.drop_at = None
        assert c.send_mail().startswith(b"250 2.0.0 ")
    assert len(downstream.aborted) == 1 and downstream.aborted[0] == MSG
    assert len(downstream.wait_for_messages(1)) == 1


def test_drop_at_data_command_gives_451_442(gate, downstream):
    downstream.drop_at = "DATA"
    with raw(gate) as c:
        r = c.send_mail()
        assert r.startswith(b"451 4.4.2 "), r
    assert downstream.messages == [] and downstream.aborted == []


def test_stalled_downstream_times_out_with_451_442(gate_factory, downstream):
    downstream.stall_at = "DATA_END"
    gate = gate_factory(config={"downstream": {"timeout": "1s"}})
    with raw(gate) as c:
        started = time.monotonic()
        r = c.send_mail()
        assert r.startswith(b"451 4.4.2 "), r
        assert time.monotonic() - started < 8
        downstream.stall_at = None
        assert c.send_mail().startswith(b"250 2.0.0 ")
    assert downstream.stalled == 1
    assert len(downstream.wait_for_messages(1)) == 1


def test_421_at_rcpt_gives_451_442_and_a_new_downstream_connection_serves_the_next(gate, downstream):
    downstream.replies["RCPT"] = ["421 4.3.2 downstream.test Service shutting down"]  # once
    before = downstream.connections
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        r = c.cmd("RCPT TO:<user@example.com>")
        assert r.startswith(b"451 4.4.2 "), r
        assert b"421" not in r
        assert c.cmd("RSET").startswith(b"250 ")
        assert c.send_mail().startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert downstream.connections - before == 2
    assert relay_sessions(downstream)[-1] == msg.session


# =========================================================================== rules
def test_rule_rejecting_at_data_never_sends_data_downstream(gate_factory, downstream):
    gate = gate_factory(policies=policy("rejector: {}"), plugins=REJECTOR)
    with raw(gate) as c:
        assert c.send_mail() == b"554 5.7.1 Message looks like spam\r\n"
    downstream.wait_for_command(b"RSET")
    verbs = commands(downstream)
    assert "DATA" not in verbs
    assert verbs.index("RSET") > verbs.index("RCPT") > verbs.index("MAIL")
    assert downstream.messages == [] and downstream.aborted == []


def test_shadow_rule_delivers_and_logs(gate_factory, downstream):
    gate = gate_factory(policies=policy("rejector: {mode: shadow}"), plugins=REJECTOR)
    with raw(gate) as c:
        assert c.send_mail().startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == MSG
    wait_tx_logged(gate)
    log = gate.log_text()
    assert "shadow" in log and "rejector" in log
    assert "rejector:data:shadow-reject" in log


def test_rule_crash_at_rcpt_is_451_430_and_the_next_transaction_delivers(gate_factory, downstream):
    gate = gate_factory(policies=policy("crasher: {}"), plugins=CRASHER)
    with raw(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        r = c.cmd("RCPT TO:<crash-rcpt@example.com>")
        assert r.startswith(b"451 4.3.0 "), r
        assert b"kaboom" not in r  # exception text never reaches the client
        assert c.cmd("RSET").startswith(b"250 ")
        assert c.send_mail().startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["user@example.com"]
    assert not any(b"crash-rcpt" in line for line in downstream.transcript)
    log = gate.wait_for_log("RuntimeError: kaboom in on_rcpt")
    assert "Traceback (most recent call last)" in log


def test_rule_crash_at_data_is_451_430_and_the_next_transaction_delivers(gate_factory, downstream):
    gate = gate_factory(policies=policy("crasher: {}"), plugins=CRASHER)
    crashing = MSG.replace(b"Subject: hello", b"Subject: crash-data")
    with raw(gate) as c:
        r = c.send_mail(body=crashing)
        assert r.startswith(b"451 4.3.0 "), r
        assert b"kaboom" not in r
        assert c.send_mail().startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == MSG
    assert commands(downstream).count("DATA") == 1  # the crashed one never got DATA
    log = gate.wait_for_log("ZeroDivisionError: kaboom in on_data")
    assert "Traceback (most recent call last)" in log


def test_rule_crash_with_on_error_accept_delivers(gate_factory, downstream):
    gate = gate_factory(policies=policy("crasher: {on_error: accept}"), plugins=CRASHER)
    crashing = MSG.replace(b"Subject: hello", b"Subject: crash-data")
    with raw(gate) as c:
        assert c.send_mail(rcpt="crash-rcpt@example.com", body=crashing).startswith(b"250 2.0.0 ")
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["crash-rcpt@example.com"] and msg.data == crashing
    log = gate.wait_for_log("ZeroDivisionError: kaboom in on_data")
    assert "RuntimeError: kaboom in on_rcpt" in log


# =========================================================================== connection reuse
def test_transactions_on_one_client_connection_share_one_downstream_connection(gate, downstream):
    before = downstream.connections
    with gate.smtp() as c:
        for n in range(3):
            body = MSG.replace(b"hello world", f"message {n}".encode())
            assert c.sendmail(f"s{n}@sender.test", ["user@example.com"], body) == {}
    msgs = downstream.wait_for_messages(3)
    assert downstream.connections - before == 1
    assert len({m.session for m in msgs}) == 1
    assert [m.mail_from for m in msgs] == ["s0@sender.test", "s1@sender.test", "s2@sender.test"]
    assert [m.data for m in msgs] == [MSG.replace(b"hello world", f"message {n}".encode()) for n in range(3)]
    assert commands(downstream).count("XCLIENT") == 1


# =========================================================================== EHLO
def ehlo_lines(gate: GateProcess) -> list[str]:
    with gate.smtp() as c:
        code, text = c.ehlo("client.test")
    assert code == 250
    return text.decode().split("\n")


def test_ehlo_keywords_exactly(gate):
    lines = ehlo_lines(gate)
    assert lines[0] == "gate.test"
    assert sorted(lines[1:]) == sorted(
        ["PIPELINING", "SIZE 25000000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"])
    for never in ("CHUNKING", "AUTH", "XCLIENT", "XFORWARD", "STARTTLS"):
        assert not any(line.upper().startswith(never) for line in lines[1:]), never


def test_ehlo_size_is_the_downstreams_when_smaller(gate_factory, downstream_factory):
    ds = downstream_factory(size=1_000_000)
    gate = gate_factory(downstream_port=ds.port)
    assert "SIZE 1000000" in ehlo_lines(gate)


def test_ehlo_size_is_ours_when_smaller(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_message_size": "10KB"}})
    assert "SIZE 10000" in ehlo_lines(gate)


def test_ehlo_leaves_out_what_the_downstream_lacks(gate_factory, downstream_factory):
    ds = downstream_factory(replies={
        "EHLO": "250 minimal.test\n250 PIPELINING\n250 SIZE 5000\n250 ENHANCEDSTATUSCODES"})
    gate = gate_factory(downstream_port=ds.port)
    lines = ehlo_lines(gate)
    assert sorted(lines[1:]) == sorted(["PIPELINING", "SIZE 5000", "ENHANCEDSTATUSCODES"])


# =========================================================================== TCP_NODELAY
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (unified syscall table)


def _steal_fd(pid: int, fd: int) -> int:
    """Duplicate another process's fd into ours (pidfd_getfd, Linux >= 5.6)."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return dup
    finally:
        os.close(pidfd)


def _gate_socket_opts(pid: int, want) -> list[int]:
    """TCP_NODELAY of each of the gate's sockets for which want(sockname, peername) holds."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
        except OSError:
            continue
        dup = _steal_fd(pid, int(name))
        s = socket.socket(fileno=dup)
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                here, there = s.getsockname()[:2], s.getpeername()[:2]
            except OSError:
                continue  # a listening socket
            if want(here, there):
                found.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            s.close()  # closes our duplicate only
    return found


def test_tcp_nodelay_on_client_and_downstream_sockets(gate, downstream):
    if not (hasattr(os, "pidfd_open") and os.path.isdir(f"/proc/{gate.pid}/fd")):
        pytest.skip("needs Linux pidfd_open and /proc to look at the gate's sockets")
    with gate.smtp() as c:
        c.sendmail("a@sender.test", ["user@example.com"], MSG)  # the downstream connection is open now
        downstream.wait_for_messages(1)
        mine = c.sock.getsockname()[:2]
        try:
            client_side = _gate_socket_opts(gate.pid, lambda here, there: there == mine)
            downstream_side = _gate_socket_opts(
                gate.pid, lambda here, there: there == ("127.0.0.1", downstream.port))
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                pytest.skip(f"cannot inspect the gate's sockets here: {e}")
            raise
    assert client_side and all(client_side), client_side
    assert downstream_side and all(downstream_side), downstream_side
