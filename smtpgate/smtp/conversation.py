"""One client session's SMTP logic, without sockets: the front and ``smtpgate try`` both drive it.

Flow: CONNECT and HELO run the session policy (``default``). MAIL runs the session policy's
``on_mail`` and opens the downstream (so an unreachable downstream is a 451 at MAIL). The first
accepted RCPT picks the transaction's policy from the recipient's domain, runs that policy's
own ``on_mail`` hooks (those it does not share with the session policy), then sends MAIL
downstream — with the sender as the rules left it — and mirrors each RCPT. DATA runs
``on_data`` and relays; the client's final reply is the downstream's.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..mail.addresses import Address, AddressError, normalise_domain, parse_path, relay_refusal
from ..mail.session import Recipient, Session, TraceEntry, Transaction, new_id
from ..errors import RelayError, StoreError
from ..mail.message import Message
from ..pipeline.runner import publish_outcome, run_delivered, run_end, run_stage
from ..mail.reply import Reply
from ..pipeline.verdict import ACCEPT, DISCARD, QUARANTINE, Verdict

log = logging.getLogger("smtpgate.transaction")

OK_MAIL = Reply(250, "Ok", "2.1.0")
OK_RCPT = Reply(250, "Ok", "2.1.5")
OK_DATA = Reply(250, "Ok", "2.0.0")
RELAY_DENIED = Reply(554, "Relay access denied", "5.7.1")
POLICY_SPLIT = Reply(452, "Recipient governed by another policy, send it in a separate transaction",
                     "4.5.3")
TOO_MANY_RCPTS = Reply(452, "Too many recipients", "4.5.3")
TOO_BIG = Reply(552, "Message size exceeds fixed maximum message size", "5.3.4")
NEED_MAIL = Reply(503, "Error: need MAIL command", "5.5.1")
NESTED_MAIL = Reply(503, "Error: nested MAIL command", "5.5.1")
NEED_RCPT = Reply(503, "Error: need RCPT command", "5.5.1")
BROKEN = Reply(451, "Transaction aborted after a downstream failure, try again later", "4.4.2")
NEED_SMTPUTF8_SENDER = Reply(553, "Non-ASCII sender address requires SMTPUTF8", "5.6.7")
NEED_SMTPUTF8_RCPT = Reply(553, "Non-ASCII recipient address requires SMTPUTF8", "5.6.7")
CANNOT_HOLD = Reply(451, "Local error in processing (quarantine unavailable), try again later", "4.3.0")


class Conversation:
    def __init__(self, gate, session: Session):
        self.gate = gate
        self.session = session
        self.runtime = gate.runtime
        self.relay = None
        self.tx: Transaction | None = None
        self.last_tx: Transaction | None = None
        self._mail_sent = False
        self._relayed = 0  # recipients the downstream accepted in this transaction
        self._pending: Verdict | None = None  # a discard/quarantine decided before DATA
        self._broken = False

    # --- session stages ----------------------------------------------------------------
    async def connect(self) -> None:
        trace: list[TraceEntry] = []
        policy = self.runtime.policies.session_policy
        verdict = await run_stage(policy.rules, "connect", (self.session,), trace)
        self._session_verdict(verdict, trace)

    async def helo(self, name: str, esmtp: bool) -> None:
        self.session.helo, self.session.esmtp = name, esmtp
        self.session.proto = "ESMTP" if esmtp else "SMTP"
        await self.rset()
        trace: list[TraceEntry] = []
        policy = self.runtime.policies.session_policy
        verdict = await run_stage(policy.rules, "helo", (self.session,), trace)
        self._session_verdict(verdict, trace)

    def _session_verdict(self, verdict: Verdict | None, trace) -> None:
        # Like Postfix's smtpd_delay_reject: a CONNECT/HELO refusal is given at MAIL and RCPT,
        # where clients expect and log it, instead of hanging up on them.
        if verdict is not None and verdict.action not in (ACCEPT, DISCARD):
            self.session.verdict = verdict
            self.session.data.setdefault("trace", []).extend(trace)

    # --- transaction stages ------------------------------------------------------------
    async def mail(self, sender: Address | None, params: list[str]) -> Reply:
        if self.tx is not None:
            return NESTED_MAIL
        self.runtime = self.gate.runtime  # a reload takes effect at the next transaction
        limits = self.runtime.config.limits
        problem = _check_mail_params(params, limits.max_message_size)
        if problem:
            return problem
        if sender is not None and not sender.is_ascii and not _smtputf8(params):
            return self._refuse_non_ascii("MAIL", sender, NEED_SMTPUTF8_SENDER)
        tx = Transaction(new_id(), self.session, str(sender) if sender else "", list(params),
                         started=time.monotonic())
        tx.trace.extend(self.session.data.get("trace", ()))
        self.last_tx = tx  # for offline callers: the trace even of a refused MAIL
        self.session.transactions += 1
        if self.session.verdict is not None:
            return await self._refuse(tx, self.session.verdict, "mail")
        policy = self.runtime.policies.session_policy
        verdict = await run_stage(policy.rules, "mail", (tx,), tx.trace)
        if verdict is not None and verdict.action not in (ACCEPT,):
            if verdict.action in (DISCARD, QUARANTINE):
                self._pending = verdict
            else:
                return await self._refuse(tx, verdict, "mail")
        try:
            if self.relay is None:
                self.relay = self.gate.new_relay()
            await self.relay.open(self.session)
        except RelayError as exc:
            await self._finish(tx, exc.reply, "mail")
            return exc.reply
        self.tx = tx
        return OK_MAIL

    async def rcpt(self, address: Address, params: list[str]) -> Reply:
        tx = self.tx
        if tx is None:
            return NEED_MAIL
        if self._broken:
            return BROKEN
        if params:
            return Reply(555, "RCPT TO parameters not supported", "5.5.4")
        if not address.is_ascii and not _smtputf8(tx.sender_params):
            return self._refuse_non_ascii("RCPT", address, NEED_SMTPUTF8_RCPT)
        if len(tx.recipients) >= self.runtime.config.limits.max_recipients:
            return TOO_MANY_RCPTS
        policies = self.runtime.policies
        if address.domain == "" and address.is_postmaster:
            policy = tx.policy or policies.session_policy
        else:
            policy = self._governing_policy(address, tx)
            if isinstance(policy, Reply):
                return policy
        if tx.policy is not None and policy is not tx.policy:
            self._gate_trace(tx, "rcpt", "tempfail", "policy split", POLICY_SPLIT, str(address))
            return POLICY_SPLIT
        rcpt = Recipient(address, list(params), policy)
        first = tx.policy is None
        if first:
            tx.policy = policy
            shared = set(policies.session_policy.rules)
            verdict = await run_stage(policy.rules, "mail", (tx,), tx.trace, skip=shared)
            if verdict is not None and verdict.action != ACCEPT:
                if verdict.action in (DISCARD, QUARANTINE):
                    self._pending = verdict
                else:
                    tx.policy = None
                    return verdict.reply("mail")
        if not address.is_postmaster:  # postmaster is always accepted for governed domains
            verdict = await run_stage(policy.rules, "rcpt", (tx, rcpt), tx.trace,
                                      recipient=rcpt.address)
            if verdict is not None and verdict.action != ACCEPT:
                if verdict.action == DISCARD:
                    rcpt.discard = True
                elif verdict.action == QUARANTINE:
                    self._pending = verdict
                else:
                    if first and not tx.recipients:
                        tx.policy = None
                    return verdict.reply("rcpt")
        if rcpt.address != str(address):  # a rule rewrote it: the relay check applies again
            refusal = self._check_rewritten(rcpt)
            if refusal:
                return refusal
        if rcpt.discard:
            tx.recipients.append(rcpt)
            return OK_RCPT
        try:
            reply = await self._relay_rcpt(tx, rcpt)
        except RelayError as exc:
            self._broken = True
            return exc.reply
        tx.downstream_replies.append(("rcpt", reply))
        if reply.is_positive:
            tx.recipients.append(rcpt)
            self._relayed += 1
        elif first and not tx.recipients:
            tx.policy = None
        return reply

    async def data(self, raw: bytes | list[bytes]) -> Reply:
        """``raw``: the message, or its pieces in order (the Message takes the list over)."""
        tx = self.tx
        if tx is None:
            return NEED_MAIL
        if not tx.recipients:
            return NEED_RCPT
        if self._broken:
            return await self._end(tx, BROKEN)
        tx.message = Message(raw)
        del raw  # the message holds the only copy from here on
        forged = tx.message.remove_authentication_results(self.runtime.config.hostname)
        if forged:  # RFC 8601 §5: only we may vouch under our own authserv-id
            tx.trace.append(TraceEntry("data", "gate", "continue",
                                       f"removed {forged} forged Authentication-Results"))
        verdict = await run_stage(tx.policy.rules, "data", (tx,), tx.trace, message=tx.message)
        if verdict is None or verdict.action == ACCEPT:
            verdict = self._pending
        if verdict is not None and verdict.action != ACCEPT:
            reply = verdict.reply("data")
            if verdict.action == QUARANTINE and await self._hold(tx, tx.message.received, verdict) is False:
                reply = CANNOT_HOLD
            await self.relay.reset()
            return await self._end(tx, reply, deliver_hooks=verdict.action == DISCARD)
        if self._relayed == 0:  # every recipient was discarded
            await self.relay.reset()
            return await self._end(tx, OK_DATA, deliver_hooks=True)
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

    async def rset(self) -> None:
        tx = self.tx
        if tx is not None:
            await self.relay.reset()
            await self._end(tx, None)

    async def close(self) -> None:
        await self.rset()
        if self.relay is not None:
            await self.relay.close()

    # --- helpers -----------------------------------------------------------------------
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
        if not self._mail_sent:
            if not relay.connected:
                await relay.open(self.session)
            reply = await relay.mail(f"<{tx.sender}>", tx.sender_params, tx.id, utf8)
            if not reply.is_positive:
                return reply
            self._mail_sent = True
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
        self._mail_sent, self._relayed, self._pending, self._broken = False, 0, None, False
        if deliver_hooks and reply is not None and tx.policy is not None:
            await run_delivered(tx.policy.rules, tx, reply, tx.trace)
        await self._finish(tx, reply, "data" if reply is not None else "rset")
        return reply

    async def _finish(self, tx: Transaction, reply: Reply | None, stage: str) -> None:
        # Every transaction ends here: the pipeline's own events, the on_end hooks of the
        # session policy's and the transaction policy's rules (each instance once), the log line.
        publish_outcome(tx, reply)
        session_rules = self.runtime.policies.session_policy.rules
        rules = list(session_rules) + [r for r in (tx.policy.rules if tx.policy else ()) if r not in session_rules]
        await run_end(rules, tx, reply, tx.trace)
        log_transaction(tx, reply, stage)


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


def log_transaction(tx: Transaction, reply: Reply | None, stage: str) -> None:
    """The one log line per transaction; ``extra`` carries the fields for the JSON format."""
    fields = {
        "tx": tx.id, "client": tx.session.client_ip, "helo": tx.session.helo,
        "from": tx.sender, "to": [r.address for r in tx.recipients],
        "policy": getattr(tx.policy, "name", None), "stage": stage,
        "size": tx.message.size if tx.message else None,
        "reply": str(reply).split("\r\n")[-1] if reply is not None else "abandoned",
        "rules": [e.as_dict() for e in tx.trace],
        "results": {**tx.session.results.as_dict(), **tx.results.as_dict()},
        "ms": round((time.monotonic() - tx.started) * 1000, 1),
    }
    log.info("transaction", extra={"fields": fields})
