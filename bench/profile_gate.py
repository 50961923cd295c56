#!/usr/bin/env python3
"""cProfile of the real gate (one worker) relaying smtp-source's messages to smtp-sink (run by hand).

    .venv/bin/python bench/profile_gate.py                      # empty policy, seq1_keep
    .venv/bin/python bench/profile_gate.py --policies bench/policies-real --workload par50_keep
    .venv/bin/python bench/profile_gate.py --top 30 --sort cumtime
    .venv/bin/python bench/profile_gate.py --policies bench/policies-real --state redis   # state in Redis
    .venv/bin/python bench/profile_gate.py --policies bench/policies-real --cpu   # no cProfile: CPU µs/message
    .venv/bin/python bench/profile_gate.py --workload par50_conn --gc   # and the share of garbage collection
    .venv/bin/python bench/profile_gate.py --policies bench/policies-real --spy /tmp/real.raw   # py-spy samples (native too)
    .venv/bin/python bench/profile_gate.py --policies bench/policies-real --cpu --metrics   # with `metrics:` set

Starts ``smtp-sink`` and ``smtpgate serve`` (bench/gate.yaml, ``workers: 1``, state in a
temporary folder) under cProfile, sends ``--messages`` 10 KB messages with ``smtp-source``
(``seq1_keep``: one session, one connection; ``par50_keep``: 50 sessions; ``*_conn``: a
connection per message), stops the gate with SIGTERM and prints the top of the profile.
For policies with the greylist rule the benchmark's triplet is allowed first, as bench/run.sh does.
``--state redis`` keeps the state in Redis (``REDIS_URL``, default redis://127.0.0.1:6379/13,
under a key prefix of its own, deleted afterwards) instead of SQLite in the temporary folder.
``--cpu`` runs the gate without cProfile and prints the CPU time its process spent per
message while smtp-source ran (user + system of the supervisor and its workers, from /proc):
what a loaded, shared machine disturbs least, and what cProfile's own cost per call does not
inflate. ``--gc`` adds the CPU its garbage collections took (timed by ``gc.callbacks``).
Either way the gate's worker sets its garbage collector up itself
(``smtpgate.runtime.collector``), as in production. ``--metrics`` sets ``metrics:`` (a free
port on 127.0.0.1) in the gate.yaml, so the gate records its Prometheus metrics per message.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
WORKLOADS = {"seq1_keep": ["-d", "-s", "1"], "seq1_conn": ["-s", "1"],
             "par50_keep": ["-d", "-s", "50"], "par50_conn": ["-s", "50"]}

RUNNER = """
import cProfile, sys
from smtpgate import server
prof = cProfile.Profile()
try:
    prof.runcall(server.serve, sys.argv[1])
finally:
    prof.dump_stats(sys.argv[2])
"""

GC_RUNNER = """
import gc, json, sys, time
from smtpgate import server
spent = {"cpu": 0.0, "passes": [0, 0, 0]}
def timed(phase, info):  # CPU of each collection, from gc's own start/stop callbacks
    if phase == "start":
        spent["started"] = time.process_time()
    else:
        spent["cpu"] += time.process_time() - spent["started"]
        spent["passes"][info["generation"]] += 1
gc.callbacks.append(timed)
made = server.GateSMTP.connection_made
def first_made(self, transport):  # counted from the first connection, not the loading
    spent.update(cpu=0.0, passes=[0, 0, 0])
    server.GateSMTP.connection_made = made
    made(self, transport)
server.GateSMTP.connection_made = first_made
try:
    server.serve(sys.argv[1])
finally:
    spent["threshold"] = gc.get_threshold()
    with open(sys.argv[2], "w") as f:
        json.dump(spent, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def gate_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children now (Linux /proc)."""
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue  # gone meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> str:
    """The process's resident memory now and its high-water mark (Linux /proc), in MB."""
    with open(f"/proc/{pid}/status") as f:
        kb = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return f"{int(kb['VmRSS'].split()[0]) / 1024:.0f} / {int(kb['VmHWM'].split()[0]) / 1024:.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default=str(BENCH / "policies"))
    ap.add_argument("--workload", choices=WORKLOADS, default="seq1_keep")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10240, help="bytes per message (smtp-source -l)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--out", help="keep the raw profile here")
    ap.add_argument("--state", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--cpu", action="store_true", help="no cProfile: the gate's CPU µs per message")
    ap.add_argument("--spy", metavar="FILE",
                    help="as --cpu, and py-spy samples of the gate in FILE, "
                         "collapsed stacks (py-spy installed by hand: pip install py-spy)")
    ap.add_argument("--gc", action="store_true",
                    help="as --cpu, and the CPU µs per message its garbage collections took")
    ap.add_argument("--metrics", action="store_true",
                    help="set `metrics:` (Prometheus, on a free port): their recording's cost is in the figure")
    a = ap.parse_args()
    a.cpu = a.cpu or a.gc or bool(a.spy)
    sink_port, gate_port = free_port(), free_port()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
    prefix = f"smtpgate-profile-{os.getpid()}:"
    state = ["--state", f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"] if a.state == "redis" else []
    with tempfile.TemporaryDirectory() as tmp:
        conf, prof = os.path.join(tmp, "gate.yaml"), a.out or os.path.join(tmp, "gate.prof")
        subprocess.run([sys.executable, str(BENCH / "gateconf.py"), str(BENCH / "gate.yaml"), conf,
                        "--listen", str(gate_port), "--sink", str(sink_port), "--policies", a.policies,
                        *state], check=True)
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:  # one worker: the profile sees every message
            f.write(text.replace("workers: auto", "workers: 1"))
            if a.metrics:
                f.write(f"metrics: 127.0.0.1:{free_port()}\n")
        if any("greylist" in path.read_text() for path in Path(a.policies).glob("*.yaml")):
            subprocess.run([str(VENV_BIN / "smtpgate"), "greylist", "allow", "-c", conf, "--triplet",
                            "127.0.0.1", "sender@bench.test", "rcpt@bench.test"], check=True,
                           stdout=subprocess.DEVNULL)
        sink = subprocess.Popen(["/usr/sbin/smtp-sink", *(["-u", "nobody"] if os.getuid() == 0 else []),
                                 "-c", "-m", "4096", f"127.0.0.1:{sink_port}", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if a.gc:
            command = [sys.executable, "-c", GC_RUNNER, conf, prof]
        elif a.cpu:
            command = [str(VENV_BIN / "smtpgate"), "serve", "-c", conf]
        else:
            command = [sys.executable, "-c", RUNNER, conf, prof]
        gate = subprocess.Popen(command, cwd=tmp,
                                stderr=open(os.path.join(tmp, "gate.log"), "w"))
        try:
            wait_port(sink_port, sink)
            wait_port(gate_port, gate)
            spy = None
            if a.spy:  # sampled while smtp-source runs: no cProfile cost per call
                spy = subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(gate.pid),
                                        "--subprocesses", "--native", "--rate", "150", "--format", "raw",
                                        "--output", a.spy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)  # py-spy attaches
            cpu_before = gate_cpu(gate.pid)
            started = time.monotonic()
            subprocess.run(["/usr/sbin/smtp-source", *WORKLOADS[a.workload], "-m", str(a.messages),
                            "-l", str(a.size), "-f", "sender@bench.test", "-t", "rcpt@bench.test",
                            f"127.0.0.1:{gate_port}"], check=True)
            wall = time.monotonic() - started
            cpu = gate_cpu(gate.pid) - cpu_before
            memory = memory_mb(gate.pid)
            if spy:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        finally:
            gate.send_signal(signal.SIGTERM)
            gate.wait(30)
            sink.kill()
            sink.wait()
            if a.state == "redis":
                subprocess.run([sys.executable, str(BENCH / "redisctl.py"), "clean", redis_url, prefix],
                               check=False, stdout=subprocess.DEVNULL)
        if a.cpu:
            print(f"{a.messages} messages in {wall:.2f} s ({a.messages / wall:.0f}/s); the gate's CPU: "
                  f"{cpu / a.messages * 1e6:.0f} µs/message; its RSS now / at most: {memory}")
            if a.gc:
                with open(prof) as f:
                    spent = json.load(f)
                print(f"garbage collection: {spent['cpu'] / a.messages * 1e6:.1f} µs/message, passes by "
                      f"generation {spent['passes']} (from the first connection), thresholds "
                      f"{tuple(spent['threshold'])}")
            return 0
        print(f"{a.messages} messages in {wall:.2f} s under cProfile ({a.messages / wall:.0f}/s)")
        pstats.Stats(prof).sort_stats(a.sort).print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
