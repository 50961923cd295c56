"""A fleet that survives losing its Redis primary: a real primary, a replica and one Sentinel
(``redis-server --sentinel``) on private loopback ports, a real gate on
``state: redis+sentinel://…``; the primary is killed (SIGKILL), the Sentinel promotes the
replica, and the gate carries on.

What is proved: during the outage the gate answers as ``on_store_error`` says (451 4.3.0 by
default, delivered with ``on_error: accept``); after the promotion it finds the new primary
by itself (redis-py's Sentinel-managed pool, probed every 2 s at most by the breaker); the
greylist state written before the failover (an allowed triplet, a pending one) is intact
on the new primary; new traffic is greylisted and delivered as before.
"""
from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.gateproc import free_port, require_tool, stop_pid, wait_listening, wait_until
from smtpgate.stores.breaker import LONGEST_BACKOFF, SENTINEL_LONGEST_BACKOFF, Breaker
from smtpgate.stores.redis_store import RedisLink

SERVICE = "svc"
POLICIES = {
    "default.yaml": """
domains: [example.com]
rules:
  - greylist: {}
""",
    "open.yaml": """
domains: [open.example]
rules:
  - greylist: {on_error: accept}
""",
}
MESSAGE = b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: failover\r\n\r\nhello\r\n"


class RedisNode:
    """One ``redis-server`` (a data node or a Sentinel) on a free loopback port, started
    and killed by PID."""

    def __init__(self, folder: Path, name: str) -> None:
        self.binary = require_tool("redis-server")
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> RedisNode:
        log_path = self.folder / "redis.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, *args], cwd=self.folder, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_listening(self.proc, [("127.0.0.1", self.port)], 10.0,
                       lambda: log_path.read_text(errors="replace"))
        return self

    def start_data(self, *extra: str) -> RedisNode:
        return self.start("--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.folder), *extra)

    def start_sentinel(self, primary_port: int) -> RedisNode:
        conf = self.folder / "sentinel.conf"  # the Sentinel rewrites it: a file of its own
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
                        "sentinel resolve-hostnames no\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 3000\n")
        return self.start(str(conf), "--sentinel")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc)


@pytest.fixture
def trio(tmp_path):
    """(primary, replica, sentinel): the replica in sync and known to the Sentinel."""
    nodes: list[RedisNode] = []
    try:
        primary = RedisNode(tmp_path, "primary")
        nodes.append(primary)
        primary.start_data()
        replica = RedisNode(tmp_path, "replica")
        nodes.append(replica)
        replica.start_data("--replicaof", "127.0.0.1", str(primary.port))
        assert wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up", 20), \
            "the replica never synced"
        sentinel = RedisNode(tmp_path, "sentinel")
        nodes.append(sentinel)
        sentinel.start_sentinel(primary.port)
        # a failover needs a replica the Sentinel knows (it learns them from INFO)
        assert wait_until(lambda: bool(sentinel.client().sentinel_slaves(SERVICE)), 30, interval=0.2), \
            "the Sentinel never saw the replica"
        yield primary, replica, sentinel
    finally:
        for node in reversed(nodes):
            node.stop()


def transaction(client: smtplib.SMTP, *recipients: str) -> list[tuple[int, bytes]]:
    """MAIL, each RCPT, DATA when one was accepted: the RCPT replies, then DATA's (if sent)."""
    code, text = client.mail("alice@sender.test")
    assert code == 250, (code, text)
    replies = [client.rcpt(r) for r in recipients]
    if any(code == 250 for code, _ in replies):
        replies.append(client.data(MESSAGE))
    else:
        client.rset()
    return replies


def greylist_entries(gate) -> dict[str, dict]:
    done = gate.cli("greylist", "list", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    entries = doc["entries"] if isinstance(doc, dict) else doc
    return {e["recipient"]: e for e in entries}


@pytest.mark.timeout(120)
def test_the_gate_carries_on_after_a_sentinel_failover(gate_factory, downstream, trio):
    primary, replica, sentinel = trio
    # the first Sentinel named is not there: every look-up moves on to the next at once
    url = (f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel.port}/{SERVICE}/0"
           "?prefix=failover:&socket_timeout=1&socket_connect_timeout=1")
    gate = gate_factory(policies=POLICIES, config={"state": url})
    assert gate.cli("check-config").returncode == 0

    # before: one triplet let through by hand, one greylisted (pending)
    allowed = gate.cli("greylist", "allow", "--triplet", "127.0.0.1", "alice@sender.test", "bob@example.com")
    assert allowed.returncode == 0, allowed.stderr
    with gate.smtp() as c:
        c.ehlo()
        assert transaction(c, "bob@example.com")[-1][0] == 250
        [(code, text)] = transaction(c, "carol@example.com")
        assert (code, text[:6]) == (451, b"4.7.1 "), (code, text)
    downstream.wait_for_messages(1)
    before = greylist_entries(gate)
    assert before["carol@example.com"]["state"] == "pending"
    # everything written so far is on the replica before the primary dies
    assert primary.client().execute_command("WAIT", 1, 5000) == 1

    primary.kill()
    killed = time.monotonic()
    with gate.smtp(timeout=30) as c:
        c.ehlo()
        # the outage: the greylisted domain is refused for now, the fail-open one delivered
        blocked, opened, data = transaction(c, "dave@example.com", "dave@open.example")
        assert blocked[0] == 451 and blocked[1].startswith(b"4.3.0 "), blocked
        assert opened[0] == 250 and data[0] == 250, (opened, data)
        [moved] = downstream.wait_for_messages(2)[1:]
        assert moved.rcpts == ["dave@open.example"]

        def promoted_replica() -> bool:
            address = sentinel.client().sentinel_get_master_addr_by_name(SERVICE)
            return address is not None and int(address[1]) == replica.port
        assert wait_until(promoted_replica, 60, interval=0.1), "the Sentinel never promoted the replica"
        promoted = time.monotonic()

        # after: the gate finds the new primary by itself; the allowed triplet still passes
        got: list = []

        def passes() -> bool:
            c.rset()
            got[:] = transaction(c, "bob@example.com")
            return got[0][0] == 250
        assert wait_until(passes, 30, interval=0.2), (got, gate.log_text()[-4000:])
        back = time.monotonic()
        print(f"store refused for {back - killed:.1f}s after the kill, "
              f"{back - promoted:.1f}s after the promotion")
        assert got[-1][0] == 250
        # new traffic: a new triplet is greylisted (the store answers), not refused for it
        [(code, text)] = transaction(c, "erin@example.com")
        assert (code, text[:6]) == (451, b"4.7.1 "), (code, text)

    [*_, last] = downstream.wait_for_messages(3)
    assert last.rcpts == ["bob@example.com"]
    after = greylist_entries(gate)
    carol = after["carol@example.com"]
    assert carol["state"] == "pending"
    assert carol["first_seen"] == before["carol@example.com"]["first_seen"]  # replicated, intact
    assert "erin@example.com" in after
    assert replica.client().info("replication")["role"] == "master"

    # the state, read through the Sentinels, copies like any other store's
    copy = subprocess.run([sys.executable, "-m", "smtpgate", "state", "copy", url,
                           f"sqlite://{gate.folder / 'copied.db'}", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert copy.returncode == 0, copy.stderr
    copied = json.loads(copy.stdout)["copied"]["greylist"]
    assert copied == {"pending": len(after), "allow": 1}, copied  # carol, erin; bob's allow entry

    log = gate.log_text()
    assert log.count("is down (") == 1 and log.count("is back after") == 1, log[-4000:]
    assert "Traceback" not in log and "redis.asyncio" not in log  # short lines, no client reprs


def test_behind_sentinel_the_backoff_stops_at_two_seconds():
    """A failover is over in seconds: the breaker of a Sentinel URL probes every 2 s at
    most (a plain Redis URL's goes up to 30 s)."""
    sentinel_link = RedisLink("redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc-backoff/0")
    plain_link = RedisLink("redis://127.0.0.1:1/0")
    assert sentinel_link.breaker.longest == SENTINEL_LONGEST_BACKOFF == 2.0
    assert plain_link.breaker.longest == LONGEST_BACKOFF == 30.0
    b = Breaker("s", longest=SENTINEL_LONGEST_BACKOFF)
    b._failed(False, ConnectionError("refused"))
    for _ in range(5):
        b._failed(True, ConnectionError("refused"))  # failed probes
    assert b.backoff == 2.0


@pytest.mark.timeout(60)
def test_no_sentinel_answering_is_a_store_failure_in_one_line(tmp_path):
    dead = [free_port(), free_port()]
    url = f"redis+sentinel://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/svc/0"
    done = subprocess.run([sys.executable, "-m", "smtpgate", "state", "copy", url, f"sqlite://{tmp_path / 'x.db'}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert (f"the Sentinels name no usable primary for 'svc' (unreachable: 127.0.0.1:{min(dead)}, "
            f"127.0.0.1:{max(dead)})") in done.stderr, done.stderr
    assert "redis.asyncio" not in done.stderr and "Traceback" not in done.stderr
