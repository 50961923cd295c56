#!/usr/bin/env python3
"""Store decisions per second against the number of stored keys (issue 13; run by hand).

For each backend (SQLite, Redis) and each size N (10k, 100k, 1M keys), the store is filled
with N keys in bulk (SQLite: one ``executemany`` per 50 000 rows; Redis: a Lua loop on the
server), then three decisions are timed on keys picked at random among the stored ones:

- ``greylist``: ``attempt`` on a passed triplet (``passed_before``: a read and a write, as
  every message of a known sender);
- ``senders``: ``Machine.feed`` of one ``delivered`` event to a sender's record (the
  default machine of the senders rule);
- ``limits``: ``hit`` with two rates (client and sender), as at MAIL.

Each is run one at a time (``seq``: a session alone) and 64 at once (``par64``: concurrent
sessions of one worker), in this process (one worker). Each figure is decisions per second (wall
clock) and the CPU µs this process spent per decision (``time.process_time``; the Redis
server's own CPU not included): on a shared, loaded machine the second moves least. The
table goes to stdout and to ``bench/results/store-<time>.md``.

    .venv/bin/python bench/store_bench.py                          # 10k, 100k, 1M; both backends
    .venv/bin/python bench/store_bench.py --sizes 10000,100000 --backends sqlite
    .venv/bin/python bench/store_bench.py --profile sqlite:greylist   # cProfile of one, top 25

Redis: DB 15 of redis://127.0.0.1:6379 under a fresh key prefix, deleted afterwards;
``--redis URL`` another server or the same one another way (``unix:///PATH?db=15``: its
Unix socket).
The machine is shared with other runs: compare figures of one run, not across runs.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "rules"))

from smtpgate.pipeline.results import Event  # noqa: E402
from smtpgate.stores import Params, Stores  # noqa: E402
from smtpgate.stores.limits import Counter  # noqa: E402
from greylist_bench import REDIS, delete_prefix as drop_redis, with_prefix  # noqa: E402

T0 = 1_767_225_600.0
NOW = T0 + 3600
PARAMS = Params(300, 2 * 86400, 35 * 86400, 5)
KINDS = ("greylist", "senders", "limits")
FILL_BATCH = 50_000


def triplet(i: int) -> tuple[str, str, str, str]:
    a, b = divmod(i, 250)
    net = f"10.{(a >> 8) & 255}.{a & 255}"
    return f"{net}.0/24", f"sender{i}@s{i % 997}.example", f"user{i % 5000}@example.com", f"{net}.{b + 1}"


def sender(i: int) -> str:
    return f"sender{i}@s{i % 997}.example"


def machine():
    from smtpgate_rules.senders.config import build
    return build("senders", None, None, 90 * 86400.0, "senders")[0]


# --- bulk fill ---------------------------------------------------------------------------

def fill_sqlite(conn, kind: str, n: int) -> None:
    """Rows written straight into the stores' tables (what import_batch does, without objects)."""
    from smtpgate.stores.senders_sqlite import EXPIRES_SLACK
    from smtpgate.stores.sqlite_store import write_transaction
    for start in range(0, n, FILL_BATCH):
        rng = range(start, min(n, start + FILL_BATCH))
        with write_transaction(conn):
            if kind == "greylist":
                rows = []
                for i in rng:
                    c, s, r, _ = triplet(i)
                    expires = T0 + 600 + PARAMS.pass_ttl
                    rows.append((c, s, r, T0, T0 + 600, 2, 1, T0 + 600, 600.0, expires, expires))
                conn.executemany("INSERT OR REPLACE INTO greylist (client, sender, recipient, first_seen, last_seen,"
                                 " attempts, passed, passed_at, retry_delay, expires, sweep_at)"
                                 " VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            elif kind == "senders":
                m = MACHINE
                rows = []
                for i in rng:
                    rec = m.new_record(sender(i), T0)
                    rec.state, rec.counts, rec.version = "probation", {"delivered": 1}, 1
                    # the column as the store writes a record (an upper bound of its expiry,
                    # not import_batch's exact one): the events then take the usual path
                    rows.append(("senders", rec.key, rec.state, rec.seen, rec.expires + EXPIRES_SLACK, rec.to_json()))
                conn.executemany("INSERT OR REPLACE INTO senders (machine, key, state, seen, expires, doc)"
                                 " VALUES (?,?,?,?,?,?)", rows)
            else:
                rows = []
                for i in rng:
                    c, s, _, ip = triplet(i)
                    for kind_, value, w in (("client", ip, 3600.0), ("sender", s, 86400.0)):
                        counter = Counter(kind_, value, w, int(NOW // w), 0, 1)
                        rows.append((kind_, value, w, counter.bucket, 0, 1, counter.expires))
                conn.executemany("INSERT OR REPLACE INTO limits_rates (kind, value, span, bucket, previous,"
                                 " current, expires) VALUES (?,?,?,?,?,?,?)", rows)


async def migrated(stores: Stores) -> None:
    """Open the SQLite stores and migrate every table (the first call of each store does)."""
    await stores.greylist.get("x", "y", "z")
    await stores.senders.get("x", "y")
    await stores.limits.counters("x", "y")


async def filled_copy(keep: str, kind: str, n: int, dest: str) -> None:
    """``dest``: a copy of ``keep``'s database of ``n`` ``kind`` keys, filled there first if
    missing (filling 1M keys takes minutes; every figure starts from the same rows)."""
    pristine = os.path.join(keep, f"{kind}-{n}.db")
    if not os.path.exists(pristine):
        stores = Stores(f"sqlite://{pristine}.part")
        try:
            await migrated(stores)
            await stores.greylist.db.run(lambda conn: fill_sqlite(conn, kind, n))
            await stores.greylist.db.run(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        finally:
            await stores.close()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{pristine}.part{suffix}")
        os.rename(f"{pristine}.part", pristine)
    shutil.copyfile(pristine, dest)


# KEYS: none. ARGV: 1 kind, 2 first index, 3 last index (exclusive), 4 prefix, 5 now,
# 6 a sender doc template (senders). Mirrors triplet()/sender() above and the stores' keys.
FILL_LUA = """
local kind, a, b, P, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
for i = a, b - 1 do
  local hi, lo = math.floor(i / 250), i % 250
  local net = '10.' .. (math.floor(hi / 256) % 256) .. '.' .. (hi % 256)
  local client, s = net .. '.0/24', 'sender' .. i .. '@s' .. (i % 997) .. '.example'
  if kind == 'greylist' then
    local r = 'user' .. (i % 5000) .. '@example.com'
    local k = P .. 'gl:t:' .. client .. ' ' .. s .. ' ' .. r
    redis.call('HSET', k, 'client', client, 'sender', s, 'recipient', r, 'first', ARGV[6], 'last', ARGV[7],
      'attempts', 2, 'passed', '1', 'passed_at', ARGV[7], 'retry_delay', '600', 'expires', ARGV[8])
    redis.call('EXPIRE', k, 40 * 86400)
    redis.call('ZADD', P .. 'gl:awl:' .. client, tonumber(ARGV[8]), client .. ' ' .. s .. ' ' .. r)
  elseif kind == 'senders' then
    local doc = string.gsub(ARGV[6], '@KEY@', s)
    redis.call('HSET', P .. 'sm:senders:' .. s, 'v', '1', 'doc', doc)
    redis.call('EXPIRE', P .. 'sm:senders:' .. s, 90 * 86400)
  else
    local ip = net .. '.' .. (lo + 1)
    local k1 = P .. 'lim:r:client:3600:' .. ip
    local k2 = P .. 'lim:r:sender:86400:' .. s
    redis.call('HSET', k1, 'b', math.floor(now / 3600), 'p', 0, 'c', 1)
    redis.call('EXPIRE', k1, 7200)
    redis.call('HSET', k2, 'b', math.floor(now / 86400), 'p', 0, 'c', 1)
    redis.call('EXPIRE', k2, 2 * 86400)
  end
end
return b - a
"""


async def fill_redis(prefix: str, kind: str, n: int, redis_url: str = REDIS) -> None:
    import redis.asyncio as aioredis
    r = aioredis.Redis.from_url(redis_url)
    try:
        script = r.register_script(FILL_LUA)
        extra: list = []
        if kind == "greylist":
            extra = [repr(T0), repr(T0 + 600), repr(T0 + 600 + PARAMS.pass_ttl)]
        elif kind == "senders":
            rec = MACHINE.new_record("@KEY@", T0)
            rec.state, rec.counts, rec.version = "probation", {"delivered": 1}, 1
            extra = [rec.to_json()]
        for start in range(0, n, 10_000):
            await script(args=[kind, start, min(n, start + 10_000), prefix, repr(NOW), *extra])
    finally:
        await r.aclose()


# --- decisions ---------------------------------------------------------------------------

def job_for(stores: Stores, kind: str, i: int):
    c, s, r, ip = triplet(i)
    if kind == "greylist":
        return lambda: stores.greylist.attempt(c, s, r, now=NOW, params=PARAMS, client_ip=ip)
    if kind == "senders":
        return lambda: MACHINE.feed(stores.senders, s, [Event("delivered", "bench")], NOW)
    return lambda: stores.limits.hit([("client", ip, 3600.0, 10**9, True), ("sender", s, 86400.0, 10**9, True)],
                                     NOW)


async def run_all(jobs, concurrency: int, took: list | None = None) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) to run every job, ``concurrency`` at once;
    each job's wall seconds appended to ``took`` if given."""
    it = iter(jobs)
    started, cpu = time.perf_counter(), time.process_time()

    async def worker():
        for job in it:
            if took is None:
                await job()
                continue
            t = time.perf_counter()
            await job()
            took.append(time.perf_counter() - t)
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return time.perf_counter() - started, time.process_time() - cpu


async def measure(stores: Stores, kind: str, n: int, count: int, concurrency: int,
                  seed: int = 0, start=None, took: list | None = None) -> tuple[float, float]:
    """(decisions per second, CPU µs of this process per decision); ``start``: called
    between the warm-up and the timed run (the processes of ``--processes`` meet there);
    ``took``: as run_all's."""
    rng = random.Random(concurrency + seed * 1000)
    jobs = [job_for(stores, kind, rng.randrange(n)) for _ in range(count)]
    await run_all(jobs[:200], concurrency)  # warm: connections, statements, scripts
    if start is not None:
        start()
    wall, cpu = await run_all(jobs, concurrency, took)
    return count / wall, cpu / count * 1e6


def one_of_several(url: str, kind: str, n: int, count: int, concurrency: int, seed: int, barrier, answers) -> None:
    """A worker process of ``--processes``: its own stores on ``url``, its own keys, timed
    from the moment every process is warm; puts (rate, CPU µs, waited, WAL restarts, p50 and
    p99 ms of a decision)."""
    async def run():
        stores = Stores(url)
        try:
            took: list[float] = []
            rate = await measure(stores, kind, n, count, concurrency, seed, barrier.wait, took)
            took.sort()
            db = getattr(getattr(stores, kind), "db", None)
            answers.put((*rate, getattr(db, "waited", 0), getattr(db, "restarts", 0),
                         took[len(took) // 2] * 1e3, took[int(len(took) * 0.99)] * 1e3))
        finally:
            await stores.close()
    use_uvloop()
    asyncio.run(run())


def several(processes: int, url: str, kind: str, n: int, count: int, concurrency: int) -> tuple[float, float]:
    """``processes`` workers deciding at once on one store (as ``workers: 2``): (their
    decisions per second in all, their mean CPU µs per decision); each one's line printed."""
    ctx = multiprocessing.get_context("spawn")
    barrier, answers = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=one_of_several, args=(url, kind, n, count, concurrency, i, barrier, answers))
             for i in range(processes)]
    for p in procs:
        p.start()
    got = [answers.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    for rate, cpu, waited, restarts, p50, p99 in got:
        print(f"      one process: {rate:9,.0f} /s  {cpu:6.0f} µs CPU each  p50/p99 {p50:.2f}/{p99:.2f} ms  "
              f"moved to the thread (busy) {waited:6,} ({waited / count:.1%})  WAL restarts {restarts}", flush=True)
    return sum(g[0] for g in got), sum(g[1] for g in got) / len(got)


async def bench_backend(backend: str, sizes, count: int, profile: str | None, tmp: str, kinds,
                        keep: str | None = None, processes: int = 1, redis_url: str = REDIS) -> dict:
    out: dict = {}
    for kind in kinds:
        for n in sizes:
            prefix = f"store-bench-{uuid.uuid4().hex[:12]}:"
            url = f"sqlite://{tmp}/{kind}-{n}.db" if backend == "sqlite" else with_prefix(redis_url, prefix)
            started = time.perf_counter()
            if backend == "sqlite" and keep:
                await filled_copy(keep, kind, n, f"{tmp}/{kind}-{n}.db")
            stores = Stores(url)
            try:
                if backend == "sqlite":
                    await migrated(stores)
                    if not keep:
                        await stores.greylist.db.run(lambda conn: fill_sqlite(conn, kind, n))
                else:
                    await fill_redis(prefix, kind, n, redis_url)
                filled = time.perf_counter() - started
                for conc in (1, 64):
                    if profile == f"{backend}:{kind}" and conc == 64 and n == sizes[-1]:
                        prof = cProfile.Profile()
                        prof.enable()
                        rate = await measure(stores, kind, n, count, conc)
                        prof.disable()
                        text = io.StringIO()
                        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
                        print(text.getvalue())
                    elif processes > 1:
                        rate = several(processes, url, kind, n, count if conc > 1 else count // 2, conc)
                    else:
                        rate = await measure(stores, kind, n, count if conc > 1 else count // 2, conc)
                    out[(kind, n, conc)] = rate
                    print(f"  {backend:6} {kind:8} {n:>9,} keys (filled in {filled:5.1f}s)  "
                          f"{'seq' if conc == 1 else 'par64':5} {rate[0]:9,.0f} /s  {rate[1]:6.0f} µs CPU each"
                          f"  RSS {rss_mib():4.0f} MiB",
                          flush=True)
            finally:
                await stores.close()
                if backend == "redis":
                    drop_redis(prefix, redis_url)
                else:
                    for f in os.listdir(tmp):
                        os.unlink(os.path.join(tmp, f))
    return out


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def table(results: dict, sizes) -> str:
    """Decisions per second (wall clock), and in brackets the CPU µs this process spent per
    decision: the figure a loaded, shared machine disturbs least."""
    lines = ["| backend | decision | mode | " + " | ".join(f"{n:,} keys: /s (CPU µs)" for n in sizes) + " |",
             "|---|---|---|" + "---:|" * len(sizes)]
    for backend, figures in results.items():
        for kind in KINDS:
            for conc, mode in ((1, "seq"), (64, "par64")):
                cells = []
                for n in sizes:
                    rate, cpu = figures.get((kind, n, conc), (None, None))
                    cells.append("-" if rate is None else f"{rate:,.0f} ({cpu:.0f})")
                lines.append(f"| {backend} | {kind} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kinds", default=",".join(KINDS), help="greylist,senders,limits")
    ap.add_argument("--decisions", type=int, default=20_000, help="decisions timed per figure (par64)")
    ap.add_argument("--profile", help="BACKEND:KIND: cProfile the par64 run at the largest size")
    ap.add_argument("--keep", metavar="DIR",
                    help="SQLite: keep the filled databases in DIR and start each figure from a copy "
                         "(filled once; later runs reuse them)")
    ap.add_argument("--processes", type=int, default=1,
                    help="worker processes deciding at once on one store (each figure: their sum)")
    ap.add_argument("--redis", default=REDIS, metavar="URL",
                    help=f"the Redis server (default {REDIS}; unix:///PATH?db=15: at its Unix socket)")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/store-*.md")
    ap.add_argument("--no-group", action="store_true",
                    help="SQLite: commit each write alone (for comparison with the group commit)")
    args = ap.parse_args()
    if args.no_group:
        from smtpgate.stores.sqlite_store import SqliteDatabase
        SqliteDatabase.write = SqliteDatabase.call
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    tmp = tempfile.mkdtemp(prefix="store-bench-")
    try:
        for backend in args.backends.split(","):
            results[backend] = await bench_backend(backend, sizes, args.decisions, args.profile, tmp,
                                                   args.kinds.split(","), args.keep, args.processes, args.redis)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    who = "one worker (this process)" if args.processes == 1 else f"{args.processes} worker processes in all"
    head = (f"store decisions per second, {who}, {os.cpu_count()} CPUs, "
            f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = head + "\n\n" + table(results, sizes) + "\n"
    print("\n" + text)
    if not args.no_write:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        path = os.path.join(ROOT, "bench", "results", time.strftime("store-%Y%m%d-%H%M%S.md", time.gmtime()))
        with open(path, "w") as f:
            f.write(text)
        print(f"written to {path}")


MACHINE = machine()

def use_uvloop() -> None:
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as the gate runs
    except ImportError:
        pass


if __name__ == "__main__":
    use_uvloop()
    asyncio.run(main())
