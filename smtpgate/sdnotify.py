"""Telling the service manager how the gate is doing: systemd's sd_notify protocol.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (``@name`` for the abstract namespace), so it is spoken here directly,
without a library. Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.

With worker processes, only the supervisor (systemd's main PID) talks to systemd; each
worker tells the supervisor over a pipe of its own (``WorkerPipe``) when it serves and
that it is alive, and the pipe's end of file tells the supervisor the worker is gone.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("smtpgate.sdnotify")

# What a worker writes on its pipe to the supervisor.
SERVING = b"R"  # listening, or done reloading (whether the new configuration was taken or not)
ALIVE = b"W"    # a heartbeat from the worker's event loop, sent when a watchdog is set


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what systemd wants with RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None when the
    service manager watches no process or another one (``WATCHDOG_PID``)."""
    usec = environ.get("WATCHDOG_USEC", "").strip()
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


class SystemdNotifier:
    """The gate's messages to ``$NOTIFY_SOCKET``; silent when that is not set."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif address and not address.startswith("/"):
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path: not notifying", address)
            address = ""
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            # The service manager going away must never stop the gate; say so once.
            if not self._warned:
                log.warning("cannot notify the service manager at NOTIFY_SOCKET: %s", e)
                self._warned = True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=finishing transactions in flight")

    def alive(self) -> None:
        self.send("WATCHDOG=1")


class WorkerPipe:
    """A worker's end of its pipe to the supervisor, which speaks to systemd for it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)  # a busy supervisor must never block a worker's event loop

    def _write(self, byte: bytes) -> None:
        try:
            os.write(self.fd, byte)
        except (BlockingIOError, BrokenPipeError):
            pass  # the supervisor has not read the last ones yet, or is gone

    def ready(self, status: str = "") -> None:
        self._write(SERVING)

    def reloading(self) -> None:
        """The supervisor sent RELOADING=1 when it passed SIGHUP on."""

    def stopping(self) -> None:
        """The supervisor sent STOPPING=1 when it passed SIGTERM on."""

    def alive(self) -> None:
        self._write(ALIVE)
