#!/usr/bin/env python3
"""What a Redis outage costs a client (run by hand; not part of the tests).

The real gate (``smtpgate serve``, one worker, the greylist rule with ``on_error: accept``)
on a private ``redis-server``, driven by smtplib over loopback, relaying to the tests'
capturing downstream. For each case, ``--rcpts`` transactions of one recipient on one
connection; printed: the seconds for all of them and the slowest RCPT.

- ``up``: Redis answering;
- ``killed``: Redis killed (connections refused at once);
- ``frozen``: Redis stopped with SIGSTOP (connections and reads hang: a host gone from the
  network), with redis-py's 2 s default timeouts.

    .venv/bin/python bench/store_outage_bench.py --rcpts 20
    .venv/bin/python bench/store_outage_bench.py --gate-path /work/main  # another checkout's gate
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tests.support.downstream import CapturingDownstream  # noqa: E402
from tests.support.gateproc import start_gate  # noqa: E402
from tests.support.redisproc import PrivateRedis  # noqa: E402

POLICIES = {"default.yaml": "domains: [example.com]\nrules:\n  - greylist: {on_error: accept}\n"}
MESSAGE = b"Subject: outage\r\n\r\nhello\r\n"


def run(gate, rcpts: int) -> tuple[float, float]:
    slowest = 0.0
    started = time.monotonic()
    with gate.smtp(timeout=60) as c:
        c.ehlo()
        for n in range(rcpts):
            c.mail("alice@sender.test")
            t = time.monotonic()
            c.rcpt(f"user{n}@example.com")
            slowest = max(slowest, time.monotonic() - t)
            c.rset()
    return time.monotonic() - started, slowest


def wait_store_back(gate, timeout: float = 60.0) -> None:
    """Until an RCPT is greylisted (451): the store decides again."""
    deadline = time.monotonic() + timeout
    with gate.smtp(timeout=60) as c:
        c.ehlo()
        while time.monotonic() < deadline:
            c.mail("alice@sender.test")
            code, _ = c.rcpt(f"probe{time.monotonic()}@example.com")
            c.rset()
            if code == 451:
                return
            time.sleep(0.2)
    raise SystemExit("the gate never used the restarted store")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rcpts", type=int, default=20)
    ap.add_argument("--gate-path", default="", help="PYTHONPATH of the gate: another checkout to compare")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, CapturingDownstream() as ds:
        redis = PrivateRedis(Path(tmp) / "redis").start()
        gate = start_gate(Path(tmp) / "gate", downstream_port=ds.port, policies=POLICIES,
                          config={"state": redis.url}, env={"PYTHONPATH": args.gate_path})
        try:
            for case in ("up", "killed", "frozen"):
                if case == "killed":
                    redis.kill()
                elif case == "frozen":
                    redis.start()
                    wait_store_back(gate)
                    redis.freeze()
                total, slowest = run(gate, args.rcpts)
                print(f"{case:7} {args.rcpts} RCPTs in {total:6.2f}s, slowest {slowest:5.2f}s", flush=True)
        finally:
            gate.stop()
            redis.stop()


if __name__ == "__main__":
    main()
