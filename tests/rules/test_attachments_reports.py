"""The attachments rule's reports, pinned (issue 13): ``scan`` of every message under
tests/data (as stored and CRLF-only), of the shortcut tests' base64 and footer messages, of
plain messages made of many header blocks and bodies (smtp-source's X lines, prose, uuencode,
yEnc, hidden MIME headers, headerless base64 of an exe, a disk image, text) and of seeded
random edits of them, hashed with their MIME structure (every part's offsets, type,
parameters, encodings and header fields). An exact speed-up leaves the hash as it was: it
was recorded on main 3e0eb91, before the round that made the plain message's path faster.

A change meant to alter what the rule reports or parses records the new hash:
    .venv/bin/python -m tests.rules.test_attachments_reports
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tests.rules.test_attachments_fastpaths import base64_messages, begin_at, footer_messages
from tests.support import attachment_samples as S

from smtpgate_rules.attachments import CONTENT_KINDS, DEFAULT_EXTENSIONS, DEFAULT_TYPES
from smtpgate_rules.attachments.mime import Limits, parse
from smtpgate_rules.attachments.scan import Settings, scan

RECORDED = ("9a82b6082dc32448445a17cf2b4da480b3569d6e96ef2ce609a3c60811200533", 8954)  # main 3e0eb91
DATA = Path(__file__).resolve().parent.parent / "data"
SETTINGS = (Settings(extensions=frozenset(DEFAULT_EXTENSIONS), allowed_extensions=frozenset(),
                     types=tuple(DEFAULT_TYPES), content=frozenset(CONTENT_KINDS)),
            Settings(extensions=frozenset(DEFAULT_EXTENSIONS), allowed_extensions=frozenset(),
                     types=tuple(DEFAULT_TYPES), content=frozenset(CONTENT_KINDS),
                     limits=Limits(3, 5, 120)))  # (the limits' edges: parts, depth, header size)
HEAD = (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\n"  # smtp-source's, as in bench
        b"Date: Mon, 30 Nov 2026 12:00:00 +0000 (UTC)\r\nMessage-Id: <50d4.0003.0000@vm>")
X_LINES = b"\r\n".join(b"%d" % (i % 10) + b"X" * 77 for i in range(1, 129)) + b"\r\n"
_WORDS = b"the quick brown fox jumps over the lazy dog; begun beginning? no. -- content: "
PROSE = b"\r\n".join(_WORDS[i % 40:i % 40 + 70] for i in range(140)) + b"\r\n"
UU = b"begin 644 evil.exe\r\nM" + b"!" * 60 + b"\r\n`\r\nend\r\n"
BODIES = {
    "x lines": X_LINES, "prose": PROSE, "empty": b"", "crlf": b"\r\n", "short": b"hi\r\n",
    "uu at the end": PROSE + UU, "uu first": UU + PROSE,
    "yenc": PROSE + b"=ybegin line=128 size=3 name=x.exe\r\nabc\r\n",
    "hidden": PROSE + b"Content-Type: application/octet-stream; name=\"x.exe\"\r\n\r\nTVqQ\r\n",
    "hidden first": b"content-disposition: attachment;\r\n filename=x.scr\r\n" + PROSE,
    "b64 exe": S.b64(S.pe() + bytes(3000)), "b64 text": S.b64(PROSE * 3), "b64 uu": S.b64(begin_at(5)),
    "b64 vhd": S.b64(bytes(3000) + S.vhd_fixed()[-512:]),
    "x lines + uu": X_LINES + b"begin 644 a.exe\r\nM!!\r\nend\r\n",
    "x lines + begin's base64": X_LINES[:-10] + b"YmVnaW4g" + X_LINES[-2:], "x lines x5": X_LINES * 5,
    "x lines + bidi": X_LINES + b"name=\xe2\x80\xaeexe.txt",
}
HEADS = {
    "plain": HEAD, "type": HEAD + b"\r\nContent-Type: text/plain; charset=utf-8",
    "named": HEAD + b"\r\nContent-Type: application/octet-stream; name=\"a.pdf\"",
    "attachment": HEAD + b"\r\nContent-Disposition: attachment; filename=\"r\xc3\xa9sum\xc3\xa9.exe\"",
    "7bit": HEAD + b"\r\nContent-Transfer-Encoding: 7bit",
    "base64": HEAD + b"\r\nContent-Transfer-Encoding:  Base64 ",
    "qp": HEAD + b"\r\nContent-Transfer-Encoding: quoted-printable",
    "unknown encoding": HEAD + b"\r\nContent-Transfer-Encoding: x-weird",
    "two encodings": HEAD + b"\r\nContent-Transfer-Encoding: 7bit\r\nContent-Transfer-Encoding: base64",
    "folded": b"Subject: a\r\n  b \t\r\n\tc\r\nContent-Type: text/plain;\r\n name=x.exe",
    "blanks": b"Subject : \t a b \t \r\nX-A:\r\nX-B:  ",
    "latin-1": b"Subject: \xa0caf\xe9 \x85\r\nContent-Type: text/plain; name=\"\xe9.exe\"",
    "unicode spaces": b"Subject: \xc2\xa0x\xc2\xa0\r\nX-U: \xe2\x80\x83y\xe2\x80\x83 ",
    "controls": b"Subject: \x0bx\x0c \x1c\r\nX: \x1f", "mixed breaks": b"A: 1\nB: 2\r\nC: 3\n",
    "bare CR": b"A: 1\rB: 2", "no field": HEAD + b"\r\nnot a field",
    "mbox": b"From someone Mon Jan 1\r\n" + HEAD, "continuation first": b" x\r\n" + HEAD,
    "multipart": HEAD + b"\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n",
    "rfc822": HEAD + b"\r\nContent-Type: message/rfc822",
}
EDITS = (b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"=", b"-", b"begin ", b"\xa0", b"\xc3", b"\x85",
         b"Content-Type: a/b; name=x.exe\r\n", b"--zz", b"--zz--", b"Y", b"Z", b"MZ", b"\x00", b"X" * 70)


def messages():
    for path in sorted(DATA.rglob("*")):
        if path.is_file():
            raw = path.read_bytes()
            yield raw
            yield raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    for cases in (base64_messages(), footer_messages()):
        yield from (raw for _, raw in cases)
    made = [head + b"\r\n\r\n" + body for head in HEADS.values() for body in BODIES.values()]
    made += [m.replace(b"\r\n", b"\n") for m in made]
    made += [head + b"\r\n" for head in HEADS.values()]  # (no blank line, no body)
    yield from made
    rnd = random.Random(13)
    for _ in range(3000):
        m = bytearray(rnd.choice(made))
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randint(0, len(m))
            if rnd.random() < 0.3:
                del m[pos:pos + rnd.randint(1, 8)]
            else:
                m[pos:pos] = rnd.choice(EDITS)
        yield bytes(m)


def report_text(raw: bytes, settings: Settings) -> str:
    structure = parse(raw, settings.limits)
    parts = [(p.path, p.start, p.body, p.end, p.ctype, p.params, p.cte, p.gaps, p.spliceable,
              [(f.name, f.value, f.start, f.end) for f in p.fields]) for p in structure.root.walk()]
    r = scan(raw, settings)
    return repr((parts, structure.parts, structure.defects, structure.untrusted,
                 [(f.part.path, f.name, f.reasons, f.gap) for f in r.findings], r.untrusted,
                 r.defects, r.parts))


def digest() -> tuple[str, int]:
    h, count = hashlib.sha256(), 0
    for raw in messages():
        for settings in SETTINGS:
            h.update(report_text(raw, settings).encode("utf-8", "backslashreplace") + b"\n")
            count += 1
    return h.hexdigest(), count


def test_reports_are_as_recorded():
    assert digest() == RECORDED


if __name__ == "__main__":
    print(digest())
