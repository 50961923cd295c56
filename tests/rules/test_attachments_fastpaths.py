"""The attachments rule's shortcuts give exactly the answer of the long way (issue 13):
base64 sniffed from the bytes sniff reads (``base64_sample``, ``base64_is_inert``) or from
the body's two ends (``base64_ends``), the hidden-header precheck, the printable-ASCII paths
of names, boundary delimiters found by bytes.find, plain header blocks read by one regex,
and sniff's first-byte check (``_LEADS``). Each is checked against the long way it skips, at
the edges where the shortcut stops applying."""
from __future__ import annotations

import base64
import random
import re
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.support import attachment_samples as S

from smtpgate_rules.attachments import CONTENT_KINDS, DEFAULT_EXTENSIONS, DEFAULT_TYPES  # noqa: E402
from smtpgate_rules.attachments.content import FOOTER_SIGNATURES, SNIFF_WINDOWS, sniff  # noqa: E402
from smtpgate_rules.attachments.mime import (Limits, Part, Structure, _matches, _plain_fields,  # noqa: E402
                                             _read_fields, B64_DELETE, base64_ends,
                                             base64_of_every_occurrence, base64_sample,
                                             decode_base64, looks_base64)
from smtpgate_rules.attachments.names import (_quoted, _quoted_loop, _variants, _visible,  # noqa: E402
                                              display, variants)
from smtpgate_rules.attachments.scan import (_FOOTER_CHARS, _FOOTER_QUANTA, Settings,  # noqa: E402
                                             _Scanner, footer_holds_quanta, scan)

scan_module = sys.modules[_Scanner.__module__]  # (the package's "scan" is the function)
content_module = sys.modules[sniff.__module__]
mime_module = sys.modules[decode_base64.__module__]

SETTINGS = Settings(extensions=frozenset(DEFAULT_EXTENSIONS), allowed_extensions=frozenset(),
                    types=tuple(DEFAULT_TYPES), content=frozenset(CONTENT_KINDS))
CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


def long_way(monkeypatch):
    """The scanner with every shortcut off: all base64 decoded, every region lower-cased."""
    monkeypatch.setattr(_Scanner, "base64_is_inert", lambda *a, **k: False)
    monkeypatch.setattr(scan_module, "_may_hide_field", lambda *a: True)


def report_of(raw: bytes):
    r = scan(raw, SETTINGS)
    return ([(f.part.path, f.name, f.reasons, f.gap) for f in r.findings], r.untrusted, r.defects)


def both_ways(raw: bytes, monkeypatch) -> tuple:
    short = report_of(raw)
    with monkeypatch.context() as m:
        long_way(m)
        assert report_of(raw) == short
    return short


def written_as(text: bytes, line: int, crlf: bool, junk: list[tuple[int, bytes]]) -> bytes:
    """Base64 characters in lines of ``line`` (0: one line), LF or CRLF, with ``junk``
    (characters readers skip) inserted at the given offsets."""
    if line:
        text = b"\n".join(text[i:i + line] for i in range(0, len(text), line))
    if crlf:
        text = text.replace(b"\n", b"\r\n")
    for pos, char in junk:
        pos = min(pos, len(text))
        text = text[:pos] + char + text[pos:]
    return text


# --- base64_sample: the decoding's bytes where sniff reads, without decoding it all ----------
def sample_matches(body: bytes) -> None:
    full = decode_base64(body)
    got = base64_sample(body, SNIFF_WINDOWS)
    if got is None:  # padding inside: several streams, the long way
        eq = body.find(b"=")
        assert eq >= 0 and body[eq:].strip(b"=\r\n\t ")
        return
    stand_in, _chars = got
    assert len(stand_in) == len(full)
    for window in SNIFF_WINDOWS:
        assert stand_in[slice(*window)] == full[slice(*window)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=40_000), line=st.sampled_from([0, 60, 76, 77, 1000]),
       crlf=st.booleans(), padding=st.sampled_from([None, b"", b"=", b"==", b"===", b"= \r\n="]),
       junk=st.lists(st.tuples(st.integers(0, 60_000), st.sampled_from([b" ", b"*", b"\t", b".", b"\xff"])),
                     max_size=3),
       dangling=st.sampled_from([b"", b"Q", b"QU", b"QUI"]))
def test_base64_sample_has_the_decodings_bytes_in_every_window(data, line, crlf, padding, junk, dangling):
    text = base64.b64encode(data).rstrip(b"=")
    if dangling and len(text) % 4 == 0:
        text += dangling  # a group left short (1, 2 or 3 characters)
    if padding is not None:
        text += padding
    sample_matches(written_as(text, line, crlf, junk))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 511, 512, 513, 1023, 1024, 1025, 0x8000, 0x8001, 0x8005,
                                  0x8006, 0x9006, 0x9007, 100_000])
def test_base64_sample_at_the_window_edges(size):
    data = random.Random(size).randbytes(size)
    for body in (S.b64(data), base64.b64encode(data), base64.b64encode(data).rstrip(b"="),
                 S.b64(data) + b"===\r\n", S.b64(data) + S.b64(b"more")):  # the last: two streams
        sample_matches(body)


# --- sniff reads only SNIFF_WINDOWS (unless the data starts with "MZ") ----------------------
class Reads(bytes):
    """Bytes that note every range read from them (sniff only slices and asks the length)."""

    def __new__(cls, data: bytes):
        self = super().__new__(cls, data)
        self.ranges = []
        return self

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            if start < stop:
                self.ranges.append((start, stop))
            return bytes(self)[key]
        self.ranges.append((key % len(self), key % len(self) + 1))
        return bytes(self)[key]


def window_ranges(size: int) -> list[tuple[int, int]]:
    return [slice(*w).indices(size)[:2] for w in SNIFF_WINDOWS]


def samples_of_every_kind() -> list[bytes]:
    out = [S.elf(), S.macho(), S.macho_fat(), S.java_class(), S.dex(), S.script(), S.lnk(), S.iso(),
           S.udf(), S.vhd_fixed(), S.vhdx(), S.dmg(), S.fat_image(), S.chm(), S.zip_of({"a": b"b"}),
           S.tar_of({"a": b"b"}), S.gzip_of(b"x"), S.bz2_of(b"x"), S.xz_of(b"x"), S.rar(),
           S.seven_zip(), S.ole({"x": b"y"}), S.tnef("a.exe", b"MZ"), b"", b"x", b"%PDF-1.7\n"]
    rnd = random.Random(7)
    out += [rnd.randbytes(n) for n in (10, 600, 40_000, 0x9010)]
    # every signature's first bytes on otherwise plain data, so each branch is taken
    heads = [b"\x7fELF", b"\xca\xfe\xba\xbe", b"dex\n", b"#!/bin/sh\n", b"L\x00\x00\x00", b"PK\x03\x04",
             b"ITSF", b"conectix", b"\x78\x9f\x3e\x22", b"\x1f\x8b", b"BZh9", b"\xfd7zXZ\x00",
             b"Rar!\x1a\x07\x00", b"MSCF", b"\x60\xea\x10\x00", b"\x28\xb5\x2f\xfd", b"xar!", b"SIT!",
             b"xx-lh5-", b"1234567**ACE**", b"\xca\xfe\xba\xbf", b"StuffIt "]
    out += [h + bytes(700) for h in heads] + [bytes(510) + b"\x55\xaa" + bytes(600)]
    out += [S.macho(magic) for magic in sorted(content_module._MACHO)]
    return out


@pytest.mark.parametrize("data", samples_of_every_kind(), ids=lambda d: repr(d[:8]))
def test_sniff_reads_only_its_windows(data):
    probe = Reads(data)
    assert sniff(probe, scripts=True) == sniff(data, scripts=True)
    allowed = window_ranges(len(data))
    for start, stop in probe.ranges:
        assert any(a <= start and stop <= b for a, b in allowed), (start, stop)


def test_the_footer_window_is_no_wider_than_what_sniff_reads():
    """The scanner decodes every byte of a window: the footer one (VHD, DMG signatures)
    holds just the bytes sniff reads near the end (it once was the last 512 bytes)."""
    tail = [w for w in SNIFF_WINDOWS if w[0] < 0]
    read = set()
    for data in samples_of_every_kind():
        if len(data) >= 1024:  # (the end apart from the first 512 bytes)
            probe = Reads(data)
            sniff(probe, scripts=True)
            heads = [slice(*w).indices(len(data))[:2] for w in SNIFF_WINDOWS if w[0] >= 0]
            read |= {i - len(data) for a, b in probe.ranges for i in range(a, b)
                     if i >= len(data) - 512 and not any(x <= i < y for x, y in heads)}
    assert tail == [(min(read), max(read) + 1)]


# --- the scanner: with and without the shortcuts, the same report ---------------------------
def begin_at(offset: int) -> bytes:
    """Text holding a uuencoded .exe whose "begin" lands at ``offset`` of the decoded bytes."""
    uu = b"begin 644 evil.exe\nM" + b"!" * 60 + b"\n`\nend\n"
    return b"a" * offset + b"\n" + uu + b"z" * 3000


def v7_tar(name: str, size: int) -> bytes:
    """An old (V7) tar: no "ustar" magic for sniff to see, only a name can say it is a tar."""
    info = tarfile.TarInfo(name)
    info.size = size
    head = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    head[257:265] = bytes(8)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\x00 " % sum(head)
    return bytes(head) + bytes(-(-size // 512) * 512) + bytes(1024)


def base64_messages() -> list[tuple[str, bytes]]:
    big_text = b"x" * 4000
    cases = [
        ("smtp-source text", S.HEAD + b"\r\n" + b"\r\n".join(b"%d" % (i % 10) + b"X" * 77
                                                            for i in range(1, 129)) + b"\r\n"),
        ("declared pdf", S.multipart(S.text_part(), S.part(b"%PDF-1.7\n" + bytes(60_000), "r.pdf",
                                                           "application/pdf"))),
        ("declared exe, pdf name", S.multipart(S.part(S.pe() + bytes(5000), "r.pdf", "application/pdf"))),
        ("exe past the first 512", S.multipart(S.part(bytes(3000) + S.pe(), "r.bin"))),
        ("tar by name", S.multipart(S.part(S.tar_of({"a.exe": b"MZ"}) + bytes(3000), "x.tar"))),
        ("tar by name only", S.multipart(S.part(bytes(4000), "x.tar"))),
    ]
    kinds = [S.pe(), S.elf(), S.script(), S.iso(), S.udf(), S.vhd_fixed(), S.dmg(), S.fat_image(),
             S.zip_of({"a.exe": b"MZ"}), S.gzip_of(S.pe(), "a.exe")]
    for n, payload in enumerate(kinds):
        padded = payload + bytes(max(0, 3000 - len(payload)))
        if payload in (S.vhd_fixed(), S.dmg()):  # their signature is at the end: keep it there
            padded = bytes(max(0, 3000 - len(payload))) + payload
        cases.append((f"declared {n}", S.multipart(S.part(padded, "f.bin"))))
        cases.append((f"declared text/plain {n}", S.multipart(S.part(padded, None, "text/plain"))))
        cases.append((f"headerless {n}", S.HEAD + b"\r\n" + S.b64(padded)))
        cases.append((f"headerless LF {n}", S.HEAD + b"\r\n" + S.b64(padded).replace(b"\r\n", b"\n")))
        cases.append((f"headerless short lines {n}", S.HEAD + b"\r\n" + b"\r\n".join(
            base64.b64encode(padded)[i:i + 40] for i in range(0, 4 * len(padded) // 3, 40))))
        cases.append((f"headerless long lines {n}",
                      S.HEAD + b"\r\n" + base64.b64encode(padded) + b"\r\n" + base64.b64encode(padded)))
    for offset in range(6):  # "begin" at every alignment of the decoded bytes
        encoded = S.b64(begin_at(offset))
        cases.append((f"uuencoded inside base64 text {offset}",
                      S.multipart(S.part(begin_at(offset), None, "text/plain"))))
        cases.append((f"uuencoded inside headerless base64 {offset}", S.HEAD + b"\r\n" + encoded))
        cases.append((f"yEnc inside base64 text {offset}", S.multipart(S.part(
            b"y" * offset + b"\n=ybegin line=128 size=3 name=x.exe\n" + big_text, None, "text/plain"))))
    for size in (2000, 2040, 2048, 2049, 2056, 3000):  # both sides of _SHORT_BASE64
        body = S.b64(S.pe() + bytes(size))[:size]
        cases.append((f"exe body of {size}", S.multipart(S.part(b"", "f.bin") + body)))
        cases.append((f"headerless exe of {size}", S.HEAD + b"\r\n" + S.b64(S.pe() + bytes(size))[:size]))
    cases.append(("v7 tar by name", S.multipart(S.part(v7_tar("a.exe", 3000), "x.tar"))))
    two_streams = S.b64(b"hello") + S.b64(S.pe() + bytes(3000))
    cases.append(("two streams", S.multipart(S.part(b"", "f.bin") + two_streams)))
    return cases


@pytest.mark.parametrize("label, raw", base64_messages(), ids=[c[0] for c in base64_messages()])
def test_base64_shortcut_gives_the_long_ways_answer(label, raw, monkeypatch):
    both_ways(raw, monkeypatch)


def test_the_shortcut_still_finds_what_it_must(monkeypatch):
    for label, raw in base64_messages():
        reasons = [r for f in both_ways(raw, monkeypatch)[0] for r in f[2]]
        if label.startswith(("uuencoded inside", "yEnc inside")):
            assert any("evil.exe" in r or "x.exe" in r for r in reasons), label
        if label in ("declared exe, pdf name", "tar by name", "v7 tar by name"):
            assert reasons, label


@pytest.mark.timeout(300)
def test_mz_with_its_pe_header_far_away_is_decoded_whole(monkeypatch):
    """An "MZ" file's PE header may be anywhere: past 16 MB the offset needs no zero byte,
    so only the header itself, outside every window, says PE."""
    off = 0x01010101
    data = bytearray(b"\x01" * (off + 4096))  # (the header outside the last 512 bytes too)
    data[:2], data[0x3C:0x40], data[off:off + 4] = b"MZ", off.to_bytes(4, "little"), b"PE\x00\x00"
    raw = S.multipart(S.part(bytes(data), "a.bin"))
    assert any("Windows executable" in r for f in both_ways(raw, monkeypatch)[0] for r in f[2])


def test_plain_base64_is_shortcut(monkeypatch):
    """The shortcut is taken where it should be (else it saves nothing)."""
    raw = S.multipart(S.text_part(), S.part(b"%PDF-1.7\n" + bytes(60_000), "r.pdf", "application/pdf"))
    calls = []
    real = decode_base64
    monkeypatch.setattr(scan_module, "decode_base64", lambda b: calls.append(len(b)) or real(b))
    assert report_of(raw)[0] == []
    assert max(calls, default=0) <= 96  # its first bytes at most, never the whole body


def test_text_shaped_like_base64_is_shortcut_without_decoding(monkeypatch):
    """smtp-source's body (lines of a digit and X's) reads as headerless base64: text skips
    the container precheck, so nothing of it is decoded, and the answer stays the same."""
    body = b"\r\n".join(b"%d" % (i % 10) + b"X" * 77 for i in range(1, 129)) + b"\r\n"
    raw = S.HEAD + b"\r\n" + body
    assert both_ways(raw, monkeypatch)[0] == []
    calls = []
    real = decode_base64
    monkeypatch.setattr(scan_module, "decode_base64", lambda b: calls.append(len(b)) or real(b))
    report_of(raw)
    assert calls == []


@pytest.mark.parametrize("path", sorted(p for p in CORPUS.rglob("*") if p.is_file()
                                        and p.suffix in (".raw", ".txt", ".eml", "")),
                         ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_reports_are_the_same_both_ways(path, monkeypatch):
    both_ways(path.read_bytes(), monkeypatch)


# --- hidden header fields: the precheck only skips regions where nothing can be found --------
@pytest.mark.parametrize("body", [
    b"Hello\r\nContent-Type: application/octet-stream; name=\"a.exe\"\r\n\r\nMZ\r\n",
    b"Hello\nCONTENT-DISPOSITION: attachment; filename=a.exe\n",
    b"content-type: text/plain; name=a.exe\r\nno header block before me\r\n",
    b"content-type x: y; name=a.exe\r\nhello\r\n",  # no header line: the body starts at offset 0
    b"Hello content-type: x; name=a.exe (not at a line start)\r\n",
    b"Hello\r\ncontent-typo: x; name=a.exe\r\n",
    b"x" * 5000 + b"\r\nContent-Disposition: attachment;\r\n filename=a.scr\r\n",
])
def test_hidden_field_precheck_gives_the_long_ways_answer(body, monkeypatch):
    for raw in (S.HEAD + b"\r\n" + body, body,
                S.multipart(S.text_part(), preamble=body), S.multipart(S.part(body, None, "text/plain", encoding=""))):
        both_ways(raw, monkeypatch)


@pytest.mark.parametrize("raw", [S.HEAD + b"\r\nHello\nCONTENT-DISPOSITION: attachment; filename=a.exe\n",
                                 b"content-type x: y; name=a.exe\r\nhello\r\n"])
def test_hidden_field_is_still_found(raw):
    assert any("hidden MIME header" in r for f in report_of(raw)[0] for r in f[2])


# --- names: the printable-ASCII paths are what the general ones give -------------------------
@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40))
def test_ascii_names_take_the_short_way_to_the_same_variants(name):
    base = name.replace("\\", "/").split("/")[-1]
    assert variants(name) == _variants(base)
    shown = _visible(name)
    assert display(name) == (shown if len(shown) <= 120 else shown[:119] + "…")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab; ="\\\t.'), max_size=30), st.integers(0, 30))
def test_quoted_strings_read_as_with_the_character_loop(value, start):
    start = min(start, len(value))
    assert _quoted(value, start) == _quoted_loop(value, start)


# --- boundary delimiters: bytes.find candidates, then match, as finditer finds them ----------
@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"--", b"b", b"bb", b"x", b" ", b"\t", b"\r"]), max_size=40),
       st.integers(0, 5), st.integers(0, 5))
def test_delimiters_are_found_as_finditer_finds_them(pieces, cut_start, cut_end):
    buf = b"".join(pieces)
    start, end = min(cut_start, len(buf)), max(min(cut_start, len(buf)), len(buf) - cut_end)
    pattern = re.compile(rb"\n" + re.escape(b"--bb") + rb"(--)?[ \t]*\r?$", re.M)
    got = [m.span() for m in _matches(pattern, b"\n--bb", buf, start, end)]
    assert got == [m.span() for m in pattern.finditer(buf, start, end)]


# --- header blocks: plain ones read field by field with a regex, as line by line -------------
def fields_the_long_way(buf: bytes, start: int, end: int, max_header: int):
    part = Part(buf, start, start, end, "", 0)
    out = Structure(part)
    fields, body = _read_fields(part, buf, start, end, min(end, start + max_header),
                                Limits(max_header_size=max_header), out)
    return [(f.name, f.value, f.start, f.end) for f in fields], min(body, end), out.untrusted, out.defects


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"Subject: hi", b"X-A:", b"To :  <a@b>  ", b"Bad Name: x", b" folded",
                                 b"\tmore  ", b"", b"\r", b"caf\xc3\xa9: \xe9t\xc3\xa9", b"Content-Type: text/plain",
                                 b"body line", b"K:\r\xffv",
                                 # (spaces the text's strip() takes and " \t" does not)
                                 b"X-N: \xc2\xa0v\xc2\xa0 ", b"X-L: \xa0w\x85\t", b"X-C: \x0bz\x0c \x1c"]), max_size=8),
       st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]), min_size=8, max_size=8),
       st.sampled_from([b"", b"\r\n", b"\n"]), st.integers(0, 6), st.integers(0, 200))
def test_plain_header_blocks_read_as_the_long_way_reads_them(lines, breaks, tail, cut, max_header):
    buf = b"".join(line + brk for line, brk in zip(lines, breaks)) + tail + b"the body\r\n"
    start, end = min(cut, 3), max(len(buf) - cut, min(cut, 3))
    fast = _plain_fields(buf, start, end, min(end, start + max_header))
    if fast is None:
        return  # the long way reads it (the rule runs that)
    fields, body = fast
    assert ([(f.name, f.value, f.start, f.end) for f in fields], body, [], []) == \
        fields_the_long_way(buf, start, end, max_header)


def test_plain_header_blocks_take_the_short_way():
    """smtp-source's headers, CRLF or LF, folded or not, are read by the regex (else it saves nothing)."""
    for block in (S.HEAD, S.HEAD.replace(b"\r\n", b"\n"), b"Subject: a\r\n b\r\n\tc\r\nTo: x\r\n"):
        buf = block + b"\r\n" + b"body\r\n"
        fast = _plain_fields(buf, 0, len(buf), len(buf))
        assert fast is not None
        assert ([(f.name, f.value, f.start, f.end) for f in fast[0]], fast[1], [], []) == \
            fields_the_long_way(buf, 0, len(buf), 256 * 1024)


# --- sniff: data whose first byte starts no signature is only checked further in -------------
ALL_LEADS = frozenset(bytes([b]) for b in range(256))


def sniff_the_long_way(data: bytes, scripts: bool, monkeypatch) -> str | None:
    with monkeypatch.context() as m:
        m.setattr(content_module, "_LEADS", ALL_LEADS)  # every first byte tried at every signature
        return sniff(data, scripts=scripts)


INNER = [(0x8001, b"CD001"), (0x9001, b"NSR03"), (257, b"ustar"), (7, b"**ACE**"), (2, b"-lh5-"),
         (510, b"\x55\xaa"), (3, b"NTFS    "), (0x36, b"FAT"), (-512, b"conectix"), (-512, b"koly")]


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=24), st.sampled_from([16, 600, 0x9010]), st.lists(st.sampled_from(INNER), max_size=3),
       st.booleans())
def test_sniff_by_the_first_byte_gives_the_long_ways_answer(head, size, planted, scripts):
    data = bytearray(head + bytes(max(0, size - len(head))))
    for off, sig in planted:
        at = off if off >= 0 else len(data) + off
        if 0 <= at <= len(data) - len(sig):
            data[at:at + len(sig)] = sig
    data = bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        assert sniff(data, scripts=scripts) == sniff_the_long_way(data, scripts, mp)


@pytest.mark.parametrize("data", samples_of_every_kind() + [S.pe(), b"MZ" + bytes(100)],  # ("MZ": read past the windows)
                         ids=lambda d: repr(d[:8]))
def test_every_kind_is_sniffed_as_the_long_way_sniffs_it(data, monkeypatch):
    for scripts in (True, False):
        assert sniff(data, scripts=scripts) == sniff_the_long_way(data, scripts, monkeypatch)


# --- base64_ends: the decoding's first 512 bytes and its footer, from the body's two ends ------
def ends_match(body: bytes) -> None:
    got = base64_ends(body)
    if got is None:
        return  # the long way (base64_sample)
    head, tail = got
    assert head == decode_base64(body)[:512]
    assert len(tail) >= 704 and body.translate(None, B64_DELETE).rstrip(b"=").endswith(tail)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=12), st.binary(max_size=30), st.binary(max_size=30))
def test_base64_of_every_occurrence_is_in_every_encoding_holding_it(data, before, after):
    encoded = base64.b64encode(before + data + after)
    assert any(q in encoded for q in base64_of_every_occurrence(data))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1500, max_size=40_000), line=st.sampled_from([0, 60, 76, 77, 1000]),
       crlf=st.booleans(), padding=st.sampled_from([None, b"", b"=", b"==", b"= \r\n="]),
       junk=st.lists(st.tuples(st.integers(0, 60_000), st.sampled_from([b" ", b"*", b"\t", b"\xff", b"="])),
                     max_size=3),
       dangling=st.sampled_from([b"", b"Q", b"QU", b"QUI"]))
def test_base64_ends_hold_the_decodings_ends(data, line, crlf, padding, junk, dangling):
    text = base64.b64encode(data).rstrip(b"=") + dangling + (padding or b"")
    ends_match(written_as(text, line, crlf, junk))


def footer_messages() -> list[tuple[str, bytes]]:
    """Headerless base64 and declared base64 parts whose decoding ends in a VHD or DMG footer
    (or holds one just before it), at every alignment, up to the ISO windows' edge."""
    cases = []
    # (the VHD footer a byte short: sniff's other place for "conectix", data[-511:-503])
    for footer in (S.vhd_fixed()[-512:], S.vhd_fixed()[-512:-1], S.dmg()[-512:]):
        for size in (1100, 1101, 1102, 3000, 3001, 3002, 20_000, 32_000, 32_200, 32_300):
            for shift in (0, 1, 2, 9):
                data = bytes(max(0, size - len(footer) - shift)) + footer + bytes(shift)
                label = f"{footer[:4]!r}{len(footer)} {size}+{shift}"
                cases.append((f"headerless {label}", S.HEAD + b"\r\n" + S.b64(data)))
                cases.append((f"headerless as text {label}", S.HEAD + b"\r\n" + base64.b64encode(data)))
                cases.append((f"declared {label}", S.multipart(S.part(data, "f.bin"))))
    return cases


@pytest.mark.parametrize("label, raw", footer_messages(), ids=[c[0] for c in footer_messages()])
def test_footers_are_found_as_the_long_way_finds_them(label, raw, monkeypatch):
    short = both_ways(raw, monkeypatch)
    if "+0" in label and "as text" not in label:  # where sniff reads it (a one-line body is no base64 for it)
        assert any("disk image" in r for f in short[0] for r in f[2]), label


FOOTERS = {"vhd": S.vhd_fixed()[-512:], "vhd-511": S.vhd_fixed()[-512:-1], "dmg": S.dmg()[-512:]}


@pytest.mark.parametrize("extra", [0, 1, 2])  # the decoding's length mod 3: how its stream ends
@pytest.mark.parametrize("chars", [600, 650, 680, 686, 700, 704, 712, 720])
@pytest.mark.parametrize("footer", FOOTERS)
def test_a_footer_behind_a_thinned_last_kb_is_found(footer, chars, extra, monkeypatch):
    """The body's last 1024 bytes hold only ``chars`` base64 characters (junk readers skip
    fills the rest): too few to reach back to the footer's groups (686 at most), base64_ends
    must leave it to the long way; from its 704 on, its characters hold the footer's."""
    data = bytes(20_000 + extra) + FOOTERS[footer]
    text = base64.b64encode(data).rstrip(b"=")
    lines = text[:-chars]
    head = b"\r\n".join(lines[i:i + 76] for i in range(0, len(lines), 76))
    body = head + b"\r\n" + b" " * (1024 - chars) + text[-chars:]
    assert len(body[-1024:].translate(None, B64_DELETE)) == chars
    raw = S.multipart(S.part(b"", "f.bin") + body)
    assert any("disk image" in r for f in both_ways(raw, monkeypatch)[0] for r in f[2])


def test_an_iso_just_long_enough_for_its_descriptor_is_found(monkeypatch):
    """The shortest data holding an ISO 9660 descriptor (0x8006 bytes) is too long for
    _ends_are_inert (sniff reads its ISO window), however tightly its base64 is written."""
    data = bytearray(0x8006)
    data[0x8001:0x8006] = b"CD001"
    encoded = base64.b64encode(bytes(data))
    for raw in (S.multipart(S.part(bytes(data), "f.iso")), S.HEAD + b"\r\n" + S.b64(bytes(data)),
                S.multipart(S.part(b"", "f.bin") + encoded),
                S.multipart(S.part(b"", "f.bin") + encoded.rstrip(b"="))):
        assert any("disk image" in r for f in both_ways(raw, monkeypatch)[0] for r in f[2])


def test_short_text_is_proved_inert_from_its_ends(monkeypatch):
    """smtp-source's body: the two ends decide, the whole body is never translated."""
    body = b"\r\n".join(b"%d" % (i % 10) + b"X" * 77 for i in range(1, 129)) + b"\r\n"
    calls = []
    monkeypatch.setattr(scan_module, "base64_sample", lambda *a: calls.append(a) or base64_sample(*a))
    assert report_of(S.HEAD + b"\r\n" + body)[0] == []
    assert calls == []


@pytest.mark.parametrize("spread", [1, 2, 3])
def test_base64_ends_want_enough_characters_at_each_end(spread):
    """Ends thinned out by junk (readers skip it) hold too few characters: the long way."""
    text = S.b64(random.Random(spread).randbytes(6000))
    thin = lambda b: b"".join(b[i:i + spread] + b" " * 3 for i in range(0, len(b), spread))  # noqa: E731
    for body in (thin(text[:1500]) + text[1500:], text[:-1500] + thin(text[-1500:])):
        ends_match(body)
        assert base64_ends(body) is None


# --- the footer's characters: only those whose groups can hold sniff's footer signatures ---
@settings(max_examples=500, deadline=None)
@given(groups=st.integers(370, 8000), at=st.sampled_from(FOOTER_SIGNATURES), line=st.sampled_from([0, 60, 76, 77]),
       crlf=st.booleans(), padding=st.sampled_from([b"", b"=", b"=="]),
       junk=st.lists(st.tuples(st.integers(0, 60_000), st.sampled_from([b" ", b"*", b"\t", b"\xff"])), max_size=3),
       dangling=st.sampled_from([b"", b"Q", b"QU", b"QUI"]), seed=st.integers(0, 2**32))
def test_the_footer_chars_hold_every_footer_signatures_quanta(groups, at, line, crlf, padding, junk, dangling, seed):
    """Wherever the stream ends (whole groups, a dangling character, 2 or 3 left), a footer
    signature in the decoding leaves one of its quanta in the tail's _FOOTER_CHARS."""
    offset, sig = at
    extra = {b"": 0, b"Q": 0, b"QU": 1, b"QUI": 2}[dangling]  # bytes the dangling characters decode to
    data = bytearray(random.Random(seed).randbytes(3 * groups))
    where = len(data) + extra + offset
    data[where:where + len(sig)] = sig
    text = base64.b64encode(bytes(data)) + dangling + padding
    text = written_as(text, line, crlf, junk)
    decoded = decode_base64(text)
    assert decoded[len(decoded) + offset:][:len(sig)] == sig
    ends = base64_ends(text)
    if ends is not None:
        assert any(q in ends[1][_FOOTER_CHARS] for q in _FOOTER_QUANTA)
        assert footer_holds_quanta(ends[1])


@settings(max_examples=1000, deadline=None)
@given(st.integers(704, 1024), st.lists(st.tuples(st.sampled_from(_FOOTER_QUANTA), st.integers(650, 700)), max_size=3))
def test_footer_holds_quanta_by_pos_and_endpos_equals_searching_the_footer_chars_slice(size, planted):
    """Its search of the whole tail between pos and endpos (no copy) finds what a search of
    the slice tail[_FOOTER_CHARS] finds, quanta planted across the slice's edges included."""
    tail = bytearray(b"X" * size)
    for quantum, back in planted:  # (``back`` characters from the end)
        tail[size - back:size - back + len(quantum)] = quantum
    tail = bytes(tail[:size])
    assert footer_holds_quanta(tail) == any(q in tail[_FOOTER_CHARS] for q in _FOOTER_QUANTA)


def test_a_footer_quantum_outside_the_footers_chars_is_proved_inert(monkeypatch):
    """smtp-source's body with the base64 of "koly" (or of "conectix") in its last line, past
    the characters where sniff's footer lies: still proved inert from its ends."""
    lines = [b"%d" % (i % 10) + b"X" * 77 for i in range(1, 129)]
    quanta = [q for q in _FOOTER_QUANTA if b"Y" not in q and b"Z" not in q]  # (else: "begin"?)
    assert len(quanta) >= 3
    for quantum in quanta:
        raw = S.HEAD + b"\r\n" + b"\r\n".join(lines[:-1] + [quantum + lines[-1][len(quantum):]]) + b"\r\n"
        assert both_ways(raw, monkeypatch)[0] == []
        calls = []
        with monkeypatch.context() as m:
            m.setattr(scan_module, "base64_sample", lambda *a: calls.append(a) or base64_sample(*a))
            assert report_of(raw)[0] == []
        assert calls == [], quantum


# --- disk images inside the data: descriptors only tried where the data reaches them ---------
def disk_image_inside_the_long_way(data: bytes) -> bool:
    """content._disk_image_inside as it was: every descriptor and footer sliced, whatever the size."""
    for off in (0x8001, 0x8801, 0x9001):
        if data[off:off + 5] in (b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01"):
            return True
    if len(data) >= 512 and any(data[o:o + len(sig)] == sig for o, sig in FOOTER_SIGNATURES):
        return True
    return data[510:512] == b"\x55\xaa" and (data[3:11] == b"NTFS    " or data[0x36:0x39] == b"FAT"
                                             or data[0x52:0x57] == b"FAT32" or data[3:11] == b"EXFAT   ")


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([0, 511, 512, 513, 0x8001, 0x8005, 0x8006, 0x8007, 0x8806, 0x9005, 0x9006, 0x9100]),
       st.lists(st.tuples(st.sampled_from([0x8001, 0x8801, 0x9001, -512, -511, 510, 3]),
                          st.sampled_from([b"CD001", b"NSR03", b"conectix", b"koly", b"\x55\xaa", b"NTFS    "])),
                max_size=3))
def test_disk_images_inside_are_found_as_before(size, planted):
    data = bytearray(size)
    for off, sig in planted:
        at = off if off >= 0 else size + off
        if 0 <= at <= size - len(sig):
            data[at:at + len(sig)] = sig
    data = bytes(data)
    assert content_module._disk_image_inside(data) == disk_image_inside_the_long_way(data)


# --- looks_base64: the first line tried alone first --------------------------------------------
@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"QUJD" * 19, b"QUJD", b"X", b"\r\n", b"\n", b" ", b"-", b"=", b"\xff", b"\t"]),
                max_size=80), st.integers(0, 5000))
def test_looks_base64_answers_as_its_regex(pieces, cut):
    body = b"".join(pieces)[:cut]
    expected = bool(mime_module._LOOKS_B64.match(body[:4096])) and len(body.strip()) >= 16
    assert looks_base64(body) == expected
