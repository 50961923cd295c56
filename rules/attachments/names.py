"""File names as mail readers end up seeing them: MIME parameters (RFC 2045 with the usual
sloppiness, RFC 2231 continuations and charsets, RFC 2047 encoded words), then the Windows
view of a name (last path component, trailing dots and spaces ignored, any case) with the
Unicode tricks (bidi overrides, invisible characters) taken out.

Where readers could disagree, every reading is kept: a name is banned if any of them is.
"""
from __future__ import annotations

import binascii
import codecs
import re
import unicodedata

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_SECTION = re.compile(r"^(.*?)\*(\d{1,4})(\*?)$")
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c")
# Characters that render as nothing but are not Unicode "format" (Cf) characters.
_INVISIBLE_EXTRA = set("\u115f\u1160\u3164\uffa0\u2800\u034f")
NAME_KEYS = ("filename", "name")
MAX_PARAMS = 200  # per header field: anything past this is noise


def decode_charset(data: bytes, charset: str | None) -> str:
    charset = (charset or "").strip().strip('"').lower() or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words, anywhere in ``text`` (readers decode them in parameters too)."""
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub(r"\1\2", text)

    def one(m: re.Match) -> str:
        charset, enc, payload = m.group(1), m.group(2).lower(), m.group(3)
        raw = payload.encode("ascii", "replace")
        if enc == "b":
            raw += b"=" * (-len(raw) % 4)
            try:
                data = binascii.a2b_base64(raw)
            except (binascii.Error, ValueError):
                return m.group(0)
        else:
            data = _PERCENT.sub(lambda h: "=" + h.group(1), payload.replace("_", " ")).encode(
                "ascii", "replace")
            try:
                data = binascii.a2b_qp(data)
            except (binascii.Error, ValueError):
                return m.group(0)
        return decode_charset(data, charset)

    return _ENCODED_WORD.sub(one, text)


def split_params(value: str) -> tuple[str, list[tuple[str, str, str]]]:
    """``type/sub; k=v; k2="q v"`` -> head, [(key, value, rest_of_field)]. Never raises.

    ``rest_of_field`` is everything after the ``=`` to the end of the field, quotes dropped:
    one more reading of an unquoted or sloppily quoted value (``name=a.txt;.exe``)."""
    n, i = len(value), value.find(";")
    head = (value if i < 0 else value[:i]).strip()
    params: list[tuple[str, str, str]] = []
    if i < 0:
        return head, params
    i += 1
    while i < n and len(params) < MAX_PARAMS:
        while i < n and value[i] in " \t;":
            i += 1
        eq = value.find("=", i)
        semi = value.find(";", i)
        if eq < 0 or (0 <= semi < eq):  # a parameter without a value: skip it
            if semi < 0:
                break
            i = semi + 1
            continue
        key = value[i:eq].strip().lower()
        i = eq + 1
        while i < n and value[i] in " \t":
            i += 1
        rest = value[i:].replace('"', "").strip()
        if i < n and value[i] == '"':
            quoted, i = _quoted(value, i + 1)
            i += 1  # the closing quote (or the end)
            semi = value.find(";", i)
            tail = (value[i:] if semi < 0 else value[i:semi]).strip()
            val = quoted + tail.replace('"', "")  # junk after the quote: readers glue it on
            i = n if semi < 0 else semi + 1
        else:
            semi = value.find(";", i)
            val = (value[i:] if semi < 0 else value[i:semi]).strip()
            i = n if semi < 0 else semi + 1
        if key:
            params.append((key, val, rest))
    return head, params


def _quoted(value: str, i: int) -> tuple[str, int]:
    """The quoted string starting at ``i`` (after its opening quote), backslash escapes
    undone, and where its closing quote is (or the end)."""
    close = value.find('"', i)
    close = len(value) if close < 0 else close
    if "\\" not in value[i:close]:  # nothing escaped: what _quoted_loop gives, in C
        return value[i:close], close
    return _quoted_loop(value, i)


def _quoted_loop(value: str, i: int) -> tuple[str, int]:
    n, out = len(value), []
    while i < n and value[i] != '"':
        if value[i] == "\\" and i + 1 < n:
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out), i


def parse_params(value: str) -> tuple[str, dict[str, list[str]]]:
    """The lower-cased head and every value of every parameter: RFC 2231 sections joined in
    numeric order (``*10`` after ``*9``) and decoded; encoded words decoded."""
    return _params(*split_params(value))


def _params(head: str, raw: list[tuple[str, str, str]]) -> tuple[str, dict[str, list[str]]]:
    out: dict[str, list[str]] = {}
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    for key, val, _rest in raw:
        m = _SECTION.match(key)
        if m:
            base, num, enc = m.group(1), int(m.group(2)), bool(m.group(3))
            sections.setdefault(base, {}).setdefault(num, (val, enc))
        elif key.endswith("*"):
            out.setdefault(key[:-1], []).append(_rfc2231([(val, True)]))
        else:
            out.setdefault(key, []).append(decode_words(val))
    for base, secs in sections.items():
        out.setdefault(base, []).append(_rfc2231([secs[k] for k in sorted(secs)]))
    return head.lower(), out


def _rfc2231(sections: list[tuple[str, bool]]) -> str:
    charset = None
    chunks: list[bytes] = []
    for n, (val, encoded) in enumerate(sections):
        if encoded:
            if n == 0 and val.count("'") >= 2:
                charset, _lang, val = val.split("'", 2)
            chunks.append(_unpercent(val))
        else:
            chunks.append(val.encode("utf-8", "surrogateescape"))
    return decode_words(decode_charset(b"".join(chunks), charset))


def _unpercent(text: str) -> bytes:
    out, i = bytearray(), 0
    raw = text.encode("utf-8", "surrogateescape")
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25 and i + 2 < n and _is_hex(raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


def raw_names(field_values: list[str]) -> list[str]:
    """Every reading of ``filename``/``name`` in these Content-Type / Content-Disposition
    field values (both keys in both fields: senders mix them up)."""
    names: list[str] = []
    for value in field_values:
        head, raw = split_params(value)
        _head, params = _params(head, raw)
        for key in NAME_KEYS:
            names.extend(params.get(key, ()))
        for key, val, rest in raw:
            base = key.split("*", 1)[0]
            if base in NAME_KEYS and rest != val:
                names.append(decode_words(rest))
    return [n for n in dict.fromkeys(names) if n.strip()]


# --- the Windows view of a name ---------------------------------------------------------
def has_bidi(name: str) -> bool:
    return any(c in BIDI_CONTROLS for c in name)


def _clean(name: str) -> str:
    out = []
    for c in name:
        cat = unicodedata.category(c)
        if cat == "Cf" or c in _INVISIBLE_EXTRA:
            continue  # bidi controls, zero-width characters, BOM, soft hyphen...
        if cat == "Zs":
            c = " "
        out.append(c)
    return "".join(out)


def variants(name: str) -> list[str]:
    """The names a reader might save the file under, lower-cased (several where in doubt)."""
    base = re.split(r"[/\\]", name)[-1] if name else name
    if base.isascii() and base.isprintable():
        # What _variants makes of printable ASCII (no controls, nothing NFKC maps, no format
        # characters, only " " as a space): one variant.
        base = base.rstrip(" .\t")
        return [base.casefold()] if base else []
    return _variants(base)


def _variants(base: str) -> list[str]:
    found = []
    for candidate in (base, base.split("\x00", 1)[0], re.split(r"[\x00-\x1f\x7f]", base, 1)[0]):
        for form in (candidate, unicodedata.normalize("NFKC", candidate)):
            cleaned = _clean(form)
            cleaned = re.sub(r"[\x00-\x1f\x7f]", "", cleaned)
            cleaned = cleaned.rstrip(" .\t")  # Windows drops trailing dots and spaces
            if cleaned:
                found.append(cleaned.casefold())
    return list(dict.fromkeys(found))


def extensions(variant: str) -> list[str]:
    """``report.pdf.exe`` -> ["exe", "pdf.exe"]: the last extension, and the last two."""
    parts = variant.split(".")
    if len(parts) < 2:
        return []
    out = [parts[-1].strip()]
    if len(parts) >= 3:
        out.append(parts[-2].strip() + "." + parts[-1].strip())
    return out


def display(name: str, limit: int = 120) -> str:
    """A name safe to show in a note or a log: controls and bidi tricks made visible."""
    text = name if name.isascii() and name.isprintable() else _visible(name)  # (ASCII: as is)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _visible(name: str) -> str:
    out = []
    for c in name:
        cat = unicodedata.category(c)
        if cat in ("Cc", "Cf", "Zl", "Zp") or c in _INVISIBLE_EXTRA:
            out.append(f"<U+{ord(c):04X}>")
        else:
            out.append(c)
    return "".join(out)
