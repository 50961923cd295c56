"""``smtpgate limits``: the limits rule's counters in the gate's state (SQLite or Redis).

Contributed through the ``smtpgate.commands`` entry point (pyproject.toml), the way a
third-party rule ships its own subcommand (docs/writing-rules.md)::

    smtpgate limits list [--key KIND] [--limit N] [--json]
    smtpgate limits show KIND:VALUE [--json]
    smtpgate limits reset KIND:VALUE [--json]

KIND is ``client``, ``client_net``, ``sender``, ``sender_domain``, ``recipient`` or
``connections``; VALUE is normalised as the rule keys it (``client_net:192.0.2.7`` ->
``192.0.2.0/24``, ``sender:Alice+x@Example.org`` -> ``alice@example.org``). Safe while
gates run: reads are snapshots, a reset is one delete. Exit status: 0 done, 1 the store
failed, 2 bad arguments or configuration.
"""
from __future__ import annotations

import argparse
import asyncio

from smtpgate.cli_api import UsageError, answer, json_parent, positive, table

from . import KINDS, Limits, human, utc

CONNECTIONS = "connections"
ALL_KINDS = KINDS + (CONNECTIONS,)


def add_parser(sub, common: argparse.ArgumentParser):
    """The ``smtpgate.commands`` entry point: add ``limits`` and return its handler."""
    out = json_parent()
    s = sub.add_parser("limits", parents=[common], help="rate and connection counters: list, show, reset")
    lsub = s.add_subparsers(dest="limits_command", metavar="COMMAND", required=True)
    p = lsub.add_parser("list", parents=[common, out], help="counters, the most recent first")
    p.add_argument("--key", choices=ALL_KINDS, metavar="KIND", help=f"only this kind ({', '.join(ALL_KINDS)})")
    p.add_argument("--limit", type=positive, metavar="N", help="at most N counters")
    p = lsub.add_parser("show", parents=[common, out], help="one key's counters against its limits")
    p.add_argument("key", metavar="KIND:VALUE")
    p = lsub.add_parser("reset", parents=[common, out], help="forget one key's counters (all windows)")
    p.add_argument("key", metavar="KIND:VALUE")
    return limits_command


def limits_command(args, context) -> int:
    """The handler: ``context`` is smtpgate's ``CommandContext`` (the runtime on demand)."""
    runtime = context.runtime()
    rule = (context.rules("limits") or [Limits({})])[0]  # its key normalisation and limits
    return answer(f"limits {args.limits_command}",
                  lambda: asyncio.run(_run(args, runtime.stores.limits, rule, context.now())), args.json,
                  store_errors=False)  # a StoreError: main's ``smtpgate limits: …``, exit 1


async def _run(args, store, rule, now):
    try:
        if args.limits_command == "list":
            return await _list(args, store, rule, now)
        kind, value = _key(rule, args.key)
        if args.limits_command == "show":
            return await _show(store, rule, kind, value, now)
        dropped = await store.reset(kind, value)
        return ({"key": f"{kind}:{value}", "dropped": dropped},
                f"{kind}:{value}: {dropped} {'connections' if kind == CONNECTIONS else 'counters'} dropped")
    finally:
        await store.close()


def _key(rule, text: str) -> tuple[str, str]:
    kind, sep, value = text.partition(":")
    if not sep or kind not in ALL_KINDS or not value:
        raise UsageError(f"expected KIND:VALUE with KIND one of {', '.join(ALL_KINDS)}, got {text!r}")
    normal = rule.key_for(kind, value)
    if normal is None:
        raise UsageError(f"{value!r} is not counted as a {kind}")
    return kind, normal


def _limit_of(rule, counter) -> int | None:
    return next((r.max for r in rule.rates if r.per == counter.kind and r.within == counter.window), None)


def _counter_doc(rule, c, now) -> dict:
    d = c.as_dict(now)
    d["limit"] = _limit_of(rule, c)
    d["bucket_start"], d["expires"] = utc(d["bucket_start"]), utc(d["expires"])
    return d


async def _list(args, store, rule, now):
    counters = [] if args.key == CONNECTIONS else await store.counters(args.key, limit=args.limit)
    conns = await store.connections(now=now, limit=args.limit) if args.key in (None, CONNECTIONS) else {}
    docs = [_counter_doc(rule, c, now) for c in counters]
    rows = [(d["kind"], d["value"], human(d["window"]), f"{d['estimate']:g}", d["limit"]) for d in docs]
    rows += [(CONNECTIONS, client, "-", n, rule.connections or None) for client, n in conns.items()]
    doc = {"counters": docs, "connections": [{"client": k, "count": n} for k, n in conns.items()]}
    return doc, table(rows, ("KIND", "VALUE", "WINDOW", "NOW", "LIMIT")) if rows else "no counters"


async def _show(store, rule, kind, value, now):
    key = f"{kind}:{value}"
    if kind == CONNECTIONS:
        n = (await store.connections(value, now=now)).get(value, 0)
        doc = {"key": key, "connections": n, "limit": rule.connections or None}
        return doc, f"{key}: {n} open connections" + (f" (at most {rule.connections})" if rule.connections else "")
    docs = [_counter_doc(rule, c, now) for c in await store.counters(kind, value)]
    for d in docs:
        d["passes"] = d["limit"] is None or d["estimate"] + 1 <= d["limit"]
    lines = [f"{key}:"] + [f"  {human(d['window'])}: {d['estimate']:g} in the sliding window "
                           f"(this bucket {d['current']}, the last {d['previous']})"
                           + (f", limit {d['limit']}: {'passes' if d['passes'] else 'refused'}"
                              if d["limit"] is not None else "") for d in docs]
    return {"key": key, "counters": docs}, "\n".join(lines) if docs else f"{key}: no counters"
