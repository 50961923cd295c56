"""One client session's SMTP logic, without sockets: the front and ``smtpgate try`` both drive it.

Which command is allowed when is decided here only, by one table (``TABLE``: state x command
-> the step to run or the refusal; ``describe()`` prints it, docs/behaviour.md shows it). The
front reads commands, checks their arguments' syntax, and writes the replies this returns.

Flow: CONNECT and HELO run the session policy (``default``). MAIL runs the session policy's
``on_mail`` and opens the downstream (so an unreachable downstream is a 451 at MAIL). The first
accepted RCPT picks the transaction's policy from the recipient's domain, runs that policy's
own ``on_mail`` hooks (those it does not share with the session policy), then sends MAIL
downstream — with the sender as the rules left it — and mirrors each RCPT. DATA runs
``on_data``, then ``on_seal`` on the final message, and relays; the client's final reply is
the downstream's. What only observes an ended transaction (``on_delivered``, ``on_end``, the
log line) runs once the driver has written that reply (``after_reply``); the session's next
step waits for it.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from functools import partial

from ..mail.addresses import Address, AddressError, normalise_domain, parse_path, relay_refusal
from ..mail.session import Recipient, Session, TraceEntry, TraceLog, Transaction, new_id
from .. import metrics
from ..errors import LeakedConnectionError, RelayError, StoreError
from ..mail.message import Message
from ..pipeline.authheader import add_authentication_results
from ..pipeline.results import ResultsLog
from ..pipeline.runner import publish_outcome, run_delivered, run_disconnect, run_end, run_stage
from ..mail.reply import Reply
from ..pipeline.verdict import ACCEPT, DISCARD, QUARANTINE, Verdict
from .forwarding import XCLIENT_ATTRIBUTES, XFORWARD_ATTRIBUTES
from .relay_api import Relay

log = logging.getLogger("smtpgate.transaction")

OK_MAIL = Reply(250, "Ok", "2.1.0")
OK_RCPT = Reply(250, "Ok", "2.1.5")
OK_DATA = Reply(250, "Ok", "2.0.0")
OK_RSET = Reply(250, "Ok", "2.0.0")
RELAY_DENIED = Reply(554, "Relay access denied", "5.7.1")
POLICY_SPLIT = Reply(452, "Recipient governed by another policy, send it in a separate transaction",
                     "4.5.3")
TOO_MANY_RCPTS = Reply(452, "Too many recipients", "4.5.3")
TOO_BIG = Reply(552, "Message size exceeds fixed maximum message size", "5.3.4")
NEED_HELO = Reply(503, "Error: send HELO first", "5.5.1")
NEED_MAIL = Reply(503, "Error: need MAIL command", "5.5.1")
NESTED_MAIL = Reply(503, "Error: nested MAIL command", "5.5.1")
NEED_RCPT = Reply(503, "Error: need RCPT command", "5.5.1")
BROKEN = Reply(451, "Transaction aborted after a downstream failure, try again later", "4.4.2")
NEED_SMTPUTF8_SENDER = Reply(553, "Non-ASCII sender address requires SMTPUTF8", "5.6.7")
NEED_SMTPUTF8_RCPT = Reply(553, "Non-ASCII recipient address requires SMTPUTF8", "5.6.7")
CANNOT_HOLD = Reply(451, "Local error in processing (quarantine unavailable), try again later", "4.3.0")
RCPT_PARAMS = Reply(555, "RCPT TO parameters not supported", "5.5.4")
IN_TRANSACTION = Reply(503, "Error: MAIL transaction in progress", "5.5.1")
FORWARDED = Reply(250, "Ok", "2.0.0")


def not_forwarder(command: str) -> Reply:
    """XCLIENT/XFORWARD from a peer outside ``trusted_forwarders``: refused, whatever the state."""
    return Reply(550, f"{command} is not accepted from clients", "5.7.0")


# --- the state table (RFC 5321 §4.1.4, §3.3) ------------------------------------------------
class State(enum.Enum):
    GREET = "no HELO/EHLO yet (or none since STARTTLS)"
    READY = "greeted, no transaction"
    MAIL = "MAIL accepted, no recipient yet"
    RCPT = "MAIL and at least one RCPT accepted"
    MAIL_LOST = "MAIL accepted, the downstream lost before any recipient"
    RCPT_LOST = "recipients accepted, then the downstream lost"


class Step(enum.Enum):
    """The command is in sequence: the conversation runs ``_<step>`` (e.g. ``_data_lost``)."""

    GREET = "250 (EHLO: the keywords); ends any transaction; on_helo"
    MAIL = "parameters, on_mail, the downstream opened: 250 or the refusal"
    RCPT = "relay check, policy, on_rcpt, RCPT downstream: its reply"
    DATA = "354, the message, on_data, on_seal, relayed: the downstream's reply"
    DATA_LOST = "354, the message dropped: 451 4.4.2; ends the transaction"
    RSET = "250; ends any transaction"
    XCLIENT = "220 again: a new session as the real client (limits, on_connect); HELO/EHLO next"
    XFORWARD = "250; the real client's attributes; on_connect and on_helo run again"


@dataclass(frozen=True)
class Refuse:
    """The command is out of sequence: this reply, and nothing changes. ``early``: given
    before the command's arguments are read; otherwise once their syntax is checked."""

    reply: Reply
    early: bool = False


COMMANDS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "XCLIENT", "XFORWARD")
FORWARDING = ("XCLIENT", "XFORWARD")  # from trusted_forwarders only (not_forwarder otherwise)
# The two early refusals come before any argument is looked at; the other refusals follow
# the syntax check (a malformed nested MAIL gets its 501), as the gate has always answered.
_HELO_FIRST, _NEED_MAIL = Refuse(NEED_HELO, early=True), Refuse(NEED_MAIL, early=True)
_IN_TX = Refuse(IN_TRANSACTION, early=True)  # XCLIENT_README/XFORWARD_README: not between MAIL and DOT
TABLE: dict[State, dict[str, Step | Refuse]] = {
    state: dict(zip(COMMANDS, cells)) for state, cells in {
        #                 HELO        EHLO        MAIL                 RCPT            DATA                RSET       XCLIENT       XFORWARD
        State.GREET:     (Step.GREET, Step.GREET, _HELO_FIRST,         _HELO_FIRST,    _HELO_FIRST,        Step.RSET, Step.XCLIENT, Step.XFORWARD),
        State.READY:     (Step.GREET, Step.GREET, Step.MAIL,           _NEED_MAIL,     Refuse(NEED_MAIL),  Step.RSET, Step.XCLIENT, Step.XFORWARD),
        State.MAIL:      (Step.GREET, Step.GREET, Refuse(NESTED_MAIL), Step.RCPT,      Refuse(NEED_RCPT),  Step.RSET, _IN_TX,       _IN_TX),
        State.RCPT:      (Step.GREET, Step.GREET, Refuse(NESTED_MAIL), Step.RCPT,      Step.DATA,          Step.RSET, _IN_TX,       _IN_TX),
        State.MAIL_LOST: (Step.GREET, Step.GREET, Refuse(NESTED_MAIL), Refuse(BROKEN), Refuse(NEED_RCPT),  Step.RSET, _IN_TX,       _IN_TX),
        State.RCPT_LOST: (Step.GREET, Step.GREET, Refuse(NESTED_MAIL), Refuse(BROKEN), Step.DATA_LOST,     Step.RSET, _IN_TX,       _IN_TX),
    }.items()
}
# Answered by the front the same in every state, never changing it: NOOP, HELP, VRFY, EXPN,
# QUIT, AUTH, BDAT and unknown commands. A completed STARTTLS returns to GREET (RFC 3207
# §4.2: the client greets again). XCLIENT and XFORWARD follow the table only from a peer in
# ``trusted_forwarders``; anyone else gets ``not_forwarder`` in every state.


def describe() -> str:
    """The state table as Markdown: one row per state, one column per command."""
    def cell(c: Step | Refuse) -> str:
        if isinstance(c, Step):
            return c.name.lower().replace("_", " ")
        text = c.reply.text.removeprefix("Error: ").partition(",")[0]
        return f"`{c.reply.code} {c.reply.enhanced}` {text}" + ("" if c.early else " ¹")

    rows = ["| state | " + " | ".join(COMMANDS) + " |", "|---" * (len(COMMANDS) + 1) + "|"]
    rows += [f"| `{state.name}`: {state.value} | " + " | ".join(cell(cells[c]) for c in COMMANDS) + " |"
             for state, cells in TABLE.items()]
    rows += ["", "¹ after the command's arguments passed their syntax check.",
             "", "| step | what it does |", "|---|---|"]
    rows += [f"| {step.name.lower().replace('_', ' ')} | {step.value} |" for step in Step]
    return "\n".join(rows)


@dataclass
class _Progress:
    """How far the open transaction got downstream; replaced whole when it ends."""

    mail_sent: bool = False  # MAIL FROM went downstream (at the first relayed recipient)
    relayed: int = 0  # recipients the downstream accepted
    pending: Verdict | None = None  # a discard/quarantine decided before DATA, applied at DATA
    lost: bool = False  # the downstream failed mid-transaction: it can only end


class Conversation:
    """One client session. Each command method returns the reply to give; ``refusal()`` says
    ahead of time whether a command is out of sequence (the front asks before reading
    arguments, and before answering DATA with 354)."""

    def __init__(self, gate, session: Session, relay: Relay):
        self.gate = gate
        self.session = session
        self.runtime = gate.runtime
        self.relay = relay
        self.tx: Transaction | None = None
        self.last_tx: Transaction | None = None
        self.greeted = False
        self._progress = _Progress()
        # What EHLO offers is fixed for the connection, as the front's reader is.
        self._hostname = self.runtime.config.hostname
        self._size_offered = self.runtime.config.limits.max_message_size
        self._disconnect_hooks = ()  # of the rules whose CONNECT ran: they run at close
        # The TCP peer is in trusted_forwarders (the front says so): XCLIENT/XFORWARD accepted.
        self.forwarder = False
        # What a forwarder said of the real client's greeting outlives its own HELO/EHLO.
        self._forwarded_helo: str | None = None
        self._forwarded_proto: str | None = None
        self._forwarded_ident: str | None = None
        self._identified = False  # a forwarder named the real client
        self._connect_pending = False  # CONNECT waits for that (see connect())
        # The ended transaction's after-work (see after_reply): its coroutine until the
        # driver says the reply is written, then its task until it is done and awaited.
        self._after_work: Coroutine | partial | None = None
        self._after: asyncio.Future | None = None

    # --- sequencing ----------------------------------------------------------------------
    @property
    def state(self) -> State:
        if not self.greeted:
            return State.GREET
        if self.tx is None:
            return State.READY
        if self._progress.lost:
            return State.RCPT_LOST if self.tx.recipients else State.MAIL_LOST
        return State.RCPT if self.tx.recipients else State.MAIL

    def refusal(self, command: str, early: bool = False) -> Reply | None:
        """The reply if ``command`` is out of sequence now (``early``: only the refusals given
        before its arguments are read), else None."""
        if command in FORWARDING and not self.forwarder:
            return not_forwarder(command)
        cell = TABLE[self.state][command]
        if isinstance(cell, Refuse) and (cell.early or not early):
            return cell.reply
        return None

    async def _run(self, command: str, *args) -> Reply:
        try:
            if self.after_pending:  # every step sees the previous transaction's after-work done
                await self.settled()
            if command in FORWARDING and not self.forwarder:
                return not_forwarder(command)
            cell = TABLE[self.state][command]
            if isinstance(cell, Refuse):
                return cell.reply
            return await getattr(self, "_" + cell.name.lower())(*args)
        except ConnectionError as exc:  # not the client's: see LeakedConnectionError
            raise LeakedConnectionError(f"{command}: {type(exc).__name__}: {exc}") from exc

    def tls_started(self) -> None:
        """STARTTLS completed: the client must greet again (RFC 3207 §4.2)."""
        self.greeted = False

    # --- commands --------------------------------------------------------------------------
    async def connect(self) -> Reply | None:
        """Run the CONNECT stage. A ``421`` verdict (a connection limit) is returned: the
        caller says it and closes at once, as 421 means (RFC 5321 §3.8); any other
        refusal waits for MAIL (``_session_verdict``).

        From a trusted forwarder the stage waits until XCLIENT/XFORWARD names the real client
        (``rerun_session_rules``), or, if none does, for the first MAIL: run now, it would be
        about the forwarder, and take its connection slots (the limits rule) for every
        session it carries."""
        if self.forwarder and not self._identified:
            self._connect_pending = True
            return None
        self._connect_pending = False
        trace: list[TraceEntry] = []
        policy = self.runtime.policies.session_policy
        self._disconnect_hooks = policy.hooks["disconnect"]
        hooks = policy.hooks["connect"]
        # (a stage without hooks: no coroutine to make and await; run_stage would return None)
        verdict = await run_stage(hooks, "connect", (self.session,), trace) if hooks else None
        if verdict is not None and verdict.code == 421:
            self.session.data.setdefault("trace", []).extend(trace)
            reply = verdict.reply("connect")
            log.info("session %s: client %s refused at connect: %s", self.session.id,
                     self.session.client_ip, verdict.reason or reply)
            return reply
        self._session_verdict(verdict, trace)
        return None

    async def greet(self, name: str, esmtp: bool, starttls: bool = False) -> Reply:
        """HELO/EHLO (``name`` already checked): the reply, EHLO's listing ``starttls`` when
        offered. Call ``after_greeting()`` once it is written."""
        return await self._run("EHLO" if esmtp else "HELO", name, esmtp, starttls)

    async def after_greeting(self) -> None:
        """The rest of HELO/EHLO, after its reply: any transaction ends, ``on_helo`` runs."""
        await self._abandon()
        await self.settled(here=True)  # the ended transaction's on_end before on_helo, as ever
        if self.relay.connected:  # the downstream was greeted with the client's old name and
            try:  # protocol: the next MAIL opens it (or a pooled one) anew
                await self.relay.close()
            except Exception:  # the greeting's reply is given: nothing may reach the client
                log.exception("session %s: closing the downstream session after HELO/EHLO failed",
                              self.session.id)
        await self._helo_rules()

    async def _helo_rules(self) -> None:
        """The session policy's ``on_helo`` hooks, their verdict kept for MAIL."""
        trace: list[TraceEntry] = []
        hooks = self.runtime.policies.session_policy.hooks["helo"]
        verdict = await run_stage(hooks, "helo", (self.session,), trace) if hooks else None
        self._session_verdict(verdict, trace)

    async def helo(self, name: str, esmtp: bool, starttls: bool = False) -> Reply:
        """HELO/EHLO whole, for drivers that need not write the reply first."""
        reply = await self.greet(name, esmtp, starttls)
        await self.after_greeting()
        return reply

    def mail(self, sender: Address | None, params: list[str]) -> Awaitable[Reply]:
        return self._run("MAIL", sender, params)

    def rcpt(self, address: Address, params: list[str]) -> Awaitable[Reply]:
        return self._run("RCPT", address, params)

    def data(self, raw: bytes | list[bytes]) -> Awaitable[Reply]:
        """``raw``: the message, or its pieces in order (the Message takes the list over)."""
        return self._run("DATA", raw)

    def rset(self) -> Awaitable[Reply]:
        return self._run("RSET")

    async def xclient(self, forwarded) -> Reply:
        """XCLIENT from a trusted forwarder (``forwarded``: a checked ``forwarding.Forwarded``):
        the session starts again as the real client's (Postfix's XCLIENT_README). The reply is
        the new greeting; the driver then runs ``connect()`` again, as at the start."""
        return await self._run("XCLIENT", forwarded)

    async def xforward(self, forwarded) -> Reply:
        """XFORWARD from a trusted forwarder: the real client's attributes for what follows.
        The driver then calls ``rerun_session_rules()``."""
        return await self._run("XFORWARD", forwarded)

    async def rerun_session_rules(self) -> Reply | None:
        """After XCLIENT/XFORWARD: CONNECT (and HELO, when greeted) rules see the real client,
        not the forwarder they saw when the TCP connection was made. A ``421`` from CONNECT
        (a connection limit of the real client) is returned, as ``connect()`` does."""
        refusal = await self.connect()
        if refusal is not None:
            return refusal
        if self.greeted and self.session.helo:
            await self._helo_rules()
        return None

    async def refused_data(self, reply: Reply) -> Reply:
        """The message was refused while being read (size, line length, memory): the
        transaction ends, the client gets ``reply``."""
        await self._abandon()
        return reply

    async def close(self) -> None:
        await self._abandon()
        await self.settled(here=True)  # the last transaction's after-work, its reply written or not
        await self.relay.close()
        hooks, self._disconnect_hooks = self._disconnect_hooks, ()
        await run_disconnect(hooks, self.session)

    # --- steps (the table's Run cells) ---------------------------------------------------------
    async def _greet(self, name: str, esmtp: bool, starttls: bool) -> Reply:
        self.greeted = True
        self.session.helo, self.session.esmtp = self._forwarded_helo or name, esmtp
        self.session.proto = self._forwarded_proto or ("ESMTP" if esmtp else "SMTP")
        return self._ehlo_reply(starttls) if esmtp else Reply(250, self._hostname)

    async def _xclient(self, forwarded) -> Reply:
        await self._become(forwarded, new_session=True)
        self.greeted = False  # a new session: the forwarder greets again
        return Reply(220, f"{self._hostname} ESMTP smtpgate")

    async def _xforward(self, forwarded) -> Reply:
        await self._become(forwarded, new_session=False)
        return FORWARDED

    async def _become(self, fwd, new_session: bool) -> None:
        """Take the forwarder's word for who the client is. What rules kept of the session
        (``session.data``, a session verdict) was about someone else: gone. The downstream,
        if open, was told the old client: closed, so the next MAIL opens it as the new one."""
        session = self.session
        await self.relay.close()
        # As if the forwarder's connection ended: what CONNECT took for it is given back
        # (a connection slot), before its address and session.data are gone.
        hooks, self._disconnect_hooks = self._disconnect_hooks, ()
        await run_disconnect(hooks, session)
        session.data, session.verdict = {}, None
        self._identified = True
        if new_session:  # XCLIENT: unnamed attributes are unknown, not the forwarder's
            self._forwarded_helo = self._forwarded_proto = None
            session.helo, session.client_name = None, None
        # A named attribute replaces the old value even when the forwarder does not know it
        # ([UNAVAILABLE]): the old value was another client's.
        if fwd.addr is not None:
            if fwd.addr != session.client_ip:
                session.client_name = None  # the old name was the old address's
            session.client_ip = fwd.addr
        if fwd.port is not None:
            session.client_port = fwd.port
        if "NAME" in fwd.given:
            session.client_name = fwd.name
        if "HELO" in fwd.given:
            session.helo = self._forwarded_helo = fwd.helo
        if fwd.proto is not None:
            session.proto = self._forwarded_proto = fwd.proto
            session.esmtp = fwd.proto != "SMTP"
        if fwd.ident is not None:
            self._forwarded_ident = fwd.ident
        if self._forwarded_ident:
            session.data["forwarder_ident"] = self._forwarded_ident

    def _ehlo_reply(self, starttls: bool) -> Reply:
        """Only what the gate and the downstream both handle (no CHUNKING, AUTH, XCLIENT)."""
        caps = self.relay.capabilities
        size = self._size_offered
        if caps.size:
            size = min(size, caps.size) if size else caps.size
        lines = [self._hostname, "PIPELINING"]
        if self.forwarder:
            lines += ["XCLIENT " + " ".join(XCLIENT_ATTRIBUTES),
                      "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)]
        if size:
            lines.append(f"SIZE {size}")
        if caps.eightbitmime:
            lines.append("8BITMIME")
        if caps.smtputf8:
            lines.append("SMTPUTF8")
        if starttls:
            lines.append("STARTTLS")
        lines.append("ENHANCEDSTATUSCODES")
        return Reply(250, "\n".join(lines))

    def _session_verdict(self, verdict: Verdict | None, trace) -> None:
        # Like Postfix's smtpd_delay_reject: a CONNECT/HELO refusal is given at MAIL and RCPT,
        # where clients expect and log it, instead of hanging up on them.
        if verdict is not None and verdict.action not in (ACCEPT, DISCARD):
            self.session.verdict = verdict
            self.session.data.setdefault("trace", []).extend(trace)

    async def _mail(self, sender: Address | None, params: list[str]) -> Reply:
        if self.session.tls and self.session.esmtp:
            self.session.proto = "ESMTPS"
        self.runtime = self.gate.runtime  # a reload takes effect at the next transaction
        self._progress = _Progress()  # nothing of a MAIL refused before it opened carries over
        limits = self.runtime.config.limits
        problem = _check_mail_params(params, limits.max_message_size)
        if problem:
            return problem
        if sender is not None and not sender.is_ascii and not _smtputf8(params):
            return self._refuse_non_ascii("MAIL", sender, NEED_SMTPUTF8_SENDER)
        if self._connect_pending:  # a forwarder that never named a client: CONNECT about itself
            self._identified = True
            refusal = await self.connect()
            if refusal is not None:
                return refusal
        tx = Transaction(new_id(), self.session, str(sender) if sender else "", list(params),
                         started=time.monotonic())
        tx.trace.extend(self.session.data.get("trace", ()))
        self.last_tx = tx  # for offline callers: the trace even of a refused MAIL
        self.session.transactions += 1
        if self.session.verdict is not None:
            return await self._refuse(tx, self.session.verdict, "mail")
        policy = self.runtime.policies.session_policy
        hooks = policy.hooks["mail"]
        verdict = await run_stage(hooks, "mail", (tx,), tx.trace) if hooks else None
        if verdict is not None and verdict.action not in (ACCEPT,):
            if verdict.action in (DISCARD, QUARANTINE):
                self._progress.pending = verdict
            else:
                return await self._refuse(tx, verdict, "mail")
        try:
            await self.relay.open(self.session)
        except RelayError as exc:
            await self._finish(tx, exc.reply, "mail")
            return exc.reply
        self.tx = tx
        return OK_MAIL

    async def _rcpt(self, address: Address, params: list[str]) -> Reply:
        """In order: the command's own limits, the governing policy (relay check, policy split),
        the rules, the relay check again if a rule rewrote the address, then downstream. Until
        a recipient is accepted the transaction has no policy: a refused first one unsets it."""
        tx = self.tx
        refused = self._check_rcpt(tx, address, params)
        if refused:
            return refused
        policy = self._recipient_policy(tx, address)
        if isinstance(policy, Reply):
            return policy
        rcpt = Recipient(address, list(params), policy)
        first = tx.policy is None
        if first:
            tx.policy = policy
        refused = await self._recipient_rules(tx, rcpt, address, first)
        if refused:
            if first:
                tx.policy = None
            return refused
        if rcpt.address != str(address):  # a rule rewrote it: the relay check applies again
            refused = self._check_rewritten(rcpt)
            if refused:
                return refused
        return await self._add_recipient(tx, rcpt, first)

    def _check_rcpt(self, tx: Transaction, address: Address, params: list[str]) -> Reply | None:
        if params:
            return RCPT_PARAMS
        if not address.is_ascii and not _smtputf8(tx.sender_params):
            return self._refuse_non_ascii("RCPT", address, NEED_SMTPUTF8_RCPT)
        if len(tx.recipients) >= self.runtime.config.limits.max_recipients:
            return TOO_MANY_RCPTS
        return None

    def _recipient_policy(self, tx: Transaction, address: Address):
        """The policy governing ``address`` (bare ``postmaster``: the transaction's, or the
        session's), or the refusal: relay denied, or another policy than the transaction's."""
        if address.domain == "" and address.is_postmaster:
            policy = tx.policy or self.runtime.policies.session_policy
        else:
            policy = self._governing_policy(address, tx)
            if isinstance(policy, Reply):
                return policy
        if tx.policy is not None and policy is not tx.policy:
            self._gate_trace(tx, "rcpt", "tempfail", "policy split", POLICY_SPLIT, str(address))
            return POLICY_SPLIT
        return policy

    async def _recipient_rules(self, tx: Transaction, rcpt: Recipient, address: Address,
                               first: bool) -> Reply | None:
        """At the first recipient, the policy's own ``on_mail``; then ``on_rcpt`` (not for
        postmaster: always accepted for governed domains). A refusal, or None."""
        policy = rcpt.policy
        if first:
            hooks = self.runtime.policies.own_mail(policy)
            verdict = await run_stage(hooks, "mail", (tx,), tx.trace) if hooks else None
            if verdict is not None and verdict.action != ACCEPT:
                if verdict.action in (DISCARD, QUARANTINE):
                    self._progress.pending = verdict
                else:
                    return verdict.reply("mail")
        if not address.is_postmaster:
            hooks = policy.hooks["rcpt"]
            verdict = await run_stage(hooks, "rcpt", (tx, rcpt), tx.trace,
                                      recipient=rcpt.address) if hooks else None
            if verdict is not None and verdict.action != ACCEPT:
                if verdict.action == DISCARD:
                    rcpt.discard = True
                elif verdict.action == QUARANTINE:
                    self._progress.pending = verdict
                else:
                    return verdict.reply("rcpt")
        return None

    async def _add_recipient(self, tx: Transaction, rcpt: Recipient, first: bool) -> Reply:
        """A discarded recipient is kept without the downstream; any other gets the
        downstream's RCPT reply (a lost downstream: the transaction can only end)."""
        if rcpt.discard:
            tx.recipients.append(rcpt)
            return OK_RCPT
        try:
            reply = await self._relay_rcpt(tx, rcpt)
        except RelayError as exc:
            self._progress.lost = True
            return exc.reply
        tx.downstream_replies.append(("rcpt", reply))
        if reply.is_positive:
            tx.recipients.append(rcpt)
            self._progress.relayed += 1
        elif first:
            tx.policy = None
        return reply

    async def _data(self, raw: bytes | list[bytes]) -> Reply:
        tx = self.tx
        tx.message = Message(raw)
        del raw  # the message holds the only copy from here on
        forged = tx.message.remove_authentication_results(self.runtime.config.auth_id)
        if forged:  # RFC 8601 §5: only we may vouch under our own authserv-id
            tx.trace.append(TraceEntry("data", "gate", "continue",
                                       f"removed {forged} forged Authentication-Results"))
        hooks = tx.policy.hooks["data"]
        verdict = await run_stage(hooks, "data", (tx,), tx.trace, message=tx.message) if hooks else None
        if verdict is None or verdict.action == ACCEPT:
            verdict = self._progress.pending
        if verdict is not None and verdict.action != ACCEPT:
            return await self._refuse_data(tx, verdict)
        if self._progress.relayed == 0:  # every recipient was discarded
            await self.relay.reset()
            return await self._end(tx, OK_DATA, deliver_hooks=True)
        add_authentication_results(tx, self.runtime.config.auth_id)  # the rules' auth results, under our id
        # The message is final: seal-stage rules sign what will be relayed (only adding fields).
        hooks = tx.policy.hooks["seal"]
        verdict = await run_stage(hooks, "seal", (tx,), tx.trace, message=tx.message) if hooks else None
        if verdict is not None and verdict.action != ACCEPT:
            return await self._refuse_data(tx, verdict)
        held = None
        if tx.message.held:  # a rule asked to keep the original while delivering (stripped copy)
            held = await self._hold(tx, tx.message.received,
                                    Verdict(QUARANTINE, reason="; ".join(tx.message.held),
                                            data={"delivered": True}))
            if held is False:
                await self.relay.reset()
                return await self._end(tx, CANNOT_HOLD)
        try:
            reply = await self.relay.data(tx.message.pieces())
            tx.downstream_replies.append(("data", reply))
        except RelayError as exc:
            reply = exc.reply
        if held and not reply.is_positive:  # not delivered: the client retries, that copy counts
            await asyncio.to_thread(self.gate.quarantine.delete, held)
        return await self._end(tx, reply, deliver_hooks=True)

    async def _refuse_data(self, tx: Transaction, verdict: Verdict) -> Reply:
        """End the transaction at DATA with ``verdict``'s refusal (quarantine: held first)."""
        reply = verdict.reply("data")
        if verdict.action == QUARANTINE and await self._hold(tx, tx.message.received, verdict) is False:
            reply = CANNOT_HOLD
        await self.relay.reset()
        return await self._end(tx, reply, deliver_hooks=verdict.action == DISCARD)

    async def _data_lost(self, raw: bytes | list[bytes]) -> Reply:
        return await self._end(self.tx, BROKEN)

    async def _rset(self) -> Reply:
        await self._abandon()
        return OK_RSET

    # --- helpers -----------------------------------------------------------------------
    async def _hold(self, tx: Transaction, raw: bytes, verdict: Verdict):
        """Store the message as received in the quarantine: its id; None without a
        quarantine (``smtpgate try``); False when the store failed (the client gets a 451).
        In a thread: the store writes and fsyncs, which must not stall other sessions."""
        if self.gate.quarantine is None:
            return None
        try:
            qid = await asyncio.to_thread(self.gate.quarantine.put, tx, raw, verdict)
        except StoreError as exc:
            log.error("tx %s: cannot store in the quarantine: %s", tx.id, exc)
            self._gate_trace(tx, "data", "error", f"quarantine failed: {exc}", CANNOT_HOLD)
            return False
        tx.trace.append(TraceEntry("data", "gate", "quarantine", f"held as {qid}"))
        return qid

    async def _abandon(self) -> None:
        """End the open transaction, if any, without a reply (RSET, HELO, a refused DATA, close)."""
        tx = self.tx
        if tx is not None:
            await self.relay.reset()
            await self._end(tx, None)

    def _governing_policy(self, address: Address, tx: Transaction):
        refusal = relay_refusal(address)
        policy = None if refusal else self.runtime.policies.for_domain(normalise_domain(address.domain))
        if policy is None:
            self._gate_trace(tx, "rcpt", "reject", refusal or "relay denied: domain not governed",
                             RELAY_DENIED, str(address))
            return RELAY_DENIED
        return policy

    def _check_rewritten(self, rcpt: Recipient) -> Reply | None:
        try:
            parsed = parse_path(f"<{rcpt.address}>", smtputf8=True).address
        except AddressError:
            parsed = None
        if parsed is None or isinstance(self._governing_policy(parsed, self.tx), Reply):
            return RELAY_DENIED
        rcpt.parsed = parsed
        return None

    def _refuse_non_ascii(self, verb: str, address: Address, reply: Reply) -> Reply:
        # RFC 6531 §3.7.4.1; one line, as the refusal happens before any transaction log line.
        log.info("refused non-ASCII address", extra={"fields": {
            "client": self.session.client_ip, "command": verb, "address": ascii(str(address)[:300]),
            "reply": str(reply)}})
        return reply

    async def _relay_rcpt(self, tx: Transaction, rcpt: Recipient) -> Reply:
        relay = self.relay
        utf8 = _smtputf8(tx.sender_params)
        if not utf8 and not (tx.sender.isascii() and rcpt.address.isascii()):
            # A rule rewrote an address into non-ASCII: it cannot go downstream without SMTPUTF8.
            return NEED_SMTPUTF8_SENDER if not tx.sender.isascii() else NEED_SMTPUTF8_RCPT
        if not self._progress.mail_sent:
            if not relay.connected:
                await relay.open(self.session)
            # MAIL with the first recipient: one round trip where the downstream pipelines
            mail, reply = await relay.mail_rcpt(f"<{tx.sender}>", tx.sender_params,
                                                rcpt.parsed.wire(), rcpt.params, tx.id, utf8)
            if not mail.is_positive:
                return mail
            self._progress.mail_sent = True
            return reply
        return await relay.rcpt(rcpt.parsed.wire(), rcpt.params, utf8)

    def _gate_trace(self, tx, stage, action, reason, reply: Reply, recipient=None) -> None:
        tx.trace.append(TraceEntry(stage, "gate", action, reason, str(reply), 0.0, False, recipient))

    async def _refuse(self, tx: Transaction, verdict: Verdict, stage: str) -> Reply:
        reply = verdict.reply(stage)
        await self._finish(tx, reply, stage)
        return reply

    async def _end(self, tx: Transaction, reply: Reply | None,
                   deliver_hooks: bool = False) -> Reply | None:
        self.tx = None
        self._progress = _Progress()
        await self._finish(tx, reply, "data" if reply is not None else "rset",
                           delivered=deliver_hooks and reply is not None and tx.policy is not None)
        return reply

    async def _finish(self, tx: Transaction, reply: Reply | None, stage: str,
                      delivered: bool = False) -> None:
        # Every transaction ends here. What observes the end (on_delivered, the pipeline's
        # events, the on_end hooks, the log line) is deferred until the client has its reply.
        if self.after_pending:  # never two at once: each transaction's in order
            await self.settled()
        ends = self.runtime.policies.end_hooks(tx.policy)
        took = time.monotonic() - tx.started
        # (without an on_delivered hook, run_delivered would skip every rule: not called)
        run_delivered_hooks = delivered and bool(tx.policy.hooks["delivered"])
        if run_delivered_hooks or ends:
            self._after_work = self._after_end(tx, reply, stage, ends, run_delivered_hooks, took)
        else:
            # No hook to run: run_delivered/run_end would skip every rule (the runner calls
            # only rules with the hook), add no trace entry and wait for nothing; what is left
            # is the same events then the same log line, done at once after the reply.
            self._after_work = partial(_close_the_books, tx, reply, stage, took)

    async def _after_end(self, tx: Transaction, reply: Reply | None, stage: str, ends,
                         delivered: bool, took: float) -> None:
        """The after-work of one ended transaction: ``on_delivered`` (``delivered``), the
        pipeline's own events, the ``on_end`` hooks of the session policy's and the
        transaction policy's rules (each instance once), the log line. The hooks' crashes are
        logged and traced by the runner; anything else is logged here: the client's reply
        is given, nothing may reach it."""
        try:
            if delivered:
                await run_delivered(tx.policy.hooks["delivered"], tx, reply, tx.trace)
            publish_outcome(tx, reply)
            await run_end(ends, tx, reply, tx.trace)
        except Exception:
            log.exception("tx %s: the work after the reply failed", tx.id)
        _close_the_books(tx, reply, stage, took, published=True)

    # --- after the reply ---------------------------------------------------------------
    # The hooks that observe an ended transaction only observe: the client's reply does not
    # wait for them (the senders rule's on_end writes to its store: a round trip). The
    # driver calls after_reply() once the reply is written; every later step of the session
    # (_run, after_greeting, close) first awaits that work, so the client's next transaction
    # sees the previous one's effects, and a closing or draining session never loses it.
    @property
    def after_pending(self) -> bool:
        """An ended transaction's after-work is not finished yet."""
        return self._after_work is not None or (self._after is not None and not self._after.done())

    def after_reply(self) -> None:
        """The reply is written: start the ended transaction's after-work, if any (without
        hooks to run, it is done here and then: nothing in it can wait, no task is needed)."""
        work = self._after_work
        if work is not None:
            self._after_work = None
            if isinstance(work, Coroutine):
                self._after = asyncio.ensure_future(work)
            else:
                work()

    async def settled(self, here: bool = False) -> None:
        """Wait for the after-work. Not started yet (no reply was written: the client left,
        or an offline driver): ``here`` runs it in the caller's task (close(), after_greeting:
        as the hooks always ran there; no task to make), else in a task of its own. A task is
        awaited shielded: a command cancelled while it waits (the connection lost) leaves it
        running, for close() to await."""
        if here and isinstance(self._after_work, Coroutine):  # the last task is done (_finish)
            work, self._after_work = self._after_work, None
            await work
            return
        self.after_reply()
        task = self._after
        if task is not None:
            await asyncio.shield(task)
            if self._after is task:
                self._after = None


def _close_the_books(tx: Transaction, reply: Reply | None, stage: str, took: float,
                     published: bool = False) -> None:
    """The end of a transaction's after-work: the pipeline's events unless ``published``
    already (before the on_end hooks, which read them), then the log line. A failure is
    logged: the client has its reply, nothing may reach it."""
    try:
        if not published:
            publish_outcome(tx, reply)
        log_transaction(tx, reply, stage, took)
    except Exception:
        log.exception("tx %s: the work after the reply failed", tx.id)


def _smtputf8(params: list[str]) -> bool:
    return any(p.upper() == "SMTPUTF8" for p in params)


def _check_mail_params(params: list[str], max_size: int) -> Reply | None:
    for p in params:
        key, _, value = p.partition("=")
        key = key.upper()
        if key == "SIZE":
            if not (value.isascii() and value.isdigit()):
                return Reply(501, "Bad SIZE parameter", "5.5.4")
            if max_size and int(value) > max_size:
                return TOO_BIG
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return Reply(501, "BODY can only be one of 7BIT, 8BITMIME", "5.5.4")
        elif key == "SMTPUTF8":
            if value:
                return Reply(501, "SMTPUTF8 takes no value", "5.5.4")
        else:
            return Reply(555, f"MAIL FROM parameter {key} not supported", "5.5.4")
    return None


def log_transaction(tx: Transaction, reply: Reply | None, stage: str, took: float) -> None:
    """The one log line per transaction; ``extra`` carries the fields for the JSON format.
    ``took``: seconds from MAIL to the client's last reply (the after-work not counted)."""
    fields = {
        "tx": tx.id, "client": tx.session.client_ip, "helo": tx.session.helo,
        "tls": tx.session.tls_version, "cipher": tx.session.tls_cipher,
        "from": tx.sender, "to": [r.address for r in tx.recipients],
        "policy": getattr(tx.policy, "name", None), "stage": stage,
        "size": tx.message.size if tx.message else None,
        "reply": str(reply).split("\r\n")[-1] if reply is not None else "abandoned",
        "rules": TraceLog(tx.trace),  # rendered by the formatter that writes the line
        "results": ResultsLog(tx.session.results, tx.results),
        "ms": round(took * 1000, 1),
    }
    if tx.session.data.get("forwarder_ident"):  # the forwarding Postfix's queue id (XFORWARD IDENT)
        fields["forwarder_id"] = tx.session.data["forwarder_ident"]
    log.info("transaction", extra={"fields": fields})
    metrics.transaction_ended(reply.code if reply is not None else None, tx.trace)
