#!/usr/bin/env python3
"""Per-message latency probe: one client, messages sent one at a time, smtplib.

Usage: lat.py --port P --label L --out FILE.tsv [--n 1000] [--mode keep|conn]
  keep: one SMTP connection, N transactions (MAIL..DATA..250) timed one by one
  conn: a fresh connection per message (connect+EHLO+MAIL..DATA+QUIT timed)
20 untimed messages warm the system up first. Prints mean/p50/p90/p99/max in milliseconds
and appends them to FILE.tsv. Targets 127.0.0.1 only.
"""
import argparse
import os
import smtplib
import statistics
import time


def make_msg(i):
    body_line = "La de da de da 1234567890 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKL.\r\n"  # 68 bytes
    body = (body_line * (10240 // len(body_line) + 1))[:10240]
    hdr = (f"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\nSubject: lat {i}\r\n"
           f"Message-Id: <lat{i}.{time.time_ns()}@bench.test>\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n")
    return (hdr + body).encode()


def pct(xs, p):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--mode", choices=["keep", "conn"], default="keep")
    ap.add_argument("--out", required=True, help="TSV file to append the result to")
    a = ap.parse_args()
    msgs = [make_msg(i) for i in range(a.n)]
    # warm-up (not timed)
    with smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.bench.test") as s:
        for i in range(20):
            s.sendmail("sender@bench.test", ["rcpt@bench.test"], msgs[i % len(msgs)])
    lat = []
    if a.mode == "keep":
        s = smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.bench.test")
        s.ehlo()
        for m in msgs:
            t0 = time.perf_counter()
            s.sendmail("sender@bench.test", ["rcpt@bench.test"], m)
            lat.append(time.perf_counter() - t0)
        s.quit()
    else:
        for m in msgs:
            t0 = time.perf_counter()
            with smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.bench.test") as s:
                s.sendmail("sender@bench.test", ["rcpt@bench.test"], m)
            lat.append(time.perf_counter() - t0)
    ms = [x * 1000 for x in lat]
    line = (f"{a.label}\t{a.mode}\t{a.n}\t{statistics.mean(ms):.3f}\t{pct(ms,50):.3f}\t"
            f"{pct(ms,90):.3f}\t{pct(ms,99):.3f}\t{max(ms):.3f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    new = not os.path.exists(a.out)
    with open(a.out, "a") as f:
        if new:
            f.write("label\tmode\tn\tmean_ms\tp50_ms\tp90_ms\tp99_ms\tmax_ms\n")
        f.write(line + "\n")
    print(f"LAT {a.label:18s} {a.mode:4s} n={a.n} mean={statistics.mean(ms):.3f}ms p50={pct(ms,50):.3f}ms "
          f"p90={pct(ms,90):.3f}ms p99={pct(ms,99):.3f}ms max={max(ms):.3f}ms")


if __name__ == "__main__":
    main()
