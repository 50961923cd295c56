"""Per-session caps on the real gate: greetings, RSETs, junk commands and error replies.

Past a cap the client reads ``421 4.7.0`` and the gate closes the connection; every count
starts afresh after an accepted message (as Postfix's junk and hard error limits do)."""
from __future__ import annotations

import socket

from tests.support.rawsmtp import read_until_closed

BODY = b"Subject: caps\r\n\r\nhello\r\n"


class Client:
    """Raw SMTP on a socket: exact replies, and whether the gate hung up."""

    def __init__(self, address, timeout: float = 10.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def reply(self) -> bytes:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed after {lines!r}")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return b"\n".join(lines)

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def closed_within(self, timeout: float) -> bool:
        """True when the gate closes the connection (and has nothing more to say) in time."""
        closed, got = read_until_closed(self.sock, timeout)
        self.buf += got
        return closed

    def close(self) -> None:
        self.sock.close()


def connect(gate) -> Client:
    c = Client(gate.address)
    assert c.reply().startswith(b"220 ")
    return c


def assert_cut(c: Client, gate, what: str) -> None:
    reply = c.reply()
    assert reply.startswith(b"421 4.7.0 gate.test Too many " + what.encode()), reply
    assert c.closed_within(5), "the gate kept the connection open past a cap"
    assert c.buf == b""
    gate.wait_for_log(f"too many {what}")


def test_greetings_past_the_cap_get_421_and_close(gate_factory):
    gate = gate_factory(config={"limits": {"max_greetings": 3}})
    c = connect(gate)
    for name in ("a.test", "b.test", "c.test"):
        assert c.cmd(f"EHLO {name}").startswith(b"250-gate.test")
    c.sock.sendall(b"HELO d.test\r\n")
    assert_cut(c, gate, "greetings")
    c.close()
    with gate.smtp() as s:  # the next session counts from zero
        assert s.ehlo()[0] == 250


def test_rsets_past_the_cap(gate_factory):
    gate = gate_factory(config={"limits": {"max_rsets": 2}})
    c = connect(gate)
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("RSET").startswith(b"250 2.0.0")
    assert c.cmd("RSET").startswith(b"250 2.0.0")
    c.sock.sendall(b"RSET\r\n")
    assert_cut(c, gate, "RSETs")
    c.close()


def test_noop_vrfy_help_and_unknown_commands_count_together(gate_factory):
    gate = gate_factory(config={"limits": {"max_junk_commands": 4}})
    c = connect(gate)
    assert c.cmd("NOOP").startswith(b"250")
    assert c.cmd("VRFY postmaster").startswith(b"252")
    assert c.cmd("HELP").startswith(b"214 2.0.0")
    assert c.cmd("FROB\x1b\rX x") == b'500 5.5.2 Error: command "FROBX" not recognized'
    c.sock.sendall(b"NOOP\r\n")
    assert_cut(c, gate, "NOOP/VRFY/HELP or unknown commands")
    c.close()


def test_the_error_reply_that_reaches_the_cap_is_followed_by_421(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_errors": 3}})
    c = connect(gate)
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("RCPT TO:<user@example.com>").startswith(b"503")
    assert c.cmd("MAIL FROM:<no-bracket").startswith(b"501")
    assert c.cmd("DATA").startswith(b"503")  # the third error ...
    assert_cut(c, gate, "errors")            # ... and the 421 right behind it
    c.close()
    assert downstream.messages == []


def test_an_accepted_message_starts_the_counts_afresh(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_greetings": 2, "max_errors": 2}})
    c = connect(gate)
    for round_ in range(3):
        assert c.cmd("EHLO client.test").startswith(b"250")
        assert c.cmd("EHLO client.test").startswith(b"250")
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"503")  # one error per round
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.sock.sendall(BODY + b".\r\n")
        assert c.reply().startswith(b"250 ")
    assert c.cmd("QUIT").startswith(b"221")
    c.close()
    downstream.wait_for_messages(3)


def test_too_many_recipients_is_no_client_error(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_recipients": 1, "max_errors": 2}})
    c = connect(gate)
    assert c.cmd("EHLO client.test").startswith(b"250")
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
    assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250")
    for i in range(5):  # 452 4.5.3: send them in another transaction; not counted
        assert c.cmd(f"RCPT TO:<user{i}@example.com>").startswith(b"452 4.5.3")
    assert c.cmd("DATA").startswith(b"354")
    c.sock.sendall(BODY + b".\r\n")
    assert c.reply().startswith(b"250 ")
    c.close()


def test_a_pipelined_flood_is_answered_up_to_the_cap_then_cut(gate_factory):
    """5,000 EHLOs in one write: ten 250s, one 421, then nothing more is read or answered."""
    gate = gate_factory(config={"limits": {"max_greetings": 10}})
    c = connect(gate)
    try:
        c.sock.sendall(b"".join(b"EHLO h%d.test\r\n" % i for i in range(5000)))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gate may close before it has read everything we sent
    replies = []
    try:
        while True:
            replies.append(c.reply())
    except (EOFError, ConnectionResetError):
        pass
    codes = [r[:3] for r in replies]
    # closing with unread commands makes the kernel send RST, which may cut our reading short
    assert codes == ([b"250"] * 10 + [b"421"])[:len(codes)], replies[-3:]
    gate.wait_for_log("too many greetings")
    c.close()
    assert gate.is_running()
