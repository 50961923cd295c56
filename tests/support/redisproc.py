"""Redis for tests: the shared server (DB 15, a key prefix per test) and private ``redis-server``s.

The shared one is ``REDIS_URL`` (``$SMTPGATE_TEST_REDIS`` overrides it); a test takes a fresh
``new_prefix()``, gives the gate ``redis_state(prefix)`` and deletes only its own keys after
(``delete_redis_keys``; never FLUSHDB). A test that needs Redis to fail starts a
``PrivateRedis`` on a free port, which it may kill, freeze and thaw by PID; one that needs
Redis at a Unix socket starts a ``UnixRedis`` (no TCP port at all).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import redis

from tests.support.constants import LOOPBACK
from tests.support.gateproc import free_port, in_ci, require_tool, stop_pid, wait_listening
from tests.support.waiting import wait_until

REDIS_URL = os.environ.get("SMTPGATE_TEST_REDIS", f"redis://{LOOPBACK}:6379/15")
UNREACHABLE_REDIS_URL = f"redis://{LOOPBACK}:1/0"   # nothing listens on port 1: every call fails at once


def require_redis() -> None:
    """Skip when no Redis answers on REDIS_URL; under CI=true that is a failure."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError) as e:
        msg = f"Redis is not reachable at {REDIS_URL}: {e}"
        if in_ci():
            pytest.fail(msg + " [CI=true: a missing Redis is a failure]", pytrace=False)
        pytest.skip(msg)


def new_prefix() -> str:
    """A key prefix no other test uses."""
    return f"smtpgate-test-{uuid.uuid4().hex}:"


def redis_state(prefix: str) -> str:
    """The gate's ``state:`` URL for the shared Redis under ``prefix``."""
    return f"{REDIS_URL}?prefix={prefix}"


def delete_redis_keys(prefix: str) -> int:
    """Delete only this test's keys (SCAN by the prefix, never FLUSHDB)."""
    r = redis.Redis.from_url(REDIS_URL)
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    keys = list(r.scan_iter(match=pattern, count=1000))
    if keys:
        r.delete(*keys)
    return len(keys)


class PrivateRedis:
    """``redis-server`` on a free loopback port, without persistence; killed and restarted
    by PID, always on the same port."""

    def __init__(self, folder: Path) -> None:
        self.binary = require_tool("redis-server")
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> PrivateRedis:
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, *self.listen_args(), "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            self.wait_listening()
        except BaseException:  # never answered: not left running
            self.stop()
            raise
        return self

    def listen_args(self) -> list[str]:
        return ["--port", str(self.port), "--bind", LOOPBACK]

    def wait_listening(self) -> None:
        wait_listening(self.proc, [(LOOPBACK, self.port)], 10.0, self.log_text)

    def log_text(self) -> str:
        return (self.folder / "redis.log").read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        stop_pid(self.proc, signal.SIGKILL)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            stop_pid(self.proc)


class UnixRedis(PrivateRedis):
    """``redis-server`` listening on a Unix socket only (``--port 0``), without persistence;
    the socket in a short folder of its own (a socket path has at most 107 bytes, and
    pytest's tmp_path can come close), removed at ``stop``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.port = 0
        self.socket_folder = Path(tempfile.mkdtemp(prefix="sg-redis-"))
        self.socket = self.socket_folder / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]

    def wait_listening(self) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}\n{self.log_text()}", pytrace=False)
            try:
                return self.socket.exists() and self.client().ping()
            except (redis.RedisError, OSError):
                return False
        wait_until(answers, 10.0, what=lambda: f"redis-server answering at {self.socket}\n{self.log_text()}")

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.socket_folder, ignore_errors=True)  # ours, created by mkdtemp
