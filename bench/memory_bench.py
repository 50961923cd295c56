#!/usr/bin/env python3
"""Memory of the real gate: peak RSS per message in flight, and RSS per idle connection.

Run by hand from the project root (never in the tests):

    .venv/bin/python bench/memory_bench.py
    .venv/bin/python bench/memory_bench.py --source /tmp/before   # another checkout's smtpgate/

It starts `smtpgate serve` (one worker, so one process holds every connection) relaying to
Postfix's smtp-sink on loopback, and measures, each scenario on a fresh gate:
  1. one 20 MB message: the worker's peak RSS above its idle RSS, as a ratio to the size;
  2. 8 clients sending 8 MB at once: the same, against the 64 MB in flight;
  3. 20 clients sending 20 MB at once with max_inflight_data 100MB: how many were served
     (250) and how many got 452 4.3.1, the peak, and whether the gate is still up;
  4. 1,000 idle connections (greeted, then silent): RSS growth per connection;
  5. one 20 MB message through a rule that edits headers (rewrite: a Subject tag, a field
     added): as 1.
Peak RSS is the kernel's high-water mark (VmHWM), reset before each measure through
/proc/PID/clear_refs (root), else sampled every 5 ms.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
# scenario 5: a rule that edits headers (a subject tag, an added field)
EDITS = '[{rewrite: {subject_prefix: "[EXT]", add_headers: {X-Bench: "yes"}}}]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.returncode}): {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout}s: {proc.args}")


def status(pid: int, key: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Peak:
    """The highest RSS of one process between start() and stop()."""

    def __init__(self, pid: int):
        self.pid = pid
        self.use_hwm = False
        self.peak = 0
        self._stop = threading.Event()

    def start(self) -> "Peak":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.use_hwm = True
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status(self.pid, "VmRSS"))
            time.sleep(0.005)

    def stop(self) -> int:
        if self.use_hwm:
            return status(self.pid, "VmHWM")
        self._stop.set()
        self._thread.join()
        return self.peak


class Gate:
    def __init__(self, folder: Path, sink_port: int, source: str | None, limits: dict,
                 rules: str = "[]"):
        self.port = free_port()
        (folder / "policies").mkdir(parents=True, exist_ok=True)
        (folder / "policies" / "default.yaml").write_text(f"domains: [bench.test]\nrules: {rules}\n")
        lines = [f"{k}: {v}" for k, v in limits.items()]
        (folder / "gate.yaml").write_text(
            "hostname: gate.bench.test\n"
            f"listen: ['127.0.0.1:{self.port}']\n"
            "workers: 1\n"
            f"downstream: {{host: 127.0.0.1, port: {sink_port}, timeout: 60s}}\n"
            f"state: sqlite:///{folder}/state.db\n"
            f"quarantine: {folder}/quarantine\n"
            "policies: policies\n"
            "limits:\n" + "".join(f"  {line}\n" for line in lines) +
            "log: {format: text, level: warning}\n")
        env = dict(os.environ)
        if source:
            cmd = [sys.executable, "-m", "smtpgate.cli.main"]
            env["PYTHONPATH"] = source
        else:
            cmd = [str(ROOT / ".venv" / "bin" / "smtpgate")]
        self.log = open(folder / "gate.log", "wb")
        self.proc = subprocess.Popen(cmd + ["serve", "-c", str(folder / "gate.yaml")], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=folder,
                                     stdin=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        kids = children(self.proc.pid)
        self.worker = kids[0] if kids else self.proc.pid  # one worker: it or the parent
        send(self.port, b"Subject: warm-up\r\n\r\nhi\r\n")  # imports, first relay, caches
        time.sleep(0.3)

    @property
    def rss(self) -> int:
        return status(self.worker, "VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def send(port: int, body: bytes) -> int:
    """One message with smtplib (which gives SIZE=): the final reply code."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
            c.sendmail("a@client.bench.test", ["u@bench.test"], body)
        return 250
    except smtplib.SMTPResponseException as e:
        return e.smtp_code
    except smtplib.SMTPRecipientsRefused as e:
        return next(iter(e.recipients.values()))[0]
    except (OSError, smtplib.SMTPException):
        return -1


def message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = b"Subject: memory bench\r\nFrom: a@client.bench.test\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def concurrent(gate: Gate, clients: int, size: int) -> tuple[int, dict[int, int], bool]:
    body = message(size)
    base = gate.rss
    peak = Peak(gate.worker).start()
    with ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(lambda _: send(gate.port, body), range(clients)))
    top = peak.stop()
    counts: dict[int, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return top - base, counts, gate.alive()


def idle(gate: Gate, n: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    time.sleep(0.3)
    base = gate.rss
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
            socks.append(s)
        greeted = sum(1 for s in socks if s.recv(512).startswith(b"220"))
        time.sleep(0.5)
        grown = gate.rss - base
    finally:
        for s in socks:
            s.close()
    return grown, greeted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", help="run the smtpgate package found in this folder (PYTHONPATH)")
    ap.add_argument("--old-config", action="store_true",
                    help="leave out the limits a gate before issue 10 does not know")
    ap.add_argument("--only", type=int, nargs="*", help="scenario numbers to run (1-5)")
    args = ap.parse_args()
    if not shutil.which("smtp-sink"):
        raise SystemExit("needs Postfix's smtp-sink (apt-get install postfix)")
    only = set(args.only or (1, 2, 3, 4, 5))
    base_limits = {"max_message_size": "30MB", "max_connections": 5000,
                   "max_connections_per_client": 5000}
    if not args.old_config:
        base_limits["max_line_length"] = 998
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="smtpgate-membench-") as tmp:
        sink_port = free_port()
        sink_cmd = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else [])
        sink = subprocess.Popen(sink_cmd + [f"127.0.0.1:{sink_port}", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_port(sink_port, sink)

            def fresh(name: str, rules: str = "[]", **extra) -> Gate:
                return Gate(Path(tmp) / name, sink_port, args.source, {**base_limits, **extra}, rules)

            if 1 in only:
                gate = fresh("one")
                try:
                    print(f"idle worker RSS: {gate.rss / MB:.1f} MB", flush=True)
                    grown, counts, alive = concurrent(gate, 1, 20 * MB)
                    rows.append(("1 x 20 MB: peak RSS above idle",
                                 f"{grown / MB:.1f} MB = {grown / (20 * MB):.2f} x the message {counts}"))
                finally:
                    gate.stop()
            if 5 in only:
                gate = fresh("edits", rules=EDITS)
                try:
                    grown, counts, alive = concurrent(gate, 1, 20 * MB)
                    rows.append(("1 x 20 MB, headers edited (rewrite): peak RSS above idle",
                                 f"{grown / MB:.1f} MB = {grown / (20 * MB):.2f} x the message {counts}"))
                finally:
                    gate.stop()
            if 2 in only:
                gate = fresh("eight")
                try:
                    grown, counts, alive = concurrent(gate, 8, 8 * MB)
                    rows.append(("8 x 8 MB at once: peak RSS above idle",
                                 f"{grown / MB:.1f} MB = {grown / (64 * MB):.2f} x the 64 MB in flight {counts}"))
                finally:
                    gate.stop()
            if 3 in only:
                extra = {} if args.old_config else {"max_inflight_data": "100MB"}
                gate = fresh("twenty", **extra)
                try:
                    grown, counts, alive = concurrent(gate, 20, 20 * MB)
                    budget = "no budget" if args.old_config else "budget 100 MB"
                    rows.append((f"20 x 20 MB at once ({budget}): peak RSS above idle",
                                 f"{grown / MB:.1f} MB; replies {counts}; gate up: {alive}"))
                finally:
                    gate.stop()
            if 4 in only:
                gate = fresh("idle")
                try:
                    grown, greeted = idle(gate, 1000)
                    rows.append(("1,000 idle connections: RSS per connection",
                                 f"{grown / 1000 / 1024:.1f} KiB ({greeted} greeted)"))
                finally:
                    gate.stop()
        finally:
            sink.terminate()
            sink.wait(10)
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
