"""Message built from the front's pieces: the same bytes as from one buffer, joined only when
asked, header edits without touching the body, the received copy kept for the quarantine."""
import random

import pytest

from smtpgate import Message

RAW = (b"Received: from a\r\n\tby b\r\nFrom: A <a@x.test>\r\nSubject: hi\r\n"
       b"X-Dup: 1\r\nX-Dup: 2\r\n\r\nbody\r\nSubject: not a header\r\n" + b"line\r\n" * 50)


def split(raw: bytes, *cuts: int) -> list[bytes]:
    cuts = sorted(cuts)
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


@pytest.mark.parametrize("cuts", [(), (5,), (40, 41), (len(RAW) - 1,), (80, 81, 82, 200)])
def test_pieces_read_and_edit_as_one_buffer(cuts):
    pieces = split(RAW, *cuts)
    m, whole = Message(list(pieces)), Message(RAW)
    assert m.size == len(RAW) and m.get("subject") == "hi" and m.header_end() == whole.header_end()
    for msg in (m, whole):
        msg.prepend_header("X-Tag", "yes")
        msg.replace_header("Subject", "[EXT] hi")
        msg.remove_header("X-Dup")
    assert b"".join(m.pieces()) == m.raw == whole.raw
    assert m.received == RAW


def test_the_callers_list_is_taken_over_and_nothing_is_joined_for_header_work():
    pieces = [RAW[:100], RAW[100:]]
    m = Message(pieces)
    assert pieces == []  # the message holds the only references
    m.prepend_header("X-Tag", "yes")
    out = m.pieces()
    assert len(out) == 3 and isinstance(out[1], memoryview)  # head, rest of piece 1, piece 2
    assert m._joined is None


def test_unchanged_message_joined_once_keeps_one_copy():
    m = Message([RAW[:10], RAW[10:]])
    raw = m.raw
    assert raw == RAW and m.received is raw and m.pieces() == [raw]


def test_rollback_restores_pieces_and_body_edits_splice():
    m = Message([RAW[:30], RAW[30:]])
    mark = m.checkpoint()
    m.prepend_header("X-A", "1")
    m.rollback(mark)
    assert m.raw == RAW and not m.changes
    start = RAW.index(b"body")
    m.replace_ranges([(start, start + 4, b"BODY")], "test")
    assert m.raw == RAW.replace(b"body\r\n", b"BODY\r\n", 1)
    assert m.received == RAW


def test_random_cuts_and_edits_match_the_whole_buffer():
    rng = random.Random(7)
    for _ in range(300):
        cuts = [rng.randrange(1, len(RAW)) for _ in range(rng.randrange(0, 4))]
        m, whole = Message(split(RAW, *cuts)), Message(RAW)
        edit = rng.random() < 0.5
        for msg in (m, whole):
            if edit:
                msg.edit_header("subject", lambda v: v + " (tagged)")
        assert b"".join(m.pieces()) == whole.raw, cuts


def test_empty_and_headerless_pieces():
    assert Message([]).raw == b"" and Message([]).pieces() == []
    m = Message([b"\r\n", b"body only\r\n"])
    assert m.fields == [] and m.header_end() == 2
    m.prepend_header("X", "y")
    assert m.raw == b"X: y\r\n\r\nbody only\r\n"
