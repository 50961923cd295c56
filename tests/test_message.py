"""Message: raw bytes kept, header edits surgical, no header injection."""
import pytest

from smtpgate import Message

RAW = (b"Received: from a\r\n\tby b\r\nFrom: A <a@x.test>\r\nSubject: hi\r\n"
       b"X-Dup: 1\r\nX-Dup: 2\r\n\r\nbody\r\nSubject: not a header\r\n")


def test_reading_does_not_change_bytes():
    m = Message(RAW)
    assert m.get("subject") == "hi"
    assert m.get_all("X-Dup") == ["1", "2"]
    assert m.get("Received") == "from a\r\n\tby b"
    assert m.email["From"] == "A <a@x.test>"
    assert m.raw == RAW and not m.changed


def test_prepend_remove_replace_are_surgical():
    m = Message(RAW)
    m.prepend_header("X-Tag", "yes")
    assert m.raw == b"X-Tag: yes\r\n" + RAW
    assert m.remove_header("x-dup") == 2
    assert b"X-Dup" not in m.raw.split(b"\r\n\r\n")[0]
    m.replace_header("Subject", "[EXT] hi")
    assert m.raw == (b"X-Tag: yes\r\nReceived: from a\r\n\tby b\r\nFrom: A <a@x.test>\r\n"
                     b"Subject: [EXT] hi\r\n\r\nbody\r\nSubject: not a header\r\n")
    assert [c.op for c in m.changes] == ["add", "remove", "remove", "replace"]


@pytest.mark.parametrize("value", ["a\r\nBcc: x@evil.test", "a\nX: y", "a\rb", "a\x00b"])
def test_header_injection_is_refused(value):
    m = Message(RAW)
    with pytest.raises(ValueError):
        m.prepend_header("X-Tag", value)
    with pytest.raises(ValueError):
        m.replace_header("Subject", value)
    assert m.raw == RAW


@pytest.mark.parametrize("name", ["X Tag", "X:Tag", "", "X\r\nY"])
def test_bad_header_names_are_refused(name):
    with pytest.raises(ValueError):
        Message(RAW).prepend_header(name, "v")


def test_checkpoint_and_rollback():
    m = Message(RAW)
    mark = m.checkpoint()
    m.prepend_header("X-A", "1")
    m.rollback(mark)
    assert m.raw == RAW and not m.changes


def test_headerless_and_bodyless_messages():
    assert Message(b"\r\nbody only\r\n").fields == []
    assert Message(b"Subject: x\r\n").get("Subject") == "x"
    garbage = Message(b"not a header line\r\nSubject: y\r\n\r\nb\r\n")
    assert garbage.get("Subject") == "y"
