#!/usr/bin/env python3
"""Attachments rule benchmark (run by hand; not part of the tests).

Messages per second for two messages, each without and with the rule, as ratios taken in
the same run (absolute figures depend on the machine):

- ``text``: a 10 KB text/plain message (no attachment; the rule walks one part);
- ``big``: a 2 MB multipart message: a text part, a PDF-like file, a JPEG-like file and a
  zip of 20 text files, all base64 (the rule decodes and sniffs each, and lists the zip).

a. in process (default): ``smtpgate.testing.Harness`` — the whole conversation (MAIL, RCPT,
   DATA, the pipeline, the trace) with a fake downstream and no sockets, so the rule's cost is
   not hidden behind network time. This is the harsh view: the ratio is what the rule costs
   against an otherwise almost free pipeline.
b. ``--real``: the real gate (``smtpgate serve``, one worker) driven by smtplib over loopback,
   relaying to the tests' capturing downstream, ``--seconds`` per case, one connection per
   message: the ratio a client sees.

    .venv/bin/python bench/attachments_bench.py
    .venv/bin/python bench/attachments_bench.py --real --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import smtplib
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEAD = (b"From: Bench <bench@sender.example>\r\nTo: rcpt@example.com\r\nSubject: bench\r\n"
        b"Message-ID: <bench@sender.example>\r\nMIME-Version: 1.0\r\n")


def text_body(size: int) -> bytes:
    """About ``size`` bytes of plain words, CRLF lines (the same text every run)."""
    rnd = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "invoice", "meeting", "report", "tomorrow"]
    lines, total = [], 0
    while total < size:
        line = " ".join(rnd.choice(words) for _ in range(12))
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines).encode() + b"\r\n"


def text_message(size: int = 10 * 1024) -> bytes:
    return HEAD + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + text_body(size)


def big_message(size: int = 2 * 1024 * 1024) -> bytes:
    rnd = random.Random(2)

    def b64(data: bytes) -> bytes:
        return base64.encodebytes(data).replace(b"\n", b"\r\n")

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(20):
            z.writestr(f"docs/file{i}.txt", " ".join(str(rnd.random()) for _ in range(3000)))
    zdata = zbuf.getvalue()
    rest = int(size * 3 / 4) - len(zdata) - 4096
    pdf = b"%PDF-1.7\n" + rnd.randbytes(rest * 2 // 3)
    jpg = b"\xff\xd8\xff\xe0" + rnd.randbytes(rest // 3)
    parts = [
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease find the files attached.\r\n",
        b'Content-Type: application/pdf; name="report.pdf"\r\nContent-Disposition: attachment; '
        b'filename="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + b64(pdf),
        b'Content-Type: image/jpeg; name="photo.jpg"\r\nContent-Disposition: attachment; '
        b'filename="photo.jpg"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + b64(jpg),
        b'Content-Type: application/zip; name="docs.zip"\r\nContent-Disposition: attachment; '
        b'filename="docs.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + b64(zdata),
    ]
    body = b"".join(b"--BENCH\r\n" + p.rstrip(b"\r\n") + b"\r\n" for p in parts) + b"--BENCH--\r\n"
    return HEAD + b'Content-Type: multipart/mixed; boundary="BENCH"\r\n\r\n' + body


def office_message(pdf_size: int = 60 * 1024) -> bytes:
    """Typical mail with a file, as Thunderbird writes it: a text and an HTML alternative
    (quoted-printable) and one PDF of ``pdf_size`` bytes, base64. The sender and recipient are
    ``make bench``'s, so ``bench/rulecost_profile.py --message office`` can relay it."""
    rnd = random.Random(3)
    text = text_body(2 * 1024)
    html = (b"<html><head><meta http-equiv=3D\"content-type\" content=3D\"text/html; charset=3D"
            b"UTF-8\"></head>\r\n<body>\r\n" + b"".join(b"<p>" + line + b"</p>\r\n"
                                                  for line in text.split(b"\r\n") if line)
            + b"</body></html>\r\n")
    pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + rnd.randbytes(pdf_size - 15)
    b, a = b"------------fGq2XNbD5ZmEJ0tC1R9mOvzp", b"------------Xk2jnYVO0aWcd9IL8bTy7Q3E"
    return (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\nSubject: the report\r\n"
            b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <4f1c2a@bench.test>\r\n"
            b"MIME-Version: 1.0\r\nUser-Agent: Mozilla Thunderbird\r\nContent-Language: en-US\r\n"
            b'Content-Type: multipart/mixed; boundary="' + b[2:] + b'"\r\n\r\n'
            b"This is a multi-part message in MIME format.\r\n" + b + b"\r\n"
            b'Content-Type: multipart/alternative;\r\n boundary="' + a[2:] + b'"\r\n\r\n'
            + a + b"\r\nContent-Type: text/plain; charset=UTF-8; format=flowed\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n\r\n" + text + b"\r\n"
            + a + b"\r\nContent-Type: text/html; charset=UTF-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + html + b"\r\n"
            + a + b"--\r\n\r\n" + b + b'\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
            b'Content-Disposition: attachment; filename="report.pdf"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(pdf).replace(b"\n", b"\r\n") + b"\r\n" + b + b"--\r\n")


# --- in process ------------------------------------------------------------------------------
async def rate_in_process(rules, raw: bytes, seconds: float) -> tuple[float, int]:
    from smtpgate.testing import Harness
    h = Harness(rules)
    result = await h.send(raw)
    assert result.reply.code == 250 and result.message == raw, result.trace
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        h.relays.clear()
        await h.send(raw)
        n += 1
    await h.aclose()
    return n / (time.perf_counter() - start), n


def in_process(seconds: float) -> None:
    from smtpgate_rules.attachments import Attachments
    print("in process (smtpgate.testing.Harness, fake downstream, no sockets)")
    print(f"{'message':8} {'size':>9} {'without/s':>10} {'with/s':>10} {'ratio':>6}")
    for label, raw in (("text", text_message()), ("big", big_message())):
        without, _ = asyncio.run(rate_in_process([], raw, seconds))
        with_rule, _ = asyncio.run(rate_in_process([(Attachments, {"action": "strip"})], raw, seconds))
        print(f"{label:8} {len(raw):>9} {without:>10.1f} {with_rule:>10.1f} {with_rule / without:>6.2f}")


# --- the real gate ----------------------------------------------------------------------------
def real(seconds: float) -> None:
    from tests.support.downstream import CapturingDownstream
    from tests.support.gateproc import start_gate
    print("real gate (smtpgate serve, 1 worker; smtplib over loopback; capturing downstream)")
    print(f"{'message':8} {'size':>9} {'without/s':>10} {'with/s':>10} {'ratio':>6}")
    policies = {
        "without": {"default.yaml": "domains: [example.com]\nrules: []\n"},
        "with": {"default.yaml": "domains: [example.com]\nrules:\n  - attachments: {action: strip}\n"},
    }
    with tempfile.TemporaryDirectory() as tmp, CapturingDownstream() as ds:
        gates = {k: start_gate(Path(tmp) / k, downstream_port=ds.port, policies=v,
                               config={"log": {"level": "warning"}}) for k, v in policies.items()}
        try:
            for label, raw in (("text", text_message()), ("big", big_message())):
                rates = {}
                for k, gate in gates.items():
                    n, start = 0, time.perf_counter()
                    while time.perf_counter() - start < seconds:
                        with smtplib.SMTP(gate.host, gate.port, timeout=30) as c:
                            c.sendmail("bench@sender.example", ["rcpt@example.com"], raw)
                        n += 1
                        ds.clear()
                    rates[k] = n / (time.perf_counter() - start)
                print(f"{label:8} {len(raw):>9} {rates['without']:>10.1f} {rates['with']:>10.1f} "
                      f"{rates['with'] / rates['without']:>6.2f}")
        finally:
            for gate in gates.values():
                gate.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per case (default 3)")
    ap.add_argument("--real", action="store_true", help="also through the real gate over loopback")
    args = ap.parse_args()
    os.environ.setdefault("SMTPGATE_CONFIG", "")
    in_process(args.seconds)
    if args.real:
        print()
        real(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
