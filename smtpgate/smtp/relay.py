"""The downstream session (``Downstream``, the real ``Relay``): the only module that imports aiosmtplib.

One downstream session per client session, opened at the first MAIL and kept for the
session's later transactions; with ``downstream.pool`` it is taken from the worker's idle
sessions (pool.py) and given back at the end when its last exchange was a delivered message.
Replies come back as ``Reply`` values to pass through; every way the downstream can fail
(refused, reset, timeout, 421) becomes, in ``failure()``, a ``RelayError`` carrying the
``451 4.4.x`` the client gets instead — never a 250.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from ..mail.addresses import helo_refusal
from .. import metrics
from ..errors import RelayError
from ..mail.reply import Reply
from . import pipelining
from .datadecoder import normalise_line_ends
from .idletimer import ReplyDeadline
from .pool import CHECK_FAILED, CLIENT_LEFT, NO_XCLIENT, POOL_FULL, Pooled, SessionPool
from .relay_api import Capabilities, Relay, mail_then_rcpt

__all__ = ["Capabilities", "Downstream", "Relay", "failure", "farewell", "probe"]

log = logging.getLogger("smtpgate.relay")

UNREACHABLE = Reply(451, "Downstream server unavailable, try again later", "4.4.1")
LOST = Reply(451, "Downstream connection failed, try again later", "4.4.2")

# Every way aiosmtplib reports a failed exchange: refused or reset connection, timeout,
# an unreadable or unexpected reply.
FAILURES = (SMTPException, OSError, asyncio.TimeoutError)


def described(exc: BaseException) -> str:
    """An exception's text for a log line or a reply's reason; its name when it has none (a
    bare TimeoutError)."""
    return str(exc) or type(exc).__name__


def failure(problem: BaseException | Reply, opening: bool = False) -> RelayError | None:
    """The one translation of a downstream failure into what the client is told.

    While opening, any failure is ``451 4.4.1`` (unreachable); later, a failure or a ``421``
    reply (the downstream is closing) is ``451 4.4.2`` (lost) and the client keeps its
    session. Any other reply is no failure (None): it passes through unchanged."""
    if isinstance(problem, Reply):
        if problem.code != 421:
            return None
        return RelayError(f"downstream closing: {problem}", LOST)
    if opening:
        return RelayError(f"downstream unavailable: {described(problem)}", UNREACHABLE)
    return RelayError(f"downstream failed: {described(problem)}", LOST)


# Besides '+' and '=', the brackets are hex-encoded too (RFC 3461 §4 allows hex for any
# octet): an encoded value then never reads as one of the special values below.
_XTEXT_HEX = frozenset(b"+=[]")
UNAVAILABLE = "[UNAVAILABLE]"  # XCLIENT/XFORWARD special value, sent only as the gate's choice


def xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII except '+', '=' and brackets as is, the rest '+HH'.

    Whatever ``value`` holds, the result is one attribute value: no space, no '=', no '['.
    """
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        out.append(chr(byte) if 33 <= byte <= 126 and byte not in _XTEXT_HEX else f"+{byte:02X}")
    return "".join(out)


def _attribute(value: str | None) -> str:
    """An XCLIENT/XFORWARD value: encoded, or the special value when the gate has none or
    the encoded form is longer than the 255 characters Postfix takes (it would refuse the
    whole command, and so every transaction of the session)."""
    encoded = xtext(value) if value else ""
    return encoded if 0 < len(encoded) <= 255 else UNAVAILABLE


class Downstream:
    """One connection to the MTA behind the gate."""

    def __init__(self, cfg, local_hostname: str, capabilities: Capabilities | None = None,
                 pool: SessionPool | None = None):
        self.cfg = cfg
        self.local_hostname = local_hostname
        self.capabilities = capabilities or Capabilities()
        self.pool = pool
        # Sessions opened under this configuration: a pool renewed by a reload since then
        # does not take them back.
        self._generation = pool.generation if pool is not None else 0
        self._smtp: aiosmtplib.SMTP | None = None
        self._entry: Pooled | None = None
        self.in_transaction = False
        # The last exchange delivered a message: Postfix has forgiven the session's errors
        # and junk commands (smtpd resets both then), so the next client may have it.
        self._reusable = False
        # After XCLIENT, Postfix authorises a further XCLIENT by the named client's address
        # (smtpd_authorized_xclient_hosts), not the gate's: its EHLO then lists XCLIENT only
        # if that client is in the list. A session it is not listed in is never pooled.
        # None: not known yet (the client said HELO, whose answer lists no keywords).
        self._renamable: bool | None = False
        # RFC 2920: commands go ahead of replies only when the session's current greeting
        # was an EHLO whose answer offered PIPELINING. aiosmtplib keeps an earlier EHLO's
        # keywords after a HELO (a HELO client's, sent after XCLIENT), which offered none:
        # Postfix flags pipelining then (reject_unauth_pipelining; from 3.9
        # smtpd_forbid_unauth_pipelining disconnects).
        self._pipelining = False
        # Likewise CHUNKING (RFC 3030): messages go as BDAT. Both set by ``_greeted``.
        self._chunking = False
        # The NAME and ADDR the session's last XCLIENT sent (None for one not offered), what
        # Postfix authorises a further XCLIENT by (see ``Pooled.renamable_as``).
        self._named: tuple[str | None, str | None] | None = None
        # The session's replies (XCLIENT and its greeting, MAIL to the body's reply, RSET)
        # each get downstream.timeout from this one timer, not from a wait_for per command.
        self._deadline: ReplyDeadline | None = None

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def open(self, session) -> None:
        """An idle pooled session greeted again as this client (``_resume``), or a new
        connection: connect, EHLO, STARTTLS as ``downstream.tls`` says, then XCLIENT as the
        real client when configured and offered."""
        if self.connected:
            return
        self._reusable = self._renamable = self._pipelining = self._chunking = False
        self._named = None
        if self.pool is not None and self.pool.enabled:
            while (entry := self.pool.take()) is not None:
                if await self._resume(entry, session):
                    self._smtp, self._entry = entry.smtp, entry
                    metrics.downstream_session("pooled")
                    return
        await self._connect(session)
        metrics.downstream_session("new")

    async def _resume(self, entry: Pooled, session) -> bool:
        """Make a pooled session this client's: XCLIENT + EHLO as it (Postfix starts a new
        session at XCLIENT, keeping no earlier transaction; every attribute is sent, so none
        of the previous client's survives), or RSET when the gate sends no XCLIENT (the
        session then only ever carried the gate's own name). It doubles as the health check:
        False (the session closed) when it fails, and the caller tries the next one."""
        smtp = entry.smtp
        try:
            if entry.xclient:
                if "xclient" not in smtp.esmtp_extensions:  # never sent unnamed: not this one
                    raise SMTPException("XCLIENT not offered to this session any more")
                self._renamable = await self._xclient(smtp, session)
                if session.esmtp:  # a HELO answer lists no keywords: keep what we knew
                    self.capabilities.update(smtp.esmtp_extensions)
            else:  # still greeted by the gate's own EHLO
                response = await self._execute(smtp, b"RSET")
                if response.code != 250:
                    raise SMTPResponseException(response.code, response.message)
                self._greeted(smtp, ehlo=True)
            return True
        except FAILURES as exc:
            log.info("downstream %s:%s: pooled session failed its check (%s); not used",
                     self.cfg.host, self.cfg.port, described(exc))
            smtp.close()
            self.pool.discard(entry, CHECK_FAILED)
            return False
        except BaseException:  # cancelled mid-exchange: a reply may still come; never reused
            smtp.close()
            self.pool.discard(entry, CLIENT_LEFT)
            raise

    async def _connect(self, session) -> None:
        smtp = first = self._client()
        try:
            with self._failures(opening=first):
                await smtp.connect()
                _nodelay(smtp)
                await smtp.ehlo()
                if self.cfg.tls != "none":
                    smtp = await self._starttls(smtp)  # may be a new, plain connection
                self.capabilities.update(smtp.esmtp_extensions)
                self._greeted(smtp, ehlo=True)
                xclient = self.cfg.xclient and "xclient" in smtp.esmtp_extensions
                if xclient:
                    self._renamable = await self._xclient(smtp, session)
        except BaseException:  # a failure, or the client gone (cancelled): no half-open session
            smtp.close()
            raise
        self._smtp = smtp
        if self.pool is not None and self.pool.enabled:  # opened with the pool off: never its
            self._entry = Pooled(smtp, self._generation, xclient)

    def _client(self) -> "aiosmtplib.SMTP":
        return aiosmtplib.SMTP(hostname=self.cfg.host, port=self.cfg.port, timeout=self.cfg.timeout,
                               local_hostname=self.local_hostname, start_tls=False)

    async def _starttls(self, smtp: "aiosmtplib.SMTP") -> "aiosmtplib.SMTP":
        """``required``: TLS with a certificate verified against ``tls_ca`` (or the system's
        store) for the name ``downstream.host``, or a failure (451 4.4.1 to the client) before
        any MAIL is sent. ``starttls`` (Postfix's "may"): TLS, unverified, when offered; plain
        text when not offered or when the handshake fails (on a new connection)."""
        required = self.cfg.tls == "required"
        if "starttls" not in smtp.esmtp_extensions:
            if required:
                raise SMTPException("no STARTTLS offered, and downstream.tls is required")
            return smtp
        try:
            await smtp.starttls(tls_context=_client_tls_context(self.cfg.tls, self.cfg.tls_ca))
            await smtp.ehlo()
            return smtp
        except FAILURES as exc:
            if required:
                raise
            log.warning("downstream %s:%s: STARTTLS failed: %s; relaying in plain text "
                        "(downstream.tls: starttls)", self.cfg.host, self.cfg.port,
                        described(exc))
        smtp.close()
        plain = self._client()
        try:
            await plain.connect()
            _nodelay(plain)
            await plain.ehlo()
        except FAILURES:
            plain.close()
            raise
        return plain

    async def _xclient(self, smtp, session) -> bool | None:
        """XCLIENT as the client, then its greeting again; whether the downstream's answer to
        that greeting still offers XCLIENT (unknown after a HELO: None)."""
        offered = set(smtp.esmtp_extensions.get("xclient", "").upper().split())
        if not offered:  # no new greeting; a resumed session's flags stay off: DATA, one at a time
            return False
        ip = session.client_ip
        # Every value is encoded, whoever supplied it (the client's HELO, a quarantined
        # message's stored session): nothing in it can become another attribute.
        attrs = {
            "PORT": _attribute(str(session.client_port)),
            # XCLIENT_README: SMTP or ESMTP only; Postfix refuses ESMTPS/ESMTPSA with 501
            "PROTO": "SMTP" if (session.proto or "").upper() == "SMTP" else "ESMTP",
            "HELO": _attribute(session.helo),
            # Postfix applies NAME and ADDR last; sending them last keeps that order explicit.
            "NAME": _attribute(session.client_name),
            "ADDR": _attribute(f"IPV6:{ip}" if ":" in ip else ip),
        }
        args = [f"{k}={v}".encode("ascii") for k, v in attrs.items() if k in offered]
        # one not offered (smtp-sink offers no ADDR) is never sent: it stays the connection's
        self._named = (attrs["NAME"] if "NAME" in offered else None,
                       attrs["ADDR"] if "ADDR" in offered else None)
        response = await self._execute(smtp, b"XCLIENT", *args)
        # Postfix answers 220 (a new greeting); smtp-sink and others answer 250.
        if not 200 <= response.code < 300:
            raise SMTPResponseException(response.code, response.message)
        # Postfix takes the HELO name and the protocol from the greeting that follows XCLIENT:
        # greet as the client did (HELO or EHLO, its name unless that is no valid one, as a
        # session stored in the quarantine before names were checked may hold).
        helo = session.helo or ""
        ok = bool(helo) and helo_refusal(helo) is None
        if session.esmtp:
            await self._within_deadline(smtp, smtp.ehlo(hostname=helo if ok else None, timeout=None))
            self._greeted(smtp, ehlo=True)
            return "xclient" in smtp.esmtp_extensions
        self._greeted(smtp, ehlo=False)
        await self._within_deadline(smtp, smtp.helo(hostname=helo if ok else None, timeout=None))
        return None

    def _greeted(self, smtp, ehlo: bool) -> None:
        """What the session's current greeting offers: an EHLO's keywords; after a HELO
        nothing (aiosmtplib keeps the earlier EHLO's keywords then)."""
        offered = smtp.esmtp_extensions if ehlo else {}
        self._pipelining = "pipelining" in offered
        self._chunking = "chunking" in offered

    async def mail(self, wire_sender: str, params: list[str], ident: str | None = None,
                   utf8: bool = False) -> Reply:
        smtp = self._require()
        self._reusable = False
        xforward = self._xforward(smtp, ident)
        if xforward:
            await self._command(*xforward)
        reply = await self._command(*_mail_command(wire_sender, params, utf8))
        self.in_transaction = reply.is_positive
        return reply

    @staticmethod
    def _xforward(smtp, ident: str | None) -> tuple[bytes, ...] | None:
        """The XFORWARD IDENT before MAIL, when there is one and it is offered; its reply
        counts only when it is a 421."""
        if ident and "IDENT" in smtp.esmtp_extensions.get("xforward", "").upper().split():
            return b"XFORWARD", f"IDENT={xtext(ident)}".encode()
        return None

    async def rcpt(self, wire_recipient: str, params: list[str], utf8: bool = False) -> Reply:
        return await self._command(*_rcpt_command(wire_recipient, params, utf8))

    async def mail_rcpt(self, wire_sender: str, sender_params: list[str], wire_recipient: str,
                        rcpt_params: list[str], ident: str | None = None,
                        utf8: bool = False) -> tuple[Reply, Reply | None]:
        """MAIL then the first RCPT, in one round trip when the downstream offers PIPELINING
        (RFC 2920; the XFORWARD IDENT before them too): every reply is then taken as if the
        commands had gone one at a time. A refused MAIL's RCPT reply (503, need MAIL) is
        read and dropped: None is returned for it, as ``mail`` then ``rcpt`` would."""
        smtp = self._require()
        if not self._pipelining:
            return await mail_then_rcpt(self, wire_sender, sender_params, wire_recipient,
                                        rcpt_params, ident, utf8)
        self._reusable = False
        group = [_mail_command(wire_sender, sender_params, utf8),
                 _rcpt_command(wire_recipient, rcpt_params, utf8)]
        xforward = self._xforward(smtp, ident)
        if xforward:
            group.insert(0, xforward)
        replies, problem = await self._pipelined(smtp, group)
        if xforward:  # its reply matters only when it is the downstream closing (421)
            self._check(self._reply(replies, 0, problem))
            del replies[0]
        mail = self._check(self._reply(replies, 0, problem))
        self.in_transaction = mail.is_positive
        if not mail.is_positive:
            if len(replies) < 2 or failure(replies[1]) is not None:
                self._drop()  # the session cannot go on; the client gets the MAIL refusal
            # The RCPT's 503 (need MAIL) is a second error toward Postfix's limits on this
            # long-lived session (smtpd_soft/hard_error_limit: delays, then 421): one at a time
            # for the rest of it. (Pooled, it is greeted again only after a delivery, which
            # resets Postfix's count.)
            self._pipelining = False
            return mail, None
        return mail, self._check(self._reply(replies, 1, problem))

    async def _pipelined(self, smtp, group: list[tuple[bytes, ...]]):
        """Write the commands at once; their replies (``Reply``) in order, and what ended the
        exchange before all came. Uses aiosmtplib's protocol below its public API (its
        write, the injection check of its own ``execute_command``), as ``_write_then_read``
        does."""
        protocol = smtp.protocol
        with self._failures():
            for command in group:
                if any(COMMAND_INJECTION_REGEX.search(arg) for arg in command):
                    raise ValueError("Command arg contains a prohibited control character")
            protocol.write(b"".join(b" ".join(command) + b"\r\n" for command in group))
            replies, problem = await pipelining.replies(protocol, protocol.transport, len(group),
                                                        self._reply_deadline(), self.cfg.timeout)
        return [Reply.from_downstream(code, text) for code, text in replies], problem

    def _reply(self, replies: list[Reply], index: int, problem: BaseException | None) -> Reply:
        """The reply at ``index``; if it never came, the failure that ended the exchange,
        raised as the ``RelayError`` a command sent alone would have raised (connection
        dropped)."""
        if index < len(replies):
            return replies[index]
        if not isinstance(problem, FAILURES):
            problem = SMTPException(str(problem))
        with self._failures():
            raise problem

    async def data(self, raw) -> Reply:
        """Relay one message: ``raw`` is its bytes, or its pieces in order (bytes-like).

        The message is written in chunks as the socket takes them (no whole-message copy,
        unlike aiosmtplib's ``data()``), bare CR/LF made CRLF on the way: as one
        ``BDAT <size> LAST`` when the session offers CHUNKING (one exchange, no stuffing),
        else as DATA, dot-stuffed, so the downstream can never see an end of data the gate
        did not send. The downstream stores the same bytes either way."""
        smtp = self._require()
        pieces = [raw] if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        if not any(len(p) for p in pieces):
            return await self._empty_data()
        began = time.monotonic()
        with self._failures():
            if self._chunking:
                response = await self._send_bdat(smtp, pieces)
                sent = True
            else:
                response = await self._execute(smtp, b"DATA")
                sent = response.code == 354
                if sent:
                    response = await self._send_body(smtp, pieces)
        metrics.downstream_data(time.monotonic() - began)
        if not sent or response.code != 250:
            reply = self._check(Reply.from_downstream(response.code, response.message))
            # A refused DATA or BDAT leaves the downstream's MAIL/RCPT open (Postfix would
            # answer the next MAIL "503 nested MAIL command"; RFC 3030 asks for RSET after a
            # failed BDAT): end it before the next one.
            await self.reset()
        else:
            reply = Reply.from_downstream(response.code, response.message)
            self._reusable = True
        self.in_transaction = False
        return reply

    async def _send_body(self, smtp, pieces):
        """After 354: the pieces, dot-stuffed, then the final dot; the downstream's reply."""
        return await self._write_then_read(smtp, dot_stuffed(pieces), None)

    async def _send_bdat(self, smtp, pieces):
        """``BDAT <size> LAST`` and the pieces, CRLF-only, in the same writes; the reply.

        The size is counted before anything is written (``crlf_size``); should the bytes
        then differ from it, the connection is dropped before one byte more or less could
        be read as a command downstream."""
        size = crlf_size(pieces)
        head = b"BDAT %d LAST\r\n" % size
        return await self._write_then_read(smtp, crlf_chunks(pieces, head), len(head) + size)

    async def _write_then_read(self, smtp, chunks, total: int | None):
        """Write ``chunks`` as the socket takes them (``total`` bytes exactly, when given),
        then read the downstream's reply.

        Uses aiosmtplib's protocol below its public API (write, the flow-control wait and the
        reply reader), as its own ``execute_data_command`` does, one chunk at a time."""
        protocol, timeout = smtp.protocol, self.cfg.timeout
        protocol._response_pending = True  # keep a reply sent early instead of dropping it
        written = 0
        for chunk in chunks:
            written += len(chunk)
            if total is not None and written > total:
                raise SMTPException(f"BDAT: {written} bytes, more than the {total} announced")
            protocol.write(chunk)
            if protocol._paused:  # the transport's buffer is full: wait until the socket drains
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel
                    await protocol._drain_helper()
        if total is not None and written != total:
            raise SMTPException(f"BDAT: {written} bytes, not the {total} announced")
        return await self._within_deadline(smtp, protocol.read_response(timeout=None))

    async def _empty_data(self) -> Reply:
        # aiosmtplib's data() turns b"" into one empty line; an empty message stays empty.
        reply = await self._command(b"DATA")
        if reply.code == 354:
            reply = await self._command(b".")
        else:
            await self.reset()
        self.in_transaction = False
        return reply

    async def reset(self) -> None:
        """End a transaction the client or a rule abandoned, without the final dot ever sent."""
        if not self.connected or not self.in_transaction:
            self.in_transaction = False
            return
        self.in_transaction = False
        try:
            await self._command(b"RSET")
        except RelayError:
            pass  # already closed; the next transaction reconnects

    async def close(self) -> None:
        """Back to the pool when its last exchange delivered a message (see ``_reusable``),
        the pool would keep it and the next client can be named on it; otherwise QUIT (by
        the pool, which counts why, when the session was its to keep)."""
        smtp, self._smtp = self._smtp, None
        entry, self._entry = self._entry, None
        reusable, self._reusable = self._reusable, False
        self._stop_deadline()
        if smtp is None:
            return
        if entry is None or not reusable or self.in_transaction:
            await farewell(smtp)  # never the pool's to keep: not counted
            return
        # The pool's refusal first (shutdown, reload, used up): the checks below would
        # only cost an EHLO and count the session under their reason instead.
        try:
            refused = self.pool.refusal(entry) or await self._unnamable(smtp, entry)
        except BaseException:  # cancelled during the gate's EHLO (the client left): a reply may still come
            smtp.close()
            self.pool.discard(entry, CLIENT_LEFT)
            raise
        if refused:
            self.pool.discard(entry, refused)
            return
        self.pool.give(entry)  # it closes what it does not keep (a reload during the EHLO)
        log.debug("downstream %s:%s: session given back to the pool (%d idle)",
                  self.cfg.host, self.cfg.port, len(self.pool))

    async def _unnamable(self, smtp, entry: Pooled) -> str | None:
        """Why the next client could not be named on this session with XCLIENT (a pool
        reason), or None (also when no XCLIENT is sent: the next client's RSET checks it)."""
        if not entry.xclient:
            return None
        if self._renamable is None:  # a HELO client's: its answer listed no keywords
            return await self._unnamable_after_helo(smtp, entry)
        return None if self._renamable else NO_XCLIENT

    async def _unnamable_after_helo(self, smtp, entry: Pooled) -> str | None:
        """Why a HELO client's session may not take the next client's XCLIENT, or None: not
        asked when the pool is full (it would only be kept by retiring another idle session);
        known without asking when the session's own EHLO already showed it under the same
        NAME and ADDR (``Pooled.renamable_as``); else asked (``_may_rename``)."""
        if len(self.pool) >= self.pool.size:
            return POOL_FULL
        if self._named is not None and entry.renamable_as == self._named:
            return None
        refused = await self._may_rename(smtp)
        entry.renamable_as = None if refused else self._named
        return refused

    async def _may_rename(self, smtp) -> str | None:
        """After a HELO client (its answer lists no keywords): the gate's own EHLO asks
        whether the session still offers XCLIENT. Exactly what the client's EHLO would have
        told (Postfix decides by the address XCLIENT named, not by the greeting), and harmless
        here: the client's message is delivered and the next client's XCLIENT + greeting
        replaces every attribute. Why not (a failure: closed already), or None."""
        log.debug("downstream %s:%s: EHLO of the gate's own: is XCLIENT still offered after a HELO client?",
                  self.cfg.host, self.cfg.port)
        try:
            await smtp.ehlo(timeout=min(self.cfg.timeout, _FAREWELL_TIMEOUT))
        except FAILURES:
            smtp.close()
            return CHECK_FAILED
        return None if "xclient" in smtp.esmtp_extensions else NO_XCLIENT

    def _require(self):
        if not self.connected:
            raise RelayError("downstream connection lost", LOST)
        return self._smtp

    async def _command(self, *args: bytes) -> Reply:
        smtp = self._require()
        with self._failures():
            response = await self._execute(smtp, *args)
        return self._check(Reply.from_downstream(response.code, response.message))

    def _execute(self, smtp, *args: bytes):
        """One command and its reply, under the session's deadline (``_within_deadline``)."""
        return self._within_deadline(smtp, smtp.execute_command(*args, timeout=None))

    async def _within_deadline(self, smtp, exchange):
        """Await ``exchange``, aiosmtplib reply reads given no timeout of their own (a
        wait_for per command), under the session's deadline instead: the same failure when
        it passes (aiosmtplib's read timeout, the connection closed), as
        test_aiosmtplib_internals checks. The deadline fails the protocol's reply waiter as
        it is when it passes, not as it is now: were a later aiosmtplib to read twice, or
        to replace the waiter before reading, that read is bounded too."""
        protocol = smtp.protocol
        if protocol is None:  # not connected: aiosmtplib raises what it always does
            return await exchange
        deadline = self._reply_deadline()
        deadline.watch(lambda: protocol._response_waiter, self.cfg.timeout)
        try:
            return await exchange
        finally:
            deadline.done()

    def _stop_deadline(self) -> None:
        """No timer left armed for a session closed or given back (the next open starts it)."""
        if self._deadline is not None:
            self._deadline.cancel()

    def _reply_deadline(self) -> ReplyDeadline:
        deadline = self._deadline
        if deadline is None:
            deadline = self._deadline = ReplyDeadline(asyncio.get_running_loop())
        return deadline

    def _check(self, reply: Reply) -> Reply:
        error = failure(reply)
        if error is not None:
            self._drop()
            raise error
        return reply

    @contextlib.contextmanager
    def _failures(self, opening: "aiosmtplib.SMTP | None" = None):
        """Around every exchange: aiosmtplib's failures close the connection (``opening``: the
        one being opened) and become the ``RelayError`` that ``failure()`` says."""
        try:
            yield
        except FAILURES as exc:
            if opening is not None:
                opening.close()
                log.warning("downstream %s:%s unavailable: %s", self.cfg.host, self.cfg.port,
                            described(exc))
            else:
                log.warning("downstream connection failed: %s", described(exc))
                self._drop()
            raise failure(exc, opening=opening is not None) from None

    def _drop(self) -> None:
        self._stop_deadline()
        if self._smtp is not None:
            self._smtp.close()
        self._smtp = self._entry = None
        self.in_transaction = self._reusable = self._renamable = False
        self._pipelining = self._chunking = False


_FAREWELL_TIMEOUT = 5.0  # seconds for an exchange after the client's last message


async def farewell(smtp) -> None:
    """QUIT a downstream session we are done with; never raises."""
    if smtp.is_connected:
        try:
            await asyncio.wait_for(smtp.quit(), timeout=_FAREWELL_TIMEOUT)
        except FAILURES:  # saying goodbye: nobody to tell
            smtp.close()


_TLS_CONTEXTS: dict[tuple, ssl.SSLContext] = {}


def _client_tls_context(mode: str, ca: str | None) -> ssl.SSLContext | None:
    """The client context for ``downstream.tls``, built once per mode and CA file version
    (loading a trust store costs milliseconds; a session must not pay it)."""
    if mode == "none":
        return None
    try:
        stamp = os.stat(ca).st_mtime_ns if ca else None
    except OSError:
        stamp = None  # gone since the configuration was read: the load below says so
    key = (mode, ca, stamp)
    ctx = _TLS_CONTEXTS.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if mode != "required":
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        _TLS_CONTEXTS.clear()  # only the current configuration's context is kept
        _TLS_CONTEXTS[key] = ctx
    return ctx


async def probe(cfg, local_hostname: str, capabilities: Capabilities) -> bool:
    """Learn the downstream's EHLO keywords before the first client asks for ours."""
    smtp = aiosmtplib.SMTP(hostname=cfg.host, port=cfg.port, timeout=min(cfg.timeout, 5.0),
                           local_hostname=local_hostname, start_tls=False)
    try:
        await smtp.connect()
        await smtp.ehlo()
        capabilities.update(smtp.esmtp_extensions)
        await smtp.quit()
        return True
    except FAILURES as exc:  # not a client's transaction: no reply to give, only a log line
        smtp.close()
        log.warning("downstream %s:%s not answering yet (%s); EHLO offers the safe minimum",
                    cfg.host, cfg.port, described(exc))
        return False


WRITE_CHUNK = 256 * 1024
# A piece under this size (and under WRITE_CHUNK) is not made CRLF-only and stuffed on its
# own but with what follows it: a rule's header edit leaves the message as two pieces (the
# new header block, the body as received), and the line-end work has a fixed cost per pass.
SMALL_PIECE = 16 * 1024


def dot_stuffed(pieces):
    """DATA as sent: ``crlf_chunks`` with a dot doubled at every line start, then the final dot."""
    return _line_chunks(pieces, b"", stuff=True)


def crlf_chunks(pieces, head: bytes):
    """A BDAT chunk as sent: ``head`` (the command), then the message as DATA delivers it
    (CRLF-only, a final CRLF ensured), unstuffed: ``crlf_size(pieces)`` bytes after ``head``."""
    return _line_chunks(pieces, head, stuff=False)


def crlf_size(pieces) -> int:
    """How many bytes ``crlf_chunks`` yields after its head, counted without building them:
    each bare CR or bare LF gains a byte (no CRLF is split between two segments: see
    ``_segments``); a message that does not end with CR or LF gets a CRLF."""
    size, last = 0, b"\n"
    for segment in _segments(pieces):
        crlf = segment.count(b"\r\n")
        size += len(segment) + segment.count(b"\r") + segment.count(b"\n") - 2 * crlf
        last = segment[-1:]
    return size if last in (b"\r", b"\n") else size + 2


def _segments(pieces):
    """The pieces' bytes in order as ``bytes`` segments of at most about WRITE_CHUNK, each
    for one pass of line-end work: a small piece goes with what follows it, and no segment
    ends with a CR whose LF opens the next one (such a CR goes with what follows; a segment
    may end with a CR that is bare either way). A large memoryview (the body after a header edit) is copied a window at a
    time, never whole; a bytes piece alone in its segment is not copied at all."""
    small = min(SMALL_PIECE, WRITE_CHUNK)
    held, carried = [], 0  # bytes-like parts for the next segment, and their size
    for piece in pieces:
        size = len(piece)
        if carried + size < small:
            if size:
                held.append(piece)
                carried += size
            continue
        view, offset = memoryview(piece), 0
        while offset < size:
            stop = min(offset + max(WRITE_CHUNK - carried, 1), size)
            window, offset = view[offset:stop], stop
            cr = window[-1] == 13  # a CR: its LF may open what follows, so it goes with that
            if cr:
                if len(window) == 1:
                    held.append(b"\r")
                    carried += 1
                    continue
                window = window[:-1]
            if held:
                held.append(window)
                segment = b"".join(held)
            elif len(window) == size and type(piece) is bytes:
                segment = piece
            else:
                segment = window.tobytes()
            held, carried = ([b"\r"], 1) if cr else ([], 0)
            yield segment
    if held:
        yield b"".join(held)


def _line_chunks(pieces, head: bytes, stuff: bool):
    """The message as sent, in chunks of at most about WRITE_CHUNK: ``head`` first, the pieces
    made CRLF-only (``stuff``: a dot doubled at every line start), a CRLF added if the message
    lacks a final one (``stuff``: then the final dot) — in the same chunk as the message's
    end, so that a message of one chunk is one write (one segment on the wire, one wake-up of
    the downstream). Small pieces go out with what follows them (``_segments``)."""
    line_start = True
    # chunks not yet written, together at most about WRITE_CHUNK
    held, size = ([head] if head else []), len(head)
    for chunk in _segments(pieces):
        chunk = normalise_line_ends(chunk)
        if stuff:
            chunk = _stuff(chunk, line_start)
        line_start = chunk.endswith(b"\n")
        if held and size + len(chunk) > WRITE_CHUNK:
            yield b"".join(held)
            held, size = [], 0
        held.append(chunk)
        size += len(chunk)
    # a last line without its CRLF: one is added (a bare CR at the very end became one)
    end = b"" if line_start else b"\r\n"
    held.append(end + b".\r\n" if stuff else end)
    yield b"".join(held)


def _stuff(chunk: bytes, line_start: bool) -> bytes:
    """A CRLF-only chunk of DATA with a dot doubled at every line start (``line_start``: the
    chunk begins one)."""
    chunk = chunk.replace(b"\r\n.", b"\r\n..")
    if line_start and chunk.startswith(b"."):
        chunk = b"." + chunk
    return chunk


def _mail_command(wire_sender: str, params: list[str], utf8: bool) -> tuple[bytes, ...]:
    return (b"MAIL", b"FROM:" + _enc(wire_sender, utf8), *[p.encode() for p in params])


def _rcpt_command(wire_recipient: str, params: list[str], utf8: bool) -> tuple[bytes, ...]:
    return (b"RCPT", b"TO:" + _enc(wire_recipient, utf8), *[p.encode() for p in params])


def _enc(text: str, utf8: bool) -> bytes:
    return text.encode("utf-8" if utf8 else "ascii", "surrogateescape")


def _nodelay(smtp) -> None:
    # asyncio already sets TCP_NODELAY on TCP transports; make it explicit, it is load-bearing.
    transport = getattr(smtp, "transport", None)
    sock = transport.get_extra_info("socket") if transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
