"""MIME structure as byte offsets, for the attachments rule: find parts without re-serialising.

The gate hands rules CRLF-only messages; bare LFs are tolerated anyway. Every loop here is
bounded by the input's length or by ``Limits``, so hostile input cannot make it hang, and
nothing raises on bad input: problems become ``defects`` (harmless, noted) or ``untrusted``
(the structure cannot be relied on; the rule's ``on_malformed`` decides).

A ``Part`` records where its header block starts (``start``), where its body starts
(``body``) and where the body ends (``end``, just before the line break that belongs to the
next boundary delimiter). Offsets refer to ``part.buf``: the message's own bytes, or for a
``message/rfc822`` part sent base64-encoded, the decoded bytes (``part.spliceable`` is then
False: such a part can only be cut out through its outermost spliceable ancestor).
"""
from __future__ import annotations

import base64
import binascii
import itertools
import re
from dataclasses import dataclass, field
from typing import ClassVar

from .names import parse_params

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# One field of a plain header block (``_plain_fields``): its name, the rest of its first line
# and its continuation lines, each line ending in LF or CRLF, no other CR anywhere.
_PLAIN_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*)\r?\n((?:[ \t][^\r\n]*\r?\n)*)")
_PLAIN_CONTINUATION = re.compile(rb"([^\r\n]*)\r?\n")
_BLANK_LINE = re.compile(rb"\r?\n")
_LOOKS_B64 = re.compile(rb"^[A-Za-z0-9+/=\r\n]{16,}$")  # no spaces: prose is not base64
MESSAGE_TYPES = ("message/rfc822", "message/global", "message/news")


@dataclass
class Limits:
    max_depth: int = 30
    max_parts: int = 1000
    max_header_size: int = 256 * 1024


@dataclass(eq=False, slots=True)  # (slots: made for every header field; a little less to build and keep)
class Field:
    name: str          # lower-case
    value: str         # unfolded text after the colon
    start: int
    end: int


@dataclass(eq=False)
class Part:
    buf: bytes
    start: int
    body: int
    end: int
    path: str
    depth: int
    parent: "Part | None" = None
    spliceable: bool = True
    fields: list[Field] = field(default_factory=list)
    ctype: str = "text/plain"
    params: dict[str, list[str]] = field(default_factory=dict)
    children: list["Part"] = field(default_factory=list)
    #: byte ranges inside this multipart's body that belong to no part (preamble, epilogue)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    #: the Content-Transfer-Encoding values, lower-case: set with ``fields`` (read a few
    #: times per part; a plain attribute, no property call). Never mutated: shared default.
    cte: ClassVar[list[str]] = []

    def get_all(self, name: str) -> list[str]:
        # (a loop, not a comprehension: read ~4 times per part, most often finding nothing)
        values = []
        for f in self.fields:
            if f.name == name:
                values.append(f.value)
        return values

    def header(self, name: str) -> str | None:
        for f in self.fields:
            if f.name == name:
                return f.value
        return None

    @property
    def is_multipart(self) -> bool:
        return self.ctype.startswith("multipart/")

    @property
    def is_message(self) -> bool:
        return self.ctype in MESSAGE_TYPES

    @property
    def message_level(self) -> bool:
        """The root, or the message inside a message/rfc822 part: its other headers stay."""
        return self.parent is None or self.parent.is_message

    def raw_body(self) -> bytes:
        return self.buf[self.body:self.end]

    def walk(self):
        stack = [self]
        while stack:
            part = stack.pop()
            yield part
            stack.extend(reversed(part.children))


@dataclass
class Structure:
    root: Part
    parts: int = 0
    defects: list[str] = field(default_factory=list)
    #: why the structure cannot be trusted (empty: it can)
    untrusted: list[str] = field(default_factory=list)


def parse(raw: bytes, limits: Limits | None = None) -> Structure:
    """Walk the whole message into a tree of Parts; never raises on bad input."""
    limits = limits or Limits()
    root = Part(raw, 0, 0, trim_break(raw, 0, len(raw)), "", 0)
    out = Structure(root)
    stack = [root]
    while stack:
        part = stack.pop()
        out.parts += 1
        if out.parts > limits.max_parts:
            out.untrusted.append(f"more than {limits.max_parts} MIME parts")
            break
        if part.depth > limits.max_depth:
            out.untrusted.append(f"MIME parts nested deeper than {limits.max_depth}")
            break
        _read_headers(part, limits, out)
        _read_type(part, out)
        if part.is_multipart:
            _split(part, limits, out)
        elif part.is_message:
            _open_message(part, out)
        stack.extend(reversed(part.children))
    return out


# --- headers ----------------------------------------------------------------------------
def _read_headers(part: Part, limits: Limits, out: Structure) -> None:
    buf, pos, end = part.buf, part.start, part.end
    limit = min(end, pos + limits.max_header_size)
    if buf.startswith(b"From ", pos) and part.parent is None:  # an mbox separator line
        nl = buf.find(b"\n", pos, end)
        pos = end if nl < 0 else nl + 1
    # (a plain block by regex, else line by line: the same fields and end either way)
    part.fields, pos = (_plain_fields(buf, pos, end, limit)
                        or _read_fields(part, buf, pos, end, limit, limits, out))
    part.cte = [v.strip().lower() for v in part.get_all("content-transfer-encoding")]
    part.body = min(pos, end)


def _plain_fields(buf: bytes, pos: int, end: int, limit: int) -> tuple[list[Field], int] | None:
    """A header block of plain lines, read by one regex match per field: each line ends in
    LF or CRLF with no other CR in it, and the block ends in a blank line before ``limit``.
    Then ``_read_fields`` would give the same fields and body start (it strips a line's
    trailing CRs and LF, and it cuts a field at the next line that does not continue it);
    None for anything else (no blank line, a bare CR, a line that is no field, a block over
    the limit, ...): the long way reads it."""
    fields: list[Field] = []
    match = _PLAIN_FIELD.match
    while True:
        m = match(buf, pos, end)
        if m is None:
            break
        name, raw, more = m.groups()
        if more:
            lines = [raw] + _PLAIN_CONTINUATION.findall(more)
            raw = b" ".join(x.strip(b" \t") for x in lines)
        # (a single line is not stripped of " \t" first: the text's strip() takes them all
        # the same, and they never make or break its UTF-8)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
        stop = m.end()
        fields.append(Field(name.decode("ascii").lower(), value.strip(), pos, stop))
        pos = stop
    if pos >= limit:  # (the blank line too: the long way checks each line's start)
        return None
    blank = _BLANK_LINE.match(buf, pos, end)
    if blank is None:
        return None
    return fields, blank.end()


def _read_fields(part: Part, buf: bytes, pos: int, end: int, limit: int, limits: Limits,
                 out: Structure) -> tuple[list[Field], int]:
    """The header block line by line: any bytes, defects and limits noted. Its fields, and
    where it ends (the body starts there, or at ``end``)."""
    fields: list[Field] = []
    cur: list | None = None  # [name, [value lines], start]
    while pos < end:
        if pos >= limit:
            out.untrusted.append(f"part {part.path or 'top'}: header block over "
                                 f"{limits.max_header_size} bytes")
            break
        nl = buf.find(b"\n", pos, end)
        nxt = end if nl < 0 else nl + 1
        line = buf[pos:nxt].rstrip(b"\r\n")
        if not line:  # the blank line: the body starts after it
            if cur:
                fields.append(_field(cur, pos))
                cur = None
            pos = nxt
            break
        if line[:1] in (b" ", b"\t"):
            if cur is not None:
                cur[1].append(line)
            # a continuation with nothing to continue (a broken first line): skip it
        else:
            m = _FIELD.match(line)
            if cur:
                fields.append(_field(cur, pos))
                cur = None
            if not m:
                # Not a header line: the header block ended without its blank line (the
                # way Python's email and most readers take it); this line is body.
                out.defects.append(f"part {part.path or 'top'}: missing blank line after headers")
                break
            cur = [m.group(1).decode("ascii").lower(), [line[m.end():]], pos]
        pos = nxt
    else:
        if cur:
            fields.append(_field(cur, pos))
    return fields, pos


def _field(cur: list, end: int) -> Field:
    name, lines, start = cur
    raw = lines[0].strip(b" \t") if len(lines) == 1 else b" ".join(x.strip(b" \t") for x in lines)
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        value = raw.decode("latin-1")
    return Field(name, value.strip(), start, end)


def _read_type(part: Part, out: Structure) -> None:
    values = part.get_all("content-type")
    default = ("message/rfc822" if part.parent is not None and part.parent.ctype == "multipart/digest"
               else "text/plain")
    if not values:
        part.ctype = default
        return
    parsed = [parse_params(v) for v in values]
    ctype, params = parsed[0]
    if "/" not in ctype:
        out.defects.append(f"part {part.path or 'top'}: bad content type {ctype!r}")
        ctype = default
    part.ctype, part.params = ctype, params
    # Readers disagree about which of several Content-Type fields (or boundary parameters)
    # wins: if the structure they describe differs, no reading can be trusted.
    shapes = {(t.split("/")[0] == "multipart", tuple(p.get("boundary", ()))) for t, p in parsed}
    boundaries = set(params.get("boundary", ()))
    if len(shapes) > 1 or (part.is_multipart and len(boundaries) > 1):
        out.untrusted.append(f"part {part.path or 'top'}: conflicting Content-Type fields "
                             "or boundary parameters")


# --- multipart ---------------------------------------------------------------------------
def _split(part: Part, limits: Limits, out: Structure) -> None:
    boundaries = part.params.get("boundary") or []
    boundary = boundaries[0].encode("utf-8", "surrogateescape") if boundaries else b""
    if not boundary:
        out.defects.append(f"part {part.path or 'top'}: multipart without a boundary")
        part.ctype = "text/plain"
        return
    ancestor = part.parent
    while ancestor is not None:
        if ancestor.is_multipart and ancestor.params.get("boundary", [""])[0].encode(
                "utf-8", "surrogateescape") == boundary:
            out.defects.append(f"part {part.path}: reuses an outer boundary")
            break
        ancestor = ancestor.parent
    buf, body, end = part.buf, part.body, part.end
    dash = b"--" + boundary
    delims: list[tuple[int, int]] = []  # (line start, line end incl. its break)
    closed = False
    # A delimiter is a whole line: "--" boundary, "--" for the last one, then only blanks
    # (RFC 2046; "--boundaryXYZ" belongs to someone else). The regex finds them in C.
    # (A leading literal "\n" lets the regex engine skip ahead fast; the body's first line
    # has no "\n" before it inside the window, so it is matched on its own.)
    tail = re.escape(dash) + rb"(--)?[ \t]*\r?$"
    first = re.compile(tail, re.M).match(buf, body, end)
    found = [first] if first else []
    found = itertools.chain(found, _matches(re.compile(rb"\n" + tail, re.M), b"\n" + dash, buf, body, end))
    for m in found:
        i, line_end = m.start() + (m.group(0)[:1] == b"\n"), m.end()
        if line_end < end and buf[line_end:line_end + 1] == b"\n":
            line_end += 1
        delims.append((i, line_end))
        if m.group(1):
            closed = True
            break
        if len(delims) > limits.max_parts:
            out.untrusted.append(f"more than {limits.max_parts} MIME parts")
            break
    if not delims:
        out.defects.append(f"part {part.path or 'top'}: boundary never found")
        part.gaps.append((body, end))
        return
    part.gaps.append((body, _before_break(buf, delims[0][0], body)))
    if not closed:
        out.defects.append(f"part {part.path or 'top'}: no closing boundary")
    starts = [d[1] for d in delims if d is not delims[-1] or not closed]
    ends = [_before_break(buf, d[0], s) for d, s in zip(delims[1:], starts)]
    if not closed:
        ends.append(trim_break(buf, starts[-1] if starts else body, end))
    else:
        part.gaps.append((delims[-1][1], end))
    for n, (s, e) in enumerate(zip(starts, ends), 1):
        path = f"{part.path}.{n}" if part.path else str(n)
        part.children.append(Part(buf, s, s, max(s, e), path, part.depth + 1, part,
                                  part.spliceable))


def _matches(pattern: re.Pattern, prefix: bytes, buf: bytes, pos: int, end: int):
    """What ``pattern.finditer(buf, pos, end)`` yields when every match starts with
    ``prefix``: the candidates found by bytes.find (which skips ahead by the length of a long
    boundary, where the regex engine tries every line), each tried with match, the search
    going on after a match's end or one past a failed candidate, as finditer's does."""
    while True:
        i = buf.find(prefix, pos, end)
        if i < 0:
            return
        m = pattern.match(buf, i, end)
        if m:
            yield m
        pos = m.end() if m else i + 1


def trim_break(buf: bytes, start: int, end: int) -> int:
    """``end`` without the line break the data ends with (it stays when a part is replaced)."""
    if end - 2 >= start and buf[end - 2:end] == b"\r\n":
        return end - 2
    if end - 1 >= start and buf[end - 1:end] == b"\n":
        return end - 1
    return end


def _before_break(buf: bytes, i: int, floor: int) -> int:
    """The offset where the line break before a delimiter at ``i`` starts."""
    if i - 2 >= floor and buf[i - 2:i] == b"\r\n":
        return i - 2
    if i - 1 >= floor and buf[i - 1:i] == b"\n":
        return i - 1
    return i


# --- message/rfc822 ----------------------------------------------------------------------
def _open_message(part: Part, out: Structure) -> None:
    ctes = part.cte
    if not ctes or all(c in ("7bit", "8bit", "binary") for c in ctes):
        child = Part(part.buf, part.body, part.body, part.end, f"{part.path}.1" if part.path else "1",
                     part.depth + 1, part, part.spliceable)
    else:
        data = decode(part.raw_body(), ctes[0])
        child = Part(data, 0, 0, trim_break(data, 0, len(data)), f"{part.path}.1" if part.path else "1",
                     part.depth + 1, part, False)
    part.children.append(child)


# --- content transfer encodings ----------------------------------------------------------
def decode(body: bytes, cte: str) -> bytes:
    """Decode leniently, the way mail readers do (bad characters skipped, padding repaired)."""
    if cte == "base64":
        return decode_base64(body)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):
            return body
    if cte in ("x-uuencode", "uuencode", "x-uue"):
        return decode_uu(body)
    return body


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
B64_DELETE = bytes(b for b in range(256) if b not in _B64_ALPHABET)
_B64_LINE = _B64_ALPHABET + b"\r\n"  # what _LOOKS_B64 allows


def decode_base64(body: bytes) -> bytes:
    """Characters outside the alphabet are skipped; blocks that end in padding and then go on
    (concatenated encodings) are each decoded; a dangling character is dropped."""
    eq = body.find(b"=")
    clean = None
    if eq < 0:  # no padding at all: decodable at once when the characters make whole groups
        clean = body.translate(None, B64_DELETE)
        if len(clean) % 4 == 0:  # (else a2b_base64 would decode it all, then refuse it)
            try:
                return binascii.a2b_base64(clean)
            except (binascii.Error, ValueError):
                pass
    elif not body[eq:].strip(b"=\r\n\t "):  # padding only at the end: the fast path
        try:
            return binascii.a2b_base64(body)
        except (binascii.Error, ValueError):
            pass
    if clean is None:
        clean = body.translate(None, B64_DELETE)
    groups = [g for g in clean.split(b"=") if g] if b"=" in clean.rstrip(b"=") else [clean.rstrip(b"=")]
    out = []
    for g in groups:
        if len(g) % 4 == 1:
            g = g[:-1]
        try:
            out.append(binascii.a2b_base64(g + b"=" * (-len(g) % 4)))
        except (binascii.Error, ValueError):
            continue
    return b"".join(out)


def base64_sample(body: bytes, windows) -> tuple[bytes, bytes] | None:
    """A stand-in for ``decode_base64(body)`` made without decoding all of it, and the base64
    characters it decodes from: the stand-in has the decoding's length and its bytes in each
    (start, stop) of ``windows`` (slice bounds), zeros elsewhere. None when padding comes
    before the body's end (several streams, each decoded alone): decode it all then.

    Why it is the decoding: with padding only at its end the body is one stream, and
    decode_base64 gives (directly, or after a2b_base64 refused the padding) the a2b_base64 of
    its alphabet characters, a dangling last one dropped and the last group padded; so the
    3 bytes at 3k come from characters 4k..4k+3 alone, and a run of whole groups, or a suffix
    starting on a group (ending as the whole does), decodes to its own stretch of bytes."""
    eq = body.find(b"=")
    if eq >= 0 and body[eq:].strip(b"=\r\n\t "):
        return None
    chars = body.translate(None, B64_DELETE).rstrip(b"=")
    n = len(chars)
    size = n // 4 * 3 + (0, 0, 1, 2)[n % 4]
    out = bytearray(size)
    for window in windows:
        start, stop, _ = slice(*window).indices(size)
        if start < stop:
            first, last = start // 3, -(-stop // 3)  # the groups holding these bytes
            groups = chars[4 * first:4 * last]
            # whole groups of alphabet characters: a2b_base64 is the decoding; the end: as a whole
            data = binascii.a2b_base64(groups) if 4 * last <= n else decode_base64(groups)
            out[start:stop] = data[start - 3 * first:stop - 3 * first]
    return bytes(out), chars


#: bytes read at each end of a body by ``base64_ends`` (base64 lines of 76: 998 characters)
_END_BYTES = 1024
#: base64_ends gives the decoding's first END_HEAD bytes: its first _HEAD_CHARS characters
END_HEAD = 512
_HEAD_CHARS = -(-END_HEAD // 3) * 4  # 684: 171 whole groups
#: and at least the last TAIL_CHARS characters, whose groups hold at least the decoding's
#: last END_TAIL bytes: of the last T characters, the whole groups from the first group start
#: on are (T - 1) // 4 or more (the fewest when the stream ends in a dangling character)
TAIL_CHARS = 704
END_TAIL = (TAIL_CHARS - 1) // 4 * 3  # 525


def base64_ends(body: bytes) -> tuple[bytes, bytes] | None:
    """What ``decode_base64(body)`` holds at its ends, from the body's first and last
    _END_BYTES alone: its first END_HEAD bytes, and the characters of its last _END_BYTES
    (TAIL_CHARS or more: the groups of the decoding's last END_TAIL bytes or more). None
    when the body is shorter than 2 x _END_BYTES (the ends would overlap), padding comes
    before its end, or either end holds too few characters (too much else in it).

    Why: with padding only at its end the body is one stream (see ``base64_sample``); its
    first _HEAD_CHARS characters are its first groups, and the last ones are the stream's own."""
    if len(body) < 2 * _END_BYTES:
        return None
    eq = body.find(b"=")
    if eq >= 0 and body[eq:].strip(b"=\r\n\t "):
        return None
    head = body[:_END_BYTES].translate(None, B64_DELETE)
    tail = body[-_END_BYTES:].translate(None, B64_DELETE).rstrip(b"=")
    if len(head) < _HEAD_CHARS or len(tail) < TAIL_CHARS or b"=" in head:
        return None
    return binascii.a2b_base64(head[:_HEAD_CHARS])[:END_HEAD], tail


def base64_of_every_occurrence(data: bytes) -> tuple[bytes, ...]:
    """The base64 characters that ``data`` alone decides, for each of the three ways it may
    fall into 3-byte groups: wherever ``data`` is in a decoding, one of them is in its
    characters (the characters wholly made of its bits)."""
    out = []
    for r in range(3):
        encoded = base64.b64encode(bytes(r) + data + bytes(3))
        out.append(encoded[-(-8 * r // 6):8 * (r + len(data)) // 6])
    return tuple(out)


def decode_uu(body: bytes, limit: int = 64 * 1024 * 1024) -> bytes:
    out, started = [], False
    for line in body.splitlines():
        if not started:
            started = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except (binascii.Error, ValueError):
            continue
        if sum(map(len, out)) > limit:
            break
    return b"".join(out)


def looks_base64(body: bytes) -> bool:
    """Its first 4096 bytes are at least 16 of the base64 alphabet and line breaks only
    (``_LOOKS_B64``, tested with a C-speed translate instead of the regex)."""
    # (its first line first: prose fails there without translating 4 KB; the rest sliced
    # from the body itself, not from a copy of its first 4 KB)
    return len(body) >= 16 and not body[:80].translate(None, _B64_LINE) \
        and not body[80:4096].translate(None, _B64_LINE) and len(body.strip()) >= 16


def contents(raw: bytes, ctes: list[str]) -> list[bytes]:
    """Every plausible decoding of a leaf part's body ``raw`` with its transfer encodings
    ``ctes`` (one, unless its encoding is in doubt); base64 sent without its header is apart
    (``headerless_base64``): the scanner can often tell it holds nothing without decoding it."""
    if not ctes:  # (what decode gives for no encoding: the body itself)
        return [raw]
    out: list[bytes] = []
    for cte in dict.fromkeys(ctes):
        if cte in ("", "7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode",
                   "uuencode", "x-uue"):
            out.append(decode(raw, cte))
        else:  # an encoding nobody knows: readers show it as is, some guess
            out.append(raw)
            if looks_base64(raw):
                out.append(decode_base64(raw))
    uniq: list[bytes] = []
    for data in out:
        if not any(data is u or data == u for u in uniq):
            uniq.append(data)
    return uniq


def headerless_base64(raw: bytes, ctes: list[str]) -> bytes | None:
    """A leaf part's body ``raw`` (transfer encodings ``ctes``), when it may be base64 sent
    without its header (to be decoded and sniffed as well as read as it is); else None. The
    caller also wants ``mostly_long_lines``, tested after this cheaper check. (Its decoding
    never equals the body, being shorter.)"""
    ctes = ctes or [""]
    if len(ctes) != 1 or ctes[0] not in ("", "7bit", "8bit"):
        return None
    return raw if looks_base64(raw) else None


def mostly_long_lines(raw: bytes) -> bool:
    lines = raw[:8192].split(b"\n", 40)[:40]
    # (the shortest of the lines that count, measured in C: what all(len(...) >= 60) says)
    return len(lines) >= 2 and min(map(len, map(bytes.strip, lines[:-2])), default=60) >= 60
