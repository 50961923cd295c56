#!/usr/bin/env python3
"""What authentication costs (issue 14 item 7; run by hand, not part of the tests).

Messages per second through the real gate (``smtpgate serve``, one worker, smtplib over
loopback, one connection per message, relaying to the tests' capturing downstream) for a
DKIM-signed 10 KB message (RSA 2048, the common key), with no rules and with ``dkim`` +
``dmarc`` — plus ``arc`` when a rule of that name is registered (``smtpgate.rules`` entry
points): it is given a generated key as ``{key, selector, domain}``, or ``--arc-options``.
The two gates run side by side, measured in alternating rounds, so the ratio comes from one
run. The keys and the _dmarc record are served by the tests' DNS server; after the first
message the gate's resolver answers from its cache, as it would for a frequent sender.

Then the CPU cost of one verification (parse + every signature, what runs on the event loop
below ``thread_above``) for 10 KB, 1 MB and 10 MB messages: how long a large message would
hold the loop, which is why larger ones go to a worker thread.

    .venv/bin/python bench/auth_bench.py                 # needs openssl (RSA keys)
    .venv/bin/python bench/auth_bench.py --seconds 10 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

from attachments_bench import text_body  # bench/ is this script's sys.path[0]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEAD = (b"From: Bench <bench@example.org>\r\nTo: rcpt@example.com\r\nSubject: bench\r\n"
        b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")


def text_message(size: int) -> bytes:
    return HEAD + text_body(size)


def arc_registered() -> bool:
    return any(ep.name == "arc" for ep in entry_points(group="smtpgate.rules"))


def policies(arc_options: dict | None) -> dict[str, dict[str, str]]:
    rules = "  - dkim: {}\n  - dmarc: {}\n"
    if arc_options is not None:  # the hook for the arc rule: sealed after dkim and dmarc
        rules += f"  - arc: {json.dumps(arc_options)}\n"
    return {"without": {"default.yaml": "domains: [example.com]\nrules: []\n"},
            "with": {"default.yaml": "domains: [example.com]\nrules:\n" + rules}}


def real(seconds: float, rounds: int, openssl: str, arc_override: str | None) -> None:
    from tests.support.dkimkeys import rsa_key, sign
    from tests.support.dnsserver import DnsServer
    from tests.support.downstream import CapturingDownstream
    from tests.support.gateproc import start_gate

    key = rsa_key(openssl)
    raw = sign(text_message(10 * 1024), key, "example.org", "bench")
    zones = {"example.org": {"bench._domainkey": {"TXT": key.record}, "arc._domainkey": {"TXT": key.record},
                             "_dmarc": {"TXT": "v=DMARC1; p=reject"}, "@": {"TXT": "v=spf1 -all"}}}
    with tempfile.TemporaryDirectory() as tmp, CapturingDownstream() as ds, DnsServer(zones) as ns:
        arc_options = None
        if arc_registered():
            pem = Path(tmp) / "arc.pem"
            pem.write_bytes(key.private)
            arc_options = json.loads(arc_override) if arc_override else \
                {"key": str(pem), "selector": "arc", "domain": "example.org"}
        config = {"log": {"level": "warning"}, "workers": 1,
                  "dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}}
        gates = {k: start_gate(Path(tmp) / k, downstream_port=ds.port, policies=v, config=config)
                 for k, v in policies(arc_options).items()}
        try:
            counts = {k: 0 for k in gates}
            spent = {k: 0.0 for k in gates}
            for k, gate in gates.items():  # warm-up and check: both deliver it
                with smtplib.SMTP(gate.host, gate.port, timeout=30) as c:
                    c.sendmail("bench@example.org", ["rcpt@example.com"], raw)
            got = ds.wait_for_messages(2)
            assert any(b"dkim=pass" in m.data and b"dmarc=pass" in m.data for m in got), "dkim+dmarc did not pass"
            for _ in range(rounds):
                for k, gate in gates.items():
                    start = time.perf_counter()
                    while time.perf_counter() - start < seconds / rounds:
                        with smtplib.SMTP(gate.host, gate.port, timeout=30) as c:
                            c.sendmail("bench@example.org", ["rcpt@example.com"], raw)
                        counts[k] += 1
                        ds.clear()
                    spent[k] += time.perf_counter() - start
        finally:
            for gate in gates.values():
                gate.stop()
    rates = {k: counts[k] / spent[k] for k in gates}
    label = "dkim+dmarc" + ("+arc" if arc_options is not None else " (arc not registered)")
    print(f"real gate (1 worker; smtplib, a connection per message); {len(raw)} byte message, RSA 2048 signed")
    print(f"{'without/s':>10} {'with/s':>10} {'ratio':>6}  with = {label}")
    print(f"{rates['without']:>10.1f} {rates['with']:>10.1f} {rates['with'] / rates['without']:>6.2f}")


def verify_cost(openssl: str) -> None:
    from tests.support.dkimkeys import rsa_key, sign
    from smtpgate_rules.dkim.verify import Checker

    key = rsa_key(openssl)
    print("one verification on the calling thread (parse + one RSA 2048 signature), median of 5")
    print(f"{'size':>10} {'ms':>8}")
    for size in (10 * 1024, 1024 * 1024, 10 * 1024 * 1024):
        raw = sign(text_message(size), key, "example.org", "bench")
        times = []
        for _ in range(5):
            start = time.perf_counter()
            checker = Checker(raw)
            result = checker.verify(checker.signatures[0], key.record, time.time())
            times.append(time.perf_counter() - start)
            assert result.result == "pass", result
        print(f"{len(raw):>10} {sorted(times)[2] * 1000:>8.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per gate, in all rounds (default 6)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--arc-options", help="the arc rule's options as JSON (default: a generated key)")
    args = ap.parse_args()
    openssl = shutil.which("openssl")
    if openssl is None:
        print("needs the openssl command (make tools)", file=sys.stderr)
        return 2
    real(args.seconds, args.rounds, openssl, args.arc_options)
    print()
    verify_cost(openssl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
