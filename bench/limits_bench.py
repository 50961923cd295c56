#!/usr/bin/env python3
"""Limits benchmark (run by hand; not part of the tests): decisions per second of the limits
store with 10 000, 100 000 and 1 000 000 counters stored, per backend.

A decision is what the rule asks at MAIL for a policy with two rates: one ``hit`` with a
``client`` and a ``sender`` check on counters that exist (read both, decide, count both),
made one at a time (latency) and 64 at once (throughput, as many sessions do). The sliding
window is two buckets per counter, so a decision touches a fixed number of rows or keys
whatever is stored: the figures should stay flat as the store grows (O(1) per check).

    .venv/bin/python bench/limits_bench.py                           # both backends, 10k/100k/1M
    .venv/bin/python bench/limits_bench.py --sizes 10000,100000      # a busy machine: small sizes
    .venv/bin/python bench/limits_bench.py --backends sqlite --decisions 5000

SQLite: a fresh file in a temporary folder, removed afterwards. Redis: DB 15 of
redis://127.0.0.1:6379 under a fresh key prefix, deleted afterwards. Figures vary with the
machine and its load (see ``uptime``): compare the sizes of one run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smtpgate.stores import open_limits_store  # noqa: E402
from smtpgate.stores.limits import bucket_of  # noqa: E402
from greylist_bench import REDIS  # noqa: E402 (every bench's Redis)
HOUR = 3600.0
BATCH = 10_000


def client(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def sender(i: int) -> str:
    return f"sender{i}@s{i % 997}.example"


async def fill(store, n: int, now: float) -> None:
    """n counters (half client, half sender), live in the current bucket, written in bulk."""
    k = bucket_of(now, HOUR)
    rows = [("client", client(i), HOUR) if i % 2 == 0 else ("sender", sender(i), HOUR) for i in range(n)]
    if hasattr(store, "db"):  # SQLite: straight into the table, on the store's own thread
        def write(conn, chunk):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO limits_rates (kind, value, span, bucket, previous, current,"
                             " expires) VALUES (?, ?, ?, ?, 1, 1, ?)",
                             [(kind, value, w, k, (k + 2) * w) for kind, value, w in chunk])
            conn.execute("COMMIT")
        await store.counters(limit=1)  # connect and migrate
        for i in range(0, n, BATCH):
            await store.db.run(write, rows[i:i + BATCH])
        return

    async def write(r, chunk):
        pipe = r.pipeline(transaction=False)
        for kind, value, w in chunk:
            key = store.rate_key(kind, w, value)
            pipe.hset(key, mapping={"b": k, "p": 1, "c": 1})
            pipe.expire(key, int(2 * HOUR))
        await pipe.execute()
    for i in range(0, n, BATCH):
        chunk = rows[i:i + BATCH]
        await store.link.run(lambda r: write(r, chunk))


async def decisions(store, n: int, count: int, concurrency: int, now: float) -> float:
    """Decisions per second: `count` two-rate hits on random stored counters."""
    rng = random.Random(n)
    picks = [rng.randrange(n // 2) * 2 for _ in range(count)]
    it = iter(picks)

    async def worker():
        for i in it:
            checks = [("client", client(i), HOUR, 1_000_000, True), ("sender", sender(i + 1), HOUR, 1_000_000, True)]
            await store.hit(checks, now)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def delete_prefix(prefix: str) -> None:
    import redis
    r = redis.Redis.from_url(REDIS)
    batch = []
    for key in r.scan_iter(match=prefix + "*", count=10_000):
        batch.append(key)
        if len(batch) >= BATCH:
            r.unlink(*batch)
            batch.clear()
    if batch:
        r.unlink(*batch)


async def bench(backend: str, sizes: list[int], count: int) -> list[tuple]:
    out = []
    for n in sizes:
        folder = prefix = None
        if backend == "sqlite":
            folder = tempfile.mkdtemp(prefix="limits-bench-")
            url = f"sqlite://{folder}/state.db"
        else:
            prefix = f"limits-bench-{uuid.uuid4().hex}:"
            url = f"{REDIS}?prefix={prefix}"
        store = open_limits_store(url)
        now = time.time()
        try:
            started = time.perf_counter()
            await fill(store, n, now)
            filled = time.perf_counter() - started
            await decisions(store, n, 1000, 8, now)  # warm up: connections, caches, the WAL's checkpoint
            serial = await decisions(store, n, max(500, count // 8), 1, now)
            parallel = await decisions(store, n, count, 64, now)
            out.append((backend, n, filled, serial, parallel))
            print(f"{backend:6}  {n:>9,} stored (filled in {filled:5.1f}s)  "
                  f"{serial:8,.0f} decisions/s one at a time  {parallel:8,.0f} decisions/s 64 at once", flush=True)
        finally:
            await store.close()
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            if prefix:
                delete_prefix(prefix)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="counters stored, comma-separated")
    ap.add_argument("--decisions", type=int, default=20_000, help="per measurement at 64 at once")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.decisions} decisions of 2 rates each per measurement")
    for backend in args.backends.split(","):
        asyncio.run(bench(backend.strip(), sizes, args.decisions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
