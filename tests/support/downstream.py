"""A capturing downstream SMTP server for integration tests.

Written on plain asyncio streams (not aiosmtpd) so that the exact bytes the gate puts
on the wire are what the tests see. It runs its own event loop in a background thread,
so synchronous tests use it directly::

    with CapturingDownstream() as ds:
        ...  # point the gate (or smtplib) at 127.0.0.1:ds.port
        [msg] = ds.wait_for_messages(1)
        assert msg.rcpts == ["user@example.com"]

Recorded (all lists grow in arrival order; read them after ``wait_for``/``wait_for_messages``):

- ``ds.transcript``: every command line received, as bytes, without its line ending
  (DATA content is not in it).
- ``ds.messages``: a :class:`Captured` for every message the server accepted (2xx after
  the final dot); ``ds.rejected`` the ones it refused at the final dot (scripted reply or
  over ``size``); ``ds.aborted`` the raw bytes of DATA sections that never got a final
  reply (the peer went away mid-DATA, or ``stall_at``/``drop_at`` ``DATA_END``).
- ``ds.sessions``: one :class:`Session` per connection (peer, helo, xclient, raw bytes in).
- ``ds.connections``: how many connections were accepted.

One client's records: a gate passes its client's source port downstream as ``XCLIENT PORT=``,
and loopback reuses a port still in TIME_WAIT, so an earlier client may have had the same
port. ``since = ds.mark()`` before the client connects, then ``ds.messages_from(port, since)``,
``ds.rejected_from(...)``, ``ds.sessions_from(...)`` or ``ds.wait_for_messages_from(...)``
look only at what was recorded after the mark (``clear()`` makes older marks meaningless).

Scripting (may be changed while the server runs):

- ``ds.replies``: ``{KEY: reply}``; KEY is a verb (``MAIL``, ``RCPT``, ``DATA``, ``RSET``,
  ``EHLO``, ``XCLIENT``, ...), ``DATA_END`` (the reply after the final dot), ``GREETING``
  (the banner), or ``VERB:address`` for MAIL/RCPT (address compared case-insensitively,
  without angle brackets). The reply is a string like ``"451 4.3.0 busy"`` (lines joined
  by ``\\n`` make a multi-line reply; a line without a code gets the first line's), a list of such strings used one per command and
  then falling back to normal behaviour, or a callable ``(line: str) -> str | None``.
  A non-2xx/3xx reply leaves the state as it was (MAIL refused: no transaction; RCPT
  refused: not a recipient; DATA refused: no data phase). A ``421`` reply closes the
  connection, as RFC 5321 says.
- ``ds.stall_at`` / ``ds.drop_at``: a key (same spelling as above) or a collection of
  keys where the server never answers (keeps reading until the peer goes away) / closes
  the connection without answering. ``DATA_END`` applies after the whole DATA section was
  read. ``drop_at`` also takes ``DATA_BODY``: after the ``354``, as soon as the first bytes
  of the message arrive, the connection is reset (RST, as the kernel does for a killed
  process with unread data) — a downstream dying mid-DATA; what it got is in ``aborted``.
- ``ds.delays``: ``{KEY: seconds}`` to answer late (a slow downstream).
- ``ds.hang_up(index)``: close session ``index`` now, between commands (an MTA's idle
  timeout), and wait until it is closed.
- ``ds.hold_at``: a key or keys whose reply waits until the next command line has arrived
  (only a client that pipelines gets it). ``ds.ahead``: every command line that arrived
  with the next command already behind it (the client pipelined them).
- ``pipelining=False``: PIPELINING is not advertised.

``chunking=True`` advertises CHUNKING and takes BDAT (RFC 3030): a message sent so is in
``messages``/``rejected`` with ``data_raw == data`` (the chunks as they came, no stuffing)
and ``bdat`` set; its reply is scripted as ``BDAT`` (every chunk) or ``DATA_END`` (after the
last one). A refused BDAT ends the transaction, as Postfix does.

Only loopback addresses are ever bound; the server never resolves or connects anywhere.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from tests.support.constants import LOOPBACK

__all__ = ["CapturingDownstream", "Captured", "Mark", "Session", "unstuff", "decode_xtext"]

GREETING_NAME = "downstream.test"
DEFAULT_SIZE = 52_428_800
MAX_LINE = 65_536  # a command line longer than this is refused and the connection closed

XCLIENT_ATTRS = ("ADDR", "NAME", "PORT", "PROTO", "HELO")
XFORWARD_ATTRS = ("NAME", "ADDR", "PROTO", "HELO", "IDENT")

TERMINATOR = b"\r\n.\r\n"


@dataclass
class Captured:
    """One message as the downstream received it.

    ``data_raw`` is exactly what came on the wire after the ``354`` up to, not including,
    the final ``.\\r\\n`` line (so, for a non-empty message, it ends with the ``\\r\\n`` of
    the last line, RFC 5321 §4.1.1.4): ``data_raw + b".\\r\\n"`` is the byte-exact DATA
    section. ``data`` is ``data_raw`` with the dot stuffing removed (lines split on CRLF
    only; a bare LF or CR is kept as it came).
    """

    mail_from: str
    mail_params: dict[str, str | None]
    rcpts: list[str]
    data_raw: bytes
    data: bytes
    xclient: dict[str, str]
    xforward: dict[str, str]
    helo: str | None
    rcpt_params: list[dict[str, str | None]] = field(default_factory=list)
    reply: str = ""          # the reply sent after the final dot (or the last BDAT chunk)
    bdat: bool = False        # sent as BDAT chunks, not DATA
    session: int = 0          # index into ds.sessions
    esmtp: bool = True        # EHLO (True) or HELO (False) before this transaction

    def message(self) -> email.message.EmailMessage:
        """The unstuffed data parsed with the stdlib (for assertions on headers)."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    @property
    def header_block(self) -> bytes:
        """The raw header block (up to, not including, the first empty line)."""
        end = self.data.find(b"\r\n\r\n")
        return self.data if end < 0 else self.data[: end + 2]


@dataclass
class Session:
    """One connection to the downstream."""

    index: int
    peer: tuple[Any, ...]
    helo: str | None = None
    esmtp: bool = False
    xclient: dict[str, str] = field(default_factory=dict)
    xforward: dict[str, str] = field(default_factory=dict)
    transcript: list[bytes] = field(default_factory=list)
    raw_in: bytearray = field(default_factory=bytearray)  # every byte received, in order
    closed: bool = False


@dataclass(frozen=True)
class Mark:
    """How many records each list held at one moment (``ds.mark()``): those after it are new."""

    messages: int
    rejected: int
    sessions: int


def unstuff(raw: bytes) -> bytes:
    """Undo SMTP dot stuffing: drop the first '.' of every CRLF-terminated line."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line[:1] == b"." else line for line in lines)


def decode_xtext(value: str) -> str:
    """RFC 3461 xtext: '+XX' is the byte with hex value XX."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _parse_path(rest: str) -> tuple[str, str] | None:
    """Split '<addr> PARAMS' (or a bare 'addr PARAMS') into (addr, params_text)."""
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        i, quoted = 1, False
        while i < len(rest):
            c = rest[i]
            if c == "\\" and quoted:
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                return rest[1:i], rest[i + 1 :]
            i += 1
        return None
    addr, _, params = rest.partition(" ")
    return (addr, params) if addr else None


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        params[key.upper()] = value if eq else None
    return params


class _Drop(Exception):
    """Close the connection now."""


class CapturingDownstream:
    """An ESMTP server on 127.0.0.1 that records everything it receives.

    Parameters: ``xclient``/``xforward`` advertise and accept those commands (with the
    attribute names in ``xclient_attrs``/``xforward_attrs``); ``size`` is the SIZE limit
    advertised and enforced (``552 5.3.4`` at MAIL for a larger ``SIZE=`` and after
    the dot for larger data); ``None`` advertises ``SIZE`` without a limit.
    """

    def __init__(
        self,
        *,
        xclient: bool = True,
        xforward: bool = True,
        chunking: bool = False,
        size: int | None = DEFAULT_SIZE,
        host: str = LOOPBACK,
        port: int = 0,
        hostname: str = GREETING_NAME,
        xclient_attrs: Collection[str] = XCLIENT_ATTRS,
        xforward_attrs: Collection[str] = XFORWARD_ATTRS,
        replies: dict[str, Any] | None = None,
        stall_at: str | Collection[str] | None = None,
        drop_at: str | Collection[str] | None = None,
        delays: dict[str, float] | None = None,
        hold_at: str | Collection[str] | None = None,
        pipelining: bool = True,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"CapturingDownstream binds loopback only, not {host!r}")
        self.host = host
        self._want_port = port
        self.port = 0
        self.hostname = hostname
        self.xclient_enabled = xclient
        self.xforward_enabled = xforward
        self.chunking_enabled = chunking
        self.size = size
        self.xclient_attrs = tuple(a.upper() for a in xclient_attrs)
        self.xforward_attrs = tuple(a.upper() for a in xforward_attrs)
        self.replies: dict[str, Any] = dict(replies or {})
        self.stall_at = stall_at
        self.drop_at = drop_at
        self.delays: dict[str, float] = dict(delays or {})
        self.hold_at = hold_at
        self.pipelining = pipelining

        self.transcript: list[bytes] = []
        self.messages: list[Captured] = []
        self.rejected: list[Captured] = []
        self.aborted: list[bytes] = []
        self.sessions: list[Session] = []
        self.ahead: list[bytes] = []
        self.connections = 0
        self.stalled = 0   # how many times a stall_at point was reached
        self.dropped = 0   # how many times a drop_at point was reached
        self.errors: list[str] = []  # unexpected exceptions inside the server

        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: dict[int, asyncio.StreamWriter] = {}  # by session index, while open
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> CapturingDownstream:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="capturing-downstream", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            raise RuntimeError("CapturingDownstream failed to start") from self._start_error
        if not self.port:
            raise RuntimeError("CapturingDownstream did not start within 10s")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(10)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> CapturingDownstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self._want_port, limit=MAX_LINE * 2)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def hang_up(self, index: int, timeout: float = 5) -> None:
        """Close session ``index`` from the server's side (its reader then sees the end)."""
        assert self._loop is not None
        writer = self._writers[index]
        self._loop.call_soon_threadsafe(writer.close)
        self.wait_for(lambda: self.sessions[index].closed, timeout, f"session {index} closed")

    # ------------------------------------------------------------------ waiting
    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
        """Block until predicate() is true (re-checked whenever the server records something)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"downstream: timed out after {timeout}s waiting for {what}\n{self.describe()}")

    def wait_for_messages(self, n: int, timeout: float = 5) -> list[Captured]:
        """Wait until at least n messages were accepted; return (a copy of) ds.messages."""
        self.wait_for(lambda: len(self.messages) >= n, timeout, f"{n} message(s), have {len(self.messages)}")
        return list(self.messages)

    def wait_for_connections(self, n: int, timeout: float = 5) -> None:
        self.wait_for(lambda: self.connections >= n, timeout, f"{n} connection(s)")

    def wait_for_command(self, prefix: bytes | str, timeout: float = 5) -> bytes:
        """Wait for a transcript line starting with prefix (case-insensitive); return it."""
        p = (prefix.encode() if isinstance(prefix, str) else prefix).upper()
        found: list[bytes] = []

        def seen() -> bool:
            found[:] = [line for line in self.transcript if line.upper().startswith(p)]
            return bool(found)

        self.wait_for(seen, timeout, f"a command starting with {p!r}")
        return found[0]

    # ------------------------------------------------------------------ one client's records
    def mark(self) -> Mark:
        """Where the records stand now; take it before the client connects."""
        with self._cond:
            return Mark(len(self.messages), len(self.rejected), len(self.sessions))

    def messages_from(self, client_port: int | str, since: Mark) -> list[Captured]:
        """Accepted messages relayed for the client with this source port, recorded after ``since``."""
        port = str(client_port)
        with self._cond:
            return [m for m in self.messages[since.messages:] if m.xclient.get("PORT") == port]

    def rejected_from(self, client_port: int | str, since: Mark) -> list[Captured]:
        """Messages refused at the final dot for that client, recorded after ``since``."""
        port = str(client_port)
        with self._cond:
            return [m for m in self.rejected[since.rejected:] if m.xclient.get("PORT") == port]

    def sessions_from(self, client_port: int | str, since: Mark) -> list[Session]:
        """Connections opened after ``since`` whose XCLIENT PORT= is that client's (a session
        keeps its latest XCLIENT: a pooled one that served several clients shows the last)."""
        port = str(client_port)
        with self._cond:
            return [s for s in self.sessions[since.sessions:] if s.xclient.get("PORT") == port]

    def wait_for_messages_from(self, client_port: int | str, since: Mark, n: int = 1,
                               timeout: float = 5) -> list[Captured]:
        """Wait until at least n messages of that client arrived after ``since``; return them."""
        found: list[Captured] = []

        def arrived() -> bool:
            found[:] = self.messages_from(client_port, since)
            return len(found) >= n

        self.wait_for(arrived, timeout, f"{n} message(s) from client port {client_port} after {since}")
        return found

    def clear(self) -> None:
        """Forget everything recorded so far (scripting is kept)."""
        with self._cond:
            self.transcript.clear()
            self.messages.clear()
            self.rejected.clear()
            self.aborted.clear()
            self.ahead.clear()
            self.errors.clear()
            self.stalled = self.dropped = 0

    def describe(self, last: int = 30) -> str:
        lines = [f"connections={self.connections} messages={len(self.messages)} "
                 f"rejected={len(self.rejected)} aborted={len(self.aborted)} "
                 f"stalled={self.stalled} dropped={self.dropped}"]
        lines += [f"  > {line!r}" for line in self.transcript[-last:]]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)

    def _record(self, fn: Callable[[], None]) -> None:
        with self._cond:
            fn()
            self._cond.notify_all()

    # ------------------------------------------------------------------ scripting
    @staticmethod
    def _matches(setting: str | Collection[str] | None, keys: list[str]) -> bool:
        if not setting:
            return False
        wanted = {setting.upper()} if isinstance(setting, str) else {s.upper() for s in setting}
        return any(k.upper() in wanted for k in keys)

    def _scripted(self, keys: list[str], line: str) -> str | None:
        table = {str(k).upper(): v for k, v in self.replies.items()}
        for key in keys:
            if key.upper() in table:
                value = table[key.upper()]
                if callable(value):
                    return value(line)
                if isinstance(value, list):
                    return value.pop(0) if value else None
                return value
        return None

    # ------------------------------------------------------------------ protocol
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        with self._cond:
            sess = Session(index=len(self.sessions), peer=tuple(peer))
            self.sessions.append(sess)
            self.connections += 1
            self._cond.notify_all()
        self._writers[sess.index] = writer
        conn = _Conn(self, sess, reader, writer)
        try:
            await conn.run()
        except (_Drop, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - recorded for the test to see
            self._record(lambda: self.errors.append(f"{type(exc).__name__}: {exc}"))
        finally:
            self._tasks.discard(task)
            self._writers.pop(sess.index, None)
            if not writer.is_closing():
                writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except BaseException:  # noqa: BLE001 - peer may be gone already
                pass
            self._record(lambda: setattr(sess, "closed", True))


class _Conn:
    """The protocol state of one connection."""

    def __init__(self, ds: CapturingDownstream, sess: Session,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ds, self.sess, self.reader, self.writer = ds, sess, reader, writer
        self.buf = bytearray()
        self.eof = False
        self.greeted = False           # EHLO/HELO seen since connect / XCLIENT
        self.mail: tuple[str, dict[str, str | None]] | None = None
        self.rcpts: list[str] = []
        self.rcpt_params: list[dict[str, str | None]] = []
        self.chunks = bytearray()      # BDAT chunks of the transaction so far

    # -- io
    async def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = await self.reader.read(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        self.ds._record(lambda: self.sess.raw_in.extend(chunk))
        return True

    async def _readline(self) -> bytes | None:
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_LINE:
                await self._send("500 5.5.2 Error: line too long")
                raise _Drop
            start = len(self.buf)
            if not await self._fill():
                return None

    async def _read_data(self) -> bytes | None:
        """Read a DATA section; return the raw bytes before the final '.\\r\\n' line."""
        # An empty message: the '.\r\n' directly follows the DATA command's CRLF.
        while len(self.buf) < 3 and b".\r\n".startswith(bytes(self.buf)):
            if not await self._fill():
                return None
        if self.buf.startswith(b".\r\n"):
            del self.buf[:3]
            return b""
        start = 0
        while True:
            i = self.buf.find(TERMINATOR, start)
            if i >= 0:
                raw = bytes(self.buf[:i + 2])
                del self.buf[:i + len(TERMINATOR)]
                return raw
            start = max(0, len(self.buf) - len(TERMINATOR) + 1)
            if not await self._fill():
                return None

    async def _send(self, reply: str) -> None:
        lines = reply.replace("\r\n", "\n").split("\n")
        out = []
        for n, text in enumerate(lines):
            if not text[:3].isdigit():
                text = f"{lines[0][:3]} {text}"
            code, rest = text[:3], text[4:]
            sep = " " if n == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{rest}" if rest or sep == "-" else code)
        self.writer.write(("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape"))
        await self.writer.drain()
        if reply[:3] == "421":
            raise _Drop

    async def _stall(self) -> None:
        self.ds._record(lambda: setattr(self.ds, "stalled", self.ds.stalled + 1))
        while await self._fill():  # keep the bytes coming in recorded, never answer
            pass
        raise _Drop

    async def _answer(self, keys: list[str], line: str, default: str) -> str:
        """Apply delays/stall/drop/scripted replies for keys; send and return the reply."""
        ds = self.ds
        delays = {str(k).upper(): v for k, v in ds.delays.items()}
        for key in keys:
            if delays.get(key.upper()):
                await asyncio.sleep(delays[key.upper()])
                break
        if ds._matches(ds.hold_at, keys):
            while b"\n" not in self.buf and await self._fill():
                pass
        if ds._matches(ds.stall_at, keys):
            await self._stall()
        if ds._matches(ds.drop_at, keys):
            ds._record(lambda: setattr(ds, "dropped", ds.dropped + 1))
            raise _Drop
        reply = ds._scripted(keys, line) or default
        await self._send(reply)
        return reply

    # -- main loop
    async def run(self) -> None:
        ds = self.ds
        await self._answer(["GREETING", "CONNECT"], "", f"220 {ds.hostname} ESMTP capturing downstream")
        while True:
            raw = await self._readline()
            if raw is None:
                return
            line_b = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
            ds._record(lambda: (ds.transcript.append(line_b), self.sess.transcript.append(line_b)))
            if self.buf:
                ds._record(lambda: ds.ahead.append(line_b))
            line = line_b.decode("utf-8", "surrogateescape")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"do_{verb}", None) if verb.isalpha() else None
            if handler is None:
                await self._answer([verb], line, "502 5.5.2 Error: command not recognized")
                continue
            if await handler(arg, line) is False:
                return

    # -- commands
    def _ehlo_lines(self) -> list[str]:
        ds = self.ds
        lines = [f"250 {ds.hostname}", *(["250 PIPELINING"] if ds.pipelining else []),
                 f"250 SIZE {ds.size}" if ds.size else "250 SIZE"]
        if ds.xclient_enabled:
            lines.append("250 XCLIENT " + " ".join(ds.xclient_attrs))
        if ds.xforward_enabled:
            lines.append("250 XFORWARD " + " ".join(ds.xforward_attrs))
        lines += ["250 ENHANCEDSTATUSCODES", "250 8BITMIME", "250 SMTPUTF8"]
        if ds.chunking_enabled:
            lines.append("250 CHUNKING")
        return lines

    def _reset_tx(self) -> None:
        self.mail = None
        self.rcpts = []
        self.rcpt_params = []
        self.chunks = bytearray()

    async def do_EHLO(self, arg: str, line: str) -> None:
        if not arg.strip():
            await self._answer(["EHLO"], line, "501 5.5.4 Syntax: EHLO hostname")
            return
        reply = await self._answer(["EHLO"], line, "\n".join(self._ehlo_lines()))
        if reply[:1] == "2":
            self._reset_tx()
            self.greeted = True
            self.ds._record(lambda: (setattr(self.sess, "helo", arg.strip()), setattr(self.sess, "esmtp", True)))

    async def do_HELO(self, arg: str, line: str) -> None:
        if not arg.strip():
            await self._answer(["HELO"], line, "501 5.5.4 Syntax: HELO hostname")
            return
        reply = await self._answer(["HELO"], line, f"250 {self.ds.hostname}")
        if reply[:1] == "2":
            self._reset_tx()
            self.greeted = True
            self.ds._record(lambda: (setattr(self.sess, "helo", arg.strip()), setattr(self.sess, "esmtp", False)))

    def _attrs(self, arg: str, allowed: tuple[str, ...]) -> dict[str, str] | str:
        attrs: dict[str, str] = {}
        for word in arg.split():
            name, eq, value = word.partition("=")
            if not eq or not name:
                return f"501 5.5.4 Syntax error in attribute: {word}"
            if name.upper() not in allowed:
                return f"501 5.5.4 Bad attribute name: {name}"
            attrs[name.upper()] = decode_xtext(value)
        if not attrs:
            return "501 5.5.4 Syntax: attribute=value..."
        return attrs

    async def do_XCLIENT(self, arg: str, line: str) -> None:
        ds = self.ds
        if not ds.xclient_enabled:
            await self._answer(["XCLIENT"], line, "550 5.7.0 Error: insufficient authorization")
            return
        if self.mail is not None:
            await self._answer(["XCLIENT"], line, "503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = self._attrs(arg, ds.xclient_attrs)
        if isinstance(attrs, str):
            await self._answer(["XCLIENT"], line, attrs)
            return
        # Postfix answers XCLIENT with a new greeting; the client must EHLO again.
        reply = await self._answer(["XCLIENT"], line, f"220 {ds.hostname} ESMTP capturing downstream")
        if reply[:1] == "2":
            self.greeted = False
            self._reset_tx()
            ds._record(lambda: (self.sess.xclient.update(attrs), setattr(self.sess, "helo", None)))

    async def do_XFORWARD(self, arg: str, line: str) -> None:
        ds = self.ds
        if not ds.xforward_enabled:
            await self._answer(["XFORWARD"], line, "550 5.7.0 Error: insufficient authorization")
            return
        if self.mail is not None:
            await self._answer(["XFORWARD"], line, "503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = self._attrs(arg, ds.xforward_attrs)
        if isinstance(attrs, str):
            await self._answer(["XFORWARD"], line, attrs)
            return
        reply = await self._answer(["XFORWARD"], line, "250 2.0.0 Ok")
        if reply[:1] == "2":
            ds._record(lambda: self.sess.xforward.update(attrs))

    async def do_MAIL(self, arg: str, line: str) -> None:
        ds = self.ds
        parsed = _parse_path(arg[5:]) if arg[:5].upper() == "FROM:" else None
        keys = ["MAIL"] if parsed is None else [f"MAIL:{parsed[0].lower()}", "MAIL"]
        if not self.greeted:
            default = "503 5.5.1 Error: send HELO/EHLO first"
        elif self.mail is not None:
            default = "503 5.5.1 Error: nested MAIL command"
        elif parsed is None:
            default = "501 5.5.4 Syntax: MAIL FROM:<address>"
        else:
            params = _parse_params(parsed[1])
            size = params.get("SIZE")
            if ds.size and size and size.isdigit() and int(size) > ds.size:
                default = "552 5.3.4 Message size exceeds fixed limit"
            else:
                default = "250 2.1.0 Ok"
        reply = await self._answer(keys, line, default)
        if reply[:1] == "2" and parsed is not None:
            self._reset_tx()
            self.mail = (parsed[0], _parse_params(parsed[1]))

    async def do_RCPT(self, arg: str, line: str) -> None:
        parsed = _parse_path(arg[3:]) if arg[:3].upper() == "TO:" else None
        keys = ["RCPT"] if parsed is None else [f"RCPT:{parsed[0].lower()}", "RCPT"]
        if self.mail is None:
            default = "503 5.5.1 Error: need MAIL command"
        elif parsed is None or not parsed[0]:
            default = "501 5.5.4 Syntax: RCPT TO:<address>"
        else:
            default = "250 2.1.5 Ok"
        reply = await self._answer(keys, line, default)
        if reply[:1] == "2" and parsed is not None and self.mail is not None:
            self.rcpts.append(parsed[0])
            self.rcpt_params.append(_parse_params(parsed[1]))

    async def do_DATA(self, arg: str, line: str) -> None:
        ds = self.ds
        if self.mail is None:
            default = "503 5.5.1 Error: need RCPT command"
        elif not self.rcpts:
            default = "554 5.5.1 Error: no valid recipients"
        else:
            default = "354 End data with <CR><LF>.<CR><LF>"
        reply = await self._answer(["DATA"], line, default)
        if reply[:1] != "3":
            return
        if ds._matches(ds.drop_at, ["DATA_BODY"]):
            await self._die_mid_data()
        raw = await self._read_data()
        if raw is None:
            ds._record(lambda: ds.aborted.append(bytes(self.buf)))
            raise _Drop
        await self._end_message(raw, unstuff(raw), ["DATA_END"])

    async def do_BDAT(self, arg: str, line: str) -> None:
        ds = self.ds
        words = arg.split()
        if not ds.chunking_enabled:
            await self._answer(["BDAT"], line, "502 5.5.2 Error: command not recognized")
            return
        if not (1 <= len(words) <= 2 and words[0].isdigit()
                and [w.upper() for w in words[1:]] in ([], ["LAST"])):
            # the chunk's length cannot be trusted: its bytes must not be read as commands
            await self._answer(["BDAT"], line, "421 4.7.0 Error: bad BDAT, closing")
            raise _Drop
        size, last = int(words[0]), len(words) == 2
        while len(self.buf) < size:
            if not await self._fill():
                ds._record(lambda: ds.aborted.append(bytes(self.chunks + self.buf)))
                raise _Drop
        self.chunks += self.buf[:size]
        del self.buf[:size]
        if self.mail is None:
            default = "503 5.5.1 Error: need RCPT command"
        elif not self.rcpts:
            default = "554 5.5.1 Error: no valid recipients"
        elif last:
            raw = bytes(self.chunks)
            await self._end_message(raw, raw, ["BDAT", "DATA_END"], bdat=True)
            return
        else:
            default = f"250 2.0.0 Ok: {size} octets"
        if (await self._answer(["BDAT"], line, default))[:1] != "2":
            self._reset_tx()

    async def _end_message(self, raw: bytes, data: bytes, keys: list[str], bdat: bool = False) -> None:
        """The message of the transaction is in: record it, answer, end the transaction."""
        ds = self.ds
        assert self.mail is not None
        cap = Captured(
            mail_from=self.mail[0], mail_params=self.mail[1], rcpts=list(self.rcpts),
            data_raw=raw, data=data, xclient=dict(self.sess.xclient),
            xforward=dict(self.sess.xforward), helo=self.sess.helo,
            rcpt_params=list(self.rcpt_params), session=self.sess.index, esmtp=self.sess.esmtp,
            bdat=bdat,
        )
        self._reset_tx()
        self.sess.xforward = {}
        if ds.size and len(cap.data) > ds.size:
            default = "552 5.3.4 Error: message file too big"
        else:
            default = f"250 2.0.0 Ok: queued as M{len(ds.messages) + len(ds.rejected) + 1:05d}"
        if ds._matches(ds.stall_at, ["DATA_END"]) or ds._matches(ds.drop_at, ["DATA_END"]):
            ds._record(lambda: ds.aborted.append(raw))  # it will never get a final reply
        cap.reply = await self._answer(keys, "", default)
        ds._record(lambda: (ds.messages if cap.reply[:1] == "2" else ds.rejected).append(cap))

    async def _die_mid_data(self) -> None:
        while not self.buf:
            if not await self._fill():
                break
        ds = self.ds
        ds._record(lambda: (ds.aborted.append(bytes(self.buf)), setattr(ds, "dropped", ds.dropped + 1)))
        self.writer.transport.abort()  # unread bytes and no FIN: the peer sees a reset
        raise _Drop

    async def do_RSET(self, arg: str, line: str) -> None:
        reply = await self._answer(["RSET"], line, "250 2.0.0 Ok")
        if reply[:1] == "2":
            self._reset_tx()
            self.sess.xforward = {}

    async def do_NOOP(self, arg: str, line: str) -> None:
        await self._answer(["NOOP"], line, "250 2.0.0 Ok")

    async def do_QUIT(self, arg: str, line: str) -> bool:
        await self._answer(["QUIT"], line, "221 2.0.0 Bye")
        return False

