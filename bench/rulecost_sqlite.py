#!/usr/bin/env python3
"""``rulecost_profile.py`` with the store-backed rules on a real SQLite file (issue 13).

rulecost_profile.py gives ``senders`` and ``greylist`` in-memory stores, to measure the rule
and pipeline code alone; this runs the same cases with ``state: sqlite:///TMP`` (the
greylist triplet allowed first, as ``make bench`` does), so the store's own CPU per message
(SQL, JSON, the group commit) is in the figure. One event loop per case (the database's
loop connection belongs to it).

    .venv/bin/python bench/rulecost_sqlite.py --runs 5                    # CPU µs per message
    .venv/bin/python bench/rulecost_sqlite.py --profile senders --top 25  # cProfile of one case
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rulecost_profile import rules_of, run, smtp_source_message  # noqa: E402
from smtpgate.logs import setup_logging  # noqa: E402
from smtpgate.stores import Stores, make_allow, triplet_value  # noqa: E402
from smtpgate.testing import FakeClock, Harness  # noqa: E402

CASES = ("empty", "senders", "greylist", "real")


async def measure(case: str, folder: str, raw: bytes, n: int, runs: int, profile: bool, top: int, sort: str):
    clock = FakeClock()
    stores = Stores(f"sqlite:///{folder}/{case}.db", clock)
    # the greylist keys the client by its /24 (default); allow the bench triplet outright
    await stores.greylist.add_allow(make_allow("triplet", triplet_value("127.0.0.0/24", "sender@bench.test",
                                                                        "rcpt@bench.test"), clock.now(), None))
    h = Harness(rules_of(case), domains=["bench.test"], clock=clock, stores=stores)
    try:
        await run(h, raw, 200)  # warm-up
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            await run(h, raw, n)
            prof.disable()
            pstats.Stats(prof).sort_stats(sort).print_stats(top)
            return None
        return min([await run(h, raw, n) for _ in range(runs)])
    finally:
        await stores.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5, help="the fastest of")
    ap.add_argument("--profile", choices=CASES)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    setup_logging("text", "info")
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))
    raw = smtp_source_message()
    with tempfile.TemporaryDirectory() as folder:
        if a.profile:
            asyncio.run(measure(a.profile, folder, raw, a.messages, 1, True, a.top, a.sort))
            return 0
        figures = {case: asyncio.run(measure(case, folder, raw, a.messages, a.runs, False, 0, ""))
                   for case in a.cases.split(",")}
    base = figures.get("empty", 0.0)
    for case, us in figures.items():
        print(f"{case:<10} {us:7.1f} CPU µs/message, {us - base:+7.1f} over empty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
