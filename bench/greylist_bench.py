#!/usr/bin/env python3
"""Greylist benchmark (run by hand; not part of the tests).

1. Store decisions per second, per backend, with ``--entries`` (100 000) triplets stored
   (half of them passed): ``attempt`` for new triplets (a write and the auto-whitelist
   count), for passed ones (a refresh), one at a time (latency) and 64 at once
   (throughput). SQLite is measured as the gate runs it (calls on the store's own thread)
   and, for comparison, with the calls made directly on the event loop.
2. What the rule adds to a relayed message, as a ratio against the same run without it:
   a. in process: ``smtpgate.testing.Harness`` (no sockets, fake downstream), the triplet
      already passed, so every message is a ``passed_before`` decision plus the relay;
   b. the real gate (``smtpgate serve``, one worker, SQLite) driven by Postfix's
      ``smtp-source`` and relaying to ``smtp-sink`` (``--real``; needs both tools).

    .venv/bin/python bench/greylist_bench.py                 # 1 and 2a, both backends
    .venv/bin/python bench/greylist_bench.py --real          # and 2b
    .venv/bin/python bench/greylist_bench.py --backends sqlite --entries 20000

Redis: DB 15 of redis://127.0.0.1:6379 under a fresh key prefix, deleted afterwards.
Figures vary with the machine: compare ratios taken in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smtpgate.stores import Params, open_greylist_store  # noqa: E402
from smtpgate.stores.sqlite_store import SqliteGreylistStore  # noqa: E402

REDIS = "redis://127.0.0.1:6379/15"  # the Redis of every Python bench (store_bench, limits_bench, rulecost_profile)
T0 = 1_767_225_600.0
PARAMS = Params(300, 2 * 86400, 35 * 86400, 5)


def triplet(i: int) -> tuple[str, str, str, str]:
    a, b = divmod(i, 250)
    ip = f"10.{(a >> 8) & 255}.{a & 255}.{b + 1}"
    return f"10.{(a >> 8) & 255}.{a & 255}.0/24", f"sender{i}@s{i % 997}.example", f"user{i % 5000}@example.com", ip


async def run_all(store, jobs, concurrency: int) -> float:
    """Seconds to run every job (a coroutine factory) with at most `concurrency` in flight."""
    it = iter(jobs)
    started = time.perf_counter()

    async def worker():
        for job in it:
            await job()
    async with asyncio.TaskGroup() as tg:  # a failure cancels the other workers
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - started


async def fill(store, n: int) -> None:
    def first(i):
        c, s, r, ip = triplet(i)
        return lambda: store.attempt(c, s, r, now=T0, params=PARAMS, client_ip=ip)

    def second(i):
        c, s, r, ip = triplet(i)
        return lambda: store.attempt(c, s, r, now=T0 + 600, params=PARAMS, client_ip=ip)
    t = await run_all(store, (first(i) for i in range(n)), 64)
    t += await run_all(store, (second(i) for i in range(0, n, 2)), 64)
    print(f"  filled {n} triplets ({n // 2} passed) in {t:.1f}s")


async def decisions(store, n: int, count: int, concurrency: int, kind: str) -> float:
    rng = random.Random(1)
    if kind == "new":
        keys = [triplet(n + i) for i in range(count)]
    else:  # passed ones (even indexes passed in fill)
        keys = [triplet(2 * rng.randrange(n // 2)) for _ in range(count)]
    now = T0 + 900

    def job(k):
        return lambda: store.attempt(k[0], k[1], k[2], now=now, params=PARAMS, client_ip=k[3])
    seconds = await run_all(store, (job(k) for k in keys), concurrency)
    return count / seconds


async def bench_store(label: str, store, n: int, count: int) -> dict:
    print(f"{label}:")
    await fill(store, n)
    out = {}
    for kind in ("new", "passed"):
        for conc in (1, 64):
            rate = await decisions(store, n, count if conc > 1 else count // 4, conc, kind)
            out[(kind, conc)] = rate
            print(f"  {kind:6} triplets, {conc:2} at once: {rate:8.0f} decisions/s"
                  + (f"  ({1e6 / rate:.0f} µs each)" if conc == 1 else ""))
        n += count + count // 4  # the "new" ones are stored now
    return out


class OnTheLoop(SqliteGreylistStore):
    """The SQLite store with every call made directly on the event loop (for comparison)."""

    def __init__(self, url):
        super().__init__(url)
        db = self.db

        async def run(fn, *args):
            if db._conn is None:
                db._conn = db._connect()
            return fn(db._conn, *args)
        db.run = run


def with_prefix(redis_url: str, prefix: str) -> str:
    """The state URL for ``prefix`` on the server ``redis_url`` names (``?db=N`` of a
    ``unix://`` URL kept)."""
    return f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"


def delete_prefix(prefix: str, redis_url: str = REDIS) -> None:
    import redis
    r = redis.Redis.from_url(redis_url)
    batch = []
    for key in r.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            r.delete(*batch)
            batch = []
    if batch:
        r.delete(*batch)


async def store_benchmarks(backends, n, count) -> None:
    print(f"\n== store decisions per second, {n} triplets stored ==")
    tmp = tempfile.mkdtemp(prefix="greylist-bench-")
    try:
        if "sqlite" in backends:
            store = open_greylist_store(f"sqlite://{tmp}/thread.db")
            await bench_store("sqlite (calls on the store's thread, as the gate runs it)", store, n, count)
            await store.close()
            store = OnTheLoop(f"sqlite://{tmp}/loop.db")
            await bench_store("sqlite (calls directly on the event loop, for comparison)", store, n, count)
            await store.close()
        if "redis" in backends:
            prefix = f"greylist-bench-{uuid.uuid4().hex}:"
            store = open_greylist_store(with_prefix(REDIS, prefix))
            try:
                await bench_store("redis (one Lua script per decision)", store, n, count)
            finally:
                await store.close()
                delete_prefix(prefix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- 2a: the rule's cost in process ----------------------------------------------------------

async def harness_ratio(backends, messages: int, runs: int) -> None:
    from smtpgate.testing import FakeClock, Harness, message
    from smtpgate_rules.greylist import Greylist
    print(f"\n== in process (Harness, fake downstream): {messages} relayed messages, median of {runs} ==")
    raw = message(body="x" * 10000 + "\r\n")
    for backend in backends:
        prefix = f"greylist-bench-{uuid.uuid4().hex}:"
        tmp = tempfile.mkdtemp(prefix="greylist-bench-")
        state = f"sqlite://{tmp}/h.db" if backend == "sqlite" else with_prefix(REDIS, prefix)
        clock = FakeClock()
        plain = Harness([], clock=clock, state="sqlite://:memory:")
        grey = Harness([(Greylist, {})], clock=clock, state=state)
        await grey.send(raw)
        clock.advance(300)
        assert (await grey.send(raw)).reply.code == 250
        times = {"without": [], "with": []}
        for _ in range(runs):
            for name, h in (("without", plain), ("with", grey)):
                started = time.perf_counter()
                for _ in range(messages):
                    await h.send(raw)
                times[name].append((time.perf_counter() - started) / messages)
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        print(f"  {backend:6}: without {without * 1e6:6.0f} µs/message, with greylist {with_ * 1e6:6.0f} µs/message"
              f"  -> ratio {with_ / without:.2f} (+{(with_ - without) * 1e6:.0f} µs)")
        await plain.aclose()
        await grey.aclose()
        shutil.rmtree(tmp, ignore_errors=True)
        if backend == "redis":
            delete_prefix(prefix)


# --- 2b: the real gate with smtp-source -> gate -> smtp-sink ------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def real_gate_ratio(messages: int, sessions: int, runs: int, workers: int) -> None:
    tool = lambda name: shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")  # noqa: E731
    sink_bin, source_bin = tool("smtp-sink"), tool("smtp-source")
    if not sink_bin or not source_bin:
        print("\n(real gate: smtp-sink / smtp-source not installed, skipped)")
        return
    print(f"\n== real gate (workers: {workers}, SQLite), smtp-source -s {sessions} -m {messages} "
          f"-l 10240 -> gate -> smtp-sink, median of {runs} ==")
    tmp = tempfile.mkdtemp(prefix="greylist-bench-")
    sink_port = free_port()
    sink_args = [sink_bin] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{sink_port}", "1024"]
    sink = subprocess.Popen(sink_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gates = {}
    try:
        wait_port(sink_port)
        for name, rules in (("without", "rules: []"), ("with", "rules:\n  - greylist: {delay: 1s}")):
            folder = os.path.join(tmp, name)
            os.makedirs(os.path.join(folder, "policies"))
            port = free_port()
            with open(os.path.join(folder, "policies", "default.yaml"), "w") as f:
                f.write(f"domains: [bench.test]\n{rules}\n")
            with open(os.path.join(folder, "gate.yaml"), "w") as f:
                f.write(f"hostname: gate.bench.test\nlisten: ['127.0.0.1:{port}']\nworkers: {workers}\n"
                        f"downstream: {{host: 127.0.0.1, port: {sink_port}}}\nstate: sqlite:///./state.db\n"
                        "quarantine: ./quarantine\npolicies: policies\n"
                        "limits: {max_connections: 5000, max_connections_per_client: 5000}\n"
                        "log: {level: warning}\n")
            proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", "gate.yaml"], cwd=folder,
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, "log"), "w"))
            gates[name] = (proc, port)
            wait_port(port)
        # pass the benchmark's one triplet once, as a real sender would: 451, wait, retry
        port = gates["with"][1]
        for attempt in range(2):
            with smtplib.SMTP("127.0.0.1", port) as c:
                try:
                    c.sendmail("sender@bench.test", ["rcpt@bench.test"], b"Subject: x\r\n\r\nx\r\n")
                    break
                except smtplib.SMTPRecipientsRefused:
                    time.sleep(1.2)
        times = {"without": [], "with": []}
        for _ in range(runs):
            for name in ("without", "with"):
                started = time.perf_counter()
                subprocess.run([source_bin, "-s", str(sessions), "-m", str(messages), "-l", "10240",
                                "-f", "sender@bench.test", "-t", "rcpt@bench.test",
                                f"127.0.0.1:{gates[name][1]}"], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - started)
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        print(f"  without greylist {messages / without:7.0f} messages/s, with {messages / with_:7.0f} messages/s"
              f"  -> time ratio {with_ / without:.2f}")
    finally:
        for proc, _ in gates.values():
            stop(proc)
        stop(sink)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--decisions", type=int, default=20_000, help="per measurement at 64 at once")
    ap.add_argument("--messages", type=int, default=2000, help="per in-process run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also the real gate with smtp-source/smtp-sink")
    ap.add_argument("--real-messages", type=int, default=5000)
    ap.add_argument("--real-sessions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    try:
        import uvloop
        uvloop.install()  # as the gate runs
    except ImportError:
        pass
    asyncio.run(store_benchmarks(backends, args.entries, args.decisions))
    asyncio.run(harness_ratio(backends, args.messages, args.runs))
    if args.real:
        real_gate_ratio(args.real_messages, args.real_sessions, args.runs, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
