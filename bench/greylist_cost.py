#!/usr/bin/env python3
"""The SQLite greylist store's CPU per allowed decision, alone (run by hand; issue 13).

    .venv/bin/python bench/greylist_cost.py
    .venv/bin/python bench/greylist_cost.py --clients 3   # client allow entries of 3 prefix lengths too

What ``make bench`` has the greylist rule ask at each RCPT: ``attempt`` of bench's one
triplet, on the allow list (``greylist allow --triplet``), in a SQLite file: the read path
and the tally of its ``allowed`` counter. CPU µs per call, the fastest of ``--runs``; a
tight loop, so less than the same code costs between two messages of the running gate
(cold caches), but steady on a shared machine. Copy it into another checkout to compare.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.greylist_bench import PARAMS  # noqa: E402 (the greylist benches' timing)
from smtpgate.stores import make_allow, triplet_value  # noqa: E402
from smtpgate.stores.sqlite_store import SqliteGreylistStore  # noqa: E402

TRIPLET = ("127.0.0.0/24", "sender@bench.test", "rcpt@bench.test")


async def measure(folder: str, a) -> float:
    store = SqliteGreylistStore(f"sqlite://{folder}/greylist.db")
    try:
        await store.add_allow(make_allow("triplet", triplet_value(*TRIPLET), 0.0, None))
        for n in range(a.clients):  # networks elsewhere: lengths in use, no match
            await store.add_allow(make_allow("client", f"10.{n}.0.0/{16 + n}", 0.0, None))
        now = 1_000_000.0
        for _ in range(500):  # warm-up: the loop's connection, the read path, the caches
            await store.attempt(*TRIPLET, now=now, params=PARAMS, client_ip="127.0.0.1")
        best = float("inf")
        for _ in range(a.runs):
            started = time.process_time()
            for _ in range(a.calls):
                result = await store.attempt(*TRIPLET, now=now, params=PARAMS, client_ip="127.0.0.1")
            best = min(best, (time.process_time() - started) / a.calls * 1e6)
            assert result.outcome == "allowed"
        return best
    finally:
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5, help="the fastest of")
    ap.add_argument("--clients", type=int, default=0, help="client allow entries elsewhere, each its own prefix length")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(f"allowed decision: {asyncio.run(measure(folder, a)):.1f} CPU µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
