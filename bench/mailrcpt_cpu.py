#!/usr/bin/env python3
"""The gate's CPU for a transaction's downstream MAIL + first RCPT, pipelined or not (run by hand).

    .venv/bin/python bench/mailrcpt_cpu.py                 # 6 rounds of 5000, alternated
    .venv/bin/python bench/mailrcpt_cpu.py --rounds 3 --count 2000

Starts ``smtp-sink`` on loopback and, in this process on uvloop as the gate runs, opens one
``relay.Downstream`` session; each round sends ``mail_rcpt`` then ``reset`` (RSET) ``count``
times, alternately with PIPELINING as smtp-sink offers it and with it hidden (the commands
then go one at a time), and prints this process's CPU µs and the wall µs per transaction.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.config import load_gate_config  # noqa: E402
from smtpgate.smtp.relay import Downstream  # noqa: E402
from tests.support.gateproc import start_smtp_sink, stop_pid  # noqa: E402


async def one_round(port: int, count: int, pipelined: bool) -> tuple[float, float]:
    cfg = load_gate_config(None)
    relay = Downstream(dataclasses.replace(cfg.downstream, host="127.0.0.1", port=port), "gate.test")
    smtp = relay._client()
    await smtp.connect()
    await smtp.ehlo()
    relay._smtp = smtp
    relay._pipelining = pipelined and "pipelining" in smtp.esmtp_extensions
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        mail, rcpt = await relay.mail_rcpt("<a@sender.test>", [], "<user@example.com>", [], "tx1")
        assert mail.code == 250 and rcpt is not None and rcpt.code == 250, (mail, rcpt)
        await relay.reset()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await relay.close()
    return cpu / count * 1e6, wall / count * 1e6


async def main(rounds: int, count: int) -> None:
    sink = start_smtp_sink(Path(tempfile.mkdtemp(prefix="mailrcpt-")))
    try:
        for n in range(rounds):
            for pipelined in (False, True):
                cpu, wall = await one_round(sink.port, count, pipelined)
                how = "pipelined    " if pipelined else "one at a time"
                print(f"round {n + 1} {how}: {cpu:4.0f} CPU µs, {wall:4.0f} wall µs per MAIL + RCPT + RSET",
                      flush=True)
    finally:
        stop_pid(sink.proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    uvloop.run(main(args.rounds, args.count))
