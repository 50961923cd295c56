#!/usr/bin/env python3
"""Latency per SMTP stage on one kept connection (run by hand; issue 13): what each of a
transaction's commands waits for its reply, as lat.py's keep mode times the whole.

    .venv/bin/python bench/stage_lat.py --port P [--port Q ...] [--n 1000] [--rounds 3] [--pause 0.002]

Sends lat.py's 10 KB message N times per round on one connection per gate (20 untimed first),
gates in turn, round after round; prints the median µs of MAIL, RCPT, DATA (the 354), the
message (end of data to the 250), and the whole, per gate and round. ``--pause``: the client
waits that long before each MAIL, so the MAIL no longer waits for the last transaction's
after-work (the senders rule's compare-and-set). 127.0.0.1 only.
"""
import argparse
import smtplib
import statistics
import time

from lat import make_msg

STAGES = ("mail", "rcpt", "data", "message", "whole")


def one_round(port: int, msgs: list[bytes], pause: float = 0.0) -> dict[str, float]:
    took = {s: [] for s in STAGES}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench.test") as s:
        s.ehlo()
        for i, m in enumerate(msgs):
            if pause:  # the last transaction's after-work (on_end, the log line) done by then
                time.sleep(pause)
            t0 = time.perf_counter()
            assert s.mail("sender@bench.test")[0] == 250
            t1 = time.perf_counter()
            assert s.rcpt("rcpt@bench.test")[0] == 250
            t2 = time.perf_counter()
            s.putcmd("data")
            assert s.getreply()[0] == 354
            t3 = time.perf_counter()
            s.send(m + b"\r\n.\r\n")
            assert s.getreply()[0] == 250
            t4 = time.perf_counter()
            if i >= 20:  # warmed up
                for name, a, b in (("mail", t0, t1), ("rcpt", t1, t2), ("data", t2, t3),
                                   ("message", t3, t4), ("whole", t0, t4)):
                    took[name].append((b - a) * 1e6)
    return {name: statistics.median(xs) for name, xs in took.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between a 250 and the next MAIL (untimed)")
    a = ap.parse_args()
    msgs = [make_msg(i) for i in range(a.n + 20)]
    print("port  round " + " ".join(f"{s:>8}" for s in STAGES) + "   (median µs)")
    for r in range(a.rounds):
        for port in a.port:
            got = one_round(port, msgs, a.pause)
            print(f"{port:5} {r + 1:5} " + " ".join(f"{got[s]:8.0f}" for s in STAGES), flush=True)


if __name__ == "__main__":
    main()
