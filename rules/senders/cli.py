"""``smtpgate senders``: look into and steer the per-sender state machines of a gate fleet.

Reads gate.yaml's ``state:`` (SQLite or Redis) and the policies. The machine is the one of
the ``default`` policy's machine rule (``senders``, or a plugin's ``MachineRule``), or the one
``--machine NAME`` / ``--policy NAME`` picks; a KEY is normalised as that rule keys it
(``Alice+x@Example.org`` -> ``alice@example.org``, ``192.0.2.7`` -> ``192.0.2.0/24`` for
``client_net``). Safe while gates run: every write is one atomic store update.

Contributed by the senders rule through the ``smtpgate.commands`` entry point
(pyproject.toml); it serves every ``smtpgate.MachineRule``, a plugin's too.

Exit status: 0 done (``list`` with no machine in any policy lists nothing), 1 the store
failed, 2 bad arguments or configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import copy

from smtpgate import MachineError, MachineRule
from smtpgate.cli_api import UsageError, answer, json_parent, positive, table, utc


def add_parser(sub, common: argparse.ArgumentParser):
    """The ``smtpgate.commands`` entry point: add ``senders`` and return its handler."""
    s = sub.add_parser("senders", parents=[common], help="sender state machines: list, show, set, reset, graph")
    ssub = s.add_subparsers(dest="senders_command", metavar="COMMAND", required=True)
    out = json_parent()
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--machine", metavar="NAME", help="the machine (default: the default policy's)")
    which.add_argument("--policy", metavar="NAME", help="the machine of this policy's rules")

    p = ssub.add_parser("list", parents=[common, out, which], help="tracked keys: state, since, event counts")
    p.add_argument("--state", metavar="STATE", help="only keys in this state")
    p.add_argument("--limit", type=positive, metavar="N", help="at most N keys, most recently seen first")

    p = ssub.add_parser("show", parents=[common, out, which], help="one key's state and history")
    p.add_argument("key", metavar="KEY")

    p = ssub.add_parser("set", parents=[common, out, which], help="move a key to a state by hand")
    p.add_argument("key", metavar="KEY")
    p.add_argument("state", metavar="STATE")
    p.add_argument("--reason", default="set by hand", metavar="TEXT", help="recorded in the key's history")

    p = ssub.add_parser("reset", parents=[common, out, which], help="forget a key (it starts again)")
    p.add_argument("key", metavar="KEY")

    ssub.add_parser("graph", parents=[common, which], help="the machine as Graphviz DOT")
    return senders_command


def senders_command(args, context) -> int:
    """The handler: ``context`` is smtpgate's ``CommandContext`` (the runtime on demand)."""
    runtime = context.runtime()

    def work():
        if _nothing_to_list(args, context):
            asyncio.run(runtime.stores.close())
            return ({"machine": None, "key_kind": None, "keys": [], "count": 0},
                    "no keys (no policy uses a sender state machine)")
        rule = machine_rule(context, args.machine, args.policy)
        if args.senders_command == "graph":
            print(rule.machine.to_dot(), end="")
            return None
        return asyncio.run(_run(args, runtime, rule, context.now()))
    return answer(f"senders {args.senders_command}", work, getattr(args, "json", False))


def _nothing_to_list(args, context) -> bool:
    """``list`` with no machine anywhere (and none asked for by name) is an empty listing,
    as ``greylist list`` is for a state nothing wrote to."""
    return (args.senders_command == "list" and args.machine is None and args.policy is None
            and not machine_rules(context))


def machine_rules(context) -> list:
    """Machine rule instances, the default policy's first, one per machine name."""
    found, names = [], set()
    for policy, rule in context.policy_rules(lambda r: isinstance(r, MachineRule)):
        if rule.machine.name not in names:
            names.add(rule.machine.name)
            found.append((policy, rule))
    return found


def machine_rule(context, machine: str | None, policy: str | None):
    runtime = context.runtime()
    found = machine_rules(context)
    if not found:
        raise UsageError("no policy uses a sender state machine (the senders rule)")
    if policy is not None:
        if runtime.policies.get(policy) is None:
            raise UsageError(f"no policy named {policy!r} (policies: {', '.join(p.name for p in runtime.policies)})")
        own = [r for r in runtime.policies.get(policy).rules if isinstance(r, MachineRule)]
        found = [(runtime.policies.get(policy), r) for r in own]
        if not found:
            raise UsageError(f"policy {policy!r} has no sender state machine")
    if machine is not None:
        chosen = [r for _, r in found if r.machine.name == machine]
        if not chosen:
            raise UsageError(f"no machine named {machine!r} (machines: {', '.join(r.machine.name for _, r in found)})")
        return chosen[0]
    return found[0][1]


async def _run(args, runtime, rule, now: float):
    try:
        handler = {"list": _list, "show": _show, "set": _set, "reset": _reset}[args.senders_command]
        return await handler(args, rule, runtime.stores.senders, now)
    finally:
        await runtime.stores.close()


def _key(rule, text: str) -> str:
    key = rule.normalise_key(text)
    if key is None:
        raise UsageError(f"{text!r} is not a {rule.key} key")
    return key


def _counts(counts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


def _change_doc(c) -> dict:
    d = c.as_dict()
    d["at"] = utc(d["at"])
    return d


# --- commands ----------------------------------------------------------------------------

async def _list(args, rule, store, now):
    machine = rule.machine
    if args.state is not None and args.state not in machine.states:
        raise UsageError(f"unknown state {args.state!r} (states: {', '.join(machine.states)})")
    docs = []
    # Decays are applied on reading, so a state filter is checked after them.
    for rec in await store.records(machine.name):
        rec = machine.settle(rec, now)
        if rec is None or (args.state is not None and rec.state != args.state):
            continue
        docs.append({"key": rec.key, "state": rec.state, "since": utc(rec.since), "last_event": utc(rec.seen),
                     "counts": dict(rec.counts)})
        if args.limit and len(docs) >= args.limit:
            break
    rows = [(d["key"], d["state"], d["since"], d["last_event"], _counts(d["counts"])) for d in docs]
    text = (table(rows, ("KEY", "STATE", "SINCE", "LAST EVENT", "EVENTS")) +
            f"\n{len(docs)} key{'' if len(docs) == 1 else 's'}") if rows else "no keys"
    return {"machine": machine.name, "key_kind": rule.key, "keys": docs, "count": len(docs)}, text


async def _show(args, rule, store, now):
    machine = rule.machine
    key = _key(rule, args.key)
    stored = await store.get(machine.name, key)
    rec = machine.settle(copy.deepcopy(stored), now)
    does = rule.describe_state(rec.state if rec else machine.initial) if hasattr(rule, "describe_state") else []
    doc = {"machine": machine.name, "key_kind": rule.key, "key": key, "tracked": rec is not None,
           "state": rec.state if rec else machine.initial, "does": does, "now": utc(now)}
    if rec is not None:
        doc.update(since=utc(rec.since), last_event=utc(rec.seen), first_seen=utc(rec.created),
                   forgotten_after=utc(rec.expires), counts=dict(rec.counts),
                   history=[_change_doc(c) for c in rec.history])
        if rec.state in machine.decay:
            ttl, target = machine.decay[rec.state]
            doc["decays"] = {"to": target, "at": utc(max(rec.since, rec.seen) + ttl)}
    lines = [f"key:         {key} ({rule.key}, machine {machine.name})",
             f"state:       {doc['state']}" + ("" if rec else " (not tracked: every key starts here)")]
    if does:
        lines.append(f"does:        {'; '.join(does)}")
    if rec is not None:
        lines += [f"since:       {doc['since']}", f"last event:  {doc['last_event']}",
                  f"events:      {_counts(rec.counts)}"]
        if "decays" in doc:
            lines.append(f"decays to:   {doc['decays']['to']} at {doc['decays']['at']} unless an event comes first")
        lines.append(f"forgotten:   {doc['forgotten_after']} unless an event comes first")
        if rec.history:
            rows = [(h["at"], h["event"], h["from"] or "-", h["to"], h["rule"], h["why"]) for h in doc["history"]]
            lines += ["", table(rows, ("WHEN", "EVENT", "FROM", "TO", "RULE", "WHY"))]
    return doc, "\n".join(lines)


async def _set(args, rule, store, now):
    machine = rule.machine
    key = _key(rule, args.key)
    if any(c in args.reason for c in "\r\n\x00"):
        raise UsageError("--reason must be one line")
    try:
        change = await machine.move(store, key, args.state, now, args.reason, "cli")
    except MachineError as e:
        raise UsageError(e.message) from None
    doc = {"machine": machine.name, "key": key, "changed": _change_doc(change)}
    return doc, f"{key}: {change.src} -> {change.dst} ({args.reason})"


async def _reset(args, rule, store, now):
    key = _key(rule, args.key)
    gone = await store.delete(rule.machine.name, key)
    doc = {"machine": rule.machine.name, "key": key, "forgotten": gone}
    return doc, f"{key}: forgotten (starts again in {rule.machine.initial})" if gone else f"{key}: was not tracked"
