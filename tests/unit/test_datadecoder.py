"""DataDecoder: piecewise decoding gives exactly what one search over the whole stream gives.

The reference below is the gate's former whole-message reader (one search for CRLF.CRLF, then
un-stuff, then normalise). Streams are random mixes of the bytes that matter (".", CR, LF),
cut at random places, with a fixed seed so a failure is repeatable.
"""
import random

import pytest

from smtpgate.smtp.datadecoder import NO_STORAGE, DataDecoder, normalise_line_ends

TERMINATOR = b"\r\n.\r\n"


def reference(stream: bytes) -> tuple[bytes, bytes]:
    chunk = b"\r\n" + stream
    end = chunk.find(TERMINATOR)
    content = chunk[:end + 2].replace(b"\r\n.", b"\r\n")[2:]
    return normalise_line_ends(content), chunk[end + len(TERMINATOR):]


def decode(stream: bytes, cuts: list[int], **limits) -> tuple[object, bytes | None]:
    decoder = DataDecoder(**limits)
    pos, rest = 0, None
    for cut in sorted(cuts) + [len(stream)]:
        if rest is not None:
            break
        if cut > pos:
            rest = decoder.feed(stream[pos:cut])
            pos = cut
    if rest is not None and pos < len(stream):
        rest += stream[pos:]
    result = decoder.result()
    return (b"".join(result) if isinstance(result, list) else result), rest


def random_stream(rng: random.Random) -> bytes:
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.", b"\x00"]
    body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    return body + TERMINATOR + b"RSET\r\n" * rng.randrange(0, 2)


def test_random_streams_cut_anywhere_decode_as_the_whole():
    rng = random.Random(1005)
    for _ in range(3000):
        stream = random_stream(rng)
        cuts = [rng.randrange(0, len(stream) + 1) for _ in range(rng.randrange(0, 8))]
        expected, rest = reference(stream)
        assert decode(stream, cuts) == (expected, rest), (stream, cuts)
        assert decode(stream, list(range(len(stream)))) == (expected, rest), stream  # byte by byte


@pytest.mark.parametrize("stream, expected", [
    (b".\r\n", b""),                                   # empty message
    (b"..\r\n.\r\n", b".\r\n"),                        # a stuffed dot on the first line
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
    (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),         # LF.LF is no end, its dot is kept
    (b"a\r.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    (b"no final newline\r\n.\r\n", b"no final newline\r\n"),
])
def test_known_cases(stream, expected):
    assert decode(stream, [1, 2, 3, 5, 8]) == (expected, b"")


def test_line_length_counts_octets_before_crlf_across_pieces():
    ok = b"x" * 998 + b"\r\n" + b"y" * 10 + b"\r\n.\r\n"
    long = b"x" * 999 + b"\r\n.\r\n"
    for cuts in ([], [500], [997, 998, 999, 1000], list(range(0, 1010, 7))):
        assert decode(ok, cuts, max_line=998)[0] == ok[:-3]
        refused, rest = decode(long, cuts, max_line=998)
        assert (refused.code, refused.enhanced, rest) == (500, "5.5.2", b""), cuts
    assert decode(long, [], max_line=0)[0] == long[:-3]  # 0: no limit


def test_bare_lf_splits_lines_as_the_downstream_would_see_them():
    assert decode(b"x" * 600 + b"\n" + b"y" * 600 + b"\r\n.\r\n", [], max_line=998)[0].count(b"\r\n") == 2


def test_size_limit_and_budget_refuse_but_read_to_the_end():
    refused, rest = decode(b"a" * 100 + b"\r\n.\r\nQUIT\r\n", [10, 50], max_size=50)
    assert (refused.code, rest) == (552, b"QUIT\r\n")
    seen = []
    refused, rest = decode(b"a" * 100 + b"\r\n.\r\n", [10, 50],
                           grow=lambda size: seen.append(size) or size < 40)
    assert refused is NO_STORAGE and rest == b"" and seen


# --- the relay's side: dot-stuffing in chunks gives what aiosmtplib's whole-message data() sent

def test_relay_chunks_stuff_like_the_whole_message(monkeypatch):
    import re

    from smtpgate.smtp import relay

    def whole(message: bytes) -> bytes:  # aiosmtplib's execute_data_command, restated
        message = re.sub(rb"(?:\r\n|\n|\r(?!\n))", b"\r\n", message)
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"

    monkeypatch.setattr(relay, "WRITE_CHUNK", 3)
    rng = random.Random(2026)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n."]
    for _ in range(2000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        cuts = sorted(rng.randrange(0, len(message) + 1) for _ in range(rng.randrange(0, 4)))
        pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
        pieces = [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)]
        assert b"".join(relay.dot_stuffed(pieces)) == whole(message), (message, cuts)


def test_relay_bdat_chunk_is_what_data_delivers_unstuffed_and_as_long_as_announced(monkeypatch):
    # BDAT carries the bytes the downstream stores after DATA (same line-end fix, no
    # stuffing), and crlf_size counts them exactly without building them: the size in
    # "BDAT <size> LAST" must never differ from what follows it.
    from smtpgate.smtp import relay
    from tests.support.downstream import unstuff

    monkeypatch.setattr(relay, "WRITE_CHUNK", 3)
    rng = random.Random(3030)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.", b"\n."]
    for _ in range(3000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        cuts = sorted(rng.randrange(0, len(message) + 1) for _ in range(rng.randrange(0, 4)))
        pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
        pieces = [memoryview(p) if i % 2 else p for i, p in enumerate(pieces)]
        sent = b"".join(relay.crlf_chunks(pieces, b"BDAT "))
        data = b"".join(relay.dot_stuffed(pieces))
        assert sent == b"BDAT " + unstuff(data[:-3]), (message, cuts)
        assert len(sent) - 5 == relay.crlf_size(pieces), (message, cuts)


def test_a_large_memoryview_body_is_counted_as_bytes_a_window_at_a_time():
    # After a header edit the body is a memoryview of the message as received: crlf_size
    # counts it as the same bytes, copying one WRITE_CHUNK window at a time, never the whole
    # body (once per BDAT). A CR ends a window whose LF opens the next one.
    import tracemalloc

    from smtpgate.smtp import relay

    window = relay.WRITE_CHUNK
    line = b"bare LF\nbare CR\rline " + b"x" * 50 + b"\r\n"
    body = bytearray(line * (40 * window // len(line)))
    body[window - 1:window + 1] = b"\r\n"
    body[3 * window - 1:3 * window + 1] = b"\r\r"
    raw = b"Subject: big\r\n\r\n" + bytes(body) + b"no final line end"
    end = raw.index(b"\r\n\r\n") + 4
    edited = [b"X-Edit: 1\r\n" + raw[:end], memoryview(raw)[end:]]
    as_bytes = [b"X-Edit: 1\r\n" + raw]
    size = len(b"".join(relay.crlf_chunks(as_bytes, b"")))
    tracemalloc.start()
    try:
        assert relay.crlf_size(edited) == size
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert relay.crlf_size(as_bytes) == size
    assert peak < 3 * window < len(raw) // 10, peak


def test_a_header_block_of_its_own_goes_out_with_the_body():
    # A rule's header edit leaves the message as two pieces (the new header block, the body
    # as received): one write, as for the message unedited; large messages still go in
    # chunks of about WRITE_CHUNK.
    from smtpgate.mail.message import Message
    from smtpgate.smtp import relay

    raw = b"From: <a@x.test>\r\nSubject: hi\r\n\r\n" + b"line\r\n" * 2000
    message = Message(raw)
    message.prepend_header("X-Bench", "real")
    assert len(message.pieces()) == 2
    assert list(relay.dot_stuffed(message.pieces())) == [b"X-Bench: real\r\n" + raw + b".\r\n"]
    big = Message(b"Subject: big\r\n\r\n" + b"x" * 78 * 10 + b"\r\n" * 10_000)
    big.prepend_header("X-Bench", "real")
    chunks = list(relay.dot_stuffed(big.pieces()))
    assert len(chunks) == 1
    old_chunk, relay.WRITE_CHUNK = relay.WRITE_CHUNK, 4096
    try:
        chunks = list(relay.dot_stuffed(big.pieces()))
    finally:
        relay.WRITE_CHUNK = old_chunk
    assert b"".join(chunks) == big.raw + b".\r\n"
    assert len(chunks) > 2 and all(len(c) <= 4096 for c in chunks[:-1]) and len(chunks[-1]) <= 4096 + 3


def test_a_small_header_block_is_not_a_pass_of_its_own(monkeypatch):
    # The line-end work (three counts, the stuffing replace) has a fixed cost per pass: the
    # header block a rule's edit splits off goes through it with the body, not on its own;
    # a large message still goes a WRITE_CHUNK window at a time.
    from smtpgate.mail.message import Message
    from smtpgate.smtp import relay

    passes = []
    normalise = relay.normalise_line_ends
    monkeypatch.setattr(relay, "normalise_line_ends", lambda chunk: passes.append(len(chunk)) or normalise(chunk))
    raw = b"From: <a@x.test>\r\nSubject: hi\r\n\r\n" + b"line\r\n" * 2000
    message = Message(raw)
    message.prepend_header("X-Bench", "real")
    assert b"".join(relay.dot_stuffed(message.pieces())) == b"X-Bench: real\r\n" + raw + b".\r\n"
    assert passes == [len(raw) + 15]
    passes.clear()
    assert relay.crlf_size(message.pieces()) == len(raw) + 15
    monkeypatch.setattr(relay, "WRITE_CHUNK", 4096)
    b"".join(relay.dot_stuffed(message.pieces()))
    assert passes[0] == 4096 and sum(passes) == len(raw) + 15


def test_random_streams_line_limit_matches_the_longest_line():
    rng = random.Random(998)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b"bb", b"cccc", b"\r\n."]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        stream = body + TERMINATOR
        max_line = rng.randrange(1, 9)
        expected, _ = reference(stream)
        longest = max(len(line) for line in expected.split(b"\r\n"))
        cuts = [rng.randrange(0, len(stream) + 1) for _ in range(rng.randrange(0, 6))]
        got, rest = decode(stream, cuts, max_line=max_line)
        if longest > max_line:
            assert getattr(got, "code", None) == 500, (stream, cuts, max_line)
        else:
            assert got == expected, (stream, cuts, max_line)


@pytest.mark.parametrize("stream, expected, rest", [
    (b"a\r\n.\r\nMAIL FROM:<x>\r\n..\r\n", b"a\r\n", b"MAIL FROM:<x>\r\n..\r\n"),  # dots after the end
    (b"a\r\n..b\r\n.\r\nRSET\r\n", b"a\r\n.b\r\n", b"RSET\r\n"),  # a stuffed dot before it
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", b""),                   # a dot that is no terminator
])
def test_the_first_line_start_dot_decides_terminator_and_unstuffing(stream, expected, rest):
    # feed() finds the first CRLF "." once: the terminator itself, or dots to unstuff before it
    assert reference(stream) == (expected, rest)
    for cuts in ([], [1], [len(stream) - 8], list(range(len(stream)))):
        assert decode(stream, cuts) == (expected, rest), cuts
