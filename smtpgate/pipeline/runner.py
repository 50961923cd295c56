"""Run one stage of a policy's rules over a transaction and record the trace.

Knows nothing about sockets: the conversation asks, the pipeline answers with a Verdict or
None. Hooks get the arguments they name (``rule.HOOKS``). The runner alone applies a rule's
``mode`` and ``on_error``: a shadow rule runs and is traced but never acts (its verdict is
ignored, its envelope and message edits and ``tx.skip`` calls are undone, its results are
marked shadow and its events reach no state machine); a rule that raises is logged with its
traceback (a StoreError: one line) and turns into ``451 4.3.0`` unless it is set
``on_error: accept``. What a rule adds to ``tx.results`` during a hook goes into that hook's
trace entry. At the seal stage each hook gets a fresh ``Seal`` to stage header fields on;
they are prepended together once the hook returned, never for a shadow rule, a refusing
verdict or a hook that raised, and a hook that edits the message itself fails
(``pipeline/seal.py``).
"""
from __future__ import annotations

import logging
from time import perf_counter

from ..mail.session import TraceEntry
from ..errors import StoreError
from ..mail.message import Change, describe_changes
from .rule import HOOKS, SIGNATURES, hook_parameters
from .seal import Seal, check_untouched
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


# What a hook may rewrite in the envelope at a stage: (label, argument, attribute).
_ENVELOPE = {"mail": ("sender", "tx", "sender"), "rcpt": ("recipient", "rcpt", "address")}


_HOOK = {stage: hook for hook, (stage, _) in HOOKS.items()}


def _arguments(stage: str, args: tuple) -> dict:
    """Everything a hook of ``stage`` may ask for, by name, from the caller's positional
    ``args`` (``(session,)``, ``(tx,)``, ``(tx, rcpt)``, ``(tx, reply)``)."""
    if stage in ("connect", "helo", "disconnect"):
        session = args[0]
        return {"session": session, "results": session.results}
    tx = args[0]
    out = {"tx": tx, "session": tx.session, "results": tx.results}
    if stage == "rcpt":
        out["rcpt"] = args[1]
    elif stage in ("delivered", "end"):
        out["reply"] = args[1]
    elif stage == "seal":
        out["seal"] = args[1] if len(args) > 1 else None
    if stage in ("data", "seal", "delivered", "end"):
        out["message"] = tx.message
    return out


def prepare(rules, stage: str) -> tuple[tuple, ...]:
    """What ``run_stage`` (or ``run_delivered``/``run_end``) calls at ``stage``, made once per
    policy (its rules are a fixed tuple), not per call: ``(rule, bound hook, argument names)``
    of the rules that have the hook, in order; the names are None for a hook with the
    documented positional signature, or a plain function set on the instance (both get the
    caller's ``args`` as they are), else those it asks for (checked against HOOKS at load)."""
    hook_name = _HOOK[stage]
    out = []
    for rule in rules:
        hook = getattr(rule, hook_name, None)
        if hook is None:
            continue
        fn = getattr(hook, "__func__", None)
        names = None if fn is None else hook_parameters(fn)
        out.append((rule, hook, None if names is None or names == SIGNATURES[hook_name] else names))
    return tuple(out)


def _call(hook, names, stage: str, args: tuple):
    """Call a prepared hook that asks for its arguments by ``names`` (the callers call one
    with the documented signature, ``names`` None, themselves: ``hook(*args)``)."""
    available = _arguments(stage, args)
    return hook(**{n: available[n] for n in names})


async def run_stage(hooks, stage: str, args: tuple, trace: list[TraceEntry], *,
                    message=None, recipient: str | None = None) -> Verdict | None:
    """Call each prepared hook of ``stage`` in order (``hooks``: ``prepare``'s, kept by the
    policy); return the first decisive verdict.

    ``accept`` ends the stage early (later rules of this stage do not run) and is returned so
    the caller can tell a whitelist from "no opinion". A domain policy's ``on_mail`` hooks
    leave out the rules it inherited from the session policy (``PolicySet.own_mail``), which
    already ran them for this transaction, so no hook runs twice. The conversation does not
    call it for a stage without hooks (no coroutine to make and await for nothing).
    """
    hook_name = _HOOK[stage]
    # The transaction's results from MAIL on, the session's at CONNECT and HELO.
    tx = args[0] if stage not in ("connect", "helo") else None
    skipped = tx.skipped if tx is not None else None
    results = tx.results if tx is not None else args[0].results
    slot = _ENVELOPE.get(stage)
    # what the stage needs, decided once per call rather than per rule
    target, attr = ((tx if stage == "mail" else args[1]), slot[2]) if slot else (None, None)
    sealing = stage == "seal"
    journal = results._journal
    for rule, hook, names in hooks:
        name = rule.name
        shadow = rule.mode == "shadow"
        if skipped and name in skipped:  # tx.skip(): e.g. a sender state skips greylisting
            trace.append(TraceEntry(stage, name, "continue", f"skipped: {skipped[name]}",
                                    None, 0.0, shadow, recipient))
            continue
        if message is not None:
            mark = message.checkpoint()
            message._current_rule = name
        else:
            mark = None
        seal = None
        if sealing:  # a fresh one per hook: what it stages is its own, all or none
            seal = Seal()
            args = (args[0], seal)
        before = getattr(target, attr) if attr else None
        skips_before = dict(skipped) if shadow and skipped is not None else None
        results._current = (name, shadow)
        reported_from = len(journal)
        started = perf_counter()
        try:
            verdict = await (hook(*args) if names is None else _call(hook, names, stage, args))
            if verdict is not None and not isinstance(verdict, Verdict):
                raise TypeError(f"hook returned {type(verdict).__name__}, expected Verdict or None")
            if seal is not None:
                check_untouched(message, mark)
        except Exception as exc:  # a plugin's bug must never reach the client as a traceback
            ms = (perf_counter() - started) * 1000
            _log_crash(rule, hook_name, exc)
            if mark is not None:
                message.rollback(mark)
            if attr:
                setattr(target, attr, before)
            _undo_skips(tx, skips_before)
            trace.append(TraceEntry(stage, name, "error", f"{type(exc).__name__}: {exc}",
                                    None, ms, shadow, recipient, _reported(results, reported_from)))
            if rule.on_error == "accept" or shadow:
                continue
            return RULE_CRASHED
        finally:
            if message is not None:
                message._current_rule = None
        ms = (perf_counter() - started) * 1000
        reported = _reported(results, reported_from)
        # The trace names what the rule changed (envelope address, header edits), so a rule
        # that only rewrites, returning None, still leaves a reason; a shadow rule's changes
        # are named, then undone. (Nothing changed, the usual case: no string work.)
        if seal is not None and len(seal) and not shadow and (verdict is None or verdict.action == ACCEPT):
            message._current_rule = name  # the changes are the rule's, in the trace
            message.prepend_fields(seal.fields)  # checked when staged: cannot fail half-way
            message._current_rule = None
        changed_text = None
        edited = mark is not None and len(message.changes) > mark[1]
        moved = attr is not None and getattr(target, attr) != before
        staged_in_shadow = shadow and seal is not None and len(seal) > 0
        if edited or moved or staged_in_shadow:
            changed = []
            if moved:
                changed.append(f"{slot[0]} <{before}> -> <{getattr(target, attr)}>")
                if shadow:
                    setattr(target, attr, before)
            if edited:
                changed.append(describe_changes(message.changes[mark[1]:]))
            elif staged_in_shadow:
                changed.append(describe_changes(Change("add", name, None, value) for name, value in seal.fields))
            changed_text = "; ".join(changed) or None
        if shadow and mark is not None:
            message.rollback(mark)
        if skips_before is not None:
            _undo_skips(tx, skips_before, rule)
        if shadow and changed_text:
            log.info("shadow: rule %s would change at %s: %s (not done)", name, stage, changed_text)
        if verdict is None:
            trace.append(TraceEntry(stage, name, "continue", changed_text, None, ms, shadow,
                                    recipient, reported))
            continue
        reason = "; ".join(x for x in (verdict.reason, changed_text) if x) or None
        reply = None if verdict.action == ACCEPT else str(verdict.reply(stage))
        trace.append(TraceEntry(stage, name, verdict.action, reason, reply, ms,
                                shadow, recipient, reported))
        if shadow:
            log.info("shadow: rule %s would %s at %s: %s", name, verdict.action, stage,
                     reason or "")
            continue
        return verdict
    return None


def _reported(results, mark: int) -> str | None:
    """What the hook added to the results since ``mark``, for its trace entry."""
    results._current = None
    # the common case, nothing reported, costs no string work
    return results.since(mark) if len(results._journal) > mark else None


def _undo_skips(tx, before: dict | None, rule=None) -> None:
    """A shadow rule's ``tx.skip`` calls are logged, not done."""
    if before is None or tx.skipped == before:
        return
    if rule is not None:
        log.info("shadow: rule %s would skip %s", rule.name, ", ".join(sorted(set(tx.skipped) - set(before))))
    tx.skipped.clear()
    tx.skipped.update(before)


async def _observe(hooks, stage: str, tx, reply, trace: list[TraceEntry], keep_text: bool) -> None:
    """``on_delivered`` / ``on_end`` (``hooks``: ``prepare``'s): hooks that only observe; a
    crash is logged and traced."""
    results = tx.results
    journal = results._journal
    args = (tx, reply)
    for rule, hook, names in hooks:
        shadow = rule.mode == "shadow"
        results._current = (rule.name, shadow)
        mark = len(journal)
        started = perf_counter()
        try:
            said = await (hook(*args) if names is None else _call(hook, names, stage, args))
            action, reason = "continue", said if keep_text and isinstance(said, str) and said else None
        except Exception as exc:
            _log_crash(rule, _HOOK[stage], exc)
            action, reason = "error", f"{type(exc).__name__}: {exc}"
        ms = (perf_counter() - started) * 1000
        trace.append(TraceEntry(stage, rule.name, action, reason, None, ms, shadow, None,
                                _reported(results, mark)))


async def run_delivered(hooks, tx, reply, trace: list[TraceEntry]) -> None:
    """``on_delivered`` hooks only observe: a crash there is logged and traced, nothing else."""
    await _observe(hooks, "delivered", tx, reply, trace, keep_text=False)


def publish_outcome(tx, reply) -> None:
    """The pipeline's own events, published at the one place a transaction ends:
    ``rejected`` for each rule that refused (not in shadow mode; ``rule`` is its name), then
    ``downstream_rejected`` if the downstream refused (5xx) a recipient or the message, then
    ``delivered`` if it took the message (2xx to DATA)."""
    results = tx.results
    for e in tx.trace:
        if e.action == "reject" and not e.shadow and e.rule != "gate":
            results.pipeline_event("rejected", e.rule, e.reason)
    for stage, answer in tx.downstream_replies:
        if answer.is_permanent:
            results.pipeline_event("downstream_rejected", "downstream", f"{stage}: {answer.lines()[-1]}")
    for stage, answer in tx.downstream_replies:
        if stage == "data" and answer.is_positive:
            results.pipeline_event("delivered", "downstream", answer.lines()[-1])


async def run_disconnect(hooks, session) -> None:
    """``on_disconnect`` hooks (``prepare``'s) observe the end of a session whose CONNECT
    stage ran (to release what ``on_connect`` took, e.g. a connection slot). A crash is
    logged, nothing else: the client is gone."""
    args = (session,)
    for rule, hook, names in hooks:
        try:
            await (hook(*args) if names is None else _call(hook, names, "disconnect", args))
        except Exception as exc:
            _log_crash(rule, "on_disconnect", exc)


async def run_end(hooks, tx, reply, trace: list[TraceEntry]) -> None:
    """``on_end`` hooks observe a finished transaction (whatever its outcome; ``reply`` is the
    last reply the client got for it, None when it was abandoned). A hook may return a short
    text for the trace (what it did). A crash is logged and traced, nothing else."""
    await _observe(hooks, "end", tx, reply, trace, keep_text=True)
