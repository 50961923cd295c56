"""The hot path to a plain ``redis://`` server: a batch of commands out, their replies back,
on connections of our own (an asyncio protocol, hiredis packing and parsing in C).

Why not redis-py here: its asyncio client costs 80-130 µs of this process's CPU per round
trip (a task and a timer per read, connection bookkeeping, instrumentation); this costs
~20 µs (bench/store_bench.py). Only the batched calls of ``RedisLink`` (``script`` /
``command``: every store decision) come this way; everything else, and ``rediss://``,
Sentinel and ``health_check_interval`` URLs, stays on redis-py.

A connection carries one batch at a time (the pool hands it to one caller, ``RedisLink``
bounds how many are out). Anything unusual closes it rather than risk reading a reply
meant for another batch: a timeout, a cancelled caller, the server closing, a reply that
does not parse. Faults come out as ``ConnectionError`` or ``TimeoutError``, which the
circuit breaker counts as outages; error replies come back as
``hiredis.ReplyError`` values in their place, for the caller to judge.
"""
from __future__ import annotations

import asyncio
import socket

import hiredis


class _Wire(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.replies: list = []
        self.want = 0
        self.done: asyncio.Future | None = None
        self.failed: Exception | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.done is None or self.done.done():  # nothing was asked: the stream is not ours to read
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
        self.done.set_result(self.replies)

    def connection_lost(self, exc):
        self._fail(ConnectionError(f"Redis closed the connection{f': {exc}' if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        if self.failed is None:
            self.failed = exc
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class WireConnection:
    """One connection: ``await call(commands)`` sends them in one write and answers their replies."""

    def __init__(self, wire: _Wire, timeout: float):
        self._wire = wire
        self._timeout = timeout

    @property
    def usable(self) -> bool:
        return self._wire.failed is None and not self._wire.transport.is_closing()

    async def call(self, commands: list[tuple]) -> list:
        wire = self._wire
        if wire.failed is not None:
            raise wire.failed
        wire.replies, wire.want = [], len(commands)
        wire.done = asyncio.get_running_loop().create_future()
        wire.transport.write(b"".join(hiredis.pack_command(c) for c in commands))
        try:
            async with asyncio.timeout(self._timeout):
                return await wire.done
        except TimeoutError:
            raise TimeoutError(f"Redis did not answer within {self._timeout:g}s") from None

    def close(self) -> None:
        self._wire.transport.close()


class WirePool:
    """Idle connections to one server, opened on demand (the caller bounds how many are out)."""

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None,
                 password: str | None = None, client_name: str | None = None,
                 timeout: float = 2.0, connect_timeout: float = 2.0, keepalive: bool = False):
        self.host, self.port = host, port
        self._login = []
        if username or password:  # as redis-py: AUTH [user] password ("" when only a user is given)
            self._login.append(("AUTH", username, password or "") if username else ("AUTH", password))
        if client_name:
            self._login.append(("CLIENT", "SETNAME", client_name))
        if db:
            self._login.append(("SELECT", db))
        self._timeout, self._connect_timeout, self._keepalive = timeout, connect_timeout, keepalive
        self._idle: list[WireConnection] = []

    async def call(self, commands: list[tuple]) -> list:
        """The replies to ``commands`` (one round trip), on an idle connection or a new one."""
        conn = self._idle.pop() if self._idle else await self._open()
        try:
            replies = await conn.call(commands)
        except BaseException:  # a timeout, a fault, a cancelled caller: replies may still come
            conn.close()
            raise
        if conn.usable:
            self._idle.append(conn)
        return replies

    async def _open(self) -> WireConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, wire = await loop.create_connection(_Wire, self.host, self.port)
        except TimeoutError:
            raise TimeoutError(f"connecting to Redis at {self.host}:{self.port}: no answer within "
                              f"{self._connect_timeout:g}s") from None
        except OSError as e:
            raise ConnectionError(f"connecting to Redis at {self.host}:{self.port}: {e.strerror or e}") from None
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
