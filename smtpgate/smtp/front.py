"""The only module that speaks SMTP to clients (and the only one importing aiosmtpd).

aiosmtpd reads commands, handles PROXY and STARTTLS; this subclass checks each command's
arguments, hands HELO/EHLO/MAIL/RCPT/DATA/RSET to the conversation, and writes its replies.
Which command is allowed when is the conversation's table (conversation.py), not aiosmtpd's
``check_helo_needed``. What it changes from stock aiosmtpd, and why:
- EHLO lists only what the gate and the downstream both handle (the conversation builds it);
- every reply carries an enhanced status code (ENHANCEDSTATUSCODES is advertised);
- DATA is read as it arrives and decoded piece by piece (datadecoder.py: the same strict
  end-of-data rule as a search for CRLF.CRLF, dot-unstuffing, bare CR/LF normalised to CRLF
  so the downstream can never see an end of data the gate did not, the size and line-length
  limits), keeping one copy of the message; past ``max_inflight_data`` DATA gets 452 4.3.1;
- stray BDAT is refused and its chunk swallowed, not parsed; XCLIENT and XFORWARD are taken
  only from a peer in ``trusted_forwarders`` (forwarding.py parses them), refused otherwise;
- every command passes one counter (``_Commands``) and every reply one writer, where the
  per-session caps (greetings, RSETs, junk commands, errors) answer 421 and close;
- QUIT is answered at once, and the connection closed once the session's last transaction
  is observed (its ``on_end`` hooks, its log line: they run after the client's reply);
- connections are counted across workers (``connections.py``), and a PROXY header is read
  only from trusted peers: anyone else is hung up on before the greeting;
- one idle timer per connection (idletimer.py), reset per command, instead of aiosmtpd's new
  loop timer per command; closed for good when the connection is lost;
- importing this module replaces ``aiosmtpd.smtp.sanitized_log`` (its per-command-line log)
  with one that asks the logger's level first: process-wide, so any other aiosmtpd server in
  the same process gets it too (the test downstream is plain asyncio, and bench/floor_relay.py
  does not import this module: both unaffected); what is logged is unchanged.
The timer and the log rely on aiosmtpd internals (``_reset_timeout``, ``_timeout_handle``,
that module global): tests/unit/test_aiosmtpd_internals.py checks them against the installed
aiosmtpd.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import ssl
from collections.abc import Awaitable

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from . import inflight
from .. import metrics
from ..config.gate import in_networks
from ..mail.addresses import AddressError, helo_refusal, parse_path
from . import forwarding
from .connections import ConnectionTracker, client_key
from .conversation import Conversation
from .datadecoder import NO_STORAGE, READ_CHUNK, DataDecoder
from .idletimer import IdleTimer
from ..mail.session import Session, new_id
from ..mail.reply import Reply

log = logging.getLogger("smtpgate.front")

_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}  # the two it is called with


def _sanitized_log(func, msg, *args, **kwargs) -> None:
    """aiosmtpd logs every command line twice through this (Logger.debug, Logger.info),
    masking AUTH data first (a regular expression per line) although its logger is off at
    those levels (logs.py sets mail.log to WARNING): ask the level first, then log as
    aiosmtpd does. Any other call goes through as it came."""
    level = _LEVELS.get(getattr(func, "__name__", None))
    logger = getattr(func, "__self__", None)
    if level is None or not isinstance(logger, logging.Logger) or logger.isEnabledFor(level):
        _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log  # its command loop looks the name up per line

# Seconds a connection the gate closes still reads (and drops) what the client sends, after
# its last reply and the end of its output: see ``GateSMTP._close``.
LINGER = 2.0

_REPLY = re.compile(r"^(\d{3})([ -])(?!\d\.\d{1,3}\.\d{1,3}\b)(.*)$", re.S)
VERSION_IDENT = "smtpgate"


# Commands counted against the per-session caps, by the Limits field that caps them.
_GREETINGS = frozenset({"HELO", "EHLO"})
_JUNK = frozenset({"NOOP", "VRFY", "EXPN", "HELP"})  # and every unrecognised command
_CAPPED = {"max_greetings": "greetings", "max_rsets": "RSETs",
           "max_junk_commands": "NOOP/VRFY/HELP or unknown commands", "max_errors": "errors"}


class _Commands(dict):
    """aiosmtpd's command table (name -> method). Its dispatch loop looks up every command
    line here once, so ``get`` is the one place that sees each command: the session counts it
    and may answer it with another method (an unknown command's 500, or 421 past a cap).
    Filled on first use of each command (most connections use five of the ~20), not at
    connect: a name is a command exactly when the class has its ``smtp_`` method."""

    def __init__(self, protocol: "GateSMTP"):
        super().__init__()
        self._protocol = protocol

    def __missing__(self, command):
        if command not in self._protocol._smtp_name_set():
            raise KeyError(command)
        method = self[command] = getattr(self._protocol, "smtp_" + command)
        return method

    def get(self, command, default=None):
        try:
            method = self[command]
        except KeyError:
            method = default
        return self._protocol._on_command(command, method)


class _Handler:
    """aiosmtpd's handler slot: only PROXY needs it; everything else lives in GateSMTP. One
    instance serves every connection; GateSMTP gives aiosmtpd its one hook itself."""

    def __dir__(self):  # aiosmtpd scans dir(handler) per connection (inspect.getmembers)
        return []

    async def handle_PROXY(self, server: "GateSMTP", session, envelope, proxy_data) -> bool:
        if not proxy_data.valid:
            return False
        if proxy_data.src_addr is not None:  # LOCAL / UNKNOWN keep the socket's peer
            ip = str(proxy_data.src_addr)
            server.gsession.client_ip = ip.removeprefix("::ffff:") if "." in ip else ip
            server.gsession.client_port = int(proxy_data.src_port or 0)
        return True


_HANDLER = _Handler()
_HANDLE_HOOKS = {"PROXY": _HANDLER.handle_PROXY}  # aiosmtpd only reads it (.get per hook)


class GateSMTP(SMTP):
    def __init__(self, gate, tracker: ConnectionTracker, tls_context: ssl.SSLContext | None = None):
        cfg = gate.runtime.config
        # aiosmtpd's __init__ looks for auth_* and smtp_* methods through dir(self) on every
        # connection (inspect.getmembers: half its cost); we offer no AUTH and build the
        # command table below from a list made once per class.
        self._dir_hidden = True
        super().__init__(
            _HANDLER, hostname=cfg.hostname, ident=VERSION_IDENT,
            data_size_limit=cfg.limits.max_message_size, enable_SMTPUTF8=True,
            decode_data=False, timeout=cfg.limits.command_timeout, tls_context=tls_context,
            proxy_protocol_timeout=cfg.limits.command_timeout if cfg.proxy_protocol else None,
            auth_require_tls=True,
            # else aiosmtpd looks the loop up per connection under warnings.catch_warnings()
            loop=asyncio.get_running_loop())
        # aiosmtpd keeps command_size_limits on the class and grows it on every EHLO; keep
        # our own, sized for the longest MAIL/RCPT with every parameter we offer.
        self.command_size_limits = collections.defaultdict(lambda: 512, MAIL=1024, RCPT=1024)
        self._handle_hooks = _HANDLE_HOOKS  # what aiosmtpd's scan of the handler would find
        self.gate = gate
        self.tracker = tracker
        self.gsession: Session | None = None
        self.conv: Conversation | None = None
        self._greeting_pending = True
        self._in_data = False
        self._closing = False
        self._output_ended = False  # _close sent the end of our output: nothing more is written
        self._client_key: str | None = None  # as counted in the connection table
        self._command = ""
        self._counts = collections.Counter()  # per-session caps, since the last accepted message
        self._dir_hidden = False
        self._smtp_methods = _Commands(self)
        # one timer for the connection's life instead of one per command (idletimer.py);
        # aiosmtpd resets it through _reset_timeout and cancels it at connection_lost, where
        # we close it
        self._timeout_handle = IdleTimer(self.loop, self._timeout_cb)

    @classmethod
    def _smtp_names(cls) -> list[str]:
        names = cls.__dict__.get("_smtp_name_list")
        if names is None:
            names = cls._smtp_name_list = [n for n in dir(cls) if n.startswith("smtp_")]
        return names

    @classmethod
    def _smtp_name_set(cls) -> frozenset[str]:
        """The command names (``smtp_`` methods without the prefix)."""
        commands = cls.__dict__.get("_smtp_commands")
        if commands is None:
            commands = cls._smtp_commands = frozenset(n[5:] for n in cls._smtp_names())
        return commands

    def __dir__(self):
        # aiosmtpd scans dir(self) (via inspect.getmembers) for smtp_* and auth_* methods on
        # every new connection: nothing while its __init__ runs (see above), else the
        # smtp_* methods only. AUTH is never offered, so no auth_* mechanisms are listed.
        return [] if self._dir_hidden else self._smtp_names()

    # --- connection life ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:  # the TLS layer after STARTTLS: same client, same session, greeted again
            self.conv.tls_started()
            return
        # TCP_NODELAY is the event loop's: asyncio and uvloop set it on every accepted TCP
        # connection (tests/unit/test_nodelay.py); the socket object uvloop makes
        # for get_extra_info("socket") and a second setsockopt cost a connection syscalls.
        peer = transport.get_extra_info("peername") or ("", 0)
        ip = str(peer[0])
        self.gsession = Session(new_id(), ip.removeprefix("::ffff:") if "." in ip else ip,
                                int(peer[1]) if len(peer) > 1 else 0)
        self.conv = Conversation(self.gate, self.gsession, self.gate.new_relay())
        # The TCP peer, not a PROXY header's address: the forwarder is who we talk to.
        forwarders = self.gate.runtime.config.trusted_forwarders
        self.conv.forwarder = bool(forwarders) and in_networks(self.gsession.client_ip, forwarders)
        self.tracker.protocols.add(self)
        proxy = self.gate.runtime.config.proxy_protocol
        if proxy is not None and not proxy.trusts(self.gsession.client_ip):
            log.warning("session %s client=%s: not a trusted PROXY protocol source, closed "
                        "without a greeting", self.gsession.id, self.gsession.client_ip)
            self._closing = True
            transport.close()

    def connection_lost(self, error) -> None:
        if self._handler_coroutine is None:
            # Called again (aiosmtpd calls it itself after a failed TLS handshake, then the
            # transport does) after _drop_cycles: all was done the first time.
            return
        super().connection_lost(error)
        # aiosmtpd only cancels the timer, and a command still ending (smtp_DATA's finally)
        # would arm it again, calling back this protocol: closed, a later reset does nothing.
        self._timeout_handle.close()
        if self in self.tracker.protocols:
            self.tracker.protocols.discard(self)
            if self._client_key is not None:
                self.tracker.close(self._client_key)
                self._client_key = None
                metrics.connection_closed()
            if self.conv is not None:
                task = self.loop.create_task(self.conv.close())  # no loop lookup (a getpid)
                _background.add(task)
                task.add_done_callback(_background.discard)
        self._handler_coroutine.add_done_callback(self._drop_cycles)

    def _drop_cycles(self, handler: asyncio.Task) -> None:
        """The connection is lost and its command loop has ended: nothing runs for it any
        more. Drop the references that lead back to this protocol (bound methods, the
        writer, the ended task and the exception it ended with, whose frames hold it), so
        that reference counting frees the connection at once instead of the cyclic
        collector, whose passes cost the gate CPU per message (issue 13)."""
        error = None if handler.cancelled() else handler.exception()
        if error is not None:
            # aiosmtpd ends its loop by raising a reset connection: no error of ours. Anything
            # else is said here (asyncio would have, once the task was collected).
            if not isinstance(error, ConnectionError):
                log.error("session %s: the command loop failed",
                          self.gsession.id if self.gsession else "-", exc_info=error)
            error.__traceback__ = None
        self._handler_coroutine = None  # (the idle timer, which calls back, closed already)
        self._smtp_methods = None  # its bound methods, and _Commands._protocol
        self._client_connected_cb = None  # asyncio's StreamReaderProtocol keeps it
        self._writer = None  # StreamWriter._protocol is this protocol

    async def _greet(self) -> bool:
        """Runs where aiosmtpd would send 220 (after PROXY): limits, then CONNECT rules."""
        metrics.connection_opened()
        if not await self._count_client(first=True):
            return False
        refusal = await self.conv.connect()
        if refusal is not None:  # 421 (a connection limit): say it and close at once
            metrics.connection_refused()
            await self.hang_up(refusal)
            return False
        return True

    async def _count_client(self, first: bool) -> bool:
        """Count the session under its client (again after XCLIENT/XFORWARD named the real
        one); past a limit: 421 and closed. A trusted forwarder carries many clients' sessions,
        so it is held to the total only, never to the per-client limit."""
        limits = self.gate.runtime.config.limits
        key = client_key(self.gsession.client_ip, limits.ipv6_client_prefix)
        if key == self._client_key:
            return True
        if self._client_key is not None:
            self.tracker.close(self._client_key)
        self.tracker.open(key)
        self._client_key = key
        over = (first and self.tracker.total > limits.max_connections) or (
            self.tracker.per_client(key) > limits.max_connections_per_client
            and not (first and self.conv.forwarder))
        if over:
            metrics.connection_refused()
            await self.hang_up(Reply(421, f"{self.hostname} Too many connections, try again later",
                                     "4.7.0"))
            return False
        return True

    @property
    def busy(self) -> bool:
        """In a transaction, reading DATA, or observing one that ended: shutdown waits for it."""
        return self._in_data or (self.conv is not None and (self.conv.tx is not None
                                                            or self.conv.after_pending))

    async def hang_up(self, reply: Reply, linger: bool = True) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                await self._write(reply)
            except (ConnectionError, RuntimeError):
                pass
            self._close(linger)

    def _close(self, linger: bool = True) -> None:
        """Close the connection after the last reply. Closed at once with the client's
        pipelined commands unread, or with more arriving after it, the kernel resets the
        connection and drops the replies still in its send queue (those a slow reader had
        not taken yet: the goodbye itself, even a message's 250, which the client then
        sends again). So (``linger``) the output ends after those replies (a FIN), and
        what the client still sends is read and dropped until it closes, or LINGER seconds
        at most (the idle timer, no longer reset by commands). Without a half-close (TLS):
        closed at once, as before."""
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not linger or self._output_ended or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._output_ended = True
        self._timeout_handle.reset(LINGER)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's last resort: never echo exception text to the client."""
        if isinstance(error, (asyncio.IncompleteReadError, ConnectionError)):
            if self.transport is not None:
                self.transport.close()
            return "421 4.4.2 Connection lost"
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection after it
            cause = error.__cause__
            log.info("session %s client=%s: TLS handshake failed: %s",
                     self.gsession.id if self.gsession else "-",
                     self.gsession.client_ip if self.gsession else "-",
                     getattr(cause, "reason", None) or cause or "connection closed")
            return "421 4.7.0 TLS handshake failed"
        log.error("unexpected error in session %s", self.gsession.id if self.gsession else "-",
                  exc_info=error)
        return "451 4.3.0 Local error in processing, try again later"

    async def _out_of_sequence(self, command: str) -> bool:
        """MAIL, RCPT and DATA start here: True when the command is answered already. After
        the gate closed the connection (a 421, the too-many-errors goodbye), aiosmtpd still
        runs the commands a pipelining client had sent; none of them may open or relay a
        transaction the client was told is refused. Otherwise the conversation's table may
        refuse the command before its arguments are read."""
        if self._closing or self.transport is None or self.transport.is_closing():
            return True  # as if answered: the command does nothing
        refusal = self.conv.refusal(command, early=True)
        if refusal is not None:
            await self._write(refusal)
            return True
        return False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's: after every command line, and around DATA (the data timeout); not
        once the output ended (_close: the connection lingers LINGER seconds at most)."""
        if not self._output_ended:
            self._timeout_handle.reset(duration or self._timeout_duration)

    # --- writing -----------------------------------------------------------------------
    async def push(self, status) -> None:
        """aiosmtpd's own replies pass here: give them enhanced codes."""
        if self._greeting_pending:
            self._greeting_pending = False
            if not await self._greet():
                return
            await self._write_lines([f"220 {self.hostname} ESMTP {VERSION_IDENT}"])
            return
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        await self._write_lines(_own_reply_lines(status))

    def _write(self, reply: Reply) -> Awaitable[None]:
        return self._write_lines(reply.lines())  # awaited by the caller: one coroutine less

    async def _write_lines(self, lines: list[str] | tuple[str, ...]) -> None:
        if self._output_ended or self.transport is None or self.transport.is_closing():
            # Closed (a goodbye, a timeout, the client gone) while a command was still being
            # answered: nobody is listening, and uvloop raises on a write to a closed handle.
            return
        text = "\r\n".join(lines) + "\r\n" if lines else ""
        self._writer.write(text.encode("utf-8", "replace"))
        if self.conv is not None:  # the reply is out: what observes an ended transaction runs
            self.conv.after_reply()
        await self._writer.drain()
        if lines and not self._closing and self._errors_reach_cap(lines[0]):
            await self._over_cap("max_errors")

    # --- per-session caps ----------------------------------------------------------------
    def _errors_reach_cap(self, first_line: str) -> bool:
        """Count error replies: True when this one reaches max_errors (like Postfix, that
        reply is followed by 421); an accepted message starts every count afresh."""
        if first_line[:1] in "45" and not first_line.startswith(("452-4.5.3", "452 4.5.3")):
            # 452 4.5.3 asks for another transaction: no client can avoid it, so not an error
            self._counts["max_errors"] += 1
            return self._counts["max_errors"] >= self.gate.runtime.config.limits.max_errors
        if self._command == "DATA" and first_line[:1] == "2":
            self._counts.clear()
        return False

    def _on_command(self, command: str, method):
        """Every command line's dispatch (see ``_Commands``): the method that answers it."""
        if self._closing:
            return self._ignore
        self._command = command
        if command in _GREETINGS:
            cap = "max_greetings"
        elif command == "RSET":
            cap = "max_rsets"
        elif command in _JUNK or method is None:
            cap = "max_junk_commands"
        else:
            return method
        self._counts[cap] += 1
        if self._counts[cap] > getattr(self.gate.runtime.config.limits, cap):
            return lambda arg: self._over_cap(cap)
        return method if method is not None else self._unknown

    async def _over_cap(self, cap: str) -> None:
        limit = getattr(self.gate.runtime.config.limits, cap)
        log.warning("session %s client=%s: too many %s (limits.%s: %d), closing",
                    self.gsession.id, self.gsession.client_ip, _CAPPED[cap], cap, limit)
        await self.hang_up(Reply(421, f"{self.hostname} Too many {_CAPPED[cap]}, closing connection",
                                 "4.7.0"))

    async def _ignore(self, arg) -> None:
        """A command read after the session decided to close: no reply."""

    async def _unknown(self, arg) -> None:
        name = "".join(c for c in self._command[:32] if c.isprintable())  # never echo controls
        await self._write(Reply(500, f'Error: command "{name}" not recognized', "5.5.2"))

    # --- commands ----------------------------------------------------------------------
    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str):
        if not await self._greeting_ok("EHLO", hostname):
            return
        self._set_rset_state()
        self.session.extended_smtp = True  # aiosmtpd's: its command-line length limits follow it
        starttls = bool(self.tls_context) and not self._tls_protocol
        await self._write(await self.conv.greet(hostname, True, starttls))
        self._tls_state()
        await self.conv.after_greeting()

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str):
        if not await self._greeting_ok("HELO", hostname):
            return
        self._set_rset_state()
        self.session.extended_smtp = False
        await self._write(await self.conv.greet(hostname, False))
        self._tls_state()
        await self.conv.after_greeting()

    async def _greeting_ok(self, verb: str, hostname: str) -> bool:
        """RFC 5321 §4.1.1.1: a domain or an address literal. A refused greeting changes no
        state (a later MAIL still needs a greeting) and is logged in one line."""
        if not hostname:
            await self._write(Reply(501, f"Syntax: {verb} hostname", "5.5.4"))
            return False
        why = helo_refusal(hostname)
        if why is None:
            return True
        log.info("refused greeting", extra={"fields": {
            "session": self.gsession.id, "client": self.gsession.client_ip, "command": verb,
            "reason": why, "name": ascii(hostname[:100])}})
        await self._write(Reply(501, f"Invalid {verb} argument: {why}", "5.5.2"))
        return False

    def _tls_state(self) -> None:
        self.gsession.tls = self._tls_protocol is not None
        if self.gsession.tls and self.gsession.tls_version is None:
            tls = self.transport.get_extra_info("ssl_object")
            if tls is not None:
                self.gsession.tls_version, self.gsession.tls_cipher = tls.version(), tls.cipher()[0]

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None):
        if await self._out_of_sequence("MAIL"):
            return
        path = await self._path(arg, "FROM:", "MAIL FROM:<address>")
        if path is None:
            return
        if path.params and not self.session.extended_smtp:
            await self._write(Reply(501, "Parameters need EHLO", "5.5.4"))
            return
        if getattr(self.gate, "draining", False):
            await self.hang_up(Reply(421, f"{self.hostname} Service shutting down", "4.3.2"))
            return
        reply = await self.conv.mail(path.address, path.params)
        if reply.code == 421:  # CONNECT's connection limit, run late for a silent forwarder
            await self.hang_up(reply)
            return
        await self._write(reply)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None):
        if await self._out_of_sequence("RCPT"):
            return
        path = await self._path(arg, "TO:", "RCPT TO:<address>")
        if path is None:
            return
        if path.address is None:
            await self._write(Reply(501, "Null recipient not allowed", "5.1.3"))
            return
        await self._write(await self.conv.rcpt(path.address, path.params))

    async def _path(self, arg, keyword: str, usage: str):
        rest = self._strip_command_keyword(keyword, arg or "")
        if rest is None:
            await self._write(Reply(501, f"Syntax: {usage}", "5.5.4"))
            return None
        try:
            return parse_path(rest, smtputf8=True)
        except AddressError as e:
            await self._write(Reply(e.code, e.text, e.enhanced))
            return None

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None):
        if await self._out_of_sequence("DATA"):
            return
        if arg:
            await self._write(Reply(501, "Syntax: DATA", "5.5.4"))
            return
        refusal = self.conv.refusal("DATA")
        if refusal is not None:
            await self._write(refusal)
            return
        tx = self.conv.tx
        limits = self.gate.runtime.config.limits
        share = limits.max_inflight_data // max(self.gate.runtime.config.workers, 1)
        hold = inflight.BUDGET.reserve(_declared_size(tx.sender_params) or READ_CHUNK, share)
        if hold is None:
            log.warning("session %s: DATA refused, %d bytes in flight in this worker (share %d)",
                        self.gsession.id, inflight.BUDGET.used, share)
            await self._write(NO_STORAGE)
            return
        try:
            await self._write_lines(["354 End data with <CR><LF>.<CR><LF>"])
            self._reset_timeout(limits.data_timeout)
            self._in_data = True
            try:
                content = await self._read_data(limits, hold)
            finally:
                self._in_data = False
                self._reset_timeout()
            if isinstance(content, Reply):
                await self._write(await self.conv.refused_data(content))
                return
            await self._write(await self.conv.data(content))
            del content
            if self.conv.last_tx is tx:  # kept for offline callers only: free the message now
                self.conv.last_tx = None
        finally:
            hold.release()

    async def _read_data(self, limits, hold: inflight.Reservation) -> list[bytes] | Reply:
        """The message between 354 and CRLF.CRLF as a DataDecoder leaves it: its pieces, or
        the refusal to give after the final dot. Reads what arrives, a bounded piece at a
        time; the StreamReader's private buffer is touched only to give back what followed
        the terminator (pipelined commands) and to raise its pause threshold meanwhile."""
        reader = self._reader
        decoder = DataDecoder(limits.max_message_size, limits.max_line_length, hold.grow)
        saved_limit, reader._limit = reader._limit, READ_CHUNK
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)
                rest = decoder.feed(data)
                if rest is not None:
                    if rest:
                        reader._buffer[0:0] = rest
                    return decoder.result()
        finally:
            reader._limit = saved_limit

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None):
        if arg:
            await self._write(Reply(501, "Syntax: RSET", "5.5.4"))
            return
        self._set_rset_state()
        await self._write(await self.conv.rset())

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None):
        """221 at once; the connection is closed (``_close``: the client sees it end) once
        the session's after-work is done (the last transaction's on_end hooks and log line),
        so that a client waiting for the close finds their effects (the senders state, the
        log). Commands pipelined after QUIT are read and dropped (``_on_command``)."""
        if arg:
            await self.push("501 Syntax: QUIT")  # aiosmtpd's replies, as before
            return
        await self.push("221 Bye")
        self._closing = True
        if self.conv is not None:
            await self.conv.settled()
        self._close()

    async def smtp_BDAT(self, arg: str | None):
        # CHUNKING is never offered; swallow the chunk so its bytes are never read as commands.
        parts = (arg or "").split()
        max_size = self.gate.runtime.config.limits.max_message_size or 2**31
        if not parts or not parts[0].isdigit() or int(parts[0]) > max_size:
            await self._write(Reply(421, f"{self.hostname} BDAT without CHUNKING, closing", "4.7.0"))
            self._close()
            return
        await self._reader.readexactly(int(parts[0]))
        await self._write(Reply(502, "BDAT not supported: CHUNKING is not offered", "5.5.1"))

    async def smtp_XCLIENT(self, arg: str | None):
        forwarded = await self._forwarded("XCLIENT", arg)
        if forwarded is None:
            return
        greeting = await self.conv.xclient(forwarded)
        if greeting.code != 220:
            await self._write(greeting)
            return
        self._set_rset_state()
        self.session.extended_smtp = False
        if await self._rerun_connect():  # as at connect: limits, CONNECT rules, then 220
            await self._write(greeting)

    async def smtp_XFORWARD(self, arg: str | None):
        forwarded = await self._forwarded("XFORWARD", arg)
        if forwarded is None:
            return
        reply = await self.conv.xforward(forwarded)
        if not reply.is_positive:
            await self._write(reply)
        elif await self._rerun_connect():
            await self._write(reply)

    async def _rerun_connect(self) -> bool:
        """After XCLIENT/XFORWARD named the real client: its connection limits and CONNECT
        rules, as at connect; False once a 421 is said and the connection closed."""
        if not await self._count_client(first=False):
            return False
        refusal = await self.conv.rerun_session_rules()
        if refusal is not None:
            await self.hang_up(refusal)
            return False
        return True

    async def _forwarded(self, command: str, arg: str | None):
        """XCLIENT/XFORWARD's checked attributes, or None once the refusal is written (an
        untrusted peer, mid-transaction, a malformed argument)."""
        if await self._out_of_sequence(command):
            return None
        try:
            return forwarding.parse(command, arg)
        except forwarding.ForwardError as e:
            await self._write(e.reply)
            return None

    async def smtp_STARTTLS(self, arg: str | None):
        if not self.tls_context:  # not offered: "not implemented", not aiosmtpd's 454 (retry)
            await self._write(Reply(502, "STARTTLS is not offered", "5.5.1"))
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None):
        await self._write(Reply(502, "AUTH is not offered", "5.5.1"))

    async def smtp_HELP(self, arg: str | None):
        # not aiosmtpd's: it looks commands up in the (counting) table and lists unoffered ones
        await self._write(Reply(214, "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT", "2.0.0"))

    def _getaddr(self, arg: str):
        """aiosmtpd's address parser, which only its VRFY uses here (MAIL and RCPT take
        parse_path): the stdlib parser under it raises IndexError on an address ending in
        '@' ("VRFY user@": a traceback and 451 4.3.0); that is an address it cannot parse,
        as its HeaderParseError says: (None, None), and VRFY answers 502."""
        try:
            return super()._getaddr(arg)
        except IndexError:
            return None, None

    async def smtp_EXPN(self, arg: str | None):
        await self._write(Reply(502, "EXPN is not offered", "5.5.1"))


# What a reply line may not carry (RFC 5321 textstring: HT and printable ASCII, UTF-8 here)
_NOT_IN_REPLY = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # LF: where a multi-line one splits


@functools.lru_cache(maxsize=64)  # aiosmtpd says a few fixed texts (221 Bye at every QUIT)
def _own_reply_lines(status: str) -> tuple[str, ...]:
    """One of aiosmtpd's own replies as written: with the usual enhanced code when it has
    none, and "?" for a control character of the client's it echoes ("502 Could not VRFY
    ARG": a bare CR or NUL there would reach the client inside a reply line)."""
    status = _NOT_IN_REPLY.sub("?", status)
    m = _REPLY.match(status)
    if m and m.group(2) == " ":
        return tuple(Reply(int(m.group(1)), m.group(3)).with_enhanced().lines())
    return (status,)


def _declared_size(params: list[str]) -> int:
    """The SIZE= the client gave at MAIL (checked there), else 0."""
    for p in params:
        key, _, value = p.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


_background: set[asyncio.Task] = set()


async def settle(timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) for the closing work of ended sessions — their
    downstream sessions, the rules' ``on_disconnect`` (a shared connection slot given back) —
    so that shutdown closes the stores after it, not under it."""
    if _background:
        await asyncio.wait(set(_background), timeout=timeout)
