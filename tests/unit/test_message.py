"""Message: raw bytes kept, header edits surgical, no header injection."""
import pytest

from smtpgate import Message
from smtpgate.machines.machine import SenderState
from smtpgate.mail.message import Change, HeaderField

RAW = (b"Received: from a\r\n\tby b\r\nFrom: A <a@x.test>\r\nSubject: hi\r\n"
       b"X-Dup: 1\r\nX-Dup: 2\r\n\r\nbody\r\nSubject: not a header\r\n")


def test_reading_does_not_change_bytes():
    m = Message(RAW)
    assert m.get("subject") == "hi"
    assert m.get_all("X-Dup") == ["1", "2"]
    assert m.get("Received") == "from a\r\n\tby b"
    assert m.email["From"] == "A <a@x.test>"
    assert m.raw == RAW and not m.changed


def test_fields_read_before_a_prepend_are_those_of_the_new_block():
    m = Message([RAW[:30], RAW[30:]])
    assert m.get("subject") == "hi"  # read once
    m.prepend_header("X-Tag", "yes")
    m.prepend_header("X-Other", " spaced ")
    assert m.fields == Message(m.raw).fields  # kept, moved down: as if read again
    assert [f.name for f in m.fields][:3] == ["X-Other", "X-Tag", "Received"]


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


@pytest.mark.parametrize("name", ["X Tag", "X:Tag", "", "X\r\nY", "X-Tag\n", "X-Tag\r", "X-\u00e9"])
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


# --- edit_header: a field's value changed in place, folding kept (used by rules/rewrite/__init__.py)

FOLDED = (b"Received: from a\r\nTo: A <a@old.test>,\r\n\tB <b@old.test>\r\nSubject: s\r\n"
          b"To: c@old.test\r\n\r\nTo: body@old.test\r\n")


def test_edit_header_changes_every_instance_in_place_keeping_folding():
    m = Message(FOLDED)
    seen = []

    def edit(value):
        seen.append(value)
        return value.replace("old.test", "new.test")

    assert m.edit_header("to", edit) == 2
    assert seen == [" A <a@old.test>,\r\n\tB <b@old.test>", " c@old.test"]  # as written
    assert m.raw == FOLDED.replace(b"old.test>", b"new.test>").replace(b"To: c@old", b"To: c@new")
    assert m.raw.endswith(b"To: body@old.test\r\n")  # the body is not a header
    assert [(c.op, c.header, c.after) for c in m.changes] == [
        ("edit", "To", "A <a@new.test>,\r\n\tB <b@new.test>"), ("edit", "To", "c@new.test")]


def test_edit_header_first_only_none_and_same_mean_unchanged():
    m = Message(FOLDED)
    assert m.edit_header("To", lambda v: " x@y.test", first=True) == 1
    assert m.get_all("To") == ["x@y.test", "c@old.test"]
    before = m.raw
    assert m.edit_header("Subject", lambda v: None) == 0
    assert m.edit_header("Subject", lambda v: v) == 0
    assert m.edit_header("X-Absent", lambda v: " z") == 0
    assert m.raw == before and len(m.changes) == 1


def test_edit_header_keeps_the_name_as_written_and_8bit_bytes():
    raw = "sUBJECT: Grüße\r\n\r\nb\r\n".encode("utf-8")
    m = Message(raw)
    m.edit_header("Subject", lambda v: " [T]" + v)
    assert m.raw == "sUBJECT: [T] Grüße\r\n\r\nb\r\n".encode("utf-8")
    latin1 = Message(b"Subject: caf\xe9\r\n\r\n")
    latin1.edit_header("Subject", lambda v: " [T]" + v)
    assert latin1.raw == b"Subject: [T] caf\xe9\r\n\r\n"


@pytest.mark.parametrize("value", [
    " a\r\nBcc: x@evil.test", " a\nX: y", " a\rb", " a\x00b", " a\r\n", " a\r\n \r\n b", " a\r\n\r\nbody"])
def test_edit_header_refuses_injection(value):
    m = Message(FOLDED)
    with pytest.raises(ValueError):
        m.edit_header("To", lambda v: value)
    assert m.raw == FOLDED and not m.changes  # all or nothing


def test_edit_header_allows_new_folding():
    m = Message(FOLDED)
    m.edit_header("Subject", lambda v: " a long\r\n  subject")
    assert b"Subject: a long\r\n  subject\r\nTo: c@old.test" in m.raw
    assert m.get("Subject") == "a long\r\n  subject"


def test_edit_header_on_a_header_block_without_final_crlf():
    m = Message(b"Subject: x")
    m.edit_header("Subject", lambda v: " y")
    assert m.raw == b"Subject: y"


def test_describe_changes():
    from smtpgate.mail.message import describe_changes
    m = Message(RAW)
    m.remove_header("X-Dup")
    m.prepend_header("X-Tag", "1")
    assert describe_changes(m.changes) == "remove X-Dup (2); add X-Tag"
    # one edit (a list of one: the shortcut) reads as the general path writes it
    assert describe_changes(m.changes[2:]) == describe_changes(iter(m.changes[2:])) == "add X-Tag"
    assert describe_changes(m.changes[:1]) == describe_changes(iter(m.changes[:1])) == "remove X-Dup"
    assert describe_changes([]) == describe_changes(iter([])) == ""


# --- forged Authentication-Results (RFC 8601 §5) ---------------------------------------------
AR_OTHER = b"Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=x.test\r\n"


@pytest.mark.parametrize("field", [
    b"Authentication-Results: gate.test; spf=pass smtp.mailfrom=x.test\r\n",
    b"authentication-results : GATE.Test; dkim=pass\r\n",                    # any case
    b"Authentication-Results: (forged) gate.test 1; spf=pass\r\n",          # comment, version
    b"Authentication-Results: (a (nested) comment)\r\n gate.test\r\n ; none\r\n",  # CFWS, folding
    b'Authentication-Results: "gate.test"; none\r\n',                        # quoted-string
    b"Authentication-Results: gate.test;\r\n",
])
def test_forged_authentication_results_are_removed(field):
    raw = b"Received: from a\r\n" + field + AR_OTHER + b"Subject: hi\r\n\r\nAuthentication-Results: gate.test; x\r\n"
    m = Message(raw)
    assert m.remove_authentication_results("gate.test") == 1
    assert m.raw == raw.replace(field, b"", 1)  # the rest byte for byte, the body untouched
    assert [(c.op, c.header) for c in m.changes] == [("remove", "Authentication-Results")]


@pytest.mark.parametrize("field", [
    b"Authentication-Results: gate.test.example; spf=pass\r\n",  # a longer name is another id
    b"Authentication-Results: mx.gate.test; spf=pass\r\n",
    b"Authentication-Results: x; reason=gate.test\r\n",            # only the first token counts
    b"Authentication-Results: (gate.test) x.test; none\r\n",       # a comment is not the id
    b"X-Authentication-Results: gate.test; spf=pass\r\n",          # another field
    b"Authentication-Results: (never closed gate.test; none\r\n",
])
def test_other_authentication_results_stay(field):
    raw = b"Received: from a\r\n" + field + b"Subject: hi\r\n\r\nbody\r\n"
    m = Message(raw)
    assert m.remove_authentication_results("gate.test") == 0
    assert m.raw == raw and not m.changed


def test_no_authentication_results_means_no_parsing():
    raw = b"Subject: hi\r\nX-Note: authentication-results: gate.test;\r\n\r\n" \
          b"Authentication-Results: gate.test; spf=pass\r\n"  # in the body: not a header
    m = Message(raw)
    assert m.remove_authentication_results("gate.test") == 0
    assert m._fields is None and m.raw is raw  # the cheap byte search said no: nothing parsed


def test_fields_put_on_top_never_take_over_a_leading_continuation_line():
    # Invalid, yet seen in real mail (the corpus has one): the line attached to nothing as it
    # came, and must not become the continuation of a field the gate adds (its own results).
    raw = b" ; dkim=pass header.d=bank.example\r\n\tmore\r\nFrom: a@b.example\r\n\r\nbody\r\n"
    m = Message(raw)
    m.prepend_header("Authentication-Results", "gate.example; dkim=none")
    m.prepend_fields([("ARC-Seal", "i=1;\r\n b=x")])
    assert m.raw == (b" ; dkim=pass header.d=bank.example\r\n\tmore\r\n"
                     b"ARC-Seal: i=1;\r\n b=x\r\nAuthentication-Results: gate.example; dkim=none\r\n"
                     b"From: a@b.example\r\n\r\nbody\r\n")
    assert m.get("Authentication-Results") == "gate.example; dkim=none"
    m = Message(b"From: a@b.example\r\n\r\nbody\r\n")
    m.prepend_header("X-A", "1")
    assert m.raw == b"X-A: 1\r\nFrom: a@b.example\r\n\r\nbody\r\n"


@pytest.mark.parametrize("cls", [Change, HeaderField, SenderState])
def test_the_hand_written_init_takes_every_field(cls):
    # Change, HeaderField and SenderState fill __dict__ themselves (made per edit, per view):
    # a field added to the class must be added to its __init__ too.
    import dataclasses
    import inspect
    assert list(inspect.signature(cls.__init__).parameters)[1:] == [f.name for f in dataclasses.fields(cls)]
