#!/usr/bin/env python3
"""The gate's own Python per Redis round trip, without the kernel or the server (run by
hand; issue 13).

    .venv/bin/python bench/redis_link_cpu.py

``RedisLink.command`` (the short way: ``_queue``, ``_send_now``, the wire, ``_sent``),
``RedisSenderStore.update`` (a compare-and-set that wins) and ``RedisGreylistStore.attempt``
(the bench triplet, allowed), one call at a time, on wire
connections whose transport answers in the next turn of the event loop instead of writing
to a socket. A real round trip adds the syscalls, the wake-ups and the server (tens of µs,
and most of the noise on a shared machine): this isolates the part the gate's code decides.
CPU µs per call, the fastest of ``--runs``; no Redis server is needed.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import hiredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.stores import Params, redis_wire  # noqa: E402
from smtpgate.stores.redis_store import RedisGreylistStore  # noqa: E402
from smtpgate.stores.senders import SenderRecord  # noqa: E402
from smtpgate.stores.senders_redis import RedisSenderStore  # noqa: E402

URL = "redis://127.0.0.1:6379/12?prefix=redis-link-cpu:"  # never connected to
GREYLIST_SHA = b"1" * 40  # the greylist script's (never loaded: the transport answers)
# what the greylist script answers for the bench triplet on the allow list
ALLOWED = ("allowed\t0\t\t\t0\t0\t\t\t\ttriplet:127.0.0.0/24 sender@bench.test rcpt@bench.test\t-1\t"
           '{"kind": "triplet", "value": "127.0.0.0/24 sender@bench.test rcpt@bench.test", '
           '"created": 1767225600.0}').encode()


class AnsweringTransport:
    """Every command written is answered in the next turn: an HMGET of an absent record
    (two nils), the greylist script ``ALLOWED``, anything else ``1`` (a compare-and-set
    that wins)."""

    def __init__(self, wire: redis_wire._Wire):
        self.wire, self.loop = wire, asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        commands = hiredis.Reader()  # a packed command is a RESP array: read it as one
        commands.feed(data)
        replies = []
        while (command := commands.gets()) is not False:
            if command[0] == b"HMGET":
                replies.append(b"*2\r\n$-1\r\n$-1\r\n")
            elif command[1] == GREYLIST_SHA:
                replies.append(b"$%d\r\n%s\r\n" % (len(ALLOWED), ALLOWED))
            else:
                replies.append(b":1\r\n")
        self.loop.call_soon(self.wire.data_received, b"".join(replies))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def _answering_connection(pool: redis_wire.WirePool) -> redis_wire.WireConnection:
    wire = redis_wire._Wire()
    wire.connection_made(AnsweringTransport(wire))
    return redis_wire.WireConnection(wire, pool._timeout)


def _counted(record: SenderRecord | None):
    if record is None:
        record = SenderRecord("bench", "sender@bench.test", "new", 1.0, 1.0, 1.0, 1e12)
    record.counts["delivered"] = record.counts.get("delivered", 0) + 1
    return record, None


async def fastest(call, n: int, runs: int) -> float:
    """CPU µs per ``await call()``: the fastest of ``runs`` loops of ``n``, after a warm-up."""
    await call()  # (the first opens the connection)
    figures = []
    for _ in range(runs):
        started = time.process_time()
        for _ in range(n):
            await call()
        figures.append((time.process_time() - started) / n * 1e6)
    return min(figures)


async def measure(n: int, runs: int) -> dict[str, float]:
    store = RedisSenderStore(URL)
    greylist = RedisGreylistStore(URL, link=store.link)
    store.link.client()
    store.link.scripts["cas"].sha = "0" * 40  # never loaded: the transport answers
    store.link.scripts["attempt"].sha = GREYLIST_SHA.decode()
    params = Params(delay=300.0)
    calls = {"RedisLink.command (HMGET)": lambda: store.link.command("HMGET", "k", "v", "doc"),
             "RedisSenderStore.update": lambda: store.update("bench", "sender@bench.test", _counted),
             "RedisGreylistStore.attempt": lambda: greylist.attempt(
                 "127.0.0.0/24", "sender@bench.test", "rcpt@bench.test", now=1767225600.0,
                 params=params, client_ip="127.0.0.1")}
    try:
        return {name: await fastest(call, n, runs) for name, call in calls.items()}
    finally:
        await greylist.close()
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="the fastest of")
    ap.add_argument("--calls", type=int, default=20000, help="per run")
    a = ap.parse_args()
    redis_wire.WirePool._open = _answering_connection  # no server: every reply made here
    for name, us in asyncio.run(measure(a.calls, a.runs)).items():
        print(f"{name:<28} {us:6.2f} CPU µs/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
