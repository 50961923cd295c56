"""Run one stage of a policy's rules over a transaction and record the trace.

Knows nothing about sockets: the conversation asks, the pipeline answers with a Verdict or
None. Shadow rules run and are traced but never act; a rule that raises is logged with its
traceback (a StoreError: one line) and turns into ``451 4.3.0`` unless it is set
``on_error: accept``.
"""
from __future__ import annotations

import logging
import time

from ..mail.session import Event, TraceEntry
from ..errors import StoreError
from ..mail.message import describe_changes
from .verdict import ACCEPT, Verdict

log = logging.getLogger("smtpgate.pipeline")

RULE_CRASHED = Verdict.tempfail("Local error in processing, try again later", 451, "4.3.0",
                                reason="rule crashed")


def _log_crash(rule, hook_name: str, exc: Exception) -> None:
    """A store failure is an outage, not a bug: one line (its text names the store and the
    fault) instead of a traceback on every command while the store is down."""
    if isinstance(exc, StoreError):
        log.error("rule %s failed in %s: %s", rule.name, hook_name, exc)
    else:
        log.error("rule %s crashed in %s", rule.name, hook_name, exc_info=exc)


# What a hook may rewrite in the envelope at a stage: (label, index into args, attribute).
_ENVELOPE = {"mail": ("sender", 0, "sender"), "rcpt": ("recipient", 1, "address")}


async def run_stage(rules, stage: str, args: tuple, trace: list[TraceEntry], *,
                    message=None, recipient: str | None = None, skip=()) -> Verdict | None:
    """Call ``on_<stage>`` of each rule in order; return the first decisive verdict.

    ``accept`` ends the stage early (later rules of this stage do not run) and is returned so
    the caller can tell a whitelist from "no opinion". ``skip`` holds rule instances that
    already ran this hook for this transaction (inherited by a domain policy from the session
    policy), so no hook runs twice.
    """
    hook_name = f"on_{stage}"
    skipped = getattr(args[0], "skipped", None) if stage in ("mail", "rcpt", "data") else None
    for rule in rules:
        hook = getattr(rule, hook_name, None)
        if hook is None or rule in skip:
            continue
        if skipped and rule.name in skipped:  # tx.skip(): e.g. a sender state skips greylisting
            trace.append(TraceEntry(stage, rule.name, "continue", f"skipped: {skipped[rule.name]}",
                                    None, 0.0, rule.mode == "shadow", recipient))
            continue
        shadow = rule.mode == "shadow"
        mark = message.checkpoint() if message is not None else None
        slot = _ENVELOPE.get(stage)
        before = getattr(args[slot[1]], slot[2]) if slot else None
        if message is not None:
            message._current_rule = rule.name
        started = time.perf_counter()
        try:
            verdict = await hook(*args)
            if verdict is not None and not isinstance(verdict, Verdict):
                raise TypeError(f"hook returned {type(verdict).__name__}, expected Verdict or None")
        except Exception as exc:  # a plugin's bug must never reach the client as a traceback
            ms = (time.perf_counter() - started) * 1000
            _log_crash(rule, hook_name, exc)
            if mark is not None:
                message.rollback(mark)
            if slot:
                setattr(args[slot[1]], slot[2], before)
            trace.append(TraceEntry(stage, rule.name, "error", f"{type(exc).__name__}: {exc}",
                                    None, ms, shadow, recipient))
            if rule.on_error == "accept" or shadow:
                continue
            return RULE_CRASHED
        finally:
            if message is not None:
                message._current_rule = None
        ms = (time.perf_counter() - started) * 1000
        # The trace names what the rule changed (envelope address, header edits), so a rule
        # that only rewrites, returning None, still leaves a reason; a shadow rule's changes
        # are named, then undone.
        changed = []
        if slot and getattr(args[slot[1]], slot[2]) != before:
            changed.append(f"{slot[0]} <{before}> -> <{getattr(args[slot[1]], slot[2])}>")
            if shadow:
                setattr(args[slot[1]], slot[2], before)
        if mark is not None and len(message.changes) > mark[1]:
            changed.append(describe_changes(message.changes[mark[1]:]))
        if shadow and mark is not None:
            message.rollback(mark)
        changed_text = "; ".join(changed) or None
        if verdict is None:
            trace.append(TraceEntry(stage, rule.name, "continue", changed_text, None, ms, shadow,
                                    recipient))
            continue
        reason = "; ".join(x for x in (verdict.reason, changed_text) if x) or None
        reply = None if verdict.action == ACCEPT else str(verdict.reply(stage))
        trace.append(TraceEntry(stage, rule.name, verdict.action, reason, reply, ms,
                                shadow, recipient))
        if shadow:
            log.info("shadow: rule %s would %s at %s: %s", rule.name, verdict.action, stage,
                     reason or "")
            continue
        return verdict
    return None


async def run_delivered(rules, tx, reply, trace: list[TraceEntry]) -> None:
    """``on_delivered`` hooks only observe: a crash there is logged and traced, nothing else."""
    for rule in rules:
        if getattr(rule, "on_delivered", None) is None:
            continue
        started = time.perf_counter()
        try:
            await rule.on_delivered(tx, reply)
            action, reason = "continue", None
        except Exception as exc:
            _log_crash(rule, "on_delivered", exc)
            action, reason = "error", f"{type(exc).__name__}: {exc}"
        trace.append(TraceEntry("delivered", rule.name, action, reason, None,
                                (time.perf_counter() - started) * 1000, rule.mode == "shadow"))


def publish_outcome(tx, reply) -> None:
    """The pipeline's own events, recorded at the one place a transaction ends: ``rejected``
    for each rule that refused (not in shadow mode; ``rule`` is its name), then
    ``downstream_rejected`` if the downstream refused (5xx) a recipient or the message, then
    ``delivered`` if it took the message (2xx to DATA). Names rules appended to
    ``tx.data["events"]`` directly are taken into ``tx.events`` first, in their place."""
    tx.events[:] = tx.published()
    for e in tx.trace:
        if e.action == "reject" and not e.shadow and e.rule != "gate":
            _record(tx, "rejected", e.rule, e.reason)
    for stage, answer in tx.downstream_replies:
        if answer.is_permanent:
            _record(tx, "downstream_rejected", "downstream", f"{stage}: {answer.lines()[-1]}")
    for stage, answer in tx.downstream_replies:
        if stage == "data" and answer.is_positive:
            _record(tx, "delivered", "downstream", answer.lines()[-1])


def _record(tx, name: str, rule: str, why) -> None:
    # Into tx.events only: tx.data["events"] keeps what rules published, as it always did.
    tx.events.append(Event(name, rule, None if why is None else " ".join(str(why).split())[:200]))


async def run_disconnect(rules, session) -> None:
    """``on_disconnect`` hooks observe the end of a session whose CONNECT stage ran (to
    release what ``on_connect`` took, e.g. a connection slot). A crash is logged, nothing else:
    the client is gone."""
    for rule in rules:
        if getattr(rule, "on_disconnect", None) is None:
            continue
        try:
            await rule.on_disconnect(session)
        except Exception as exc:
            _log_crash(rule, "on_disconnect", exc)


async def run_end(rules, tx, reply, trace: list[TraceEntry]) -> None:
    """``on_end`` hooks observe a finished transaction (whatever its outcome; ``reply`` is the
    last reply the client got for it, None when it was abandoned). A hook may return a short
    text for the trace (what it did). A crash is logged and traced, nothing else."""
    for rule in rules:
        if getattr(rule, "on_end", None) is None:
            continue
        started = time.perf_counter()
        try:
            said = await rule.on_end(tx, reply)
            action, reason = "continue", said if isinstance(said, str) and said else None
        except Exception as exc:
            _log_crash(rule, "on_end", exc)
            action, reason = "error", f"{type(exc).__name__}: {exc}"
        trace.append(TraceEntry("end", rule.name, action, reason, None,
                                (time.perf_counter() - started) * 1000, rule.mode == "shadow"))
