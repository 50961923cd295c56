"""The hot path to a plain ``redis://`` or ``unix://`` server: a batch of commands out, their
replies back, on connections of our own (an asyncio protocol, hiredis packing and parsing in C).

Why not redis-py here: its asyncio client costs 80-130 µs of this process's CPU per round
trip (a task and a timer per read, connection bookkeeping, instrumentation); this costs
~20 µs (bench/store_bench.py). Only the batched calls of ``RedisLink`` (``script`` /
``command``: every store decision) come this way, over TCP or a Unix socket; everything
else, and ``rediss://``, Sentinel and ``health_check_interval`` URLs, stays on redis-py.

A connection carries one batch at a time (the pool hands it to one caller), and its
replies end that batch even when the caller has given up meanwhile, so the stream is never
read out of step. ``RedisLink``'s slots bound how many batches are out, but not strictly:
a ``call`` cancelled while its batch is out gives its slot back at once, and the connection
stays busy until the replies (or its timeout) come. Anything unusual closes it: a
timeout, the server closing, a reply that does not parse. A batch's end is a callback
(``send``), so a caller that needs no coroutine hears its replies in the very turn of the
event loop they arrive in. Faults come out as ``ConnectionError`` or ``TimeoutError``, which the
circuit breaker counts as outages; error replies come back as
``hiredis.ReplyError`` values in their place, for the caller to judge.
"""
from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable

import hiredis


class _Wire(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.replies: list = []
        self.want = 0
        self.done: Callable[[list | Exception], None] | None = None  # the batch out: told its end
        # The batch's deadline, watched by one timer per connection that is re-armed only when
        # it fires early (a later batch's deadline): arming and cancelling a timer per batch
        # cost more than the rest of a batch's bookkeeping together.
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.on_timeout: Callable[[], None] | None = None
        self.failed: Exception | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.done is None:  # nothing was asked: the stream is not ours to read
            self._fail(ConnectionError("Redis sent data nobody asked for"))
            return
        self.reader.feed(data)
        try:
            while len(self.replies) < self.want:
                reply = self.reader.gets()
                if reply is False:  # incomplete: wait for more
                    return
                self.replies.append(reply)
        except hiredis.ProtocolError as e:
            self._fail(ConnectionError(f"Redis sent an unreadable reply: {e}"))
            return
        self._end(self.replies)

    def connection_lost(self, exc):
        self._fail(ConnectionError(f"Redis closed the connection{f': {exc}' if exc else ''}"))

    def _end(self, result: list | Exception) -> None:
        done, self.done = self.done, None
        done(result)

    def arm(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """The batch out (written just before) fails at ``timeout`` from now unless its replies come first."""
        self.deadline = loop.time() + timeout
        if self.timer is not None and self.timer.when() > self.deadline:  # a shorter timeout
            self.timer.cancel()  # (the login's is the connect timeout)
            self.timer = None
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._check_deadline, loop)

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.done is None or self.failed is not None:  # no batch out: nothing to watch
            return
        if loop.time() < self.deadline:  # a later batch's: watch that one
            self.timer = loop.call_at(self.deadline, self._check_deadline, loop)
            return
        self.on_timeout()

    def _fail(self, exc: Exception) -> None:
        if self.failed is None:
            self.failed = exc
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()
        if self.done is not None:
            self._end(exc)


class WireConnection:
    """One connection: ``send(commands, done)`` writes them at once and calls ``done`` with
    their replies, or with the fault that ended the connection (a timeout included)."""

    def __init__(self, wire: _Wire, timeout: float):
        self._wire = wire
        self._timeout = timeout
        wire.on_timeout = self._timed_out

    @property
    def usable(self) -> bool:
        return self._wire.failed is None and not self._wire.transport.is_closing()

    def send(self, commands: list[tuple], done: Callable[[list | Exception], None]) -> None:
        wire = self._wire
        if wire.failed is not None:
            asyncio.get_running_loop().call_soon(done, wire.failed)
            return
        assert wire.done is None, "one batch at a time on a connection"
        # packed first: a bad argument raises here, with nothing written and nothing armed
        data = b"".join(hiredis.pack_command(c) for c in commands)
        wire.replies, wire.want, wire.done = [], len(commands), done
        try:
            wire.transport.write(data)
        except BaseException:  # not sent: nothing out for the timer to fail later
            wire.done = None
            raise
        wire.arm(asyncio.get_running_loop(), self._timeout)

    def _timed_out(self) -> None:
        self._wire._fail(TimeoutError(f"Redis did not answer within {self._timeout:g}s"))

    async def call(self, commands: list[tuple]) -> list:
        """The replies to ``commands``; the fault raised."""
        future = asyncio.get_running_loop().create_future()
        self.send(commands, functools.partial(_settle, future))
        return await future

    def close(self) -> None:
        self._wire.transport.close()


def _settle(future: asyncio.Future, result: list | Exception) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class WirePool:
    """Idle connections to one server, opened on demand (the caller bounds how many are out):
    at ``host``:``port``, or at the Unix socket ``path`` when one is given."""

    def __init__(self, host: str | None, port: int | None, *, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None,
                 client_name: str | None = None, timeout: float = 2.0,
                 connect_timeout: float = 2.0, keepalive: bool = False):
        self.host, self.port, self.path = host, port, path
        self._where = path if path is not None else f"{host}:{port}"
        self._login = []
        if username or password:  # as redis-py: AUTH [user] password ("" when only a user is given)
            self._login.append(("AUTH", username, password or "") if username else ("AUTH", password))
        if client_name:
            self._login.append(("CLIENT", "SETNAME", client_name))
        if db:
            self._login.append(("SELECT", db))
        self._timeout, self._connect_timeout, self._keepalive = timeout, connect_timeout, keepalive
        self._idle: list[WireConnection] = []

    def send(self, commands: list[tuple], done: Callable[[list | Exception], None]) -> bool:
        """``commands`` written at once on an idle connection, ``done`` told their replies
        (or the fault) when they come; False (nothing sent) when no connection is idle."""
        if not self._has_idle():
            return False
        conn = self._idle.pop()

        def ended(result):
            if not isinstance(result, Exception) and conn.usable:
                self._idle.append(conn)
            done(result)
        try:
            conn.send(commands, ended)
        except BaseException:  # nothing was written (a bad argument): still idle
            self._idle.append(conn)
            raise
        return True

    async def call(self, commands: list[tuple]) -> list:
        """The replies to ``commands`` (one round trip), on an idle connection or a new one."""
        if not self._has_idle():
            self._idle.append(await self._open())
        future = asyncio.get_running_loop().create_future()
        # send cannot answer False: a usable connection is idle (just found or opened) and
        # nothing ran since that could take it
        self.send(commands, functools.partial(_settle, future))
        return await future

    def _has_idle(self) -> bool:
        """Whether a usable connection is idle; the ones the server closed meanwhile (its
        timeout, CLIENT KILL, a restart) are dropped first, as redis-py's pool reconnects,
        rather than written to and taken for an outage."""
        while self._idle and not self._idle[-1].usable:
            self._idle.pop().close()
        return bool(self._idle)

    async def _open(self) -> WireConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self.path is not None:
                    transport, wire = await loop.create_unix_connection(_Wire, self.path)
                else:
                    transport, wire = await loop.create_connection(_Wire, self.host, self.port)
        except TimeoutError:
            raise TimeoutError(f"connecting to Redis at {self._where}: no answer within "
                              f"{self._connect_timeout:g}s") from None
        except OSError as e:
            raise ConnectionError(f"connecting to Redis at {self._where}: {e.strerror or e}") from None
        if self._keepalive:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = WireConnection(wire, self._connect_timeout)
        if self._login:
            try:
                replies = await conn.call(self._login)
            except BaseException:
                conn.close()
                raise
            refused = next((r for r in replies if isinstance(r, hiredis.ReplyError)), None)
            if refused is not None:  # a wrong password or DB: as redis-py, a connection fault
                conn.close()
                raise ConnectionError(f"Redis refused the login: {refused}")
        conn._timeout = self._timeout
        return conn

    def drop_idle(self) -> None:
        """Close the idle connections (after an outage they lead to a dead server process)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
