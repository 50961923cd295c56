"""The client side's CPU per message, in process: the real GateSMTP (aiosmtpd, the DATA
reader, the conversation, the log line) on uvloop over loopback TCP, a client like
smtp-source's (HELO, then MAIL, RCPT, DATA, the message, one command at a time) and the fake
downstream of smtpgate.testing (no relay, no sockets behind the gate).

    .venv/bin/python bench/front_profile.py                 # CPU µs per message, best of --runs
    .venv/bin/python bench/front_profile.py --profile 25    # and a cProfile of one run (top 25)
    .venv/bin/python bench/front_profile.py --per-connection   # a connection per message (seq1_conn)

The figure includes the client's own work (the same in any A/B); one process, so other
processes on the machine disturb it far less than bench/profile_gate.py's --cpu figure.

Every body line starts with a digit, so no line starts with a dot: the DATA reader's first
CRLF "." is the terminator and it skips dot-unstuffing, its best case (most real mail).
``--dots N`` sends every Nth body line dot-stuffed (".." on the wire) to measure the other path.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import time

import uvloop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from smtpgate.logs import setup_logging  # noqa: E402
from smtpgate.runtime.collector import settle_for_serving  # noqa: E402
from smtpgate.smtp.connections import ConnectionTracker  # noqa: E402
from smtpgate.smtp.front import GateSMTP  # noqa: E402
from smtpgate.testing import Harness  # noqa: E402

LINE = b"X" * 78 + b"\r\n"


def bench_message(size: int, dots: int = 0) -> bytes:
    """Like smtp-source's: four headers, then 80-octet lines up to ``size`` octets, as sent
    (before the final dot); with ``dots``, every ``dots``th line dot-stuffed."""
    head = (b"From: <sender@example.com>\r\nTo: <rcpt@example.com>\r\n"
            b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-Id: <1@example.com>\r\n\r\n")
    lines = [b".." + LINE[2:] if dots and i % dots == dots - 1 else b"%d" % (i % 10) + LINE[1:]
             for i in range(max(size - len(head), 0) // len(LINE))]
    return head + b"".join(lines)


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] == b" ":
            return


async def greeted(port: int):
    """A new connection, its 220 read and HELO answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await expect(reader, b"220")
    writer.write(b"HELO client.example.com\r\n")
    await expect(reader, b"250")
    return reader, writer


async def goodbye(reader, writer) -> None:
    """QUIT, its 221, then the close the gate makes once the session is settled."""
    writer.write(b"QUIT\r\n")
    await expect(reader, b"221")
    await reader.read()  # the gate's close
    writer.close()


async def run(harness: Harness, messages: int, message: bytes,
              per_connection: bool = False) -> float:
    """CPU seconds per message for ``messages`` messages on one connection (``per_connection``:
    a new one per message, greeted with HELO and ended with QUIT, like smtp-source without -d)."""
    loop = asyncio.get_running_loop()
    tracker = ConnectionTracker()
    server = await loop.create_server(lambda: GateSMTP(harness.gate, tracker), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if not per_connection:
        reader, writer = await greeted(port)
    body = message + b".\r\n"
    start = time.process_time()
    for i in range(messages):
        if per_connection:
            reader, writer = await greeted(port)
        writer.write(b"MAIL FROM:<sender@example.com>\r\n")
        await expect(reader, b"250")
        writer.write(b"RCPT TO:<rcpt@example.com>\r\n")
        await expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await expect(reader, b"354")
        writer.write(body)
        await expect(reader, b"250")
        if per_connection:
            await goodbye(reader, writer)
        if i % 500 == 499:  # the fake downstream keeps what it relayed
            for relay in harness.relays:
                relay.relayed.clear()
    took = time.process_time() - start
    if not per_connection:
        await goodbye(reader, writer)
    server.close()
    await server.wait_closed()
    return took / messages


async def main_async(args) -> None:
    harness = Harness(domains=("example.com",))
    message = bench_message(args.size, args.dots)
    conn = args.per_connection
    await run(harness, 200, message, conn)  # warm-up
    settle_for_serving()  # the serving worker's collector settings
    best = min([await run(harness, args.messages, message, conn) for _ in range(args.runs)])
    dots = f", every {args.dots}th line dot-stuffed" if args.dots else ""
    dots += ", a connection per message" if conn else ""
    print(f"{args.messages} messages x {args.runs} runs, {len(message)} octets{dots}: "
          f"{best * 1e6:.1f} CPU µs/message (best run)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await run(harness, args.messages, message, conn)
        profiler.disable()
        stats = pstats.Stats(profiler)
        print(f"{stats.total_calls / args.messages:.0f} function calls per message")
        stats.sort_stats("tottime").print_stats(args.profile)
    await harness.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=10_240, help="octets per message")
    parser.add_argument("--dots", type=int, default=0, metavar="N",
                        help="dot-stuff every Nth body line (default: none, the best case)")
    parser.add_argument("--per-connection", action="store_true",
                        help="a new connection per message (HELO, the message, QUIT)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also a cProfile of one run, its TOP lines")
    args = parser.parse_args()
    setup_logging()
    logging.getLogger().handlers[0].stream = open(os.devnull, "w")  # the line is built, not kept
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
