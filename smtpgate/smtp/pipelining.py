"""RFC 2920 command pipelining on a downstream connection: the replies to a group of
commands written at once, read in order.

aiosmtplib reads one reply per command it sent: a second reply that arrives in the same
segment waits in its buffer unparsed, and one that arrives before its reader is back is
dropped. So while a group's replies come in, ``_Replies`` stands in for the client's
protocol on the transport (asyncio's ``set_protocol``) and hands it back once they are all
in, or the connection failed. Plain asyncio: relay.py stays the only aiosmtplib importer.
"""
from __future__ import annotations

import asyncio

from .idletimer import ReplyDeadline

# aiosmtplib's own bounds on one reply line (MAX_LINE_LENGTH, its CRLF included) and on one
# reply (MAX_RESPONSE_LENGTH): past either the exchange fails, as one at a time, instead of
# a downstream streaming endless lines filling memory.
MAX_LINE = 8192
MAX_REPLY = MAX_LINE * 4


class MalformedReply(ValueError):
    """A reply line that does not start with a three-digit code, or a line or reply too long."""


class _Replies(asyncio.Protocol):
    """Collects the replies to a group, in order, as ``(code, text)``: the text is the
    lines' texts joined by newlines, as aiosmtplib gives a reply."""

    def __init__(self, client: asyncio.Protocol, wanted: int):
        self.client, self.wanted = client, wanted
        self.replies: list[tuple[int, str]] = []
        self.problem: BaseException | None = None
        self._pending = bytearray()  # the start of a line not complete yet
        self._lines: list[bytes] = []  # the texts of the reply being read
        self._size = 0
        self._changed: asyncio.Future | None = None

    @property
    def finished(self) -> bool:
        return self.problem is not None or len(self.replies) >= self.wanted

    async def wait(self, deadline: ReplyDeadline, timeout: float) -> None:
        """Until every reply is in or the exchange failed; ``asyncio.TimeoutError`` when
        the downstream stays silent ``timeout`` seconds (each reply gets the whole timeout,
        as when the commands go one at a time), from the session's ``deadline``."""
        loop = asyncio.get_running_loop()
        while not self.finished:
            self._changed = changed = loop.create_future()
            deadline.watch(self._awaited, timeout)  # a fresh timeout for each reply
            try:
                await changed
            finally:
                deadline.done()

    def _awaited(self) -> asyncio.Future | None:
        """The future ``wait`` awaits now: the one the session deadline fails."""
        return self._changed

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return  # unasked-for bytes: aiosmtplib drops those too
        complete = len(self.replies)
        self._pending += data
        start = 0
        while not self.finished and (end := self._pending.find(b"\n", start)) >= 0:
            self._line(bytes(self._pending[start:end + 1]))
            start = end + 1
        del self._pending[:start]
        if not self.finished and self._size + len(self._pending) > MAX_REPLY:
            self.problem = MalformedReply("reply too long")
        if self.finished or len(self.replies) > complete:  # else the reply's timeout runs on
            self._wake()

    def _line(self, line: bytes) -> None:
        self._size += len(line)
        if len(line) > MAX_LINE:
            self.problem = MalformedReply("reply line too long")
            return
        try:
            code = int(line[:3])
        except ValueError:
            self.problem = MalformedReply(f"malformed reply line: {line!r}")
            return
        if self._size > MAX_REPLY:
            self.problem = MalformedReply("reply too long")
            return
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":  # the reply's last line
            text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
            self.replies.append((code, text))
            self._lines, self._size = [], 0

    def eof_received(self) -> bool:
        if not self.finished:
            self.problem = ConnectionResetError("downstream closed the connection")
            self._wake()
        return False  # close the transport, as aiosmtplib does

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.finished:
            self.problem = ConnectionResetError(f"downstream connection lost: {exc}" if exc else
                                                "downstream connection lost")
            self._wake()
        self.client.connection_lost(exc)  # the client's state must know it closed

    def pause_writing(self) -> None:
        self.client.pause_writing()

    def resume_writing(self) -> None:
        self.client.resume_writing()


async def replies(client: asyncio.Protocol, transport: asyncio.Transport, wanted: int,
                  deadline: ReplyDeadline, timeout: float
                  ) -> tuple[list[tuple[int, str]], BaseException | None]:
    """The replies to the ``wanted`` commands just written on ``transport``, in order, and
    what ended the exchange early (None when all came): a closed connection, a malformed
    reply, ``asyncio.TimeoutError``. The replies read before a failure are kept: the caller
    decides as if the commands had gone one at a time."""
    collector = _Replies(client, wanted)
    transport.set_protocol(collector)
    try:
        await collector.wait(deadline, timeout)
    except asyncio.TimeoutError as exc:
        collector.problem = exc
    finally:
        if not transport.is_closing():
            transport.set_protocol(client)
    return collector.replies, collector.problem
