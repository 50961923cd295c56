"""Limits and hostile clients, against the real gate (a subprocess) and the capturing downstream.

Byte-exact cases use raw sockets. Every reply the gate sends in these tests, other than the
220 greeting, the 354 and the EHLO lines, must carry an enhanced status code: each test ends
with ``assert_enhanced(...)`` over the raw clients it used.
"""
from __future__ import annotations

import re
import socket
import struct
import time

import pytest

from tests.support.rawsmtp import read_until_closed
from tests.support.waiting import wait_until

ENHANCED = re.compile(rb"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}")
BODY = b"Subject: limits\r\n\r\nsmall message\r\n"
FROM = "a@sender.test"
RCPT = "user@example.com"


class Raw:
    """A byte-exact SMTP client on a raw socket that records every reply it reads."""

    def __init__(self, address: tuple[str, int], source: str | None = None, timeout: float = 5.0):
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.replies: list[tuple[str, list[bytes]]] = []  # (what was answered, reply lines)

    # -- reading
    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self, what: str = "") -> tuple[int, bytes]:
        """One (possibly multi-line) reply: (code, lines joined by LF). EOFError if closed."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line is None:
                raise EOFError(f"connection closed while reading a reply to {what!r}; got {lines}")
            lines.append(line)
            if line[3:4] != b"-":
                break
        self.replies.append((what, lines))
        return int(lines[0][:3]), b"\n".join(lines)

    def greeting(self) -> tuple[int, bytes]:
        return self.reply("greeting")

    def closed_within(self, timeout: float) -> bool:
        """True when the peer closes (EOF or reset) within timeout; replies read meanwhile are recorded."""
        closed, got = read_until_closed(self.sock, timeout)
        self.buf += got
        while b"\r\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\r\n")
            self.replies.append(("(before close)", [line]))
        if closed and self.buf:
            self.replies.append(("(before close)", self.buf.split(b"\r\n")))
            self.buf = b""
        return closed

    # -- writing
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, bytes]:
        raw = line.encode() if isinstance(line, str) else line
        self.send(raw + b"\r\n")
        return self.reply(raw.split(b" ", 1)[0].decode("ascii", "replace").upper())

    def ehlo(self, name: str = "client.test") -> bytes:
        code, text = self.cmd(f"EHLO {name}")
        assert code == 250, text
        return text

    def message(self, body: bytes = BODY, sender: str = FROM, rcpts: tuple[str, ...] = (RCPT,)) -> tuple[int, bytes]:
        """MAIL, RCPT..., DATA, the body: the final reply."""
        code, text = self.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for r in rcpts:
            code, text = self.cmd(f"RCPT TO:<{r}>")
            assert code == 250, text
        code, text = self.cmd("DATA")
        assert code == 354, text
        self.send(body + b".\r\n")
        return self.reply("DATA_END")

    def quit(self) -> None:
        code, text = self.cmd("QUIT")
        assert code == 221, text
        assert self.closed_within(5)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assert_enhanced(*clients: Raw) -> None:
    """Every reply line except the greeting, 354 and EHLO carries an enhanced status code."""
    bad = []
    for client in clients:
        for what, lines in client.replies:
            for line in lines:
                if what in ("greeting", "EHLO") or line[:3] in (b"220", b"354") or not line:
                    continue
                if not ENHANCED.match(line):
                    bad.append((what, line))
    assert not bad, f"replies without an enhanced status code: {bad}"


def connect(gate, source: str | None = None) -> Raw:
    return Raw(gate.address, source=source)


def greeted(gate, source: str | None = None) -> Raw:
    c = connect(gate, source)
    code, text = c.greeting()
    assert code == 220, text
    return c


def greeted_eventually(gate, source: str | None = None, timeout: float = 5.0) -> Raw:
    """A new connection that gets 220, retried while the gate still counts a just-closed one."""
    def greeted_now() -> Raw | None:
        c = connect(gate, source)
        code, text = c.greeting()
        if code == 220:
            return c
        c.close()
        assert code == 421, text
        return None

    return wait_until(greeted_now, timeout, what=f"a 220 greeting for {source or 'the default source'}")


def assert_refused_421(gate, source: str | None = None) -> Raw:
    c = connect(gate, source)
    code, text = c.greeting()
    assert code == 421 and text.startswith(b"421 4.7.0 "), text
    assert c.closed_within(5), "the gate kept a connection open after its 421"
    return c


def downstream_idle(ds) -> None:
    """Wait until every downstream session the gate opened has closed (nothing more can arrive)."""
    ds.wait_for(lambda: all(s.closed for s in ds.sessions), 5, "all downstream sessions closed")


def ds_commands(ds) -> list[bytes]:
    return [line.split(b" ", 1)[0].upper() for line in ds.transcript]


# ---------------------------------------------------------------------------- message size
SMALL = {"limits": {"max_message_size": "10KB"}}


def test_ehlo_advertises_the_size_limit_and_mail_size_over_it_is_refused(gate_factory, downstream):
    gate = gate_factory(config=SMALL)
    with greeted(gate) as c:
        keywords = [line[4:] for line in c.ehlo().split(b"\n")]
        assert b"SIZE 10000" in keywords
        code, text = c.cmd(f"MAIL FROM:<{FROM}> SIZE=20000")
        assert (code, text[:10]) == (552, b"552 5.3.4 "), text
        # the refusal left no transaction: a fitting MAIL is accepted, RCPT needs it
        code, text = c.cmd(f"MAIL FROM:<{FROM}> SIZE=9000")
        assert text.startswith(b"250 2.1.0"), text
        assert c.cmd("RSET")[0] == 250
        c.quit()
    assert_enhanced(c)
    downstream_idle(downstream)
    assert b"MAIL" not in ds_commands(downstream)


def test_oversized_body_is_refused_after_the_dot_and_the_connection_goes_on(gate_factory, downstream):
    gate = gate_factory(config=SMALL)
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 256  # about 20 KB, no SIZE= given
    assert len(big) > 20_000
    with greeted(gate) as c:
        c.ehlo()
        code, text = c.message(big)
        assert (code, text[:10]) == (552, b"552 5.3.4 "), text
        code, text = c.message(BODY)  # the same connection, a small message
        assert text.startswith(b"250 2.0.0"), text
        c.quit()
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == BODY
    downstream_idle(downstream)
    assert len(downstream.messages) == 1 and not downstream.rejected and not downstream.aborted
    assert ds_commands(downstream).count(b"DATA") == 1  # the big one never reached DATA


# ---------------------------------------------------------------------------- recipients
def test_fourth_recipient_gets_452_and_the_first_three_are_delivered(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_recipients": 3}})
    rcpts = [f"user{i}@example.com" for i in range(1, 5)]
    with greeted(gate) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{FROM}>")[0] == 250
        for r in rcpts[:3]:
            code, text = c.cmd(f"RCPT TO:<{r}>")
            assert code == 250, text
        code, text = c.cmd(f"RCPT TO:<{rcpts[3]}>")
        assert (code, text[:10]) == (452, b"452 4.5.3 "), text
        assert c.cmd("DATA")[0] == 354
        c.send(BODY + b".\r\n")
        code, text = c.reply("DATA_END")
        assert code == 250, text
        c.quit()
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == rcpts[:3]
    assert not any(rcpts[3].encode() in line for line in downstream.transcript)


# ---------------------------------------------------------------------------- timeouts
def test_idle_connection_is_closed_after_the_command_timeout(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"command_timeout": "1s"}})
    with greeted(gate) as c:
        c.ehlo()
        start = time.monotonic()
        assert c.closed_within(6), "an idle client was not cut after command_timeout: 1s"
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 6, elapsed
    assert_enhanced(c)  # a 421 on the way out, if any, carries its enhanced code
    assert gate.is_running()
    with greeted(gate) as c2:  # and the gate goes on
        c2.ehlo()
        assert c2.message()[0] == 250
        c2.quit()
    downstream.wait_for_messages(1)


def test_client_stalling_in_data_is_cut_after_the_data_timeout(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"command_timeout": "30s", "data_timeout": "1s"}})
    with greeted(gate) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{FROM}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: stalled\r\n\r\nhalf a mess")
        start = time.monotonic()
        assert c.closed_within(6), "a client stalled in DATA was not cut after data_timeout: 1s"
        assert time.monotonic() - start >= 0.5
    assert_enhanced(c)
    downstream_idle(downstream)
    assert not downstream.messages and not downstream.rejected and not downstream.aborted
    assert b"DATA" not in ds_commands(downstream)  # the downstream never saw a DATA, let alone a dot
    assert gate.is_running()


# ---------------------------------------------------------------------------- connections
def test_third_connection_from_one_client_gets_421(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_connections_per_client": 2, "max_connections": 100}})
    a1, a2 = greeted(gate), greeted(gate)
    a3 = assert_refused_421(gate)                 # 127.0.0.1's third
    b1 = greeted(gate, "127.0.0.2")               # another client still gets in
    a1.quit()
    a4 = greeted_eventually(gate)                 # a slot of 127.0.0.1 is free again
    a4.ehlo()
    assert a4.message()[0] == 250
    a4.quit()
    for c in (a2, b1):
        c.quit()
    assert_enhanced(a1, a2, a3, a4, b1)
    downstream.wait_for_messages(1)


def test_connections_over_the_total_get_421(gate_factory, downstream):
    gate = gate_factory(config={"limits": {"max_connections": 3, "max_connections_per_client": 20}})
    c1, c2, c3 = greeted(gate, "127.0.0.1"), greeted(gate, "127.0.0.2"), greeted(gate, "127.0.0.3")
    c4 = assert_refused_421(gate, "127.0.0.1")    # per client 2 of 20: it is the total that counts
    c5 = assert_refused_421(gate, "127.0.0.4")
    c2.quit()
    c6 = greeted_eventually(gate, "127.0.0.3")
    c6.ehlo()
    assert c6.message()[0] == 250
    for c in (c1, c3, c6):
        c.quit()
    assert_enhanced(c1, c2, c3, c4, c5, c6)
    downstream.wait_for_messages(1)


# ---------------------------------------------------------------------------- BDAT, XCLIENT, XFORWARD
def test_stray_bdat_chunk_is_swallowed_and_never_run_as_commands(gate_factory, downstream):
    gate = gate_factory()
    chunk = b"RSET\r\nQUIT"
    assert len(chunk) == 10
    with greeted(gate) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{FROM}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
        c.send(b"BDAT 10 LAST\r\n" + chunk)
        code, text = c.reply("BDAT")
        assert (code, text[:10]) == (502, b"502 5.5.1 "), text
        # Had "RSET" run, the transaction would be gone and DATA would get 503; had "QUIT"
        # run, the connection would be closed.
        code, text = c.cmd("DATA")
        assert code == 354, text
        c.send(BODY + b".\r\n")
        code, text = c.reply("DATA_END")
        assert code == 250, text
        c.quit()
    # exactly one reply per real command: no 250 for a smuggled RSET, no 221 for a smuggled QUIT
    assert [what for what, _ in c.replies] == ["greeting", "EHLO", "MAIL", "RCPT", "BDAT", "DATA",
                                               "DATA_END", "QUIT"]
    assert [lines[0][:3] for _, lines in c.replies] == [b"220", b"250", b"250", b"250", b"502",
                                                          b"354", b"250", b"221"]
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == BODY
    assert b"RSET" not in ds_commands(downstream)[: ds_commands(downstream).index(b"DATA")]


@pytest.mark.parametrize("arg", [b"abc", b"", b"-5 LAST", b"99999999999999999999 LAST"])
def test_bdat_with_a_bad_size_gets_421_and_is_closed(gate_factory, downstream, arg):
    gate = gate_factory()
    with greeted(gate) as c:
        c.ehlo()
        code, text = c.cmd(b"BDAT " + arg if arg else b"BDAT")
        assert (code, text[:4]) == (421, b"421 "), text
        assert c.closed_within(5)
    assert_enhanced(c)
    assert gate.is_running()
    with greeted(gate) as c2:
        c2.quit()


def test_xclient_and_xforward_from_clients_are_refused(gate_factory, downstream):
    gate = gate_factory()
    with greeted(gate) as c:
        c.ehlo()
        for verb in ("XCLIENT", "XFORWARD"):
            code, text = c.cmd(f"{verb} ADDR=1.2.3.4 NAME=trusted.example")
            assert (code, text[:10]) == (550, b"550 5.7.0 "), text
        code, text = c.message()
        assert code == 250, text
        c.quit()
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == "127.0.0.1"
    assert msg.xclient["NAME"] != "trusted.example"
    assert "ADDR" not in msg.xforward
    assert not any(b"1.2.3.4" in line for line in downstream.transcript)
    log = gate.wait_for_log("client=127.0.0.1")
    assert "1.2.3.4" not in log


# ---------------------------------------------------------------------------- garbage
GARBAGE = [
    (b"\xff\xfeHELO x", b"500"),                        # 8-bit bytes in the command verb
    (b"MAIL FROM:<a\xff\xfe@sender.test>", b"5"),       # 8-bit bytes (not UTF-8) in an address
    (b"NOOP " + b"x" * 5000, b"500"),                   # a 5000-byte command line
    (b"FOOBAR baz", b"500"),                            # an unknown command
    (b"MAIL FROM:", b"501"),                            # MAIL without a path
    (b"RCPT TO:<user@example.com>", b"503"),            # RCPT before MAIL
    (b"DATA", b"503"),                                  # DATA before MAIL
    (b"AUTH PLAIN AGFhAGE=", b"502"),                   # AUTH is never offered
]


def test_garbage_commands_get_clear_5xx_replies_and_the_session_goes_on(gate_factory, downstream):
    gate = gate_factory()
    with greeted(gate) as c:
        c.ehlo()
        for line, expected in GARBAGE:
            code, text = c.cmd(line)
            assert 500 <= code < 600 and text.startswith(expected), (line[:40], text)
            assert ENHANCED.match(text), (line[:40], text)
        code, text = c.message()  # the same session still relays
        assert code == 250, text
        c.quit()
    assert_enhanced(c)
    downstream.wait_for_messages(1)
    assert gate.is_running()
    with greeted(gate) as c2:  # and the next connection works
        c2.ehlo()
        assert c2.message()[0] == 250
        c2.quit()
    downstream.wait_for_messages(2)


def test_null_sender_with_null_recipient(gate_factory, downstream):
    gate = gate_factory()
    with greeted(gate) as c:
        c.ehlo()
        code, text = c.cmd("MAIL FROM:<>")
        assert text.startswith(b"250 2.1.0"), text
        code, text = c.cmd("RCPT TO:<>")
        assert 500 <= code < 600 and ENHANCED.match(text), text
        # the bounce itself goes on with a real recipient
        assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(BODY + b".\r\n")
        assert c.reply("DATA_END")[0] == 250
        c.quit()
    assert_enhanced(c)
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == "" and msg.rcpts == [RCPT]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishing_mid_data_does_not_hurt_the_gate(gate_factory, downstream, how):
    gate = gate_factory()
    c = greeted(gate)
    c.ehlo()
    assert c.cmd(f"MAIL FROM:<{FROM}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: gone\r\n\r\nhalf a mess")
    if how == "reset":  # RST instead of FIN
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    gate.wait_for_log("reply=abandoned")  # the gate noticed and closed the transaction
    assert gate.is_running()
    with greeted(gate) as c2:
        c2.ehlo()
        assert c2.message()[0] == 250
        c2.quit()
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == BODY
    downstream_idle(downstream)
    assert len(downstream.messages) == 1 and not downstream.aborted
    assert "Traceback" not in gate.log_text()
    assert_enhanced(c, c2)
