"""No SMTP smuggling: the downstream never sees an end of data the gate did not.

Every test talks to the real gate (a child process) over a raw socket, so the exact bytes
are under control, and reads what the CapturingDownstream received on the wire.

The gate's documented choice (DESIGN.md, "No smuggling"): DATA ends only at the exact
``\\r\\n.\\r\\n``; the content is un-dot-stuffed, then every bare CR and bare LF becomes CRLF
(normalise, not reject); NUL bytes are kept. What goes downstream is CRLF-only and
correctly dot-stuffed.
"""

from __future__ import annotations

import re
import socket

import pytest
from tests.support.rawsmtp import RawSMTP

HEAD = (b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: smuggling attempt\r\n\r\n"
        b"first line of the real message")
SMUGGLED_COMMANDS = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
SMUGGLED_MESSAGE = b"From: evil@evil.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
REAL_END = b"\r\n.\r\n"

# (test id, the end-of-data imitation the client sends, what the gate must turn it into:
#  un-dot-stuffed at real CRLF line starts only, then bare CR / bare LF -> CRLF).
# Worked out by hand from the rule, not from the product's code.
ENDINGS = [
    ("LF.LF", b"\n.\n", b"\r\n.\r\n"),
    ("LF.CR", b"\n.\r", b"\r\n.\r\n"),
    ("CR.LF", b"\r.\n", b"\r\n.\r\n"),
    ("CR.CR", b"\r.\r", b"\r\n.\r\n"),
    ("LF.CRLF", b"\n.\r\n", b"\r\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n", b"\r\n\r\n"),            # "\r\n." is a stuffed line start
    ("CR.CRLF", b"\r.\r\n", b"\r\n.\r\n"),
    ("CRLF.CR", b"\r\n.\r", b"\r\n\r\n"),            # "\r\n." is a stuffed line start
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n", b"\r\n\x00.\r\n"),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", b"\r\n\x00\r\n"),  # the dot is stuffing, the NUL stays
    ("CRLF.CR-CRLF", b"\r\n.\r\r\n", b"\r\n\r\n\r\n"),
    ("CR-CRLF.CR-CRLF", b"\r\r\n.\r\r\n", b"\r\n\r\n\r\n\r\n"),
]

BARE_CR = re.compile(rb"\r(?!\n)")
BARE_LF = re.compile(rb"(?<!\r)\n")


# ---------------------------------------------------------------------------- helpers
class Raw(RawSMTP):
    """The shared raw client, plus reading every reply up to QUIT's."""

    def replies_until_quit(self) -> list[bytes]:
        """Every reply up to and including the 221 to QUIT."""
        out = []
        while True:
            r = self.reply()
            out.append(r)
            if r.startswith(b"221"):
                return out


def open_transaction(gate, rcpt: bytes = b"user@example.com") -> Raw:
    """Connect, EHLO, MAIL, RCPT, DATA (each answered as expected); returns at the 354."""
    c = Raw(gate.address)
    assert c.reply().startswith(b"220")
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(b"250 2.1.0")
    assert c.cmd(b"RCPT TO:<" + rcpt + b">").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    return c


def stuff(data: bytes) -> bytes:
    """SMTP dot stuffing of CRLF-only data."""
    return re.sub(rb"(?m)^\.", b"..", data)


def settle(ds) -> None:
    """Wait until every downstream connection the gate opened is closed (QUIT was relayed),
    so nothing more can arrive: counting messages after this is final."""
    ds.wait_for(lambda: any(s.xclient for s in ds.sessions) and all(s.closed for s in ds.sessions), 10,
                "the gate to close its downstream connections")


def assert_clean_wire(raw: bytes) -> None:
    """CRLF only, and no line that would end the data early."""
    assert not BARE_CR.search(raw), f"bare CR reached the downstream: {raw!r}"
    assert not BARE_LF.search(raw), f"bare LF reached the downstream: {raw!r}"
    assert raw == b"" or raw.endswith(b"\r\n")
    assert b"." not in raw.split(b"\r\n"), f"an unstuffed '.' line reached the downstream: {raw!r}"
    assert b"\r\n.\r\n" not in b"\r\n" + raw


# ---------------------------------------------------------------------------- smuggling
@pytest.mark.parametrize("own_end", [True, False], ids=["smuggled-dot", "no-smuggled-dot"])
@pytest.mark.parametrize("ending,normalised", [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS])
def test_fake_end_of_data_cannot_smuggle_a_second_message(gate_factory, downstream, ending,
                                                          normalised, own_end):
    gate = gate_factory()
    smuggled_tail = SMUGGLED_COMMANDS + SMUGGLED_MESSAGE
    # With own_end the smuggler closes its second message itself (".\r\n"); the real
    # end follows. Without, the client's real end closes the data.
    sent = HEAD + ending + smuggled_tail + (b".\r\n" if own_end else b"") + REAL_END + b"QUIT\r\n"
    with open_transaction(gate) as c:
        c.send(sent)  # the whole rest of the session in one write
        replies = c.replies_until_quit()

    # The gate: one 250 for the one message; whatever follows it is refused as a command
    # (the stray real end: "" and "."), never a 250/354 of a smuggled transaction.
    assert replies[0].startswith(b"250 2.0.0"), replies
    assert all(r[:1] == b"5" for r in replies[1:-1]), replies
    assert len(replies) == (4 if own_end else 2), replies

    settle(downstream)
    assert len(downstream.messages) == 1, downstream.describe()
    assert downstream.rejected == [] and downstream.aborted == []
    [msg] = downstream.messages
    assert msg.mail_from == "a@sender.test"
    assert msg.rcpts == ["user@example.com"]
    mails = [line for line in downstream.transcript if line.upper().startswith(b"MAIL")]
    assert mails == [b"MAIL FROM:<a@sender.test>"], downstream.describe()
    assert not [line for line in downstream.transcript if b"evil" in line.lower()], downstream.describe()
    assert [line for line in downstream.transcript if line.upper() == b"DATA"] == [b"DATA"]

    # The wire: CRLF only, correctly stuffed, and exactly the normalised content.
    assert_clean_wire(msg.data_raw)
    # Without the smuggler's own dot, the data ends at the real "\r\n.\r\n" after the
    # smuggled text's last CRLF: one empty line more.
    expected = HEAD + normalised + smuggled_tail + (b"" if own_end else b"\r\n")
    assert msg.data == expected
    assert msg.data_raw == stuff(expected)
    # NUL bytes are kept, never deleted.
    assert msg.data.count(b"\x00") == ending.count(b"\x00")
    # The smuggled commands are body text of the one message.
    assert SMUGGLED_COMMANDS in msg.data
    assert msg.data.index(SMUGGLED_COMMANDS) > msg.data.index(b"first line of the real message")


def test_bare_line_ends_everywhere_are_normalised(gate_factory, downstream):
    gate = gate_factory()
    body = b"Subject: mixed\n\rline1\rline2\nline3\r\r\n\n.\n..\r.x\r\n.y\r\n"
    with open_transaction(gate) as c:
        c.send(body + b".\r\nQUIT\r\n")
        replies = c.replies_until_quit()
    assert replies[0].startswith(b"250 2.0.0") and len(replies) == 2, replies
    settle(downstream)
    [msg] = downstream.messages
    assert_clean_wire(msg.data_raw)
    # un-stuffing applies to real CRLF line starts only (".y"; not "." / ".." / ".x" after a
    # bare LF or CR), then each bare CR / bare LF is a line end of its own.
    assert msg.data == b"Subject: mixed\r\n\r\nline1\r\nline2\r\nline3\r\n\r\n\r\n.\r\n..\r\n.x\r\ny\r\n"


# ---------------------------------------------------------------------------- dot stuffing
def test_dot_stuffed_lines_arrive_correctly_stuffed(gate_factory, downstream):
    gate = gate_factory()
    original = (b"Subject: dots\r\n\r\n.line\r\n..two\r\n.\r\n...\r\nmid.dle\r\n. \r\n"
                b".\x00\r\nlast\r\n")
    with open_transaction(gate) as c:
        c.send(stuff(original) + b".\r\nQUIT\r\n")
        replies = c.replies_until_quit()
    assert replies[0].startswith(b"250 2.0.0") and len(replies) == 2, replies
    settle(downstream)
    [msg] = downstream.messages
    assert_clean_wire(msg.data_raw)
    assert msg.data == original
    assert msg.data_raw == stuff(original)
    assert b"\r\n..line\r\n...two\r\n..\r\n....\r\n" in msg.data_raw


def _send_empty_message(gate, downstream):
    with open_transaction(gate) as c:
        c.send(b".\r\nQUIT\r\n")  # "DATA\r\n" then ".\r\n": no content at all
        replies = c.replies_until_quit()
    assert replies[0].startswith(b"250 2.0.0") and len(replies) == 2, replies
    settle(downstream)
    assert len(downstream.messages) == 1, downstream.describe()
    return downstream.messages[0]


def test_empty_message_is_relayed_as_one_clean_message(gate_factory, downstream):
    msg = _send_empty_message(gate_factory(), downstream)
    assert_clean_wire(msg.data_raw)
    assert msg.data_raw.strip(b"\r\n") == b""
    assert msg.rcpts == ["user@example.com"]


def test_empty_message_arrives_empty(gate_factory, downstream):
    """Bytes stay bytes: an empty DATA section goes downstream as an empty DATA section."""
    msg = _send_empty_message(gate_factory(), downstream)
    assert msg.data_raw == b"", f"an empty message must arrive empty, got {msg.data_raw!r}"


def test_first_line_is_a_dot(gate_factory, downstream):
    gate = gate_factory()
    original = b".\r\nSubject: first line was a dot\r\n\r\nbody\r\n"
    with open_transaction(gate) as c:
        c.send(stuff(original) + b".\r\nQUIT\r\n")
        replies = c.replies_until_quit()
    assert replies[0].startswith(b"250 2.0.0") and len(replies) == 2, replies
    settle(downstream)
    [msg] = downstream.messages
    assert_clean_wire(msg.data_raw)
    assert msg.data_raw.startswith(b"..\r\n")
    assert msg.data == original


def test_first_line_starts_with_a_dot(gate_factory, downstream):
    gate = gate_factory()
    original = b".hidden: x\r\nSubject: s\r\n\r\nbody\r\n"
    with open_transaction(gate) as c:
        c.send(stuff(original) + b".\r\nQUIT\r\n")
        replies = c.replies_until_quit()
    assert replies[0].startswith(b"250 2.0.0") and len(replies) == 2, replies
    settle(downstream)
    [msg] = downstream.messages
    assert msg.data_raw == stuff(original)
    assert msg.data == original


# ---------------------------------------------------------------------------- pipelining
def test_commands_pipelined_after_the_final_dot_are_commands(gate_factory, downstream):
    gate = gate_factory()
    first = b"Subject: one\r\n\r\nfirst\r\n"
    second = b"Subject: two\r\n\r\nsecond\r\n"
    with open_transaction(gate) as c:
        c.send(first + b".\r\nRSET\r\nNOOP\r\nMAIL FROM:<b@sender.test>\r\n"
               b"RCPT TO:<other@example.com>\r\nDATA\r\n")
        replies = [c.reply() for _ in range(6)]
        assert replies[0].startswith(b"250 2.0.0"), replies      # first message
        assert replies[1].startswith(b"250"), replies            # RSET
        assert replies[2].startswith(b"250"), replies            # NOOP
        assert replies[3].startswith(b"250 2.1.0"), replies      # MAIL
        assert replies[4].startswith(b"250"), replies            # RCPT
        assert replies[5].startswith(b"354"), replies            # DATA
        c.send(second + b".\r\nQUIT\r\n")
        rest = c.replies_until_quit()
    assert rest[0].startswith(b"250 2.0.0") and len(rest) == 2, rest
    settle(downstream)
    assert len(downstream.messages) == 2, downstream.describe()
    one, two = downstream.messages
    assert (one.mail_from, one.rcpts, one.data) == ("a@sender.test", ["user@example.com"], first)
    assert (two.mail_from, two.rcpts, two.data) == ("b@sender.test", ["other@example.com"], second)
    assert b"RSET" not in one.data and b"MAIL FROM" not in one.data


def test_pipelined_transaction_in_one_write(gate_factory, downstream):
    """A whole PIPELINING client: MAIL/RCPT/DATA in one write, then data, dot and QUIT in one."""
    gate = gate_factory()
    body = b"Subject: pipelined\r\n\r\nbody\r\n"
    with Raw(gate.address) as c:
        assert c.reply().startswith(b"220")
        assert c.cmd(b"EHLO client.test").startswith(b"250")
        c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        replies = [c.reply() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
        c.send(body + b".\r\nQUIT\r\n")
        rest = c.replies_until_quit()
    assert rest[0].startswith(b"250 2.0.0") and len(rest) == 2, rest
    settle(downstream)
    [msg] = downstream.messages
    assert msg.data == body
