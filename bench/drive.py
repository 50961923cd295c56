#!/usr/bin/env python3
"""Throughput driver: Postfix's smtp-source against 127.0.0.1:PORT, messages per second.

    drive.py --port 20030 --label gate-empty --out RUN/results.tsv
             [--runs 3] [--workloads par50_conn,par50_keep,seq1_conn,seq1_keep]
             [--cpu name=PID[,PID...]]

Workloads (10 240-byte body plus smtp-source's headers, one recipient):
  par50_conn  N_PAR messages, 50 parallel sessions, a new TCP connection per message
  par50_keep  N_PAR messages, 50 parallel sessions, many messages per connection (-d)
  seq1_conn   N_SEQ messages, one session, a new connection per message
  seq1_keep   N_SEQ messages, one session, one connection for all of them (-d)
N_PAR (default 10000) and N_SEQ (default 3000) come from the environment.

A run counts only when smtp-source exits 0: it gives up on any reply that is not 2xx, so a
system that defers or refuses (a greylist 451, a rule's 554) shows as a FAILED run.
--cpu name=PID: CPU used by PID and all its descendants during each run (utime+stime from
/proc; 100% = one core busy). Only 127.0.0.1 is ever targeted.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

SMTP_SOURCE = "/usr/sbin/smtp-source"
CLK = os.sysconf("SC_CLK_TCK")
HEADER = "label\tworkload\trun\tnmsg\twall_s\tmsgs_per_s\trc\tsource_cpu%\tcpu%\n"


def workloads() -> dict[str, list[str]]:
    npar = int(os.environ.get("N_PAR", 10000))
    nseq = int(os.environ.get("N_SEQ", 3000))
    return {
        "par50_conn": ["-s", "50", "-m", str(npar)],
        "par50_keep": ["-d", "-s", "50", "-m", str(npar)],
        "seq1_conn": ["-s", "1", "-m", str(nseq)],
        "seq1_keep": ["-d", "-s", "1", "-m", str(nseq)],
    }


def descendants(roots: list[int]) -> set[int]:
    """roots plus every process below them (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0


def snapshot(groups: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    return {name: {p: cpu_ticks(p) for p in descendants(roots)} for name, roots in groups.items()}


def one_run(port: int, wl_args: list[str], groups: dict[str, list[int]]) -> dict:
    nmsg = int(wl_args[wl_args.index("-m") + 1])
    cmd = [SMTP_SOURCE, *wl_args, "-l", "10240", "-f", "sender@bench.test",
           "-t", "rcpt@bench.test", "-M", "client.bench.test", f"127.0.0.1:{port}"]
    before = snapshot(groups)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        rc, out = p.returncode, p.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired:
        rc, out = -1, "smtp-source did not finish within 900 s"
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = snapshot(groups)
    cpu = {}
    for name in groups:
        ticks = sum(after[name][pid] - before[name].get(pid, 0) for pid in after[name])
        cpu[name] = 100.0 * ticks / CLK / wall
    src_cpu = 100.0 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall
    return {"rc": rc, "out": out[-500:], "wall": wall, "rate": nmsg / wall, "nmsg": nmsg,
            "cpu": cpu, "src_cpu": src_cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True, help="TSV file to append the runs to")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", default="par50_conn,par50_keep,seq1_conn,seq1_keep")
    ap.add_argument("--cpu", action="append", default=[], help="name=PID[,PID]")
    a = ap.parse_args()

    wls = workloads()
    chosen = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in chosen if w not in wls]
    if unknown:
        print(f"drive.py: unknown workload(s) {', '.join(unknown)}; known: {', '.join(wls)}",
              file=sys.stderr)
        return 2
    groups = {}
    for spec in a.cpu:
        name, pids = spec.split("=", 1)
        groups[name] = [int(x) for x in pids.split(",") if x]

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    new = not os.path.exists(a.out)
    failed = 0
    with open(a.out, "a") as out:
        if new:
            out.write(HEADER)
        summary = []
        for wl in chosen:
            rates = []
            for i in range(a.runs):
                r = one_run(a.port, wls[wl], groups)
                cpus = " ".join(f"{k}={v:.0f}%" for k, v in r["cpu"].items())
                ok = r["rc"] == 0
                failed += not ok
                print(f"{a.label:18s} {wl:11s} run{i + 1} {r['rate']:9.1f} msg/s  wall={r['wall']:.2f}s "
                      f"rc={r['rc']} smtp-source={r['src_cpu']:.0f}% {cpus}"
                      + ("" if ok else f"  !! FAILED: {r['out'].strip()[-200:]}"), flush=True)
                out.write(f"{a.label}\t{wl}\t{i + 1}\t{r['nmsg']}\t{r['wall']:.3f}\t{r['rate']:.1f}\t"
                          f"{r['rc']}\t{r['src_cpu']:.0f}\t{cpus}\n")
                out.flush()
                if ok:
                    rates.append(r["rate"])
                time.sleep(1)  # a short pause: the system under test settles between runs
            summary.append((wl, statistics.median(rates) if rates else float("nan"), len(rates)))
    print(f"== {a.label}: median msgs/s over {a.runs} run(s) ==")
    for wl, med, n in summary:
        print(f"   {wl:11s} {med:9.1f}  (ok runs: {n}/{a.runs})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
