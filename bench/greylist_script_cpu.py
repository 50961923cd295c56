#!/usr/bin/env python3
"""What one greylist decision costs the Redis server, case by case (run by hand; issue 13).

    .venv/bin/python bench/greylist_script_cpu.py --url redis://127.0.0.1:6411/0

For each case, ``--calls`` decisions through ``RedisGreylistStore.attempt`` (``--at-once``
at a time: 64 keeps the server busy, so its wake-ups weigh little; 1 is a cold server), with the server's figures before and
after: its CPU (``INFO cpu``: the whole server, so point ``--url`` at a server of your own,
or other clients are counted too) and the script's own time (``INFO commandstats``: evalsha).
Server µs per decision, the fastest of ``--runs``. Keys go under a fresh prefix, deleted
afterwards.

Cases: ``triplet`` (the bench triplet on the allow list, as ``make bench`` has it),
``sender`` (the sender allowed), ``pending`` (no allow entry: a triplet retried too early),
each with a client network on the allow list (``+net``: the prefix lengths in use are
non-empty) or without; ``client`` (the client's /24 allowed) and ``triplet+own`` (the
triplet and the client's /24 and /25 allowed: the triplet is named).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.stores import Params, make_allow, triplet_value  # noqa: E402
from smtpgate.stores.redis_store import RedisGreylistStore  # noqa: E402

T0 = 1767225600.0
CLIENT, SENDER, RCPT, IP = "127.0.0.0/24", "sender@bench.test", "rcpt@bench.test", "127.0.0.1"
CASES = ("triplet", "sender", "pending", "triplet+net", "sender+net", "pending+net", "client", "triplet+own")


def server_figures(url: str) -> tuple[float, int, int]:
    """(CPU seconds, evalsha calls, evalsha µs) of the server so far."""
    with redis.Redis.from_url(url) as r:
        cpu, stats = r.info("cpu"), r.info("commandstats").get("cmdstat_evalsha", {})
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], stats.get("calls", 0), stats.get("usec", 0)


async def one_case(url: str, case: str, calls: int, runs: int, at_once: int) -> tuple[float, float]:
    prefix = f"glcpu-{uuid.uuid4().hex}:"
    store = RedisGreylistStore(f"{url}{'&' if '?' in url else '?'}prefix={prefix}")
    params = Params(delay=300.0)
    try:
        kind = case.split("+")[0]
        if kind == "triplet":
            await store.add_allow(make_allow("triplet", triplet_value(CLIENT, SENDER, RCPT), T0, None))
        elif kind == "sender":
            await store.add_allow(make_allow("sender", SENDER, T0, None))
        elif kind == "client":
            await store.add_allow(make_allow("client", "127.0.0.0/24", T0, None))
        if case.endswith("+net"):
            await store.add_allow(make_allow("client", "198.51.100.0/24", T0, None))
        elif case.endswith("+own"):
            for net in ("127.0.0.0/24", "127.0.0.0/25"):
                await store.add_allow(make_allow("client", net, T0, None))

        async def decide():
            a = await store.attempt(CLIENT, SENDER, RCPT, now=T0 + 1, params=params, client_ip=IP)
            assert a.outcome == ("too_early" if kind == "pending" else "allowed"), a.outcome

        await store.attempt(CLIENT, SENDER, RCPT, now=T0, params=params, client_ip=IP)
        best = None
        for _ in range(runs):
            cpu0, n0, us0 = server_figures(url)
            for _ in range(calls // at_once):
                await asyncio.gather(*(decide() for _ in range(at_once)))
            cpu1, n1, us1 = server_figures(url)
            done = (calls // at_once) * at_once
            figure = ((cpu1 - cpu0) / done * 1e6, (us1 - us0) / max(1, n1 - n0))
            best = figure if best is None or figure[0] < best[0] else best
        return best
    finally:
        await store.close()
        with redis.Redis.from_url(url) as r:
            for k in r.scan_iter(match=prefix + "*", count=1000):
                r.delete(k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="a Redis of your own (redis://127.0.0.1:PORT/DB)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--calls", type=int, default=20000, help="decisions per run")
    ap.add_argument("--runs", type=int, default=3, help="the fastest of")
    ap.add_argument("--at-once", type=int, default=64, help="decisions asked together")
    a = ap.parse_args()
    if not 1 <= a.at_once <= a.calls:
        ap.error("--at-once must be at least 1 and at most --calls")
    for case in a.cases.split(","):
        cpu, script = asyncio.run(one_case(a.url, case, a.calls, a.runs, a.at_once))
        print(f"{case:<12} server CPU {cpu:6.2f} µs/decision, evalsha {script:5.2f} µs/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
