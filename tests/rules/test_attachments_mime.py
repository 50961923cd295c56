"""The attachments rule's MIME walking, name decoding and splicing: byte offsets, hostile
structures (never a crash, never a hang, never a banned part let through), and byte identity
of everything outside a stripped part."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import attachment_samples as S

from smtpgate.testing import Harness  # noqa: E402
from smtpgate_rules.attachments.mime import Limits, decode_base64, parse  # noqa: E402
from smtpgate_rules.attachments.names import (extensions, parse_params, raw_names,  # noqa: E402
                                              variants)
from smtpgate_rules.attachments import Attachments  # noqa: E402


async def send(raw: bytes, **options):
    h = Harness([(Attachments, options)])
    return h, await h.send(raw)


def assert_only_replaced(original: bytes, result: bytes, removed: bytes) -> bytes:
    """Everything before and after ``removed`` (one occurrence in ``original``) is byte-identical;
    returns what took its place."""
    start = original.index(removed)
    end = start + len(removed)
    tail = original[end:]
    assert result.startswith(original[:start])
    assert result.endswith(tail)
    return result[start:len(result) - len(tail)]


# --- the walker ---------------------------------------------------------------------------
def test_offsets_of_a_nested_message():
    exe = S.part(S.pe(), "a.exe")
    raw = S.multipart(S.text_part(), S.nested([S.text_part("inner"), exe]), epilogue=b"bye\r\n")
    st = parse(raw)
    assert not st.untrusted and not st.defects
    parts = list(st.root.walk())
    assert [p.path for p in parts] == ["", "1", "2", "2.1", "2.2"]
    leaf = parts[-1]
    assert raw[leaf.start:leaf.end] == exe
    assert leaf.ctype == "application/octet-stream"
    assert raw[leaf.body:leaf.end].startswith(b"TVq")  # base64 of "MZ"


def test_rfc822_inside_is_walked_in_place_or_decoded():
    inner = S.multipart(S.text_part(), S.part(S.pe(), "x.exe"), boundary="in")
    raw = S.multipart(S.text_part(), S.rfc822(inner))
    st = parse(raw)
    deepest = [p for p in st.root.walk() if p.path == "2.1.2"][0]
    assert deepest.spliceable and deepest.buf is raw
    raw64 = S.multipart(S.text_part(), S.rfc822(inner, encoding="base64"))
    deepest = [p for p in parse(raw64).root.walk() if p.path == "2.1.2"][0]
    assert not deepest.spliceable and deepest.buf == inner


def test_lenient_base64():
    assert decode_base64(b"TVqQ\r\nAAM*A!\r\n") == b"MZ\x90\x00\x03\x00"  # junk skipped
    assert decode_base64(b"QUI=QUJD") == b"ABABC"                 # concatenated blocks
    assert decode_base64(b"QUJDR") == b"ABC"                       # dangling character
    assert decode_base64(b"QUJD\r\nRA") == b"ABCD"                  # no padding, no whole groups
    assert decode_base64(b"QUJD\r\nQUJD\r\n") == b"ABCABC"           # no padding, whole groups


# --- names -------------------------------------------------------------------------------
@pytest.mark.parametrize("header, expected", [
    ('attachment; filename="report.exe"', "report.exe"),
    ("attachment; FILENAME=report.EXE", "report.EXE"),
    ("attachment; filename*=utf-8''r%C3%A9sum%C3%A9.exe", "résumé.exe"),
    ("attachment; filename*=iso-8859-1'fr'r%E9sum%E9.exe", "résumé.exe"),
    ('attachment; filename="=?UTF-8?B?cmVwb3J0LmV4ZQ==?="', "report.exe"),
    ('attachment; filename="=?iso-8859-1?Q?r=E9sum=E9.exe?="', "résumé.exe"),
    ('attachment; filename="=?UTF-8?Q?a?= =?UTF-8?Q?b.exe?="', "ab.exe"),
])
def test_name_decodings(header, expected):
    assert expected in raw_names([header])


def test_rfc2231_continuations_in_numeric_order():
    # sections out of order, *10 after *9, encoded and plain sections mixed
    secs = [f"filename*{i}={c}" for i, c in enumerate("abcdefghij")]
    secs += ["filename*10*=%2Eexe"]
    header = "attachment; " + "; ".join(reversed(secs))
    assert "abcdefghij.exe" in raw_names([header])
    header = "attachment; filename*0*=utf-8''%E2%80%AEfdp; filename*1=.exe"
    assert "\u202efdp.exe" in raw_names([header])


def test_every_reading_of_a_sloppy_parameter_is_kept():
    assert "safe.txt;.exe" in raw_names(["attachment; filename=safe.txt;.exe"])
    assert "safe.txt.exe" in raw_names(['attachment; filename="safe.txt".exe'])
    both = raw_names(['attachment; filename="a.txt"; filename*=utf-8\'\'b.exe'])
    assert "a.txt" in both and "b.exe" in both


@pytest.mark.parametrize("name, ext", [
    ("Report.PDF.exe", "exe"), ("report.exe.", "exe"), ("report.exe . .", "exe"),
    ("report.e\u200bxe", "exe"), ("report.ex\ufeffe", "exe"), ("invoice\u202egpj.exe", "exe"),
    ("C:\\temp\\x.exe", "exe"), ("../../x.exe", "exe"), ("x.exe\x00.txt", "exe"),
    ("x.\uff45\uff58\uff45", "exe"), ("report.exe\u00a0", "exe"),
])
def test_windows_view_of_names(name, ext):
    assert any(extensions(v)[:1] == [ext] for v in variants(name)), variants(name)


def test_parse_params_head_and_duplicates():
    head, params = parse_params('Multipart/Mixed; Boundary="a"; boundary=b')
    assert head == "multipart/mixed" and params["boundary"] == ["a", "b"]


# --- hostile structures ------------------------------------------------------------------
async def test_no_closing_boundary_still_finds_and_strips_the_part():
    exe = S.part(S.pe(), "a.exe")
    raw = S.multipart(S.text_part(), exe, close=False)
    h, result = await send(raw, action="strip")
    assert result.reply.code == 250
    new = assert_only_replaced(raw, result.message, exe)
    assert b"a.exe" in new and b"TVq" not in new


async def test_missing_content_type_and_broken_headers():
    raw = (S.HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           b"--b\r\nthis line is no header\r\nmore text\r\n"
           b"--b\r\n\r\n" + S.b64(S.pe()) + b"--b--\r\n")
    h, result = await send(raw)
    assert result.reply.code == 554  # base64 sent without headers is still sniffed
    assert "Windows executable" in result.trace[-1].reason


async def test_bad_base64_is_decoded_leniently():
    body = S.b64(S.pe()).replace(b"\r\n", b"\r\n!!*\r\n", 1)
    raw = S.multipart(S.text_part(), b'Content-Type: application/pdf; name="a.pdf"\r\n'
                      b"Content-Transfer-Encoding: base64\r\n\r\n" + body)
    _, result = await send(raw)
    assert result.reply.code == 554 and "PE/MZ" in result.trace[-1].reason


async def test_unknown_transfer_encoding_is_read_both_ways():
    raw = S.multipart(S.text_part(), b'Content-Type: application/pdf; name="a.pdf"\r\n'
                      b"Content-Transfer-Encoding: x-weird\r\n\r\n" + S.b64(S.pe()))
    _, result = await send(raw)
    assert result.reply.code == 554


async def test_absurd_nesting_is_malformed_not_a_crash():
    raw = S.text_part("deep")
    for n in range(200):
        raw = S.nested([raw], boundary=f"b{n}")
    raw = S.HEAD + raw
    t = time.perf_counter()
    _, result = await send(raw)
    assert time.perf_counter() - t < 5
    assert result.reply.code == 554 and "nested deeper" in result.trace[-1].reason
    _, result = await send(raw, on_malformed="tempfail")
    assert str(result.reply).startswith("451 4.7.1")


async def test_too_many_parts_is_malformed():
    raw = S.multipart(*[S.text_part(str(i)) for i in range(1500)])
    _, result = await send(raw)
    assert result.reply.code == 554 and "more than 1000 MIME parts" in result.trace[-1].reason
    _, result = await send(raw, max_parts=2000)
    assert result.reply.code == 250


async def test_huge_header_is_malformed():
    raw = S.HEAD + b"X-Junk: " + b"a" * (300 * 1024) + b"\r\n\r\nbody\r\n"
    _, result = await send(raw)
    assert result.reply.code == 554 and "header block over" in result.trace[-1].reason
    _, result = await send(raw, max_header_size="1MB")
    assert result.reply.code == 250 and result.message == raw


async def test_conflicting_boundaries_cannot_be_trusted():
    raw = (S.HEAD + b'Content-Type: multipart/mixed; boundary="a"; boundary="b"\r\n\r\n'
           b"--a\r\n" + S.text_part() + b"\r\n--b\r\n" + S.part(S.pe(), "x.exe") + b"\r\n--a--\r\n--b--\r\n")
    _, result = await send(raw, action="strip")
    assert result.reply.code == 554 and "conflicting" in result.trace[-1].reason
    _, result = await send(raw, action="strip", on_malformed="accept")
    assert result.reply.code == 554  # banned part seen, but no stripping on a structure in doubt


async def test_hidden_part_in_a_text_body_is_stripped():
    hidden = (b"Content-Type: text/plain\r\n\r\nsee below\r\n"
              b"Content-Disposition: attachment; filename=\"run.exe\"\r\n\r\nTVqQAAMAAAAEAAAA\r\n")
    raw = S.multipart(S.text_part(), hidden)
    h, result = await send(raw, action="strip")
    assert result.reply.code == 250
    new = assert_only_replaced(raw, result.message, hidden)
    assert b"run.exe" in new and b"TVqQ" not in new


async def test_banned_name_in_the_preamble_is_removed():
    pre = b"Content-Disposition: attachment; filename=x.scr\r\n\r\n"
    raw = S.multipart(S.text_part(), preamble=pre)
    h, result = await send(raw, action="strip")
    assert result.reply.code == 250
    assert result.message == raw.replace(pre, b"\r\n", 1)  # its last CRLF is the delimiter's


async def test_garbage_never_crashes_or_hangs():
    import random
    rnd = random.Random(4)
    seeds = [S.multipart(S.text_part(), S.part(S.zip_of({"a.txt": b"x"}), "a.zip"),
                         S.rfc822(S.multipart(S.part(S.pe(), "b.pdf"), boundary="q")))]
    for _ in range(150):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 30)):
            op = rnd.random()
            i = rnd.randrange(len(data))
            if op < 0.4:
                data[i] = rnd.randrange(256)
            elif op < 0.7:
                del data[i:i + rnd.randint(1, 50)]
            else:
                data[i:i] = rnd.choice([b"\r\n", b"--", b"=_b0und4ry_", b";", b'"', b"--q--\r\n"])
        h, result = await send(bytes(data), action="strip")
        assert result.reply.code in (250, 554), result.trace
        if result.reply.code == 250 and result.message != bytes(data):
            # whatever was stripped, nothing it found banned is left
            _, again = await send(result.message)
            assert again.reply.code == 250, again.trace


# --- splicing: byte identity ---------------------------------------------------------------
async def test_strip_keeps_every_other_byte():
    first = S.part(b"%PDF-1.4\n...", "report.pdf", ctype="application/pdf")
    exe = S.part(S.pe(), "report.pdf.exe")
    last = S.part(b"\xff\xd8\xff\xe0 jpeg", "photo.jpg", ctype="image/jpeg")
    raw = S.multipart(S.text_part(), first, exe, last, epilogue=b"epilogue\r\n")
    h, result = await send(raw, action="strip")
    assert result.reply.code == 250
    new = assert_only_replaced(raw, result.message, exe)
    assert new.startswith(b"Content-Type: text/plain; charset=utf-8\r\n")
    assert b"report.pdf.exe" in new and b"banned extension .exe" in new
    assert h.relayed[0].data == result.message


async def test_strip_the_whole_message_keeps_its_other_headers():
    raw = (S.HEAD + b'Content-Type: application/x-msdownload; name="a.exe"\r\n'
           b"Content-Transfer-Encoding: base64\r\nX-After: kept\r\n\r\n" + S.b64(S.pe()))
    h, result = await send(raw, action="strip")
    out = result.message
    assert out.startswith(S.HEAD)
    assert b"X-After: kept\r\n" in out and b"TVq" not in out
    assert out.count(b"Content-Type:") == 1 and b"text/plain; charset=utf-8" in out


async def test_strip_inside_a_forwarded_message():
    exe = S.part(S.pe(), "inner.exe")
    inner = S.multipart(S.text_part("inner text"), exe, boundary="in")
    raw = S.multipart(S.text_part(), S.rfc822(inner))
    _, result = await send(raw, action="strip")
    new = assert_only_replaced(raw, result.message, exe)
    assert b"inner.exe" in new and b"TVq" not in new


async def test_strip_a_base64_forwarded_message_as_a_whole():
    inner = S.multipart(S.text_part("inner"), S.part(S.pe(), "inner.exe"), boundary="in")
    fwd = S.rfc822(inner, encoding="base64")
    raw = S.multipart(S.text_part(), fwd)
    _, result = await send(raw, action="strip")
    new = assert_only_replaced(raw, result.message, fwd)
    assert new.startswith(b"Content-Type: text/plain")


async def test_strip_non_ascii_note_is_quoted_printable():
    exe = S.part(S.pe(), b"name*=utf-8''r%C3%A9sum%C3%A9.exe")
    raw = S.multipart(S.text_part(), exe)
    _, result = await send(raw, action="strip")
    new = assert_only_replaced(raw, result.message, exe)
    assert b"Content-Transfer-Encoding: quoted-printable" in new
    assert b"r=C3=A9sum=C3=A9.exe" in new


def test_limits_are_configurable():
    st = parse(S.multipart(*[S.text_part()] * 5), Limits(max_parts=3))
    assert st.untrusted


async def test_many_banned_parts_are_all_stripped_quickly():
    exes = [S.part(b"x%d" % i, f"f{i}.exe") for i in range(900)]
    raw = S.multipart(S.text_part(), *exes)
    t = time.perf_counter()
    _, result = await send(raw, action="strip")
    assert time.perf_counter() - t < 10
    assert result.reply.code == 250
    assert result.message.count(b"This part of the message was removed") == 900
    assert b"filename=" not in result.message


# --- base64 sent without its header in a plain body (decoded and sniffed) ---
@pytest.mark.parametrize("payload, found", [(S.pe, "Windows executable"), (S.iso, "disk image"),
                                            (lambda: S.zip_of({"a.exe": b"MZ"}), "a.exe")])
async def test_headerless_base64_in_a_plain_body_is_sniffed(payload, found):
    raw = S.HEAD + b"\r\n" + S.b64(payload())
    _, result = await send(raw)
    assert result.reply.code == 554 and found in result.trace[-1].reason


async def test_plain_text_that_only_fits_the_base64_alphabet_passes():
    # smtp-source's body: long lines of a digit and X's (base64-shaped, nothing inside)
    body = b"\r\n".join(b"%d" % (i % 10) + b"X" * 77 for i in range(1, 129)) + b"\r\n"
    h, result = await send(S.HEAD + b"\r\n" + body)
    assert result.reply.code == 250 and h.relayed[0].data == S.HEAD + b"\r\n" + body
