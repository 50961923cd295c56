"""``smtpgate try``: one message through the whole pipeline, offline, stage by stage."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from ..mail.addresses import AddressError
from ..errors import ConfigError, PluginError
from ..runtime.gate import Gate
from ..runtime.loading import load_runtime
from ..smtp.offline import simulate
from ..testing import FakeRelay
from ..mail.reply import Reply

OFFLINE_QUEUED = Reply(250, "Ok: would be relayed (offline: the downstream decides)", "2.0.0")


def try_command(args, config_path: str | None) -> int:
    try:
        runtime = load_runtime(config_path, scratch_state=True)
    except (ConfigError, PluginError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    try:
        with open(args.message, "rb") as f:
            raw = f.read()
    except OSError as e:
        print(f"smtpgate try: {args.message}: {e.strerror}", file=sys.stderr)
        return 1
    from ..smtp.datadecoder import normalise_line_ends  # the same CRLF rule the server applies
    raw = normalise_line_ends(raw)
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    gate = Gate(runtime, relay_factory=lambda g: FakeRelay({"data": OFFLINE_QUEUED}))
    try:
        result = asyncio.run(simulate(gate, raw, args.sender, args.recipients,
                                      client_ip=args.client_ip, helo=args.helo))
    except AddressError as e:
        print(f"smtpgate try: bad address: {e}", file=sys.stderr)
        return 2
    if args.json:
        doc = {
            "reply": str(result.reply),
            "replies": {k: ([str(r) for r in v] if isinstance(v, list) else str(v))
                        for k, v in result.replies.items()},
            "policy": getattr(result.transaction.policy, "name", None) if result.transaction else None,
            "trace": [e.as_dict() for e in result.trace],
            "results": _results(result),
            "changes": [dataclasses.asdict(c) for c in _changes(result)],
        }
        if args.show_message and result.message is not None:
            doc["message"] = result.message.decode("utf-8", "surrogateescape")
        print(json.dumps(doc, indent=2, default=str))
        return 0
    _print_table(result, args)
    return 0


def _print_table(result, args) -> None:
    rows = [("STAGE", "RULE", "VERDICT", "MS", "REASON / REPLY")]
    for e in result.trace:
        verdict = ("shadow:" if e.shadow else "") + e.action
        detail = " — ".join(x for x in (e.recipient, e.reason, e.reply, e.result) if x)
        rows.append((e.stage, e.rule, verdict, f"{e.ms:.2f}", detail))
    if len(rows) == 1:
        rows.append(("-", "-", "no rule ran", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    print()
    policy = result.transaction.policy.name if result.transaction and result.transaction.policy else "-"
    print(f"policy: {policy}")
    for stage in ("mail", "rcpt", "data"):
        value = result.replies.get(stage)
        if value is None:
            continue
        for reply in value if isinstance(value, list) else [value]:
            print(f"{stage:5} -> {str(reply).splitlines()[-1]}")
    print(f"client would get: {str(result.reply).splitlines()[-1]}")
    for rule, record in _results(result).items():
        said = "; ".join(f"{k}: {', '.join(record[k])}" for k in ("fail", "err", "pass", "skip", "msg") if k in record)
        events = f" (events: {', '.join(record['events'])})" if record.get("events") else ""
        shadow = " [shadow]" if record.get("shadow") else ""
        print(f"result of {rule}{shadow}: {said or '-'}{events}")
    for c in _changes(result):
        print(f"change by {c.rule or '-'}: {c.op} {c.header}: {c.before!r} -> {c.after!r}")
    if args.show_message and result.message is not None:
        print("\n--- message as relayed ---")
        sys.stdout.write(result.message.decode("utf-8", "surrogateescape"))


def _results(result) -> dict:
    """Each rule's record (``tx.results``, the session's first), as the JSON log line has it."""
    tx = result.transaction
    if tx is None:
        return {}
    return {**tx.session.results.as_dict(), **tx.results.as_dict()}


def _changes(result) -> list:
    """The message's recorded edits (op, header, before, after, rule), in order."""
    tx = result.transaction
    return list(tx.message.changes) if tx is not None and tx.message is not None else []
