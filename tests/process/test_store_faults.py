"""A store that fails: the circuit breaker of the Redis stores (smtpgate/stores/breaker.py) on
a fake clock, then the real gate on a private ``redis-server`` that the test kills, freezes
and restarts.

What is proved: the documented ``on_error`` behaviour holds while Redis is down (451 4.3.0
by default, fail open with ``on_error: accept``); a dead store is tried again only after a
growing back-off, not on every command (counted in the gate's log: each call that really
went to Redis logs the network error, each call refused by the breaker logs "down since"),
so a frozen Redis costs one read timeout, not one per RCPT; the log says once that the store
is down and once that it is back; and the gate uses the store again by itself once Redis
answers.
"""
from __future__ import annotations

import asyncio
import math
import re
import smtplib
import time

import pytest

from tests.support.redisproc import PrivateRedis
from tests.support.waiting import wait_until
from smtpgate import StoreError
from smtpgate.stores.breaker import Breaker


# =========================================================================== the breaker alone
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def refused() -> ConnectionError:
    return ConnectionRefusedError(111, "refused")


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OSError)


async def ok():
    return "ok"


async def down():
    raise refused()


async def answered_error():
    raise ValueError("WRONGTYPE")


async def call(breaker: Breaker, operation) -> str:
    """What the caller sees: the result, "tried" (the operation ran and failed) or "refused"
    (the breaker refused without running it)."""
    ran = []

    async def tracked():
        ran.append(True)
        return await operation()
    try:
        return await breaker.run(tracked, is_outage)
    except StoreError:
        assert not ran
        return "refused"
    except (OSError, ValueError):
        assert ran
        return "tried"


async def test_a_failure_opens_the_circuit_and_calls_fail_at_once(caplog):
    clock = FakeClock()
    b = Breaker("Redis redis://x/0", clock=clock)
    assert await call(b, ok) == "ok"
    assert await call(b, down) == "tried"
    assert [await call(b, ok) for _ in range(5)] == ["refused"] * 5  # even though it would answer
    assert b.is_down and b.refused == 5
    downs = [r for r in caplog.records if "is down" in r.getMessage()]
    assert len(downs) == 1 and "Redis redis://x/0" in downs[0].getMessage()


async def test_after_the_backoff_one_probe_goes_and_failures_double_the_backoff():
    clock = FakeClock()
    b = Breaker("s", first=1, longest=4, clock=clock)
    await call(b, down)
    tried_at = []
    for step in range(60):  # 15 s in quarter seconds, the store always down
        clock.t += 0.25
        if await call(b, down) == "tried":
            tried_at.append(step)
    # probes after 1, then 2, then 4 seconds, then every 4 (the longest); refused between
    gaps = [later - earlier for earlier, later in zip([-1] + tried_at, tried_at)]
    assert gaps == [4, 8, 16, 16, 16]
    assert b.refused == 60 - 5


async def test_a_successful_probe_closes_the_circuit_and_logs_once(caplog):
    clock = FakeClock()
    b = Breaker("s", clock=clock)
    await call(b, down)
    clock.t += 1.0
    assert await call(b, ok) == "ok"
    assert not b.is_down
    assert [await call(b, ok) for _ in range(3)] == ["ok"] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is down" in m for m in messages) == 1
    assert sum("is back" in m for m in messages) == 1


async def test_only_one_probe_at_a_time():
    clock = FakeClock()
    b = Breaker("s", clock=clock)
    await call(b, down)
    clock.t += 1.0
    release = asyncio.Event()

    async def slow():
        await release.wait()
        return "ok"
    probe = asyncio.create_task(call(b, slow))
    await asyncio.sleep(0)
    assert await call(b, ok) == "refused"  # the probe is still out
    release.set()
    assert await probe == "ok"
    assert await call(b, ok) == "ok"


async def test_a_cancelled_probe_lets_the_next_call_probe():
    clock = FakeClock()
    b = Breaker("s", clock=clock)
    await call(b, down)
    clock.t += 1.0
    probe = asyncio.create_task(call(b, lambda: asyncio.sleep(60)))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert await call(b, ok) == "ok"


async def test_an_error_the_server_answered_does_not_open_the_circuit():
    b = Breaker("s", clock=FakeClock())
    assert await call(b, answered_error) == "tried"
    assert not b.is_down and await call(b, ok) == "ok"


async def test_calls_in_flight_when_the_store_died_do_not_lengthen_the_backoff():
    clock = FakeClock()
    b = Breaker("s", clock=clock)
    gate = asyncio.Event()

    async def dies_later():
        await gate.wait()
        raise refused()
    flights = [asyncio.create_task(call(b, dies_later)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*flights) == ["tried"] * 5
    assert b.backoff == 1.0
    clock.t += 1.0
    assert await call(b, ok) == "ok"


# =========================================================================== a private Redis
@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


POLICIES = {
    # MAIL runs the default policy: senders fails open there, so the RCPT stage is reached
    "default.yaml": """
domains: [example.com]
rules:
  - senders: {on_error: accept}
  - greylist: {}
""",
    "open.yaml": """
domains: [open.example]
rules:
  - greylist: {on_error: accept}
""",
}
MESSAGE = b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: store faults\r\n\r\nhello\r\n"
REAL_TRY = re.compile(r"rule \S+ failed in \S+: Redis redis://\S+: (?!down since)")
REFUSED = re.compile(r"rule \S+ failed in \S+: Redis redis://\S+: down since")


def rcpt(client: smtplib.SMTP, address: str) -> tuple[int, bytes]:
    code, text = client.rcpt(address)
    return code, text


def transaction(client: smtplib.SMTP, *recipients: str) -> list[tuple[int, bytes]]:
    """MAIL, each RCPT, DATA when one was accepted; the RCPT replies, then DATA's (if sent)."""
    code, text = client.mail("alice@sender.test")
    assert code == 250, (code, text)
    replies = [rcpt(client, r) for r in recipients]
    if any(code == 250 for code, _ in replies):
        replies.append(client.data(MESSAGE))
    else:
        client.rset()
    return replies


def real_tries(log: str) -> int:
    return len(REAL_TRY.findall(log))


def allowed_tries(seconds: float) -> int:
    """Calls that may reach a dead store within `seconds` of the first failure: the first,
    then one probe after 1, 1+2, 1+2+4 ... seconds (plus one for a pooled connection found
    dead only when used)."""
    return 2 + int(math.log2(seconds + 1))


def wait_store_used(gate, client: smtplib.SMTP, timeout: float = 60.0) -> tuple[int, bytes]:
    """Poll RCPTs until one is no longer refused for the store (451 4.3.0); its reply."""
    got: list[tuple[int, bytes]] = []

    def answered() -> bool:
        client.rset()
        client.mail("alice@sender.test")
        got[:] = [rcpt(client, "new@example.com")]
        return not got[0][1].startswith(b"4.3.0")
    if not wait_until(answered, timeout, interval=0.1):
        pytest.fail(f"the gate never used the store again\n{gate.log_text()[-4000:]}")
    client.rset()
    return got[0]


def test_redis_killed_mid_session_then_restarted(gate_factory, downstream, private_redis):
    gate = gate_factory(policies=POLICIES, config={"state": private_redis.url})
    assert gate.cli("greylist", "allow", "--client", "127.0.0.1").returncode == 0
    with gate.smtp() as c:
        c.ehlo()
        # the store works: allowed, delivered, tracked
        assert transaction(c, "bob@example.com")[-1][0] == 250
        downstream.wait_for_messages(1)
        gate.wait_for_log("transaction tx=")  # written after the end hooks: senders' write done
        assert private_redis.client().keys("smtpgate:sm:*")

        private_redis.kill()
        killed = time.monotonic()
        replies = []
        for n in range(15):
            replies += transaction(c, f"user{n}@example.com", f"user{n}@open.example")
        dead_for = time.monotonic() - killed
        # default on_error: 451 4.3.0 for the greylisted domain; on_error: accept: delivered
        for n in range(15):
            blocked, opened, data = replies[3 * n: 3 * n + 3]
            assert blocked[0] == 451 and blocked[1].startswith(b"4.3.0 "), blocked
            assert opened[0] == 250 and data[0] == 250, (opened, data)
        msgs = downstream.wait_for_messages(16)
        assert all(m.rcpts == [f"user{n}@open.example"] for n, m in enumerate(msgs[1:]))

        # the last transaction's end hooks follow its reply: its log line comes after them
        wait_until(lambda: gate.log_text().count("transaction tx=") >= 16, 10,
                   what=lambda: gate.log_text()[-4000:])
        log = gate.log_text()
        # 45 store calls (MAIL and end of senders, RCPT of greylist per transaction)
        assert len(REFUSED.findall(log)) + real_tries(log) >= 45
        assert 1 <= real_tries(log) <= allowed_tries(dead_for), log[-4000:]
        assert log.count("is down (") == 1 and "is back" not in log
        assert "Traceback" not in log

        private_redis.start()  # same port, empty: nothing was saved
        code, text = wait_store_used(gate, c)
        assert (code, text[:6]) == (451, b"4.7.1 "), (code, text)  # a new triplet: greylisted
        log = gate.log_text()
        assert log.count("is back after") == 1 and log.count("is down (") == 1

        # the restarted store is in use: allow list again, then delivered and tracked
        assert gate.cli("greylist", "allow", "--client", "127.0.0.1").returncode == 0
        assert transaction(c, "carol@example.com")[-1][0] == 250
    [*_, last] = downstream.wait_for_messages(17)
    assert last.rcpts == ["carol@example.com"]
    assert wait_until(lambda: bool(private_redis.client().keys("smtpgate:sm:*")), 5)


def test_a_frozen_redis_costs_one_timeout_not_one_per_rcpt(gate_factory, downstream, private_redis):
    """SIGSTOP: connections hang instead of being refused (a host gone from the network);
    each call that reaches Redis waits out the read timeout, so the count of such calls is
    what matters."""
    url = private_redis.url + "?socket_timeout=1&socket_connect_timeout=1"
    # one session sees the store go and come back: more 451s than limits.max_errors allows
    gate = gate_factory(policies=POLICIES, config={"state": url, "limits": {"max_errors": 1000}})
    assert gate.cli("greylist", "allow", "--client", "127.0.0.1").returncode == 0
    with gate.smtp(timeout=30) as c:
        c.ehlo()
        assert transaction(c, "bob@example.com")[-1][0] == 250
        private_redis.freeze()
        frozen = time.monotonic()
        replies = []
        for n in range(10):
            replies += transaction(c, f"user{n}@example.com")
        frozen_for = time.monotonic() - frozen
        assert all(code == 451 and text.startswith(b"4.3.0 ") for code, text in replies), replies
        log = gate.log_text()
        assert "TimeoutError" in log
        assert 1 <= real_tries(log) <= allowed_tries(frozen_for), log[-4000:]
        assert log.count("is down (") == 1

        private_redis.thaw()
        code, text = wait_store_used(gate, c)
        assert code == 250, (code, text)  # the allow entry survived the freeze
        assert gate.log_text().count("is back after") == 1
