"""Running under systemd: the sd_notify messages of the real gate, received the way systemd
receives them (a datagram socket named by NOTIFY_SOCKET, the sender's PID from the kernel's
credentials), and the example unit checked by ``systemd-analyze verify``.

Each test starts the gate itself (not through gate_factory, which waits until the port
listens) so that it can check that READY=1 comes only once the gate listens.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.gateproc import free_port, stop_pid, wait_until, write_gate_folder
from tests.support.rawsmtp import RawSMTP

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sd_notify is Linux")

REPO = Path(__file__).resolve().parent.parent.parent
UNIT = REPO / "examples" / "systemd" / "smtpgate.service"
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySocket:
    """What systemd listens on: a datagram socket with SO_PASSCRED, so each message comes
    with its sender's PID (systemd accepts only the main PID's by default)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address
        self.seen: list[tuple[int, dict[str, str]]] = []

    def next(self, timeout: float = 20.0) -> tuple[int, dict[str, str]]:
        """The next message as (sender pid, {key: value})."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        except socket.timeout:
            pytest.fail(f"no sd_notify message within {timeout}s; so far: {self.seen}", pytrace=False)
        pid = next(UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append((pid, fields))
        return pid, fields

    def wait_for(self, key: str, timeout: float = 20.0, skip: tuple[str, ...] = ("WATCHDOG",),
                 ) -> tuple[int, dict[str, str]]:
        """The next message carrying ``key``; messages with only keys in ``skip`` are passed
        over, anything else before it fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            pid, fields = self.next(max(0.1, deadline - time.monotonic()))
            if key in fields:
                return pid, fields
            if not set(fields) <= set(skip):
                pytest.fail(f"wanted {key}, got {fields} first; so far: {self.seen}", pytrace=False)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    # AF_UNIX paths are short (108 bytes): fall back to the abstract namespace for long tmp paths.
    address = str(path) if len(str(path)) < 100 else f"@smtpgate-test-{uuid.uuid4().hex}"
    sock = NotifySocket(address)
    yield sock
    sock.close()


@pytest.fixture
def start_notifying_gate(tmp_path, downstream):
    """`start(notify_address, workers=1, env=None) -> (Popen, port, folder)`; stopped by PID."""
    procs: list[subprocess.Popen] = []

    def start(notify_address: str, workers: int = 1, env: dict | None = None):
        port = free_port()
        folder = tmp_path / f"gate{len(procs)}"
        path, _ = write_gate_folder(folder, port=port, downstream_port=downstream.port,
                                    config={"workers": workers})
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("SMTPGATE_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        child_env.update({"PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify_address, **(env or {})})
        with open(folder / "gate.log", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(path)],
                                    cwd=folder, env=child_env, stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err)
        procs.append(proc)
        return proc, port, folder

    yield start
    for proc in procs:
        stop_pid(proc)


def listening_sockets(port: int) -> int:
    """How many sockets listen on the port (one per worker with SO_REUSEPORT), from /proc."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def greets(port: int) -> bool:
    c = RawSMTP(("127.0.0.1", port), timeout=10)
    try:
        return c.reply().startswith(b"220 ")
    finally:
        c.cmd("QUIT")
        c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping_from_the_main_pid(notify_socket, start_notifying_gate, workers):
    proc, port, folder = start_notifying_gate(notify_socket.address, workers=workers)
    pid, ready = notify_socket.wait_for("READY")
    # READY=1 comes from the main PID, and only once every worker listens.
    assert pid == proc.pid
    assert ready["READY"] == "1"
    assert listening_sockets(port) == workers
    assert greets(port)

    proc.send_signal(signal.SIGHUP)
    pid, reloading = notify_socket.wait_for("RELOADING")
    assert pid == proc.pid and reloading["RELOADING"] == "1"
    # MONOTONIC_USEC: CLOCK_MONOTONIC when the reload began (systemd >= 253 wants it).
    usec = int(reloading["MONOTONIC_USEC"])
    assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    pid, ready = notify_socket.wait_for("READY")
    assert pid == proc.pid and ready["READY"] == "1"
    log = (folder / "gate.log").read_text()
    assert log.count("configuration reloaded") == workers, log
    assert greets(port)

    proc.send_signal(signal.SIGTERM)
    pid, stopping = notify_socket.wait_for("STOPPING")
    assert pid == proc.pid and stopping["STOPPING"] == "1"
    assert proc.wait(20) == 0
    assert all(p == proc.pid for p, _ in notify_socket.seen), notify_socket.seen


def test_a_refused_reload_still_ends_with_ready(notify_socket, start_notifying_gate):
    """A broken configuration is refused and the running one kept: the reload is over."""
    proc, port, folder = start_notifying_gate(notify_socket.address, workers=2)
    notify_socket.wait_for("READY")
    (folder / "gate.yaml").write_text("listen: [\n")
    proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING")
    notify_socket.wait_for("READY")
    assert (folder / "gate.log").read_text().count("reload refused") == 2
    assert greets(port)


@pytest.mark.parametrize("workers", [1, 2])
def test_watchdog_pings_at_half_the_interval(notify_socket, start_notifying_gate, workers):
    # 2 s watchdog: the gate pings every second, from the main PID.
    proc, port, _ = start_notifying_gate(notify_socket.address, workers=workers,
                                         env={"WATCHDOG_USEC": "2000000"})
    notify_socket.wait_for("READY")
    pings = [notify_socket.wait_for("WATCHDOG", skip=()) for _ in range(3)]
    assert all(pid == proc.pid and f["WATCHDOG"] == "1" for pid, f in pings), pings
    assert greets(port)


def test_no_watchdog_pings_for_another_pid(notify_socket, start_notifying_gate):
    """WATCHDOG_PID names the process systemd watches; any other one does not ping."""
    proc, port, _ = start_notifying_gate(notify_socket.address,
                                         env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    notify_socket.wait_for("READY", skip=())
    proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING", skip=())  # no WATCHDOG=1 came in between
    assert proc.wait(20) == 0


def test_a_stuck_worker_stops_the_watchdog_pings(notify_socket, start_notifying_gate):
    """A worker whose event loop no longer runs (here: SIGSTOP) withholds the supervisor's
    pings, so systemd's watchdog restarts the gate; they resume once it runs again."""
    proc, _, folder = start_notifying_gate(notify_socket.address, workers=2,
                                           env={"WATCHDOG_USEC": "1000000"})
    notify_socket.wait_for("READY")
    notify_socket.wait_for("WATCHDOG", skip=())
    worker = _child_of(proc.pid)
    os.kill(worker, signal.SIGSTOP)
    try:
        # Within a few watchdog periods the supervisor says why it stopped pinging...
        log = folder / "gate.log"
        assert wait_until(lambda: "not pinging the watchdog" in log.read_text(), 15), log.read_text()
        notify_socket.sock.setblocking(False)
        try:
            while notify_socket.sock.recv(4096):  # pings sent before that
                pass
        except BlockingIOError:
            pass
        # ...and sends none while the worker stays stuck.
        notify_socket.sock.settimeout(2.0)
        with pytest.raises(socket.timeout):
            notify_socket.sock.recv(4096)
    finally:
        os.kill(worker, signal.SIGCONT)
    notify_socket.wait_for("WATCHDOG", skip=())


def _child_of(pid: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                return int(entry)
    pytest.fail(f"no child of {pid} found", pytrace=False)


def test_abstract_namespace_notify_socket(start_notifying_gate):
    sock = NotifySocket(f"@smtpgate-test-{uuid.uuid4().hex}")
    try:
        proc, port, _ = start_notifying_gate(sock.address)
        pid, ready = sock.wait_for("READY")
        assert pid == proc.pid and listening_sockets(port) == 1
    finally:
        sock.close()


def test_without_notify_socket_nothing_changes(gate_factory):
    """Outside systemd (no NOTIFY_SOCKET) the gate serves and stops as before."""
    gate = gate_factory(config={"workers": 2})
    assert greets(gate.port)
    assert gate.stop() == 0
    assert "NOTIFY_SOCKET" not in gate.log_text()


def test_a_replacement_worker_runs_the_reloaded_configuration(notify_socket, start_notifying_gate):
    """A worker that dies after a reload is replaced by one running the reloaded
    configuration, not the one the gate started with."""
    proc, port, folder = start_notifying_gate(notify_socket.address, workers=2)
    notify_socket.wait_for("READY")
    (folder / "policies" / "default.yaml").write_text("domains: [example.org]\nrules: []\n")
    proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING")
    notify_socket.wait_for("READY")
    log = folder / "gate.log"
    os.kill(_child_of(proc.pid), signal.SIGKILL)
    assert wait_until(lambda: log.read_text().count("listening on") == 3, 20), log.read_text()
    assert wait_until(lambda: listening_sockets(port) == 2, 20)
    # SO_REUSEPORT spreads connections by their address: 20 of them reach both workers
    # (all but certainly), and every one must answer as the reloaded policy says.
    for _ in range(20):
        c = RawSMTP(("127.0.0.1", port), timeout=10)
        try:
            assert c.reply().startswith(b"220 ")
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
            assert c.cmd("RCPT TO:<user@example.com>").startswith(b"554"), log.read_text()
            assert c.cmd("RCPT TO:<user@example.org>").startswith(b"250")
        finally:
            c.cmd("QUIT")
            c.close()
