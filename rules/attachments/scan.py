"""Find the banned parts of a message: names, declared types, contents, archives, nesting.

``scan(raw, settings)`` walks the MIME tree (``_attachments_mime``) and returns a ``Report``:
the banned parts with their reasons, and why the structure cannot be trusted, if it cannot.
It never raises on bad input; an unexpected error inside one file's inspection makes that
file uninspectable (so it is blocked unless ``uninspectable: allow``), never passed unseen.
"""
from __future__ import annotations

import base64
import functools
import itertools
import logging
import re
from dataclasses import dataclass, field

from . import archives
from .content import (CONTAINERS, DESCRIPTIONS, FOOTER_SIGNATURES, HEAD, OPAQUE, SNIFF_WINDOWS,
                      inspect_ole, parse_tnef, sniff)
from .mime import (END_HEAD, END_TAIL, TAIL_CHARS, Limits, Part, base64_ends, base64_of_every_occurrence,
                   base64_sample, contents, decode_base64, decode_uu, headerless_base64,
                   mostly_long_lines, parse)
from .names import display, extensions, has_bidi, raw_names, variants

log = logging.getLogger("smtpgate.rule.attachments")

_UU_BEGIN = re.compile(rb"(?m)^begin(?:-base64)? [0-7]{3,4} ([^\r\n]+)")
_YENC_BEGIN = re.compile(rb"(?m)^=ybegin [^\r\n]*?name=([^\r\n]+)")
_BEGIN = re.compile(rb"begin")
_HIDDEN = (b"content-type", b"content-disposition")
_LINE_OF_CONTENT = re.compile(rb"(?i)\ncontent-")  # what both _HIDDEN start with, on a new line
#: The base64 of every 3-byte piece of "begin": one of them is in any base64 stream whose
#: decoding holds "begin" (see ``_Scanner.base64_is_inert``).
_BEGIN_QUANTA = tuple(base64.b64encode(b"begin"[k:k + 3]) for k in range(3))
_BEGIN_LEADS = tuple(dict.fromkeys(q[:1] for q in _BEGIN_QUANTA))  # ("Y", "Z": one search each)
#: Base64 this short is simply decoded (the shortcut pays off on longer bodies).
_SHORT_BASE64 = 2048
#: Where sniff's first window past the first 512 bytes starts (the ISO/UDF descriptors):
#: data no longer than this is read there by none (``_Scanner._ends_are_inert``).
_ISO_START = min(start for start, _ in SNIFF_WINDOWS if start > 0)
#: the base64 of what sniff looks for in a footer (VHD, DMG), however it falls into groups
_FOOTER_QUANTA = tuple(q for sig in dict.fromkeys(sig for _, sig in FOOTER_SIGNATURES)
                       for q in base64_of_every_occurrence(sig))
#: _ends_are_inert's stand-in: the first 512 bytes, then zeros where sniff reads a footer
_FOOTER_ZEROS = bytes(-SNIFF_WINDOWS[1][0])
# _ends_are_inert's proof takes sniff's first window for the bytes base64_ends decodes, its
# footer window for bytes inside the end whose characters base64_ends gives, and the others
# for windows past both: a change to the windows must keep that (or change the proof).
if not (SNIFF_WINDOWS[0] == (0, END_HEAD) and -END_TAIL <= SNIFF_WINDOWS[1][0] < SNIFF_WINDOWS[1][1] < 0
        and all(start >= END_HEAD for start, _ in SNIFF_WINDOWS[2:])):
    raise AssertionError(f"sniff's windows {SNIFF_WINDOWS} break _Scanner._ends_are_inert's proof")


def _footer_chars() -> slice:
    """Where the characters whose groups hold sniff's footer signatures are, among a stream's
    last characters (base64_ends' tail): for each count of characters mod 4 (how the stream
    ends: whole groups, a dangling character, 2 or 3 left), the groups of the decoding's
    bytes at each signature's offset from its end, counted back from the last character.
    Any of _FOOTER_QUANTA that the decoding holds there lies in these characters."""
    far, near = 0, None
    for rest in range(4):
        groups = 1000  # (any count far over the footer's reach)
        count, size = 4 * groups + rest, 3 * groups + (0, 0, 1, 2)[rest]
        for offset, sig in FOOTER_SIGNATURES:
            first, last = size + offset, size + offset + len(sig) - 1  # the signature's bytes
            start, end = 4 * (first // 3), 4 * (last // 3) + 4  # their groups' characters
            far = max(far, count - start)
            near = count - end if near is None else min(near, count - end)
    return slice(-far, -near)


#: the characters of base64_ends' tail that can hold one of _FOOTER_QUANTA (its last 686
#: to 668: 18 characters, where the whole tail is 704 or more)
_FOOTER_CHARS = _footer_chars()
if -_FOOTER_CHARS.start > TAIL_CHARS:
    raise AssertionError("sniff's footer window lies beyond base64_ends' tail")
_FOOTER_QUANTUM = re.compile(b"|".join(re.escape(q) for q in _FOOTER_QUANTA))


def footer_holds_quanta(tail: bytes) -> bool:
    """Whether the characters of base64_ends' ``tail`` where sniff's footer lies
    (_FOOTER_CHARS) hold one of _FOOTER_QUANTA: one search there, no copy."""
    size = len(tail)
    return _FOOTER_QUANTUM.search(tail, size + _FOOTER_CHARS.start, size + _FOOTER_CHARS.stop) is not None


_COMPRESSED_SUFFIX = {".gz": "", ".gzip": "", ".tgz": ".tar", ".taz": ".tar", ".bz2": "",
                      ".tbz": ".tar", ".tbz2": ".tar", ".xz": "", ".txz": ".tar", ".z": ""}


@dataclass
class Settings:
    extensions: frozenset
    allowed_extensions: frozenset
    types: tuple
    content: frozenset
    block_bidi: bool = True
    block_encrypted: bool = True
    block_macros: bool = True
    block_uninspectable: bool = True
    archive_depth: int = 3
    archive_max_entries: int = 10_000
    archive_max_size: int = 100 * 1024 * 1024
    archive_max_ratio: float = 100.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        # banned types as a set and a prefix tuple ("type/*" -> "type/"): built once, at load
        self.exact_types = frozenset(self.types)
        self.type_prefixes = tuple(t[:-1] for t in self.types if t.endswith("/*"))


@dataclass
class Finding:
    part: Part
    name: str                                   # the file name as shown, or ""
    reasons: list[str]
    gap: tuple[int, int] | None = None          # a preamble/epilogue range instead of the part


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    untrusted: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    parts: int = 0


def scan(raw: bytes, settings: Settings) -> Report:
    structure = parse(raw, settings.limits)
    # (the structure is the caller's no more: the report takes its lists, no copies)
    report = Report(untrusted=structure.untrusted, defects=structure.defects, parts=structure.parts)
    scanner = _Scanner(settings)
    root = structure.root
    if not root.children:  # a single part (most mail): no walk, one buffer
        reasons, name = scanner.part(root)
        if reasons:
            report.findings.append(Finding(root, name, reasons))
        report.findings.extend(scanner.hidden([root]))
        return report
    buffers: dict[int, list[Part]] = {}
    for part in root.walk():
        buffers.setdefault(id(part.buf), []).append(part)
        reasons, name = scanner.part(part)
        if reasons:
            report.findings.append(Finding(part, name, reasons))
    for parts in buffers.values():
        report.findings.extend(scanner.hidden(parts))
    return report


class _Scanner:
    def __init__(self, settings: Settings):
        self.s = settings

    @functools.cached_property
    def budget(self) -> archives.Budget:
        """The message's archive budget, made when its first archive is opened (most mail has none)."""
        s = self.s
        return archives.Budget(s.archive_max_entries, s.archive_max_size, s.archive_max_ratio)

    # --- one MIME part -------------------------------------------------------------------
    def part(self, part: Part) -> tuple[list[str], str]:
        types = part.get_all("content-type")
        dispositions = part.get_all("content-disposition")
        names = raw_names(dispositions + types) if types or dispositions else []  # (no field: none)
        shown = display(names[0]) if names else ""
        reasons: list[str] = []
        for name in names:
            prefix = "" if display(name) == shown else f"{display(name)}: "
            reasons += [prefix + r for r in self.name(name)]
        declared = sorted({part.ctype, *(v.split(";", 1)[0].strip().lower() for v in types)}) \
            if types else (part.ctype,)
        for ctype in declared:
            if self._type_banned(ctype):
                reasons.append(f"declared type {ctype}")
        if part.is_message or (part.is_multipart and part.children):
            return _dedupe(reasons), shown
        disposition = dispositions[0].split(";", 1)[0].strip().lower() if dispositions else ""
        texty = part.ctype.startswith(("text/", "multipart/"))
        attachment_like = bool(names) or disposition == "attachment" or not texty
        name = names[0] if names else ""
        body = part.raw_body()
        if part.cte == ["base64"] and self.base64_is_inert(body, name, attachment_like, texty):
            datas = []  # (contents would be its decoding alone)
        else:
            datas = contents(body, part.cte)
        guess = headerless_base64(body, part.cte)  # (all three tests must hold: the cheap ones first)
        if guess is not None and not self.base64_is_inert(guess, name, attachment_like, texty) \
                and mostly_long_lines(guess):
            datas.append(decode_base64(guess))  # base64 sent without its header: sniff it too
        for data in datas:
            reasons += self.blob(data, name, 0, attachment_like, "")
            if texty:
                reasons += self.embedded_text(data)
        return _dedupe(reasons), shown

    def base64_is_inert(self, body: bytes, name: str, attachment_like: bool, texty: bool) -> bool:
        """True only when the base64 decoding of ``body`` certainly adds no reason to its part
        (what most attachments and base64-shaped text come to), proved without decoding all of
        it. False means: decode it and look, as ever. Exact, not a guess:
        - blob's sniff reads only SNIFF_WINDOWS of data not starting with "MZ", and
          base64_sample has the decoding's bytes there (and its length): same answer;
        - embedded_text finds nothing without "begin" ("=ybegin" included); "begin" at any
          offset fills a whole 3-byte group with "beg", "egi" or "gin", whose base64
          (_BEGIN_QUANTA) the characters then hold;
        - a name ending in .tar makes blob try tar on the whole data: not shortcut.
        """
        if len(body) <= _SHORT_BASE64 or _tar_by_name(name):
            return False
        # A zip, an Office file...: it will be decoded whole, don't sample it first. (Only a
        # saving, never part of the proof: it can only answer False. Text is seldom one, so
        # text skips it: its stand-in's sniff below finds a container all the same.)
        if not texty and sniff(decode_base64(body[:96]), scripts=attachment_like) is not None:
            return False
        if self._ends_are_inert(body, attachment_like, texty):
            return True
        sample = base64_sample(body, SNIFF_WINDOWS)
        if sample is None:
            return False
        stand_in, chars = sample
        if stand_in[:2] == b"MZ":
            return False
        if texty and any(q in chars for q in _BEGIN_QUANTA if q[:1] in chars):  # (memchr first)
            return False
        return sniff(stand_in, scripts=attachment_like) is None

    def _ends_are_inert(self, body: bytes, attachment_like: bool, texty: bool) -> bool:
        """base64_is_inert's proof from the body's two ends, without translating all of it
        (what a short body of base64-shaped text comes to): True only when it holds, False
        means: prove it the long way. Exact: the decoding is longer than 512 bytes (base64_ends
        wants 684 and 704 characters from the body's two ends, apart: over 1040 bytes) and
        shorter than the ISO windows (so sniff reads only its first 512 and its footer),
        its first 512 bytes are known, the tail's characters whose groups hold the footer
        (_FOOTER_CHARS) hold none of _FOOTER_QUANTA (so it holds no signature), so sniff says of it
        what it says of those 512 bytes followed by zeros; text without the first character
        of any of _BEGIN_QUANTA cannot hold them."""
        if len(body) * 3 // 4 + 2 > _ISO_START:
            return False
        if texty:
            for lead in _BEGIN_LEADS:  # (memchr each; no generator)
                if lead in body:
                    return False
        ends = base64_ends(body)
        if ends is None:
            return False
        head, tail = ends
        if head[:2] == b"MZ" or footer_holds_quanta(tail):
            return False
        return sniff(head + _FOOTER_ZEROS, scripts=attachment_like) is None

    def embedded_text(self, data: bytes) -> list[str]:
        """uuencoded and yEnc files inside a text body (some readers show them as attachments)."""
        reasons = []
        # (and so no "=ybegin"; memchr first, then the regex engine's literal search, ~40%
        # faster than bytes' own on a text's many b's)
        if b"b" not in data or _BEGIN.search(data) is None:
            return reasons
        for m in itertools.islice(_UU_BEGIN.finditer(data), 50):
            name = m.group(1).decode("utf-8", "replace").strip()
            found = list(self.name(name))
            payload = decode_uu(data[m.start():m.start() + 64 * 1024])  # enough to sniff
            found += self.blob(payload, name, 0, True, "")
            reasons += [f"uuencoded {display(name)}: {r}" for r in found]
        for m in itertools.islice(_YENC_BEGIN.finditer(data), 50):
            name = m.group(1).decode("utf-8", "replace").strip()
            reasons += [f"yEnc file {display(name)}: {r}" for r in self.name(name)]
        return reasons

    def hidden(self, parts: list[Part]) -> list[Finding]:
        """Header fields naming a banned file where no part's header is: in a text body, a
        preamble or an epilogue. A reader that splits the message otherwise would see a part."""
        buf = parts[0].buf
        # Where a header line could hide: preambles, epilogues and bodies that are not
        # base64 (whose alphabet has no ":"); every part's own header block is known.
        regions = [g for p in parts for g in p.gaps]
        regions += [(p.body, p.end) for p in parts if not p.children and "base64" not in p.cte]
        found: dict[int, Finding] = {}
        hits = 0
        for start, stop in regions:
            if not _may_hide_field(buf, start, stop):
                continue
            low = buf[start:stop].lower()
            for needle in _HIDDEN:
                pos = 0
                while hits < 10_000:
                    j = low.find(needle, pos)
                    if j < 0:
                        break
                    pos, hits, i = j + len(needle), hits + 1, start + j
                    if i > 0 and buf[i - 1:i] != b"\n":
                        continue
                    self._hidden_field(buf, i, parts, found)
        return list(found.values())

    def _hidden_field(self, buf: bytes, i: int, parts: list[Part], found: dict) -> None:
        end = buf.find(b"\n", i)
        end = len(buf) if end < 0 else end
        while end + 1 < len(buf) and buf[end + 1:end + 2] in (b" ", b"\t") and end - i < 65536:
            nxt = buf.find(b"\n", end + 1)
            end = len(buf) if nxt < 0 else nxt
        line = buf[i:end].decode("utf-8", "replace")
        value = line.split(":", 1)[1] if ":" in line else ""
        names = raw_names([value])
        reasons = [f"{display(n)}: {r}" for n in names for r in self.name(n)]
        if not reasons:
            return
        owner, gap = _owner(parts, i)
        key = id(owner) if gap is None else gap[0]
        finding = found.setdefault(key, Finding(owner, display(names[0]), [], gap))
        finding.reasons += [f"hidden MIME header: {r}" for r in reasons]

    # --- names and types -----------------------------------------------------------------
    def name(self, name: str) -> list[str]:
        reasons = []
        if self.s.block_bidi and has_bidi(name):
            reasons.append("file name holds bidi control characters")
        for v in variants(name):
            exts = extensions(v)
            if not exts or exts[0] in self.s.allowed_extensions:
                continue
            ext = exts[0]
            if ext in self.s.extensions or (ext.startswith("{") and ext.endswith("}")):
                why = "a CLSID extension" if ext.startswith("{") else f"banned extension .{ext}"
                if len(exts) > 1 and not exts[1].startswith("."):
                    why += f" (double extension .{exts[1]})"
                reasons.append(why)
        return _dedupe(reasons)

    def _type_banned(self, ctype: str) -> bool:
        return ctype in self.s.exact_types or ctype.startswith(self.s.type_prefixes)

    # --- content ---------------------------------------------------------------------------
    def blob(self, data: bytes, name: str, depth: int, attachment_like: bool, where: str) -> list[str]:
        """What is banned about one file's bytes (and, for containers, about what they hold)."""
        kind = sniff(data, scripts=attachment_like)
        if kind is None and _tar_by_name(name):
            kind = "tar" if archives.is_tar(data) else None
        if kind is None:
            return []
        if kind in DESCRIPTIONS:
            return [f"{where}content is {DESCRIPTIONS[kind]}"] if kind in self.s.content else []
        if kind in OPAQUE:
            return self._uninspectable(f"{where}{OPAQUE[kind]} archive: its contents cannot be listed")
        if depth >= self.s.archive_depth:
            return self._uninspectable(f"{where}archives nested deeper than {self.s.archive_depth}")
        label = f"{where}{display(name) or kind}: "
        try:
            return self._container(kind, data, name, depth + 1, label)
        except archives.OverLimits as e:
            return self._uninspectable(f"{label}over the inspection limits ({e}; a zip bomb?)")
        except archives.Unreadable as e:
            return self._uninspectable(f"{label}{e}")
        except Exception as e:  # a bug or a library's surprise: block it, don't pass it unseen
            log.warning("attachments: could not inspect %s", label, exc_info=True)
            return self._uninspectable(f"{label}could not be inspected ({type(e).__name__})")

    def _uninspectable(self, reason: str) -> list[str]:
        return [reason] if self.s.block_uninspectable else []

    def _container(self, kind: str, data: bytes, name: str, depth: int, label: str) -> list[str]:
        if kind == "ole":
            return self._ole(data, depth, label)
        if kind == "tnef":
            found, error = parse_tnef(data)
            reasons = self._uninspectable(f"{label}{error}") if error else []
            for names, payload in found:
                reasons += [f"{label}{display(n)}: {r}" for n in names for r in self.name(n)]
                reasons += self.blob(payload, names[0] if names else "", depth, True,
                                     f"{label}{display(names[0]) if names else 'attachment'}: ")
            return reasons
        if kind in ("gzip", "bzip2", "xz"):
            plain = archives.decompress(data, kind, self.budget)
            inner = (archives.gzip_name(data) if kind == "gzip" else None) or _strip_suffix(name)
            reasons = [f"{label}{display(inner)}: {r}" for r in self.name(inner)] if inner else []
            if (inner or "").lower().endswith(".tar") or archives.is_tar(plain):
                return reasons + self._entries(*archives.list_tar(plain, self.budget, HEAD, self._want_all),
                                               depth, label)
            return reasons + self.blob(plain, inner or "", depth, True, label)
        lister = archives.list_zip if kind == "zip" else archives.list_tar
        return self._entries(*lister(data, self.budget, HEAD, self._want_all), depth, label,
                             zip_=kind == "zip")

    def _entries(self, entries, problem, depth: int, label: str, zip_: bool = False) -> list[str]:
        reasons: list[str] = []
        if isinstance(problem, archives.OverLimits):
            reasons += self._uninspectable(f"{label}over the inspection limits ({problem}; a zip bomb?)")
        elif problem is not None:
            reasons += self._uninspectable(f"{label}{problem}")
        lowered = {n.lower() for e in entries for n in e.names}
        if zip_:
            if "java" in self.s.content and "meta-inf/manifest.mf" in lowered and any(
                    n.endswith(".class") for n in lowered):
                reasons.append(f"{label}content is {DESCRIPTIONS['java']}")
            if "msi" in self.s.content and "appxmanifest.xml" in lowered:
                reasons.append(f"{label}content is a Windows app package (APPX/MSIX)")
            if self.s.block_macros and any(n.endswith("vbaproject.bin") or n.startswith("xl/macrosheets/")
                                           for n in lowered):
                reasons.append(f"{label}Office document with macros")
        for e in entries:
            shown = display(e.names[0]) if e.names else "?"
            for n in e.names:
                reasons += [f"{label}{display(n)}: {r}" for r in self.name(n)]
            if e.encrypted and self.s.block_encrypted:
                reasons.append(f"{label}{shown}: encrypted")
            if not e.is_dir and e.data:
                reasons += self.blob(e.data, e.names[0] if e.names else "", depth, True, f"{label}{shown}: ")
        return _dedupe(reasons)

    def _want_all(self, head: bytes, name: str) -> bool:
        return sniff(head, scripts=False) in CONTAINERS or name.lower().endswith(".tar")

    def _ole(self, data: bytes, depth: int, label: str) -> list[str]:
        rep = inspect_ole(data)
        reasons = self._uninspectable(f"{label}{rep.error}") if rep.error else []
        if "macros" in rep.kinds and self.s.block_macros:
            reasons.append(f"{label}Office document with macros")
        if "msi" in rep.kinds and "msi" in self.s.content:
            reasons.append(f"{label}content is {DESCRIPTIONS['msi']}")
        if "encrypted" in rep.kinds and self.s.block_encrypted:
            reasons.append(f"{label}encrypted Office document")
        for n in rep.names:
            reasons += [f"{label}embedded {display(n)}: {r}" for r in self.name(n)]
        for n, payload in rep.embedded:
            reasons += self.blob(payload, n, depth, True, f"{label}embedded {display(n) or 'object'}: ")
        return reasons


def _may_hide_field(buf: bytes, start: int, stop: int) -> bool:
    """False when ``hidden`` cannot find a field in buf[start:stop], proved in C without
    lower-casing a copy: it only looks at a needle that starts a line (at offset 0 or after
    "\n") and lies wholly in the region, and both needles start with "content-"."""
    if buf.find(b"-", start, stop) < 0:  # (memchr)
        return False
    if start == 0 and buf[:8].lower() == b"content-":
        return True
    return _LINE_OF_CONTENT.search(buf, max(start - 1, 0), stop) is not None


def _owner(parts: list[Part], offset: int) -> tuple[Part, tuple[int, int] | None]:
    """The deepest part whose body holds ``offset``, or the multipart gap that does."""
    best = parts[0]
    for p in parts:
        if p.body <= offset < max(p.end, p.body + 1) and p.depth >= best.depth:
            best = p
    for a, b in best.gaps:
        if a <= offset < b:
            return best, (a, b)
    return best, None


def _tar_by_name(name: str) -> bool:
    found = variants(name) if name else None
    return bool(found) and found[0].endswith(".tar")


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suffix, repl in _COMPRESSED_SUFFIX.items():
        if low.endswith(suffix):
            return name[: len(name) - len(suffix)] + repl
    return ""


def _dedupe(reasons: list[str]) -> list[str]:
    return list(dict.fromkeys(reasons))
