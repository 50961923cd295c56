"""A message as its raw bytes, with surgical header edits and a lazily parsed MIME view.

The bytes are the message as received (CRLF line ends). Nothing here re-serialises a message:
header edits splice lines in or out, and a rule that restructures the body hands back the
new bytes itself. A message no rule touched goes downstream exactly as it came.

Memory: the message is held once. It may arrive as pieces (the front's reads); they are
joined only when a rule asks for ``raw`` or ``email``. The header block is split off (a
small copy) for reading fields and for header edits, and the body stays a view of the bytes
as received, so header edits never copy the body; ``pieces()`` hands the relay the
current message without joining it.
"""
from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage

# A header field name: printable ASCII but ":" (RFC 5322 §2.2); \Z, as "$" lets a final LF through
_NAME_CHARS = r"[\x21-\x39\x3b-\x7e]+\Z"
_FIELD_NAME = re.compile(_NAME_CHARS.encode())  # in the message's bytes
_FIELD_NAME_TEXT = re.compile(_NAME_CHARS)  # a name given as text (Message.is_field_name)
_UNSAFE = re.compile(r"[\r\n\x00]")
# CR and LF only as folding: CRLF, then space or tab, then some text on that line.
_BAD_FOLDING = re.compile(r"\x00|\r(?!\n)|(?<!\r)\n|\r\n(?![ \t]*[^ \t\r\n])|\r\n(?![ \t])")
AUTH_RESULTS = "Authentication-Results"
# A field-name at the start of a header line (continuation lines start with white space).
_AUTH_RESULTS_LINE = re.compile(rb"^authentication-results[ \t]*:", re.I | re.M)
# RFC 2045 token characters (RFC 8601's value = token / quoted-string).
_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+')


@dataclass(frozen=True, init=False)
class Change:
    """One edit, for the trace: ``("add", "X-Spam", None, "yes")``."""

    op: str
    header: str
    before: str | None
    after: str | None
    rule: str | None = None

    def __init__(self, op: str, header: str, before: str | None, after: str | None,
                 rule: str | None = None):
        # What the frozen dataclass's own __init__ does (one object.__setattr__ per field),
        # in half the time: one is made per edit, on the message's path.
        d = self.__dict__
        d["op"], d["header"], d["before"], d["after"], d["rule"] = op, header, before, after, rule


@dataclass(frozen=True, init=False)
class HeaderField:
    name: str
    value: str  # unfolded-as-written text after the colon (CRLFs of folding kept out)
    start: int  # byte offsets of the whole field, folding lines and final CRLF included
    end: int

    def __init__(self, name: str, value: str, start: int, end: int):
        # as Change's: every field is made anew when a header is prepended above it
        d = self.__dict__
        d["name"], d["value"], d["start"], d["end"] = name, value, start, end


class Message:
    """Raw bytes plus edits. ``raw`` is always what would be relayed now."""

    @staticmethod
    def is_field_name(name) -> bool:
        """Whether ``name`` is a header field name (printable ASCII but ``:``): what
        ``prepend_header`` accepts, for a rule's options to check at load."""
        return isinstance(name, str) and _FIELD_NAME_TEXT.match(name) is not None

    def __init__(self, raw: bytes | list[bytes]):
        if isinstance(raw, (bytes, bytearray, memoryview)):
            body = (bytes(raw),) if not isinstance(raw, bytes) else (raw,)
        else:  # pieces: take them over, so the caller's list no longer holds them
            body = tuple(p for p in raw if p)
            if isinstance(raw, list):
                raw.clear()
        #: the message is ``_head + b"".join(_body)``; ``_head`` is None until split off
        self._head: bytes | None = None
        self._body: tuple = body
        self._received: tuple = body  # as received, for the quarantine
        self._joined: bytes | None = body[0] if len(body) == 1 and isinstance(body[0], bytes) else None
        self._edited = False
        self._fields: list[HeaderField] | None = None
        self._email: EmailMessage | None = None
        self.changes: list[Change] = []
        #: reasons rules gave for keeping the message as received in the quarantine while it
        #: is still delivered (``quarantine_original``); the gate acts on them after DATA
        self.held: list[str] = []
        self._current_rule: str | None = None  # set by the pipeline, for the trace

    # --- reading -----------------------------------------------------------------------
    @property
    def raw(self) -> bytes:
        if self._joined is None:
            joined = b"".join(self.pieces())
            if not self._edited:
                self._received = (joined,)  # unchanged: the pieces can go
            self._head, self._body, self._joined = None, (joined,), joined
        return self._joined

    def pieces(self) -> list:
        """The current message as bytes-like pieces, in order, without joining them."""
        if self._joined is not None:
            return [self._joined]
        return ([self._head] if self._head else []) + list(self._body)

    @property
    def received(self) -> bytes:
        """The message exactly as received, whatever rules changed since."""
        if len(self._received) == 1 and isinstance(self._received[0], bytes):
            return self._received[0]
        return b"".join(self._received)

    @property
    def size(self) -> int:
        if self._joined is not None:
            return len(self._joined)
        return len(self._head or b"") + sum(map(len, self._body))

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def header_end(self) -> int:
        """Offset of the first body byte (just past the blank line), or len(raw) if none."""
        return len(self._header_block())

    def _header_block(self) -> bytes:
        """The header fields and the blank line (all of a message without one), split off."""
        if self._head is None:
            first = self._body[0] if self._body else b""
            end = _header_end(first)
            if end == len(first) and len(self._body) > 1:  # headers beyond the first piece
                self.raw  # noqa: B018 - join, then split the one piece
                first = self._body[0]
                end = _header_end(first)
            view = memoryview(first)
            self._head = first[:end] if type(first) is bytes else bytes(view[:end])
            rest = view[end:]
            self._body = ((rest,) if len(rest) else ()) + self._body[1:]
        return self._head

    @property
    def fields(self) -> list[HeaderField]:
        if self._fields is None:
            self._fields = list(self._parse_fields())
        return self._fields

    def _parse_fields(self):
        raw = self._header_block()
        end = len(raw)
        pos, start, name, value_parts = 0, None, None, []
        while pos < end:
            nl = raw.find(b"\r\n", pos, end)
            nl = end if nl < 0 else nl
            line = raw[pos:nl]
            nxt = min(nl + 2, end)
            if not line:
                break
            if line[:1] in (b" ", b"\t") and start is not None:
                value_parts.append(line)
            else:
                if start is not None:
                    yield _field(name, value_parts, start, pos)
                colon = line.find(b":")
                if colon > 0 and _FIELD_NAME.match(line[:colon].rstrip()):
                    start, name, value_parts = pos, line[:colon].rstrip(), [line[colon + 1:]]
                else:  # not a header line (garbage, a "From " line): keep bytes, skip the field
                    start, name, value_parts = None, None, []
            pos = nxt
        if start is not None:
            yield _field(name, value_parts, start, pos)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field ``name`` (any case), its value stripped; ``default`` when absent."""
        lname = name.lower()
        for f in self.fields:
            if f.name.lower() == lname:
                return f.value
        return default

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [f.value for f in self.fields if f.name.lower() == lname]

    @property
    def email(self) -> EmailMessage:
        """The parsed MIME tree (parsed on first use only). Read-only: edits go through this class."""
        if self._email is None:
            self._email = email.parser.BytesParser(policy=email.policy.default).parsebytes(self.raw)
        return self._email

    # --- editing -----------------------------------------------------------------------
    def prepend_header(self, name: str, value: str) -> None:
        """Add ``Name: value`` above every other field (the way trace headers go)."""
        line = _field_line(name, value)
        head = self._header_block()
        fields = self._fields
        self._put_on_top(line, head)
        if fields is not None and name.isascii() and head[:1] not in (b" ", b"\t"):
            # The fields read already stay read, moved down by the new line (what parsing
            # the new block would give; a leading continuation line would change it).
            n = len(line)
            self._fields = [HeaderField(name, value.strip(), 0, n)] + [
                HeaderField(f.name, f.value, f.start + n, f.end + n) for f in fields]
        self.changes.append(Change("add", name, None, value, self._current_rule))

    def prepend_fields(self, fields: list[tuple[str, str]]) -> None:
        """Add ``[(name, value), ...]`` above every other field, in that order, as one edit:
        every field is checked first, so a bad one raises ValueError and nothing changes.
        Unlike ``prepend_header``, a value may be folded (CRLF, then a space or tab, then
        text on that line), as signature fields are; other CR, LF and NUL are refused."""
        lines = [_folded_field_line(name, value) for name, value in fields]
        if not lines:
            return
        self._put_on_top(b"".join(lines))
        self.changes.extend(Change("add", name, None, " ".join(value.split()), self._current_rule)
                            for name, value in fields)

    def remove_header(self, name: str) -> int:
        """Delete every instance of ``name``; returns how many went."""
        gone = [f for f in self.fields if f.name.lower() == name.lower()]
        if gone:
            self._splice([(f.start, f.end, b"") for f in gone])
            for f in gone:
                self.changes.append(Change("remove", name, f.value, None, self._current_rule))
        return len(gone)

    def remove_authentication_results(self, authserv_id: str) -> int:
        """Delete the ``Authentication-Results`` fields that claim ``authserv_id`` (matched
        without case), as a border MTA must for its own id (RFC 8601 §5); others stay.
        Returns how many went. Without such a field nothing is parsed and the bytes stay
        exactly as they are."""
        if not _AUTH_RESULTS_LINE.search(self._header_block()):
            return 0
        wanted = authserv_id.strip().rstrip(".").lower()
        gone = [f for f in self.fields if f.name.lower() == AUTH_RESULTS.lower()
                and (authserv_id_of(f.value) or "").rstrip(".").lower() == wanted]
        if gone:
            self._splice([(f.start, f.end, b"") for f in gone])
            for f in gone:
                self.changes.append(Change("remove", AUTH_RESULTS, f.value, None, self._current_rule))
        return len(gone)

    def replace_header(self, name: str, value: str) -> None:
        """Give the first ``name`` field a new value in place and drop the others; add if absent."""
        found = [f for f in self.fields if f.name.lower() == name.lower()]
        if not found:
            self.prepend_header(name, value)
            return
        first = found[0]
        edits = [(first.start, first.end, _field_line(first.name, value))]
        edits += [(f.start, f.end, b"") for f in found[1:]]
        self._splice(edits)
        self.changes.append(Change("replace", name, first.value, value, self._current_rule))

    def edit_header(self, name: str, edit, *, first: bool = False) -> int:
        """Give fields named ``name`` (every instance, or the first only) new values in place.

        ``edit(value)`` gets the value exactly as written after the colon (leading space and
        folding included, final CRLF not) and returns the new value written the same way, or
        None to leave that field alone. The field keeps its place and its name as written; only
        its own lines change. CR and LF in a new value are allowed only as folding (CRLF, then
        space or tab, then text on that line) and NUL never: a bad value raises ValueError and
        nothing changes (no header injection). Returns how many fields changed."""
        found = [f for f in self.fields if f.name.lower() == name.lower()]
        edits, changes = [], []
        for f in found[:1] if first else found:
            line = self._header_block()[f.start:f.end]
            colon = line.index(b":") + 1
            body_end = len(line) - 2 if line.endswith(b"\r\n") else len(line)
            old = line[colon:body_end].decode("utf-8", "surrogateescape")
            new = edit(old)
            if new is None or new == old:
                continue
            if _BAD_FOLDING.search(new):
                raise ValueError(f"new value for {f.name} holds CR, LF or NUL outside folding")
            data = line[:colon] + new.encode("utf-8", "surrogateescape") + line[body_end:]
            edits.append((f.start, f.end, data))
            changes.append(Change("edit", f.name, f.value, new.strip(), self._current_rule))
        if edits:
            self._splice(edits)
            self.changes.extend(changes)
        return len(edits)

    def replace_raw(self, raw: bytes, reason: str) -> None:
        """For rules that rebuild the body (e.g. stripping a part): new bytes, one change entry."""
        if not isinstance(raw, bytes):
            raise TypeError("replace_raw takes bytes")
        self._set_raw(raw)
        self.changes.append(Change("body", "(body)", None, reason, self._current_rule))

    def replace_ranges(self, edits: list[tuple[int, int, bytes]], reason: str) -> None:
        """Splice: each ``(start, end, new)`` puts ``new`` in place of ``raw[start:end]``; every
        byte outside those ranges stays as it is. Ranges refer to the current ``raw`` and must
        not overlap. One change entry (for the trace) with ``reason``."""
        edits = sorted(edits, key=lambda e: (e[0], e[1]))
        end = 0
        for start, stop, new in edits:
            if not isinstance(new, bytes):
                raise TypeError("replace_ranges takes bytes")
            if not (isinstance(start, int) and isinstance(stop, int)
                    and end <= start <= stop <= self.size):
                raise ValueError(f"bad or overlapping range [{start}, {stop})")
            end = stop
        self._splice(edits)
        self.changes.append(Change("body", "(body)", None, reason, self._current_rule))

    def quarantine_original(self, reason: str) -> None:
        """Keep the message as it was received in the quarantine, and carry on: the rest of
        the pipeline runs and what the rules leave is relayed. The gate stores the copy just
        before relaying and drops it again if the downstream does not take the message (the
        client will retry). For a rule that strips a part but wants the original kept."""
        self.held.append(str(reason))

    # --- for the pipeline: undo a shadow rule's edits ----------------------------------
    def checkpoint(self) -> tuple[tuple, int, int]:
        return (self._head, self._body, self._joined), len(self.changes), len(self.held)

    def rollback(self, mark: tuple[tuple, int, int]) -> None:
        state, n, held = mark
        if any(a is not b for a, b in zip(state, (self._head, self._body, self._joined))):
            self._head, self._body, self._joined = state
            self._fields, self._email = None, None
        del self.changes[n:]
        del self.held[held:]

    def _set_raw(self, raw: bytes) -> None:
        self._head, self._body, self._joined = None, (raw,), raw
        self._fields, self._email, self._edited = None, None, True

    def _put_on_top(self, lines: bytes, head: bytes | None = None) -> None:
        """Insert whole field lines above every field (``head``: the header block, when the
        caller has it). A header section that starts with continuation lines (invalid, RFC
        5322 §2.2.3, yet seen in real mail) keeps them first: under a new field they would
        become its continuation, and a client could write into a field the gate vouches for
        (`` ; dkim=pass`` onto its Authentication-Results)."""
        if head is None:
            head = self._header_block()
        at = _orphan_lines_end(head) if head[:1] in (b" ", b"\t") else 0
        self._set_head(head[:at] + lines + head[at:] if at else lines + head)

    def _set_head(self, head: bytes) -> None:
        # (its callers read the header block first: the body is split off)
        self._head, self._joined = head, None
        self._fields, self._email, self._edited = None, None, True

    def _splice(self, edits: list[tuple[int, int, bytes]]) -> None:
        """Put each ``new`` in place of ``[start, end)``; within the header block only the
        header block is rebuilt, else the message once, from views (no slice copies)."""
        head = self._header_block()
        in_head = all(end <= len(head) for _, end, _ in edits)
        view = memoryview(head if in_head else self.raw)
        out, pos = [], 0
        for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
            out += [view[pos:start], new]
            pos = end
        out.append(view[pos:])
        joined = b"".join(out)
        del out, view
        if in_head:
            self._set_head(joined)
        else:
            self._set_raw(joined)


def describe_changes(changes) -> str:
    """``edit From; add X-External; remove Received (2)`` — for trace reasons and logs."""
    if type(changes) is list and len(changes) == 1:  # one edit, the usual case: no counting
        return f"{changes[0].op} {changes[0].header}"
    counts: dict[tuple[str, str], int] = {}
    for c in changes:
        key = (c.op, c.header)
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{op} {header}" + (f" ({n})" if n > 1 else "") for (op, header), n in counts.items())


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an ``Authentication-Results`` value (RFC 8601 §2.2): the first
    token or quoted-string, after any CFWS (white space, folding, nested comments). None
    when the value does not start with one."""
    pos = _skip_cfws(value, 0)
    if pos is None or pos >= len(value):
        return None
    if value[pos] == '"':
        out, pos = [], pos + 1
        while pos < len(value):
            c = value[pos]
            if c == "\\" and pos + 1 < len(value):
                out.append(value[pos + 1])
                pos += 2
            elif c == '"':
                return "".join(out)
            elif c not in "\r\n":
                out.append(c)
                pos += 1
            else:
                pos += 1
        return None
    m = _TOKEN.match(value, pos)
    return m.group(0) if m else None


def _skip_cfws(text: str, pos: int) -> int | None:
    """The offset past white space and (nested, quoted-pair aware) comments; None if a
    comment never closes."""
    depth = 0
    while pos < len(text):
        c = text[pos]
        if c == "\\" and depth:
            pos += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and c not in " \t\r\n":
            return pos
        pos += 1
    return None if depth else pos

def _orphan_lines_end(head: bytes) -> int:
    """The offset past the continuation lines (space or tab first) a header section opens
    with: 0 for a well-formed one."""
    pos = 0
    while head[pos:pos + 1] in (b" ", b"\t"):
        nl = head.find(b"\r\n", pos)
        pos = len(head) if nl < 0 else nl + 2
    return pos


def _header_end(raw: bytes) -> int:
    if raw.startswith(b"\r\n"):
        return 2
    i = raw.find(b"\r\n\r\n")
    return len(raw) if i < 0 else i + 4


def _field(name: bytes, parts: list[bytes], start: int, end: int) -> HeaderField:
    value = b"\r\n".join(parts).decode("utf-8", "surrogateescape").strip()
    return HeaderField(name.decode("ascii", "replace"), value, start, end)


def check_folded_field(name: str, value: str) -> None:
    """ValueError unless ``Name: value`` is one field: a good name, CR and LF only as
    folding (CRLF, white space, text), no NUL."""
    _folded_field_line(name, value)


def _folded_field_line(name: str, value: str) -> bytes:
    if not isinstance(name, str) or not isinstance(value, str):
        raise ValueError("a header field's name and value are text")
    if not _FIELD_NAME_TEXT.match(name):
        raise ValueError(f"bad header name {name!r}")
    if _BAD_FOLDING.search(value) or value.endswith(("\r", "\n")):
        raise ValueError(f"header value for {name} holds CR, LF or NUL outside folding")
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def _field_line(name: str, value: str) -> bytes:
    """One header field, refusing anything that could start a new line or field."""
    if not _FIELD_NAME_TEXT.match(name):
        raise ValueError(f"bad header name {name!r}")
    if _UNSAFE.search(value):
        raise ValueError(f"header value for {name} holds CR, LF or NUL")
    return f"{name}: {value}\r\n".encode("utf-8")
