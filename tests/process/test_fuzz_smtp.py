"""Property-based tests of the SMTP front against the running gate (hypothesis).

(a) Random command streams — valid and invalid verbs in any case, random and hostile
    arguments, 8-bit and NUL bytes, odd line ends, pipelined in one write or cut into
    random pieces — always end in well-formed replies and a close, never in a hang, a
    crash reply, a traceback in the log or a dead worker.
(b) Random line-end mixes inside DATA (bare CR, bare LF, CRLF, ``\\n.\\n``, ``\\r.\\r``, dots
    at line starts, NULs) in one to three transactions per session: the downstream gets
    exactly one message per transaction, each exactly what the documented rule makes of
    what the client sent (un-stuff at CRLF line starts, then bare CR/LF -> CRLF), on a
    CRLF-only, dot-stuffed wire — never a message the client did not send.

One gate for the module (tests/support/fuzzing.py); example counts are bounded for CI.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.support.fuzzing import (CRASH, FuzzGate, Session, assert_clean_wire, assert_replies_well_formed,
                                   fuzz_settings, reply_lines, start_fuzz_gate, stop_fuzz_gate, stuff)
from tests.support.gateproc import start_gate

SENDER = b"a@sender.test"
RCPT = b"user@example.com"
TERMINATOR = b"\r\n.\r\n"


@pytest.fixture(scope="module")
def fuzz_gate(tmp_path_factory):
    fg = start_fuzz_gate(start_gate, tmp_path_factory.mktemp("fuzz-smtp") / "gate",
                         config={"limits": {"command_timeout": "20s", "data_timeout": "20s"}})
    yield fg
    stop_fuzz_gate(fg)


# ---------------------------------------------------------------------------- (a) commands
VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
         "STARTTLS", "AUTH", "BDAT", "XCLIENT", "XFORWARD", "ETRN", "TURN", "SEND", "VERB"]
ARGS = {
    "EHLO": ["client.test", "[127.0.0.1]", "[IPv6:::1]", "", "[x LOGIN=admin", "a b\tc", "x=y+z",
             "bücher.test", "-" * 300],
    "MAIL": ["FROM:<a@sender.test>", "FROM:<>", "FROM:<a@sender.test> SIZE=100",
             "FROM:<a@sender.test> BODY=8BITMIME", "FROM:<a@sender.test> SMTPUTF8",
             "FROM:<a@sender.test> SIZE=999999999999", "FROM:<a@sender.test> FOO=bar",
             "FROM: <a@sender.test>", "FROM:a@sender.test", "FROM:<@route.test:a@sender.test>",
             'FROM:<"quoted local"@sender.test>', "FROM:<a@sender.test", "FROM:<a@[127.0.0.1]>",
             "FROM:<ü@sender.test>", "FROM:<ü@sender.test> SMTPUTF8", "FROM:"],
    "RCPT": ["TO:<user@example.com>", "TO:<postmaster>", "TO:<Postmaster@example.com>",
             "TO:<user@elsewhere.test>", "TO:<user%other.test@example.com>", "TO:<>",
             "TO:<user@example.com> NOTIFY=NEVER", "TO:<@a.test,@b.test:user@example.com>",
             "TO:<user@[127.0.0.1]>", "TO:<ü@example.com>", "TO:<user@bücher.example>",
             'TO:<"a@b"@example.com>', "TO:user@example.com", "TO:"],
    "DATA": ["", "x"],
    "RSET": ["", "x"],
    "NOOP": ["", "anything"],
    "QUIT": ["", "now"],
    "VRFY": ["user", "user@example.com", ""],
    "EXPN": ["list"],
    "HELP": ["", "MAIL"],
    "STARTTLS": ["", "x"],
    "AUTH": ["PLAIN", "PLAIN AGFkbWluAHNlY3JldA==", "LOGIN", ""],
    "XCLIENT": ["LOGIN=admin", "ADDR=10.0.0.1 NAME=x"],
    "XFORWARD": ["ADDR=10.0.0.1"],
}
# CRLF most of the time; the rest are what broken or hostile clients send.
LINE_ENDS = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b"\n\r", b" \r\n", b"\x00\r\n"])
NOISE = st.binary(max_size=40)
TEXTY = st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass"))
LONG = st.integers(min_value=400, max_value=2000).map(lambda n: b"A" * n)


def _case(verb: str):
    return st.sampled_from([verb, verb.lower(), verb.capitalize()]).map(str.encode)


@st.composite
def command(draw) -> bytes:
    """One command line (or BDAT with its chunk, or DATA with a body and the final dot)."""
    kind = draw(st.sampled_from(["known"] * 6 + ["junk-verb", "junk-line", "bdat", "data-body"]))
    end = draw(LINE_ENDS)
    if kind == "junk-line":
        return draw(st.one_of(NOISE, TEXTY, LONG)) + end
    if kind == "bdat":
        size = draw(st.integers(min_value=0, max_value=64))
        chunk = draw(st.binary(min_size=size, max_size=size))
        last = draw(st.sampled_from([b"", b" LAST", b" x"]))
        return b"BDAT %d%s\r\n%s" % (size, last, chunk)
    if kind == "data-body":
        # DATA with a body; when the gate refuses DATA the body is read as commands.
        body = draw(st.binary(max_size=120))
        return b"DATA\r\n" + body + TERMINATOR
    verb = draw(st.sampled_from(VERBS)) if kind == "known" else draw(TEXTY.filter(lambda b: b" " not in b))
    name = draw(_case(verb)) if kind == "known" else verb
    known = ARGS.get(verb, [""]) if kind == "known" else [""]
    arg = draw(st.one_of(st.sampled_from(known).map(str.encode), NOISE, TEXTY, LONG))
    sep = draw(st.sampled_from([b" ", b"", b"  ", b"\t"])) if arg else b""
    return name + sep + arg + end


@st.composite
def opening(draw) -> list[bytes]:
    """Most sessions open as a client would (greeting, MAIL, RCPTs, each with a known
    argument, good or bad), so that the later states are reached with odd envelopes."""
    lines = []
    greeting = draw(st.sampled_from(["", "EHLO client.test", "HELO client.test", "EHLO x"]))
    if greeting == "EHLO x":
        greeting = "EHLO " + draw(st.sampled_from(ARGS["EHLO"]))
    if greeting:
        lines.append(greeting)
        mail = draw(st.sampled_from(["", "FROM:<a@sender.test>", *ARGS["MAIL"]]))
        if mail:
            lines.append("MAIL " + mail)
            lines += ["RCPT " + r for r in draw(st.lists(st.sampled_from(ARGS["RCPT"]), max_size=3))]
    return [line.encode() + b"\r\n" for line in lines]


@st.composite
def session_script(draw) -> tuple[list[bytes], bool]:
    """(pieces to send one write each, wait for the greeting first)."""
    stream = b"".join(draw(opening()) + draw(st.lists(command(), min_size=1, max_size=20)))
    # Whatever state the stream left: end a DATA phase, then QUIT at a line start.
    stream += TERMINATOR + b"QUIT\r\n"
    cuts = sorted(draw(st.lists(st.integers(min_value=1, max_value=len(stream) - 1), max_size=6,
                                unique=True))) if draw(st.booleans()) else []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return pieces, draw(st.booleans())


def test_random_command_streams_always_end_cleanly(fuzz_gate: FuzzGate):
    mark = fuzz_gate.log_mark()

    @fuzz_settings(max_examples=100)
    @given(script=session_script())
    def one_session(script):
        pieces, wait_greeting = script
        start, since = fuzz_gate.log_mark(), fuzz_gate.ds.mark()
        with Session(fuzz_gate.gate.address) as s:
            if wait_greeting:
                assert s.read_reply().startswith(b"220 "), s.transcript
            for piece in pieces:
                if not s.send(piece):
                    break  # the gate closed (QUIT or 421): what it sent is read below
            replies = b"".join(s.transcript) + s.read_until_closed()
        assert_replies_well_formed(replies)
        lines = reply_lines(replies)
        assert lines and lines[0].startswith(b"220"), replies
        # The gate closes only after saying why: QUIT's 221, a 421, or a 5xx goodbye (too
        # many bad commands). Unless the close reset the connection (the client was still
        # sending after a QUIT), which may drop replies not yet read.
        if not s.reset:
            assert lines[-1][:3] in (b"221", b"421") or lines[-1][:1] == b"5", (
                f"closed after {lines[-1]!r}, no goodbye (a send met {s.send_refused!r}): "
                f"{replies!r}\n"
                + fuzz_gate.describe_session(s.port, start, since))
        fuzz_gate.settle()
        relayed = fuzz_gate.ds.messages_from(s.port, since)
        assert len(relayed) <= sum(1 for line in lines if line.startswith(b"354")), replies
        for msg in relayed:
            assert_clean_wire(msg.data_raw)
            assert msg.mail_from.encode() in b"".join(pieces)  # never a sender nobody sent
        fuzz_gate.check_healthy(start, script)

    one_session()
    fuzz_gate.check_healthy(mark)


@pytest.mark.parametrize("mail,rcpt", [("FROM:<ü@sender.test>", "TO:<user@example.com>"),
                                       ("FROM:<a@sender.test>", "TO:<ü@example.com>")])
def test_non_ascii_address_without_smtputf8_is_refused(fuzz_gate: FuzzGate, mail, rcpt):
    """What the streams above found first (issue 10 §2): 451 4.3.0 and a traceback before."""
    mark = fuzz_gate.log_mark()
    with Session(fuzz_gate.gate.address) as s:
        s.send(f"EHLO client.test\r\nMAIL {mail}\r\nRCPT {rcpt}\r\nQUIT\r\n".encode())
        replies = s.read_until_closed()
    assert b"553 5.6.7" in replies and CRASH.search(replies) is None, replies
    fuzz_gate.check_healthy(mark)


def test_vrfy_of_an_address_ending_in_at_is_refused_without_a_crash(fuzz_gate: FuzzGate):
    """Found by the streams above: aiosmtpd's VRFY parser (the stdlib's) raised IndexError
    on "user@": a traceback in the log and 451 4.3.0 to the client."""
    mark = fuzz_gate.log_mark()
    with Session(fuzz_gate.gate.address) as s:
        s.send(b"EHLO client.test\r\nVRFY user@\r\nVRFY user@example.com\r\nQUIT\r\n")
        replies = s.read_until_closed()
    lines = reply_lines(replies)
    assert lines[-3].startswith(b"502 5.5.1 Could not VRFY ") and lines[-2].startswith(b"252 "), replies
    assert CRASH.search(replies) is None, replies
    fuzz_gate.check_healthy(mark)


def test_an_echoed_argument_carries_no_control_character(fuzz_gate: FuzzGate):
    """aiosmtpd's "502 Could not VRFY ARG" echoes the client's argument: a bare CR, NUL or
    ESC there must not reach the client inside a reply line."""
    mark = fuzz_gate.log_mark()
    with Session(fuzz_gate.gate.address) as s:
        s.send(b"EHLO client.test\r\nVRFY a\rb\x00c\x1bd@\r\nQUIT\r\n")
        replies = s.read_until_closed()
    assert_replies_well_formed(replies)
    lines = reply_lines(replies)
    assert lines[-2] == b"502 5.5.1 Could not VRFY a?b?c?d@", replies
    fuzz_gate.check_healthy(mark)


# ---------------------------------------------------------------------------- (b) DATA line ends
FRAGMENTS = st.sampled_from([
    b"\r\n", b"\r\n", b"\r", b"\n", b"\n.\n", b"\r.\r", b"\r\n.\r\n.", b".", b"..", b". ",
    b"\x00", b"\xff\xfe", b"Subject: fuzz", b"From: a@sender.test", b"line", b" folded",
    b"MAIL FROM:<evil@evil.test>", b"RCPT TO:<victim@example.com>", b"DATA", b"QUIT",
])
# At most 30 fragments of at most 27 octets: no line reaches the 998-octet limit (RFC 5321).
BODY = st.lists(st.one_of(FRAGMENTS, st.binary(max_size=8)), max_size=30).map(b"".join)


def split_data(body: bytes) -> tuple[bytes, bytes]:
    """Where the data of `body + TERMINATOR` ends: (data before the end, bytes after it).

    RFC 5321: data ends at the first CRLF "." CRLF, the CRLF before DATA's content counting
    as a line start (so ".\\r\\n" first is an empty message)."""
    stream = b"\r\n" + body + TERMINATOR
    at = stream.index(TERMINATOR)
    return stream[2: at + 2], stream[at + len(TERMINATOR):]


def expected_content(data: bytes) -> bytes:
    """The gate's documented rule, written from the rule: un-stuff lines that start after a
    CRLF (or at the start), then every bare CR and bare LF becomes CRLF."""
    lines = data.split(b"\r\n")
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    out = bytearray()
    i = 0
    while i < len(unstuffed):
        c = unstuffed[i:i + 1]
        if c == b"\r" and unstuffed[i + 1:i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        out += b"\r\n" if c in (b"\r", b"\n") else c
        i += 1
    return bytes(out)


@st.composite
def transactions(draw) -> list[tuple[bytes, list[bytes]]]:
    """1-3 bodies, each with the pieces it is sent in (random cuts, terminator included)."""
    out = []
    for body in draw(st.lists(BODY, min_size=1, max_size=3)):
        data, rest = split_data(body)
        # Bytes after an early end of data are read as commands: keep them from opening a
        # transaction of their own, so the expected messages stay exactly one per DATA.
        assume(b"MAIL" not in rest.upper())
        wire = body + TERMINATOR
        cuts = sorted(draw(st.lists(st.integers(min_value=1, max_value=len(wire) - 1),
                                    max_size=4, unique=True)))
        out.append((body, [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]))
    return out


def test_line_end_mixes_in_data_arrive_as_one_clean_message_each(fuzz_gate: FuzzGate):
    mark = fuzz_gate.log_mark()

    @fuzz_settings(max_examples=80)
    @given(txs=transactions())
    def one_session(txs):
        start, since = fuzz_gate.log_mark(), fuzz_gate.ds.mark()
        expected = []
        ended_early = False
        with Session(fuzz_gate.gate.address) as s:
            assert s.read_reply().startswith(b"220 ")
            s.send(b"EHLO client.test\r\n")
            assert s.read_reply().startswith(b"250"), s.transcript
            for body, pieces in txs:
                s.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
                for want in (b"250 2.1.0", b"250 2.1.5", b"354 "):
                    assert s.read_reply().startswith(want), s.transcript
                for piece in pieces:
                    s.send(piece)
                assert s.read_reply().startswith(b"250 2.0.0"), s.transcript
                data, rest = split_data(body)
                expected.append(expected_content(data))
                if rest:
                    # The client ended the data early: the rest are commands (random bytes
                    # can spell RSET, NOOP, RCPT...). End the session there, so that the
                    # replies cannot be confused with those of another transaction.
                    s.send(b"\r\nQUIT\r\n")
                    ended_early = True
                    break
            if not ended_early:
                s.send(b"QUIT\r\n")
                assert s.read_reply().startswith(b"221"), s.transcript
            replies = b"".join(s.transcript) + s.read_until_closed()
        assert_replies_well_formed(replies)
        fuzz_gate.settle()
        relayed = fuzz_gate.ds.messages_from(s.port, since)
        assert [m.data for m in relayed] == expected, fuzz_gate.ds.describe()
        for msg in relayed:
            assert msg.mail_from == SENDER.decode() and msg.rcpts == [RCPT.decode()]
            assert_clean_wire(msg.data_raw)
            assert msg.data_raw == stuff(msg.data)
        assert not fuzz_gate.ds.rejected_from(s.port, since)
        assert "evil" not in " ".join(m.mail_from for m in fuzz_gate.ds.messages[since.messages:])
        fuzz_gate.check_healthy(start, txs)

    one_session()
    fuzz_gate.check_healthy(mark)


def test_the_model_of_the_data_rule_matches_the_documented_examples():
    """The expected-content model above agrees with the hand-worked cases of test_smuggling."""
    assert expected_content(b"Subject: mixed\n\rline1\rline2\nline3\r\r\n\n.\n..\r.x\r\n.y\r\n") == \
        b"Subject: mixed\r\n\r\nline1\r\nline2\r\nline3\r\n\r\n\r\n.\r\n..\r\n.x\r\ny\r\n"
    assert split_data(b"") == (b"\r\n", b"")  # one empty line, then the final dot
    assert split_data(b"a\r\n.\r\nb") == (b"a\r\n", b"b\r\n.\r\n")
    assert split_data(b".\r\nx") == (b"", b"x\r\n.\r\n")
    assert re.fullmatch(rb"(\r\n|[^\r\n])*", expected_content(b"\r\r\n\n\r"))


# ---------------------------------------------------------------------------- found by fuzzing
GOODBYES = {
    "bdat-421": b"BDAT\r\n",  # 421 4.7.0 BDAT without CHUNKING, closing
    "bad-commands": b"X\r\n" * 25,  # past limits.max_errors (20): 421 4.7.0 and closed
}


@pytest.mark.parametrize("goodbye", list(GOODBYES), ids=list(GOODBYES))
def test_nothing_pipelined_after_a_goodbye_is_relayed(fuzz_gate: FuzzGate, goodbye):
    """After the gate closed the connection, aiosmtpd still ran the commands the client had
    pipelined: a transaction open before the goodbye went on with DATA, and writing its 354
    to the closed connection raised in uvloop (a traceback); with that write skipped, the
    downstream took a message the client was told was refused (421), which the client would
    send again. Now nothing after the goodbye does anything."""
    mark, since = fuzz_gate.log_mark(), fuzz_gate.ds.mark()
    with Session(fuzz_gate.gate.address) as s:
        s.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n"
               + GOODBYES[goodbye]
               + b"DATA\r\nSubject: after the goodbye\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies = s.read_until_closed()
    assert_replies_well_formed(replies)
    last = reply_lines(replies)[-1]
    assert last.startswith((b"421", b"502")), replies
    fuzz_gate.settle()
    assert fuzz_gate.ds.messages_from(s.port, since) == [], "relayed after the goodbye"
    fuzz_gate.check_healthy(mark)
