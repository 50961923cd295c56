#!/usr/bin/env python3
"""What ``smtpgate state copy`` costs (run by hand; not part of the tests).

Fills a SQLite state in a temporary folder with ``--triplets`` greylist triplets (half
passed) and a tenth as many sender records, then runs the real command as a subprocess:
SQLite -> Redis (DB 15 of ``--redis``, under a prefix of its own, deleted afterwards) and
Redis -> a new SQLite file. Printed: seconds and peak memory (``/usr/bin/time``) each way.

    .venv/bin/python bench/state_copy_bench.py --triplets 100000
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from smtpgate.stores import Entry, open_stores
from smtpgate.stores.senders import Change, SenderRecord

BATCH = 1000


async def fill(url: str, triplets: int) -> None:
    stores = open_stores(url)
    now = time.time()
    try:
        for start in range(0, triplets, BATCH):
            await stores.greylist.import_batch([
                Entry(f"10.{i // 65536 % 256}.{i // 256 % 256}.0/24", f"u{i}@sender.test", f"r{i % 97}@example.com",
                      now - 100, now - 50, 2, i % 2 == 0, now - 50 if i % 2 == 0 else None,
                      250.0 if i % 2 == 0 else None, now + 86400)
                for i in range(start, min(start + BATCH, triplets))], now)
        records = triplets // 10
        for start in range(0, records, BATCH):
            await stores.senders.import_batch([
                SenderRecord("senders", f"u{i}@sender.test", "probation", now - 10, now - 10, now - 10,
                             now + 90 * 86400, {"delivered": 1}, {}, [],
                             [Change(now - 10, "delivered", "new", "probation", "delivered", "senders")])
                for i in range(start, min(start + BATCH, records))], now)
    finally:
        await stores.close()


def timed_copy(source: str, target: str) -> str:
    done = subprocess.run(["/usr/bin/time", "-f", "%e s, peak RSS %M KB", sys.executable, "-m", "smtpgate",
                           "state", "copy", source, target], capture_output=True, text=True, check=True)
    counts = "; ".join(line.strip() for line in done.stdout.strip().splitlines()[1:])
    return f"{done.stderr.strip().splitlines()[-1]} ({counts})"


def delete_prefix(redis_url: str, prefix: str) -> None:
    import redis
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), BATCH):
        r.delete(*keys[i:i + BATCH])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triplets", type=int, default=100_000)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = p.parse_args()
    prefix = f"state-copy-bench-{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as folder:
        source, back = f"sqlite://{Path(folder) / 'source.db'}", f"sqlite://{Path(folder) / 'back.db'}"
        middle = f"{args.redis}?prefix={prefix}"
        asyncio.run(fill(source, args.triplets))
        try:
            print(f"sqlite -> redis: {timed_copy(source, middle)}")
            print(f"redis -> sqlite: {timed_copy(middle, back)}")
        finally:
            delete_prefix(args.redis, prefix)


if __name__ == "__main__":
    main()
