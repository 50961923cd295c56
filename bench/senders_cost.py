#!/usr/bin/env python3
"""The senders store's CPU per message, alone (run by hand; issue 13).

    .venv/bin/python bench/senders_cost.py                 # a SQLite file
    .venv/bin/python bench/senders_cost.py --state redis   # Redis at 127.0.0.1:6379 (DB 15, a private prefix)

What the ``senders`` rule asks its store for one message of bench's one sender, with the
default machine: the read at MAIL (``Machine.current``) and the ``delivered`` event at the
end (``Machine.feed``: change, JSON, compare-and-set), and ``SenderRecord.to_json`` of the
record that leaves, written again unchanged (the best case: every time text remembered; in
the gate an event brings 2 new ones). Times move on as in the gate (a new event time per
message). CPU µs per call, the fastest of ``--runs``; a tight loop, so about half what the
same code costs between two messages of the running gate (cold caches), but steady on a
shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rules.senders.config import build  # noqa: E402
from smtpgate.pipeline.results import Event  # noqa: E402
from smtpgate.stores import open_sender_store  # noqa: E402
from bench.greylist_bench import REDIS, delete_prefix  # noqa: E402 (DB 15: every bench's Redis)

KEY = "sender@bench.test"
STEP = 0.0123  # seconds between two messages


def keep_fastest(best: dict[str, float], name: str, seconds: float) -> None:
    best[name] = min(best.get(name, float("inf")), seconds * 1e6)


async def measure(url: str, messages: int, runs: int) -> dict[str, float]:
    store = open_sender_store(url)
    machine, _ = build("senders", None, None, 90 * 86400.0, "senders")
    events = [Event("delivered", "gate", None)]
    now = time.time()
    best: dict[str, float] = {}
    try:
        for n in [200] + [messages] * runs:  # a warm-up first
            read = feed = 0.0
            for _ in range(n):
                now += STEP
                c0 = time.process_time()
                await machine.current(store, KEY, now)
                c1 = time.process_time()
                await machine.feed(store, KEY, events, now)
                read, feed = read + c1 - c0, feed + time.process_time() - c1
            if n == messages:
                keep_fastest(best, "MAIL read", read / n)
                keep_fastest(best, "event", feed / n)
        rec = await store.get("senders", KEY)
        for _ in range(runs):
            c0 = time.process_time()
            for _ in range(messages):
                rec.to_json()
            keep_fastest(best, "to_json unchanged", (time.process_time() - c0) / messages)
    finally:
        await store.close()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5, help="the fastest of")
    ap.add_argument("--state", choices=("sqlite", "redis"), default="sqlite")
    a = ap.parse_args()
    prefix = f"senders-cost-{uuid.uuid4().hex}:"
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/state.db" if a.state == "sqlite" else f"{REDIS}?prefix={prefix}"
        try:
            figures = asyncio.run(measure(url, a.messages, a.runs))
        finally:
            if a.state == "redis":
                delete_prefix(prefix)
    print(", ".join(f"{name} {us:.1f}" for name, us in figures.items()), "CPU µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
