#!/usr/bin/env python3
"""Where a relayed message's time goes, rule by rule, in process (run by hand; issue 13).

Each case runs the whole offline dialogue (``smtpgate.testing.Harness``: CONNECT, EHLO,
MAIL, RCPT, DATA, the pipeline, the trace, the log line) on a 10 KB message like
``smtp-source``'s, with a fake downstream and no sockets, so the pipeline's own cost is not
hidden behind network time. The store-backed rules (``senders``, ``greylist``) get in-memory
stores that answer at once, so what is measured is the rule and pipeline code, not SQLite
or Redis (bench/store_bench.py measures the stores); ``--state sqlite`` gives them a real
SQLite file instead (the bench triplet on the allow list, as ``make bench`` has it), so the
store's own CPU per message (SQL, JSON, the group commit) is in the figure; ``--state redis``
puts it on the Redis server at 127.0.0.1:6379 (DB 15, a fresh key prefix per case, deleted
afterwards) and also reports the server's CPU per message (``INFO cpu`` before and after each
run: the server shares the gate's cores, so its time counts as much as the gate's);
``--commands`` adds what it ran per message (``INFO commandstats``, scripts' inner commands
included).

    .venv/bin/python bench/rulecost_profile.py                        # CPU µs per message, each case
    .venv/bin/python bench/rulecost_profile.py --profile real --top 15    # cProfile of one case
    .venv/bin/python bench/rulecost_profile.py --state sqlite --cases empty,senders,greylist,real
    .venv/bin/python bench/rulecost_profile.py --state redis --cases empty,senders,greylist,real
    .venv/bin/python bench/rulecost_profile.py --state redis --cases real --runs 1 --commands
    .venv/bin/python bench/rulecost_profile.py --state redis --redis "unix:///run/redis.sock?db=15"
    .venv/bin/python bench/rulecost_profile.py --metrics --cases empty,real   # with `metrics:` set

The log line is written at ``info`` to /dev/null through the gate's own text formatter, as
``make bench`` runs the gate; the garbage collector has a serving worker's settings
(``smtpgate.runtime.collector``), applied after each case's warm-up. ``--metrics`` records
the Prometheus metrics as a gate with ``metrics:`` does (``smtpgate.metrics.prepare``: the
multiprocess files in a temporary folder), so their cost per message is in the figure.
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
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.logs import setup_logging  # noqa: E402
from smtpgate.runtime.collector import settle_for_serving  # noqa: E402
from smtpgate.stores import Stores, make_allow, triplet_value  # noqa: E402
from smtpgate.stores.greylist import Attempt, GreylistStore  # noqa: E402
from smtpgate.stores.senders import SenderStore  # noqa: E402
from smtpgate.testing import FakeClock, Harness  # noqa: E402
from bench.greylist_bench import REDIS, delete_prefix, with_prefix  # noqa: E402 (DB 15: every bench's Redis)


class MemoryGreylist(GreylistStore):
    """Every triplet allowed at once, as in ``make bench`` (the triplet is on the allow list)."""

    async def attempt(self, client, sender, recipient, *, now, params, client_ip=None, dry_run=False):
        return Attempt("allowed", None)

    async def close(self):
        pass


class NoLimits:
    async def close(self):
        pass


class MemorySenders(SenderStore):
    def __init__(self):
        self.records = {}

    async def get(self, machine, key):
        return self.records.get((machine, key))

    async def update(self, machine, key, change, now=None):
        record, out = change(self.records.get((machine, key)))
        if record is None:
            self.records.pop((machine, key), None)
        else:
            self.records[(machine, key)] = record
        return out

    async def close(self):
        pass


def smtp_source_message(size: int = 10 * 1024) -> bytes:
    """What ``smtp-source -l 10240`` sends: four headers, then 78-character lines of a digit
    and X's (which the attachments rule also tries as base64 sent without its header)."""
    head = (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\n"
            b"Date: Mon, 30 Nov 2026 12:00:00 +0000 (UTC)\r\nMessage-Id: <50d4.0003.0000@vm>\r\n\r\n")
    lines = [b"%d" % (i % 10) + b"X" * 77 for i in range(1, size // 80 + 1)]
    return head + b"\r\n".join(lines) + b"\r\n"


def noop_rules(count: int = 4):
    """``count`` rules with a hook at every stage that does nothing: what the framework itself
    costs per rule per stage (the ``noop`` case against ``empty``)."""
    from smtpgate import Rule
    from smtpgate.pipeline.rule import SIGNATURES, hook_parameters

    class Noop(Rule):
        """Each hook with its documented signature (the runner's plain call)."""

        async def on_connect(self, session):
            return None

        async def on_helo(self, session):
            return None

        async def on_mail(self, tx):
            return None

        async def on_rcpt(self, tx, rcpt):
            return None

        async def on_data(self, tx):
            return None

        async def on_seal(self, tx, seal):
            return None

        async def on_delivered(self, tx, reply):
            return None

        async def on_end(self, tx, reply):
            return None

        async def on_disconnect(self, session):
            return None

    # a stage added to the framework, or a signature changed, must show here, not be missed
    assert {hook: hook_parameters(getattr(Noop, hook)) for hook in SIGNATURES} == SIGNATURES
    return [(type(f"Noop{i}", (Noop,), {"name": f"noop{i}"}), {}) for i in range(count)]


def rules_of(case: str):
    from smtpgate.pipeline.plugins import PluginRegistry
    if case == "noop":
        return noop_rules()
    registry = PluginRegistry.load()
    table = {
        "senders": [("senders", {})],
        "greylist": [("greylist", {"delay": "5m"})],
        "attachments": [("attachments", {"action": "strip"})],
        "rewrite": [("rewrite", {"add_headers": {"X-Bench": "real"}})],
    }
    table["real"] = table["senders"] + table["greylist"] + table["attachments"] + table["rewrite"]
    return [(registry.get(name), opts) for name, opts in table.get(case, [])]


CASES = ("empty", "noop", "senders", "greylist", "attachments", "rewrite", "real")
STATEFUL = ("senders", "greylist", "real")  # the cases that use the stores


def redis_server_cpu(redis_url: str) -> float:
    """The Redis server's CPU seconds so far (user + system, its main thread and the rest)."""
    import redis
    with redis.Redis.from_url(redis_url) as r:
        info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def redis_commandstats(redis_url: str) -> dict[str, tuple[int, int]]:
    """The server's commands so far: name -> (calls, µs), those inside scripts included."""
    import redis
    with redis.Redis.from_url(redis_url) as r:
        return {name: (s["calls"], s["usec"]) for name, s in r.info("commandstats").items()}


def commands_per_message(before: dict, after: dict, messages: int) -> str:
    """``name calls/message (µs/call)`` of what the server ran meanwhile, busiest first
    (another client of the same server would be counted too)."""
    out = []
    for name, (calls, usec) in after.items():
        c, u = calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1]
        if c >= messages / 2:
            out.append((u, f"{name} {c / messages:.2f} ({u / c:.1f} µs)"))
    return ", ".join(text for _, text in sorted(out, reverse=True))


async def open_stores(state: str, folder: str, case: str, clock: FakeClock, redis_url: str) -> Stores:
    if state == "memory":
        return Stores("memory", greylist=MemoryGreylist(), senders=MemorySenders(), limits=NoLimits())
    if state == "redis":
        url = with_prefix(redis_url, f"rulecost-{uuid.uuid4().hex}:")
    else:
        url = f"sqlite:///{folder}/{case}.db"
    stores = Stores(url, clock)
    # the greylist keys the client by its /24 (default); allow the bench triplet outright
    await stores.greylist.add_allow(make_allow("triplet", triplet_value(
        "127.0.0.0/24", "sender@bench.test", "rcpt@bench.test"), clock.now(), None))
    return stores


async def measure(case: str, a, raw: bytes, folder: str) -> tuple[float, float | None] | None:
    """One case in one event loop (a SQLite store's loop connection belongs to it): a
    warm-up, the collector as a serving worker has it, then the fastest of ``a.runs`` (or,
    with ``--profile``, one cProfiled run): (gate CPU µs, Redis server CPU µs or None) per
    message."""
    clock = FakeClock()
    stores = await open_stores(a.state, folder, case, clock, a.redis)
    server = a.state == "redis" and case in STATEFUL
    h = Harness(rules_of(case), domains=["bench.test"], clock=clock, stores=stores)
    try:
        await run(h, raw, 200)  # warm-up
        settle_for_serving()
        if a.profile:
            prof = cProfile.Profile(time.process_time) if a.cpu else cProfile.Profile()
            prof.enable()
            await run(h, raw, a.messages)
            prof.disable()
            pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)
            return None
        figures = []
        for _ in range(a.runs):
            before, commands = (redis_server_cpu(a.redis), redis_commandstats(a.redis)) if server else (0.0, None)
            gate = await run(h, raw, a.messages)
            figures.append((gate, (redis_server_cpu(a.redis) - before) / a.messages * 1e6 if server else None))
            if server and a.commands:
                print(f"{case}: {commands_per_message(commands, redis_commandstats(a.redis), a.messages)}")
        return min(figures, key=lambda f: f[0] + (f[1] or 0.0))
    finally:
        prefix = stores.greylist.link.options["prefix"] if a.state == "redis" else None
        try:
            await stores.close()
        finally:
            if prefix:
                delete_prefix(prefix, a.redis)


async def run(h: Harness, raw: bytes, n: int) -> float:
    """CPU µs per message: the process's CPU time, which other work on a shared machine
    disturbs far less than the wall clock."""
    started = time.process_time()
    for _ in range(n):
        d = await h.send(raw, sender="sender@bench.test", recipients=["rcpt@bench.test"],
                         client_ip="127.0.0.1", helo="localhost")
        if d.reply.code != 250:
            raise SystemExit(f"not relayed: {d.reply}")
    return (time.process_time() - started) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5, help="the fastest of")
    ap.add_argument("--profile", choices=CASES, help="cProfile this case instead")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--cpu", action="store_true", help="with --profile: profile CPU time, not the wall clock")
    ap.add_argument("--commands", action="store_true",
                    help="with --state redis: the server's commands per message and their µs (INFO commandstats)")
    ap.add_argument("--message", choices=("smtp-source", "office"), default="smtp-source",
                    help="smtp-source's 10 KB text, or text + HTML + a 60 KB PDF (attachments_bench)")
    ap.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
    ap.add_argument("--state", choices=("memory", "sqlite", "redis"), default="memory",
                    help="the store-backed rules' stores: answering at once, a real SQLite file, "
                         "or Redis (--redis; a private prefix)")
    ap.add_argument("--redis", default=REDIS, metavar="URL",
                    help=f"with --state redis: the server (default {REDIS}; unix:///PATH?db=15: at its Unix socket)")
    ap.add_argument("--metrics", action="store_true",
                    help="record the Prometheus metrics, as a gate with `metrics:` set does")
    a = ap.parse_args()
    if a.cpu and not a.profile:
        ap.error("--cpu needs --profile")
    if a.commands and a.state != "redis":
        ap.error("--commands needs --state redis")
    setup_logging("text", "info")  # as the gate logs, into /dev/null
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))
    if a.message == "office":
        from bench.attachments_bench import office_message
        raw = office_message()
    else:
        raw = smtp_source_message()

    from smtpgate import metrics
    metrics_dir = metrics.prepare() if a.metrics else None  # before prometheus_client's import
    try:
        with tempfile.TemporaryDirectory() as folder:
            if a.profile:
                asyncio.run(measure(a.profile, a, raw, folder))
                return 0
            figures = {case: asyncio.run(measure(case, a, raw, folder)) for case in a.cases.split(",")}
    finally:
        if metrics_dir:
            metrics.cleanup(metrics_dir)
    base = figures.get("empty", next(iter(figures.values())))[0]
    server = a.state == "redis"
    print(f"{'case':<12} {'CPU µs/message':>14} {'share of empty (msg/s)':>24}"
          + (f" {'Redis server CPU µs/message':>28}" if server else ""))
    for case, (us, server_us) in figures.items():
        print(f"{case:<12} {us:>14.1f} {base / us:>24.2f}"
              + (f" {'-' if server_us is None else f'{server_us:.1f}':>28}" if server else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
