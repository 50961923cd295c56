#!/usr/bin/env python3
"""The relay benchmark with real Postfix as the downstream (issue 13: the pool of downstream
sessions, measured where XCLIENT resets Postfix's session). Needs root and Debian's postfix
(a private instance from tests/support/postfixproc.py, relaying on to an smtp-sink).

    .venv/bin/python bench/postfix_bench.py [--runs 1] [--workloads par50_conn,seq1_conn]
        [--systems direct,floor,gate-nopool,gate-pool] [--no-xclient]

Postfix allows XCLIENT from 127.0.0.0/8, and smtp-source's connections come from 127.0.0.1,
so a pooled session named as that client may take XCLIENT again: `gate-pool` is the pool at
work (as with `smtpd_authorized_xclient_hosts=0.0.0.0/0,[::]/0` on the gate's own smtpd,
docs/postfix.md). Outside clients with Postfix's usual `127.0.0.1` there are never pooled:
that case costs what `gate-nopool` (a connection per client) does. N_PAR / N_SEQ from the
environment, as for `make bench`.

smtp-source greets with HELO, and the gate greets Postfix as its client after XCLIENT, so
messages go as DATA; ``--no-xclient`` (``downstream.xclient: false``) keeps the gate's own
EHLO, whose answer offers CHUNKING: messages go as BDAT, as for an EHLO client.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import drive  # noqa: E402  (bench/drive.py: smtp-source and the CPU accounting)
from tests.support.gateproc import free_port, stop_pid  # noqa: E402
from tests.support.postfixproc import start_postfix  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

VENV = ROOT / ".venv" / "bin"
ALL = "direct,floor,gate-nopool,gate-pool"


def listening(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def gate_config(folder: Path, port: int, down: int, pool: int, xclient: bool) -> Path:
    config = yaml.safe_load((BENCH / "gate.yaml").read_text())
    config.update(listen=[f"127.0.0.1:{port}"], policies=str(BENCH / "policies"),
                  state=f"sqlite://{folder}/state.db", quarantine=str(folder / "quarantine"))
    config["downstream"] = {**config["downstream"], "port": down, "pool": {"size": pool},
                            "xclient": xclient}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(label: str, port: int, pid: int | None, wls: list[str], runs: int) -> dict[str, float]:
    loads = drive.workloads()
    out = {}
    for wl in wls:
        rates = []
        for _ in range(runs):
            r = drive.one_run(port, loads[wl], {label: [pid]} if pid else {})
            # CPU per message: what a shared, loaded machine disturbs least
            cpu = " ".join(f"{k}={v:.1f}% ({v * 1e4 / r['rate']:.0f} µs/msg)" for k, v in r["cpu"].items())
            print(f"{label:22s} {wl:11s} {r['rate']:8.1f} msg/s rc={r['rc']} {cpu}", flush=True)
            if r["rc"] == 0:
                rates.append(r["rate"])
            time.sleep(1)
        out[wl] = statistics.median(rates) if rates else float("nan")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workloads", default="par50_conn,seq1_conn")
    ap.add_argument("--systems", default=ALL)
    ap.add_argument("--sink", action="store_true",
                    help="smtp-sink as the downstream instead of Postfix (the same A/B, no queue)")
    ap.add_argument("--no-xclient", action="store_true",
                    help="downstream.xclient: false (the gate's own EHLO: BDAT to Postfix)")
    a = ap.parse_args()
    wls, systems = a.workloads.split(","), a.systems.split(",")
    work = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-bench-"))
    sink_port = free_port()
    sink = start(["/usr/sbin/smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1024"],
                 work / "sink.log")
    wait_until(lambda: listening(sink_port), 10, what="smtp-sink")
    main_cf = "relay_domains = bench.test\nsmtpd_recipient_restrictions = reject_unauth_destination\n"
    postfix = None if a.sink else start_postfix(work / "postfix", relay_port=sink_port, main_cf=main_cf)
    down = sink_port if a.sink else postfix.port
    results: dict[str, dict[str, float]] = {}
    try:
        for system in systems:
            port = free_port()
            if system == "direct":
                results[system] = measure(system, down, None, wls, a.runs)
                continue
            if system == "floor":
                proc = start([str(VENV / "python"), str(BENCH / "floor_relay.py"), "--listen", str(port),
                              "--down", str(down), "--uvloop", "--workers", "2"],
                             work / "floor.log")
            else:
                pool = 0 if system == "gate-nopool" else 8
                cfg = gate_config(work / system, port, down, pool, not a.no_xclient)
                proc = start([str(VENV / "smtpgate"), "serve", "-c", str(cfg)], work / f"{system}.log")
            try:
                wait_until(lambda: listening(port), 30, what=system)
                results[system] = measure(system, port, proc.pid, wls, a.runs)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    finally:
        if postfix is not None:
            postfix.stop()
        stop_pid(sink)
    base = results.get("floor")
    print(f"\n{'smtp-sink' if a.sink else 'Postfix'} as the downstream, messages/s (N_PAR={os.environ.get('N_PAR', 10000)}, "
          f"N_SEQ={os.environ.get('N_SEQ', 3000)}, median of {a.runs}); logs in {work}")
    print("| system | " + " | ".join(wls) + " |\n|---|" + "---:|" * len(wls))
    for system, rates in results.items():
        cells = [f"{rates[w]:.0f}" + (f" ({rates[w] / base[w]:.2f}× floor)" if base and system != "floor"
                                      and system != "direct" else "") for w in wls]
        print(f"| {system} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
