#!/usr/bin/env python3
"""The gate's CPU for one client connection's downstream side with ``downstream.pool`` (run by hand).

    .venv/bin/python bench/pool_cpu.py                      # 5 rounds of 2000 clients
    .venv/bin/python bench/pool_cpu.py --rounds 3 --count 1000 --ehlo

Starts ``smtp-sink`` on loopback and, in this process on uvloop as the gate runs, plays
``count`` client connections one after the other as seq1_conn's smtp-source makes them: a
``relay.Downstream`` on the worker's pool per client, opened as a HELO client (``--ehlo``:
an EHLO one) from 127.0.0.1 (XCLIENT, HELO), MAIL + RCPT, a short message (351 bytes), then ``close``
(the session back to the pool: after a HELO client once XCLIENT shows offered). Prints this
process's CPU µs per client connection: the downstream's share of seq1_conn, without the
client side, the rules or the stores. A/B: run it in each worktree (it imports its own tree).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.config import load_gate_config  # noqa: E402
from smtpgate.mail.session import Session  # noqa: E402
from smtpgate.smtp.pool import SessionPool  # noqa: E402
from smtpgate.smtp.relay import Capabilities, Downstream, farewell  # noqa: E402
from tests.support.gateproc import start_smtp_sink, stop_pid  # noqa: E402

MESSAGE = b"Subject: pool\r\n\r\n" + b"x" * 78 + b"\r\n" * 128


async def one_round(pool: SessionPool, port: int, count: int, ehlo: bool) -> float:
    cfg = load_gate_config(None)
    downstream = dataclasses.replace(cfg.downstream, host="127.0.0.1", port=port)
    capabilities = Capabilities()
    cpu = time.process_time()
    for n in range(count):
        session = Session(f"s{n}", "127.0.0.1", 40000 + n % 20000, helo="client.test",
                          esmtp=ehlo, proto="ESMTP" if ehlo else "SMTP")
        relay = Downstream(downstream, "gate.test", capabilities, pool)
        await relay.open(session)
        mail, rcpt = await relay.mail_rcpt("<a@sender.test>", [], "<user@example.com>", [], f"tx{n}")
        assert mail.code == 250 and rcpt is not None and rcpt.code == 250, (mail, rcpt)
        assert (await relay.data(MESSAGE)).code == 250
        await relay.close()
    return (time.process_time() - cpu) / count * 1e6


async def main(rounds: int, count: int, ehlo: bool) -> None:
    sink = start_smtp_sink(Path(tempfile.mkdtemp(prefix="poolcpu-")))
    pool = SessionPool(8, 60.0, 10**9, farewell)
    try:
        await one_round(pool, sink.port, 100, ehlo)  # warm-up
        for n in range(rounds):
            cpu = await one_round(pool, sink.port, count, ehlo)
            print(f"round {n + 1}: {cpu:4.0f} CPU µs per client connection", flush=True)
    finally:
        await pool.close()
        stop_pid(sink.proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--ehlo", action="store_true", help="clients greet with EHLO")
    args = parser.parse_args()
    uvloop.run(main(args.rounds, args.count, args.ehlo))
