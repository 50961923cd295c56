"""Header text for the ``rewrite`` rule: addresses inside address lists, subject tags, RFC 2047.

Everything works on a header value exactly as written (folding included) and changes only
the characters it must: an address's local part or domain, never a display name, comment,
group name, quoted string or encoded word around it. A value it cannot read with certainty
(an unterminated quote or comment, stray angle brackets) is left as it is.
"""
from __future__ import annotations

import email.header
import re

_SPECIALS = "<>@,:;."
_WSP = " \t\r\n"
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=(?=[ \t\r\n]|$)")
# Reply and forward markers a tag may follow: "Re: [EXT] hello" already carries "[EXT]".
_REPLY_MARKER = re.compile(r"(?:re|fwd?|aw|wg|sv|vs|antw|tr|rif|odp|rv)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*",
                           re.IGNORECASE)
MAX_LINE = 998


class Unreadable(Exception):
    """The value is not an address list this module can edit without guessing."""


def _tokens(text: str):
    """(kind, start, end): ws, comment, quoted, literal, a special character, or atom."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WSP:
            j = i
            while j < n and text[j] in _WSP:
                j += 1
            yield "ws", i, j
        elif c == "(":
            depth, j = 0, i
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            if depth:
                raise Unreadable("unterminated comment")
            yield "ws", i, j  # a comment counts as white space for the address
        elif c in '"[':
            close, j = '"' if c == '"' else "]", i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise Unreadable("unterminated quoted string or literal")
            yield ("quoted" if c == '"' else "literal"), i, j + 1
            j += 1
        elif c == ")":  # a comment closed that was never opened (the atom loop would not move)
            raise Unreadable("stray )")
        elif c in _SPECIALS:
            yield c, i, i + 1
            j = i + 1
        else:
            j = i
            while j < n and text[j] not in _WSP and text[j] not in _SPECIALS and text[j] not in '()"[':
                j += 1
            yield "atom", i, j
        i = j


def _units(tokens):
    """Split an address list into mailboxes: (tokens outside <>, tokens inside <> or None, is a
    group name)."""
    outside, inside, angle = [], None, False
    for tok in tokens:
        kind = tok[0]
        if angle:
            if kind == ">":
                angle = False
            elif kind == "<":
                raise Unreadable("nested angle brackets")
            else:
                inside.append(tok)
            continue
        if kind == "<":
            if inside is not None:
                raise Unreadable("two angle addresses in one mailbox")
            angle, inside = True, []
        elif kind == ">":
            raise Unreadable("stray >")
        elif kind in ",;:":
            yield outside, inside, kind == ":"
            outside, inside = [], None
        else:
            outside.append(tok)
    if angle:
        raise Unreadable("unterminated angle address")
    yield outside, inside, False


def _addr_spec(tokens, text: str):
    """((local start, end), (domain start, end), local, domain) of an addr-spec, or None."""
    sig = [t for t in tokens if t[0] != "ws"]
    if "@" not in [t[0] for t in sig] or [t[0] for t in sig].count("@") != 1:
        return None
    at = [t[0] for t in sig].index("@")
    local, domain = sig[:at], sig[at + 1:]
    if not local or not domain:
        return None
    # local: word *("." word); domain: atom *("." atom) or one literal
    if any(t[0] not in ("atom", "quoted") for t in local[::2]) \
            or any(t[0] != "." for t in local[1::2]) or local[-1][0] == ".":
        return None
    if not (len(domain) == 1 and domain[0][0] == "literal"):
        if any(t[0] != "atom" for t in domain[::2]) or any(t[0] != "." for t in domain[1::2]) \
                or domain[-1][0] == ".":
            return None
    lspan, dspan = (local[0][1], local[-1][2]), (domain[0][1], domain[-1][2])
    return (lspan, dspan, "".join(text[a:b] for _, a, b in local), "".join(text[a:b] for _, a, b in domain))


def rewrite_addresses(value: str, lookup) -> tuple[str | None, list[tuple[str, str]]]:
    """Apply ``lookup(address) -> new address or None`` to every address of an address-list
    header value. Returns the new value (None: unchanged) and the (old, new) pairs."""
    tokens = list(_tokens(value))
    edits, pairs = [], []
    for outside, inside, group_name in _units(tokens):
        if group_name:
            continue
        if inside is not None:
            colons = [i for i, t in enumerate(inside) if t[0] == ":"]
            spec = _addr_spec(inside[colons[-1] + 1:] if colons else inside, value)
        else:
            spec = _addr_spec(outside, value)
        if spec is None:
            continue
        lspan, dspan, local, domain = spec
        old = f"{local}@{domain}"
        new = lookup(old)
        if not new or new == old:
            continue
        new_local, _, new_domain = new.rpartition("@")
        if new_local != local:
            edits.append((lspan[0], lspan[1], new_local))
        if new_domain != domain:
            edits.append((dspan[0], dspan[1], new_domain))
        pairs.append((old, new))
    if not edits:
        return None, []
    out = value
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out, pairs


# --- RFC 2047 ----------------------------------------------------------------------------

def decode(value: str) -> str:
    """A header value as a reader sees it: unfolded, encoded words decoded (best effort)."""
    unfolded = re.sub(r"\r\n(?=[ \t])", "", value).strip()
    try:
        return str(email.header.make_header(email.header.decode_header(unfolded)))
    except Exception:  # unknown charsets, broken base64: the text as written is the best answer
        return unfolded


def encode_words(text: str) -> str:
    """``text`` as RFC 2047 Q-encoded words (UTF-8), each at most 75 characters, joined by spaces."""
    words, current = [], ""
    for ch in text:
        piece = "".join(_q(b) for b in ch.encode("utf-8"))
        if len("=?utf-8?q?" + current + piece + "?=") > 75:
            words.append(current)
            current = ""
        current += piece
    words.append(current)
    return " ".join(f"=?utf-8?q?{w}?=" for w in words if w)


def _q(byte: int) -> str:
    if byte == 0x20:
        return "_"
    if 0x21 <= byte <= 0x7E and chr(byte) not in "=?_()\"":
        return chr(byte)
    return f"={byte:02X}"


def header_text(value: str) -> str:
    """A configured header value as it goes on the wire: ASCII as written, otherwise encoded words."""
    return value if value.isascii() else encode_words(value)


# --- subject tags ------------------------------------------------------------------------

def has_tag(subject: str, tag: str) -> bool:
    """True when the decoded ``subject`` already starts with ``tag``, also after reply or
    forward markers (``Re: [EXT] ...``); case-insensitive."""
    s, tag = subject.lstrip().casefold(), tag.casefold()
    while True:
        if s.startswith(tag):
            return True
        m = _REPLY_MARKER.match(s)
        if not m:
            return False
        s = s[m.end():]


def add_prefix(value: str, prefix: str) -> str:
    """The Subject value (as written, after the colon) with ``prefix`` in front.

    The subject's own text and encoded words stay as they are. A plain ASCII prefix goes in as
    plain text; a prefix that must sit directly before an encoded word without a space, or a
    non-ASCII one, goes in as an encoded word (the space between two encoded words is not
    displayed)."""
    rest = value.lstrip(" \t\r\n")
    core, space = prefix.rstrip(), prefix[len(prefix.rstrip()):]
    starts_encoded = bool(_ENCODED_WORD.match(rest))
    if core.isascii() and (space or not starts_encoded):
        head = core + space
    elif starts_encoded:
        head = encode_words(core + space) + " "
    else:  # a non-ASCII tag before plain text: an encoded word must be followed by a space
        head = encode_words(core) + " "
    if not rest:
        return " " + core if core.isascii() else " " + encode_words(core)
    first_line = len("Subject: ") + len(head) + len(rest.split("\r\n", 1)[0])
    if first_line > MAX_LINE and head.endswith(" "):
        return " " + head.rstrip(" ") + "\r\n " + rest
    return " " + head + rest
