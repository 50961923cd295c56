"""The batched store calls' own Redis connections (smtpgate/stores/redis_wire.py): every
caller gets its own replies, logins and databases are honoured, a connection whose caller
was cancelled is used again once its replies are in, one that timed out never again. Real
Redis servers on loopback; no sleeps."""
from __future__ import annotations

import asyncio
import socket

import pytest
import redis

from smtpgate import Event, Machine, StoreError
from smtpgate.stores import Params, Stores
from smtpgate.stores.breaker import Breaker
from smtpgate.stores.redis_store import RedisLink
from tests.support.constants import T0
from tests.support.redisproc import REDIS_URL, PrivateRedis, UnixRedis, delete_redis_keys, new_prefix, require_redis


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def written_event(link: RedisLink) -> asyncio.Event:
    """Set once a batch has been written on the short way (an idle connection of the link's)."""
    written = asyncio.Event()
    real_send = link._wire.send

    def telling(calls, done):
        went = real_send(calls, done)
        if went:
            written.set()
        return went
    link._wire.send = telling
    return written


async def idle_then_frozen(link: RedisLink, private_redis, *warm_up) -> tuple:
    """(the reply to ``warm_up``, the connection it leaves idle, ``written_event``), the
    server then frozen: the next batch is written and its replies wait for the thaw."""
    reply = await link.command(*warm_up)
    conn, = link._wire._idle
    written = written_event(link)
    private_redis.freeze()
    return reply, conn, written


def test_plain_urls_use_the_wire_and_the_others_redis_py():
    assert RedisLink("redis://127.0.0.1:6379/3")._open_wire() is not None
    assert RedisLink("rediss://127.0.0.1:6379/3")._open_wire() is None
    assert RedisLink("redis+sentinel://127.0.0.1:26379/main/3")._open_wire() is None
    assert RedisLink("redis://127.0.0.1:6379/3?health_check_interval=5")._open_wire() is None
    assert RedisLink("unix:///run/redis/redis.sock?db=3")._open_wire().path == "/run/redis/redis.sock"
    assert RedisLink("unix:///run/redis/redis.sock?health_check_interval=5")._open_wire() is None


async def test_a_unix_socket_serves_the_wire_and_redis_py_with_its_login_and_database(tmp_path):
    server = UnixRedis(tmp_path / "redis").start()
    try:
        server.client().config_set("requirepass", "s3cret")
        link = RedisLink(f"unix://:s3cret@{server.socket}?db=5")
        try:
            assert await link.command("SET", "k", "in five") == b"OK"  # the wire
            conn, = link._wire._idle
            assert conn._wire.transport.get_extra_info("socket").family == socket.AF_UNIX
            assert await link.run(lambda client: client.get("k")) == b"in five"  # redis-py
        finally:
            await link.close()
        direct = redis.Redis(unix_socket_path=str(server.socket), password="s3cret", db=5)
        assert direct.get("k") == b"in five"
        wrong = RedisLink(f"unix://:wrong@{server.socket}?db=5")
        try:
            with pytest.raises(StoreError, match="refused the login"):
                await wrong.command("GET", "k")
        finally:
            await wrong.close()
        gone = RedisLink(f"unix://{tmp_path}/none.sock")
        try:
            with pytest.raises(StoreError, match=f"connecting to Redis at {tmp_path}/none.sock"):
                await gone.command("GET", "k")
        finally:
            await gone.close()
    finally:
        server.stop()


async def test_each_caller_gets_its_own_reply_across_batches_and_connections():
    require_redis()
    link = RedisLink(f"{REDIS_URL}?prefix={new_prefix()}")
    try:
        # 600 calls in one turn: three pipelines (BATCH_MAX 256) on three connections at once
        replies = await asyncio.gather(*(link.command("ECHO", f"value {i}") for i in range(600)))
        assert replies == [f"value {i}".encode() for i in range(600)]
        assert link._wire is not None and len(link._wire._idle) == 3
        # an error the server answered is that caller's StoreError, not the others'
        ok, bad = await asyncio.gather(link.command("ECHO", "fine"), link.command("NOSUCHCOMMAND"),
                                       return_exceptions=True)
        assert ok == b"fine"
        assert isinstance(bad, StoreError) and "ResponseError" in str(bad)
    finally:
        await link.close()


async def test_a_login_and_a_database_are_used_and_a_wrong_password_is_an_outage(private_redis):
    private_redis.client().config_set("requirepass", "s3cret")
    host_port = private_redis.url.split("//")[1].split("/")[0]
    link = RedisLink(f"redis://:s3cret@{host_port}/5")
    try:
        assert await link.command("SET", "k", "in five") is not None
        direct = redis.Redis.from_url(f"redis://:s3cret@{host_port}/5")
        assert direct.get("k") == b"in five"
        assert redis.Redis.from_url(f"redis://:s3cret@{host_port}/0").get("k") is None
    finally:
        await link.close()
    wrong = RedisLink(f"redis://:wrong@{host_port}/5")
    try:
        with pytest.raises(StoreError, match="refused the login"):
            await wrong.command("GET", "k")
        assert wrong.breaker.outages == 1  # counted as the server being unusable, like redis-py
    finally:
        await wrong.close()


async def test_a_connection_that_timed_out_is_never_read_again(private_redis):
    link = RedisLink(private_redis.url + "?socket_timeout=0.5")
    try:
        assert await link.command("SET", "k", "late")
        private_redis.freeze()  # the GET is written, its answer comes only after the timeout
        with pytest.raises(StoreError, match="TimeoutError"):
            await link.command("GET", "k")
        private_redis.thaw()
        link.breaker = Breaker("a fresh breaker")  # probe at once instead of after the back-off
        # the late answer to GET ("late") must not be taken for this call's
        assert await link.command("ECHO", "mine") == b"mine"
        assert await link.command("ECHO", "again") == b"again"
    finally:
        private_redis.thaw()
        await link.close()


async def test_a_processs_redis_stores_share_one_link_and_one_round_trip_per_turn():
    require_redis()
    prefix = new_prefix()
    stores = Stores(f"{REDIS_URL}?prefix={prefix}")
    link = stores.greylist.link
    assert stores.senders.link is link and stores.limits.link is link
    try:
        params = Params(300, 86400, 35 * 86400, 0)
        sent = []
        link.client()
        real_send = link._wire.send

        def counting(calls, done):  # what each round trip carried
            went = real_send(calls, done)
            if went:
                sent.append([c[0] for c in calls])
            return went
        link._wire.send = counting
        # a sender read and a greylist decision of two sessions, asked in one turn: one pipeline
        record, attempt = await asyncio.gather(
            stores.senders.get("senders", "alice@example.com"),
            stores.greylist.attempt("192.0.2.0/24", "alice@example.com", "bob@example.com", now=T0, params=params,
                                    client_ip="192.0.2.1"))
        assert record is None and attempt.outcome == "new"
        assert sent == [["HMGET", "EVALSHA"]]
        machine = Machine("senders", {"new": {"delivered": "known"}, "known": {}}, initial="new")
        view, _ = await machine.feed(stores.senders, "alice@example.com", [Event("delivered", "t")], T0)
        assert view.state == "known"
        # closing one store leaves the link to the others; the last one closes it
        await stores.greylist.close()
        assert link._client is not None
        assert (await stores.senders.get("senders", "alice@example.com")).state == "known"
    finally:
        await stores.senders.close()
        await stores.limits.close()
        assert link._client is None
        delete_redis_keys(prefix)


async def test_a_batch_on_an_idle_connection_goes_without_a_task_and_answers_as_the_long_way():
    require_redis()
    prefix = new_prefix()
    link = RedisLink(f"{REDIS_URL}?prefix={prefix}")
    long_way = []
    send = link._send

    def counting(batch):  # the coroutine path (_send): a task per batch
        long_way.append(len(batch))
        return send(batch)
    link._send = counting
    try:
        assert await link.command("ECHO", "first") == b"first"  # no connection yet: the long way opens one
        assert long_way == [1]
        ok, bad, many = await asyncio.gather(link.command("ECHO", "fine"), link.command("NOSUCHCOMMAND"),
                                             asyncio.gather(*(link.command("INCR", prefix + "n") for _ in range(3))),
                                             return_exceptions=True)
        assert long_way == [1]  # written at once on the idle connection
        assert ok == b"fine" and many == [1, 2, 3]
        assert isinstance(bad, StoreError) and str(bad).startswith(f"Redis {REDIS_URL}") and "ResponseError" in str(bad)
        assert link._slots._value == link.options["max_connections"]  # every slot given back
    finally:
        await link.close()
        delete_redis_keys(prefix)


async def test_an_idle_connection_the_server_dropped_is_replaced_and_one_with_a_batch_out_is_an_outage(
        private_redis):
    link = RedisLink(private_redis.url)
    try:
        async with asyncio.timeout(10):
            assert await link.command("SET", "k", "v")
            conn, = link._wire._idle
            lost = asyncio.Event()
            wire = conn._wire
            real_lost = wire.connection_lost
            wire.connection_lost = lambda exc: (real_lost(exc), lost.set())
            private_redis.client().client_kill_filter(_type="normal", skipme=True)  # our idle connection, gone
            await lost.wait()  # the loop has seen it close
            assert await link.command("GET", "k") == b"v"  # on a new connection, no outage
            assert link.breaker.outages == 0 and link._wire._idle and link._wire._idle[0] is not conn

            written = written_event(link)
            blocked = asyncio.ensure_future(link.command("BLPOP", "nothing", 0))  # no reply until killed
            await written.wait()
            private_redis.client().client_kill_filter(_type="normal", skipme=True)  # with the batch out
            with pytest.raises(StoreError, match=r"ConnectionError: Redis closed the connection"):
                await blocked
            assert link.breaker.outages == 1 and link.breaker.is_down
            assert link._slots._value == link.options["max_connections"]
    finally:
        await link.close()


async def test_a_bad_argument_fails_its_callers_and_leaves_the_connection_idle():
    require_redis()
    link = RedisLink(f"{REDIS_URL}?prefix={new_prefix()}")
    try:
        async with asyncio.timeout(10):
            assert await link.command("ECHO", "first") == b"first"  # a connection, idle
            conn, = link._wire._idle
            with pytest.raises(TypeError):  # as on the long way: hiredis cannot pack a dict
                await link.command("ECHO", {"not": "packable"})
            assert link._wire._idle == [conn]  # nothing written, no timer armed: still idle
            assert link._slots._value == link.options["max_connections"]
            assert await link.command("ECHO", "after") == b"after"
            assert link.breaker.outages == 0 and link._wire._idle == [conn]
    finally:
        await link.close()


async def test_a_cancelled_close_leaves_a_batch_out_to_its_replies(private_redis):
    link = RedisLink(private_redis.url)
    try:
        async with asyncio.timeout(10):
            reply, conn, written = await idle_then_frozen(link, private_redis, "SET", "k", "v")
            assert reply  # the GET below is written, its answer waits
            call = asyncio.ensure_future(link.command("GET", "k"))
            await written.wait()
            closing = asyncio.ensure_future(link.close())
            await asyncio.sleep(0)  # one step: close waits for the batch out
            closing.cancel()
            private_redis.thaw()
            assert await call == b"v"
            with pytest.raises(asyncio.CancelledError):
                await closing
            assert link._wire._idle == [conn] and link.breaker.outages == 0
            assert link._slots._value == link.options["max_connections"]
    finally:
        private_redis.thaw()
        await link.close()


async def test_close_waits_for_a_lost_scripts_long_way_and_nothing_reopens(private_redis):
    link = RedisLink(private_redis.url).attach({"answer": "return 'forty-two'"})
    try:
        async with asyncio.timeout(10):
            assert await link.script("answer", [], []) == b"forty-two"  # loaded; a connection idle
            private_redis.client().script_flush()  # the server loses it
            written = written_event(link)
            call = asyncio.ensure_future(link.script("answer", [], []))
            await written.wait()  # out on the short way; NOSCRIPT sends it the long way
            await link.close()
            assert await call == b"forty-two"
            assert link._client is None and not link._wire._idle  # nothing reopened after close
    finally:
        await link.close()


async def test_a_caller_cancelled_with_its_batch_out_leaves_the_others_their_replies(private_redis):
    link = RedisLink(private_redis.url)
    try:
        async with asyncio.timeout(10):
            reply, conn, written = await idle_then_frozen(link, private_redis, "ECHO", "first")
            assert reply == b"first"  # the batch below is written, its replies wait
            gone = asyncio.ensure_future(link.command("ECHO", "gone"))
            kept = asyncio.ensure_future(link.command("ECHO", "kept"))
            await written.wait()
            gone.cancel()
            private_redis.thaw()
            assert await kept == b"kept"
            with pytest.raises(asyncio.CancelledError):
                await gone
            # the cancelled caller's reply was read and dropped: the connection is in step
            assert link._wire._idle == [conn]
            assert link._slots._value == link.options["max_connections"]
            assert await link.command("ECHO", "next") == b"next" and link._wire._idle == [conn]
            assert link.breaker.outages == 0
    finally:
        private_redis.thaw()
        await link.close()


async def test_more_parts_than_idle_connections_go_the_short_and_the_long_way_at_once():
    require_redis()
    link = RedisLink(f"{REDIS_URL}?prefix={new_prefix()}")
    long_way = []
    send = link._send

    def counting(batch):
        long_way.append(len(batch))
        return send(batch)
    link._send = counting
    try:
        async with asyncio.timeout(10):
            assert await link.command("ECHO", "first") == b"first"  # one connection, idle
            long_way.clear()
            # 600 calls in one turn, three parts (BATCH_MAX 256): the first on the idle
            # connection, the other two on connections the long way opens
            replies = await asyncio.gather(*(link.command("ECHO", f"value {i}") for i in range(600)))
            assert replies == [f"value {i}".encode() for i in range(600)]
            assert long_way == [256, 88]
            assert len(link._wire._idle) == 3
            assert link._slots._value == link.options["max_connections"]
    finally:
        await link.close()


class _Clock:
    """Just enough of an event loop for a connection's deadline: a settable time and the
    timers armed, fired by hand."""

    def __init__(self):
        self.now = 0.0
        self.timers: list[tuple[float, object, tuple]] = []

    def time(self):
        return self.now

    def call_at(self, when, fn, *args):
        timer = (when, fn, args)
        self.timers.append(timer)
        clock = self

        class Handle:
            def when(self):
                return when

            def cancel(self):
                clock.timers.remove(timer)
        return Handle()

    def fire(self, at: float) -> None:
        self.now = at
        due = [t for t in self.timers if t[0] <= at]
        self.timers = [t for t in self.timers if t[0] > at]
        for _, fn, args in due:
            fn(*args)


def test_a_batch_times_out_at_its_own_deadline_with_one_timer_per_connection():
    from smtpgate.stores.redis_wire import _Wire
    clock, wire, timed_out = _Clock(), _Wire(), []
    wire.on_timeout = lambda: timed_out.append(clock.now)
    wire.done = lambda result: None
    wire.arm(clock, 2.0)  # the first batch: due at 2.0
    wire.done = None  # its replies came
    clock.now = 1.0
    wire.done = lambda result: None
    wire.arm(clock, 2.0)  # the next one, due at 3.0: no second timer
    assert [when for when, _, _ in clock.timers] == [2.0]
    clock.fire(2.0)  # the first batch's deadline: the batch out now is not late
    assert timed_out == [] and [when for when, _, _ in clock.timers] == [3.0]
    clock.fire(3.0)
    assert timed_out == [3.0]


def test_a_deadline_with_no_batch_out_leaves_the_connection_alone():
    from smtpgate.stores.redis_wire import _Wire
    clock, wire, timed_out = _Clock(), _Wire(), []
    wire.on_timeout = lambda: timed_out.append(clock.now)
    wire.done = lambda result: None
    wire.arm(clock, 2.0)
    wire.done = None  # answered
    clock.fire(2.0)
    assert timed_out == [] and clock.timers == [] and wire.timer is None
    wire.done = lambda result: None
    wire.arm(clock, 2.0)  # idle meanwhile: the next batch arms a timer again
    assert [when for when, _, _ in clock.timers] == [4.0]


def test_a_shorter_timeout_than_the_armed_one_is_watched_at_its_own_deadline():
    from smtpgate.stores.redis_wire import _Wire
    clock, wire, timed_out = _Clock(), _Wire(), []
    wire.on_timeout = lambda: timed_out.append(clock.now)
    wire.done = lambda result: None
    wire.arm(clock, 10.0)  # the login, under the connect timeout
    wire.done = None
    wire.done = lambda result: None
    wire.arm(clock, 0.5)  # the first batch, under the (shorter) socket timeout
    assert [when for when, _, _ in clock.timers] == [0.5]
    clock.fire(0.5)
    assert timed_out == [0.5]


def test_a_failed_connection_drops_its_timer_and_answers_the_batch_out():
    from smtpgate.stores.redis_wire import _Wire
    clock, wire, answers = _Clock(), _Wire(), []
    wire.on_timeout = lambda: pytest.fail("a failed connection has no deadline left")
    wire.done = answers.append
    wire.arm(clock, 2.0)
    wire._fail(ConnectionError("reset"))
    assert clock.timers == [] and wire.timer is None
    assert [type(a) for a in answers] == [ConnectionError]


async def test_a_batch_the_transport_would_not_take_is_not_watched():
    from smtpgate.stores.redis_wire import WireConnection, _Wire

    class Refusing:
        def write(self, data):
            raise RuntimeError("transport closed under us")

    wire = _Wire()
    wire.transport = Refusing()
    conn = WireConnection(wire, 2.0)
    with pytest.raises(RuntimeError):
        conn.send([("PING",)], lambda result: pytest.fail("nothing was sent to answer"))
    assert wire.done is None and wire.timer is None
