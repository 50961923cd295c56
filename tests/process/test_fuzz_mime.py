"""Property-based tests of random MIME structures through the attachments and rewrite rules
of the running gate (hypothesis).

Generated messages: multipart trees (mixed/alternative/related/signed/unknown subtypes) with
random boundaries (any RFC 2046 boundary character, quoted or not), forwarded messages
(plain or base64), leaves with random types, transfer encodings (declared right, wrong or
unknown), file names in every spelling the attachments rule decodes (plain, RFC 2231 with
and without continuations, RFC 2047, raw 8-bit), random header case, and address and subject
headers for the rewrite rule (display names, comments, groups, encoded words, 8-bit text).
Some leaves carry a Windows executable named ``*.exe``.

Two policies in one gate: ``example.com`` strips banned attachments, ``reject.example``
rejects them; both tag the subject, map the sender's domain in headers, add a header and
remove one. For every message:
- the reply is 250 or a documented 554 (5.7.1 attachment, 5.6.0 structure), never a rule
  crash (451 4.3.0) or another temporary failure, and nothing reaches the client's log as a
  traceback;
- a 250 means exactly one message downstream, a 554 none;
- what is relayed is CRLF-only and dot-stuffed, starts with the added header, and never
  holds an executable the client attached.

One gate for the module (tests/support/fuzzing.py); example counts are bounded for CI.
"""
from __future__ import annotations

import base64
import quopri
import string
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzzing import (FuzzGate, Session, assert_clean_wire, assert_replies_well_formed,
                                   fuzz_settings, start_fuzz_gate, stop_fuzz_gate, stuff)
from tests.support.gateproc import start_gate

from tests.support import attachment_samples as samples

RULES = """\
  - attachments: {{action: {action}}}
  - rewrite:
      subject_prefix: "[EXT]"
      header_map: {{"@sender.test": "@rewritten.test"}}
      add_headers: {{X-Fuzz: "checked"}}
      remove_headers: [X-Remove-Me]
"""
POLICIES = {
    "default.yaml": "domains: [example.com]\nrules:\n" + RULES.format(action="strip"),
    "strict.yaml": "domains: [reject.example]\nrules:\n" + RULES.format(action="reject"),
}
RECIPIENTS = {"strip": "user@example.com", "reject": "user@reject.example"}
ADDED = b"X-Fuzz: checked\r\n"
PE = samples.pe()


@pytest.fixture(scope="module")
def mime_gate(tmp_path_factory):
    fg = start_fuzz_gate(start_gate, tmp_path_factory.mktemp("fuzz-mime") / "gate", policies=POLICIES)
    yield fg
    stop_fuzz_gate(fg)


# ---------------------------------------------------------------------------- generators
@dataclass
class Built:
    """A generated entity (headers and body) and the executables written into it."""
    raw: bytes
    executables: list[bytes] = field(default_factory=list)  # each as it is encoded on the wire


BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
FILE_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"])
EXTENSIONS = ["", ".txt", ".pdf", ".exe", ".pdf.exe", ".js", ".zip", ".docx", ".html", ".EXE ", ".exe."]
TYPES = ["text/plain", "text/html", "application/octet-stream", "application/pdf", "image/png",
         "application/zip", "application/x-msdownload", "application/x-unknown", "text/x-weird",
         "TEXT/PLAIN", "application"]
ENCODINGS = [None, "7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "x-bogus",
             "BASE64"]
HEADER_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                      max_size=30)


def _case(name: str):
    return st.sampled_from([name, name.lower(), name.upper()])


@st.composite
def boundaries(draw, taken: set[str]) -> str:
    """A boundary that is neither a prefix of, nor prefixed by, any other in the message:
    the tree stays well-formed, so a banned part is a part every reader sees."""
    # "b<n>_" is unique to this boundary, so no delimiter line can start with another's;
    # the "Z" keeps a trailing space (allowed inside, not at the end) out.
    boundary = f"b{len(taken)}_" + draw(st.text(alphabet=BCHARS, max_size=40)) + "Z"
    taken.add(boundary)
    return boundary


def _quoted_param(boundary: str) -> str:
    if all(c in string.ascii_letters + string.digits + "'+_-." for c in boundary):
        return boundary
    return f'"{boundary}"'


@st.composite
def file_name_params(draw, name: str) -> tuple[bytes, bytes]:
    """(the Content-Type name parameter, the Content-Disposition filename parameter)."""
    spelling = draw(st.sampled_from(["quoted", "rfc2231", "rfc2231-continued", "rfc2047",
                                     "raw8bit", "none-in-type"]))
    utf8 = name.encode("utf-8")
    if spelling == "quoted":  # ASCII only ("?" for the rest), backslash-escaped
        safe = name.encode("ascii", "replace").replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'name="' + safe + b'"', b'filename="' + safe + b'"'
    if spelling == "rfc2231":
        value = b"utf-8''" + quote(utf8, safe="").encode()
        return b"name*=" + value, b"filename*=" + value
    if spelling == "rfc2231-continued":
        encoded = quote(utf8, safe="")
        cut = draw(st.integers(min_value=0, max_value=len(encoded)))
        while cut and encoded[cut - 1] == "%" or cut > 1 and encoded[cut - 2] == "%":
            cut -= 1
        first, second = "utf-8''" + encoded[:cut], encoded[cut:]
        value = f"filename*0*={first}; filename*1*={second}".encode()
        return value.replace(b"filename", b"name"), value
    if spelling == "rfc2047":
        word = b"=?utf-8?b?" + base64.b64encode(utf8) + b"?="
        return b'name="' + word + b'"', b'filename="' + word + b'"'
    if spelling == "raw8bit":
        value = b'"' + utf8.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return b"name=" + value, b"filename=" + value
    return b"", b"filename=" + f'"{name}"'.encode("utf-8", "replace")


def encode_body(data: bytes, encoding: str | None) -> bytes:
    kind = (encoding or "").lower()
    if kind == "base64":
        return samples.b64(data).rstrip(b"\r\n")
    if kind == "quoted-printable":
        return quopri.encodestring(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n")
    # 7bit/8bit/binary/unknown: the bytes as they are, with lines kept short
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"\r\n".join(line[i:i + 200] for line in lines for i in range(0, max(len(line), 1), 200))


@st.composite
def leaf(draw) -> Built:
    executable = draw(st.integers(min_value=0, max_value=3)) == 0
    if executable:
        stem = draw(st.text(alphabet=FILE_CHARS, max_size=20))
        name = stem + draw(st.sampled_from([".exe", ".pdf.exe", ".scr", ".EXE", ".com"]))
        ctype = draw(st.sampled_from(["application/octet-stream", "application/x-msdownload",
                                      "application/pdf"]))
        encoding = "base64"
        body = PE + draw(st.binary(max_size=40))
    else:
        name = draw(st.one_of(st.none(), st.tuples(st.text(alphabet=FILE_CHARS, max_size=30),
                                                   st.sampled_from(EXTENSIONS)).map("".join)))
        ctype = draw(st.sampled_from(TYPES))
        encoding = draw(st.sampled_from(ENCODINGS))
        body = draw(st.one_of(st.binary(max_size=120),
                              st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass"))))
    head = draw(_case("Content-Type")).encode() + b": " + ctype.encode()
    disposition = draw(st.sampled_from([None, "attachment", "inline", "form-data", "x-odd"]))
    if executable and disposition is None:
        disposition = "attachment"
    type_param = disp_param = b""
    if name is not None:
        type_param, disp_param = draw(file_name_params(name))
        if executable and not disp_param:
            disp_param = b'filename="x.exe"'
    if type_param:
        head += b"; " + type_param
    if ctype.startswith("text/"):
        head += b"; charset=" + draw(st.sampled_from([b"utf-8", b"us-ascii", b"iso-8859-1", b"x-nonsense"]))
    head += b"\r\n"
    if disposition:
        head += draw(_case("Content-Disposition")).encode() + b": " + disposition.encode()
        head += (b"; " + disp_param if disp_param else b"") + b"\r\n"
    if encoding:
        head += draw(_case("Content-Transfer-Encoding")).encode() + b": " + encoding.encode() + b"\r\n"
    wire = encode_body(body, encoding)
    return Built(head + b"\r\n" + wire, [wire] if executable else [])


@st.composite
def entity(draw, taken: set[str], depth: int = 0) -> Built:
    kind = draw(st.sampled_from(["leaf", "leaf", "multipart", "multipart", "message"]) if depth < 2
                else st.just("leaf"))
    if kind == "leaf":
        return draw(leaf())
    if kind == "message":
        inner = draw(message_entity(taken, depth + 1))
        head = draw(_case("Content-Type")).encode() + b": message/rfc822\r\n"
        if draw(st.booleans()):
            head += b"Content-Disposition: attachment\r\n"
        if draw(st.booleans()):  # a forwarded message sent base64-encoded
            head += b"Content-Transfer-Encoding: base64\r\n"
            return Built(head + b"\r\n" + samples.b64(inner.raw).rstrip(b"\r\n"), [])
        return Built(head + b"\r\n" + inner.raw.rstrip(b"\r\n"), inner.executables)
    boundary = draw(boundaries(taken))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "signed", "x-unknown"]))
    children = draw(st.lists(entity(taken, depth + 1), max_size=3))
    head = (draw(_case("Content-Type")).encode() + b": multipart/" + subtype.encode()
            + b"; boundary=" + _quoted_param(boundary).encode() + b"\r\n")
    preamble = draw(st.sampled_from([b"", b"This is a multi-part message in MIME format.\r\n",
                                     b"preamble\r\n\r\n"]))
    epilogue = draw(st.sampled_from([b"", b"epilogue\r\n", b"\r\n"]))
    body = preamble
    delimiter = b"--" + boundary.encode()
    for child in children:
        body += delimiter + draw(st.sampled_from([b"", b" ", b"\t "])) + b"\r\n" + child.raw + b"\r\n"
    body += delimiter + b"--\r\n" + epilogue
    return Built(head + b"\r\n" + body, [x for c in children for x in c.executables])


ADDRESSES = [
    "a@sender.test", "Ann Example <ann@sender.test>", '"Example, Ann" <ann@sender.test>',
    "=?utf-8?q?J=C3=B6rg?= <joerg@sender.test>", "ann@sender.test (Ann)",
    "Team: a@sender.test, b@other.test;", '"unterminated <x@sender.test>', "<>",
    "Jörg <joerg@sender.test>", "x@[127.0.0.1]", "a@sender.test, b@sender.test",
]


@st.composite
def top_headers(draw) -> bytes:
    head = b""
    for name in draw(st.lists(st.sampled_from(["From", "To", "Cc", "Reply-To", "Sender"]),
                              min_size=1, max_size=5)):
        value = draw(st.one_of(st.sampled_from(ADDRESSES), HEADER_TEXT))
        head += draw(_case(name)).encode() + b": " + value.encode("utf-8") + b"\r\n"
    subject = draw(st.one_of(
        st.none(), HEADER_TEXT,
        HEADER_TEXT.map(lambda s: "=?utf-8?b?" + base64.b64encode(s.encode()).decode() + "?="),
        st.sampled_from(["Re: [EXT] hello", "[EXT]", "AW: Fwd: x", "=?utf-8?q?caf=C3=A9?=", ""])))
    if subject is not None:
        fold = draw(st.booleans()) and " " in subject
        text = subject.replace(" ", "\r\n ", 1) if fold else subject
        head += draw(_case("Subject")).encode() + b": " + text.encode("utf-8") + b"\r\n"
    if draw(st.booleans()):
        head += draw(_case("X-Remove-Me")).encode() + b": " + draw(HEADER_TEXT).encode() + b"\r\n"
    if draw(st.booleans()):
        head += b"MIME-Version: 1.0\r\n"
    return head


@st.composite
def message_entity(draw, taken: set[str], depth: int = 0) -> Built:
    body = draw(entity(taken, depth))
    return Built(draw(top_headers()) + body.raw, body.executables)


@st.composite
def messages(draw) -> Built:
    built = draw(message_entity(set()))
    raw = built.raw if built.raw.endswith(b"\r\n") else built.raw + b"\r\n"
    return Built(raw, built.executables)


# ---------------------------------------------------------------------------- the property
REFUSALS = (b"554 5.7.1", b"554 5.6.0")


def send_one(fg: FuzzGate, raw: bytes, rcpt: str) -> tuple[int, bytes]:
    """One transaction over a raw socket; (client port, the reply to the final dot)."""
    with Session(fg.gate.address) as s:
        assert s.read_reply().startswith(b"220 ")
        s.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<" + rcpt.encode()
               + b">\r\nDATA\r\n")
        for want in (b"250", b"250 2.1.0", b"250 2.1.5", b"354 "):
            assert s.read_reply().startswith(want), s.transcript
        s.send(stuff(raw) + b".\r\n")
        reply = s.read_reply()
        s.send(b"QUIT\r\n")
        assert s.read_reply().startswith(b"221"), s.transcript
        s.read_until_closed()
    assert_replies_well_formed(b"".join(s.transcript))
    return s.port, reply


@pytest.mark.parametrize("action", ["strip", "reject"])
def test_random_mime_trees_pass_the_rules_without_a_crash(mime_gate: FuzzGate, action):
    mark = mime_gate.log_mark()

    @fuzz_settings(max_examples=80)
    @given(built=messages())
    def one_message(built: Built):
        start, since = mime_gate.log_mark(), mime_gate.ds.mark()
        port, reply = send_one(mime_gate, built.raw, RECIPIENTS[action])
        mime_gate.check_healthy(start, built)
        assert reply.startswith(b"250 2.0.0") or reply.startswith(REFUSALS), \
            (reply, mime_gate.gate.log_text()[start:][-3000:])
        mime_gate.settle()
        relayed = mime_gate.ds.messages_from(port, since)
        if not reply.startswith(b"250"):
            assert relayed == [], "a refused message reached the downstream"
            return
        [msg] = relayed
        assert_clean_wire(msg.data_raw)
        assert msg.data.startswith(ADDED), msg.data[:200]
        for exe in built.executables:
            assert exe not in msg.data, f"an attached executable was relayed ({action})"
        if action == "reject":
            assert not built.executables, "a message with an executable was accepted"
        head = msg.data.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nx-remove-me:" not in b"\r\n" + head.lower(), "remove_headers left the header"

    one_message()
    mime_gate.check_healthy(mark)


# ---------------------------------------------------------------------------- found by fuzzing
@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", [")", "a@sender.test )", "x) <b@sender.test>", "(c)) a@sender.test"])
async def test_a_stray_closing_parenthesis_leaves_the_header_as_it_is(value):
    """The header tokenizer looped forever on a ")" that closes no comment (one worker stuck
    at 100% CPU, every later client of it hanging). Now such a value is unreadable: kept."""
    from smtpgate.testing import Harness
    from smtpgate_rules.rewrite import Rewrite

    raw = f"From: {value}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    h = Harness([(Rewrite, {"header_map": {"@sender.test": "@rewritten.test"}})], domains=["example.com"])
    result = await h.send(raw, sender="a@sender.test", recipients=["user@example.com"])
    assert result.reply.code == 250
    assert h.relayed[0].data == raw
