"""``smtpgate quarantine``: list, show, release, delete and purge held messages.

Reads gate.yaml's ``quarantine:`` (the Maildir) and, for ``release``, ``downstream:``.
``release`` relays the original bytes with the original envelope (sender, its MAIL
parameters, the recipients) to the downstream, passing the original client with XCLIENT
the way the gate would have, and records the attempt in the message's sidecar; a message
already released is sent again only with ``--force``. An ID may be given as the full id, a
unique prefix of it, or the transaction id the gate logged (``tx=``). ``purge`` deletes the
messages (held or released) older than ``quarantine_keep`` or ``--older-than``, as the gate
itself does at start-up and daily.

Exit status: 0 done, 1 not found / busy / the downstream refused or failed, 2 bad arguments
or configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from datetime import datetime, timezone

from .common import json_parent, positive


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """Register ``quarantine`` and its commands on the main parser's subparsers."""
    q = sub.add_parser("quarantine", parents=[common],
                       help="held messages: list, show, release, delete, purge")
    qsub = q.add_subparsers(dest="quarantine_command", metavar="COMMAND", required=True)
    out = json_parent()

    p = qsub.add_parser("list", parents=[common, out], help="held and released messages")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--held", dest="status", action="store_const", const="held",
                       help="only messages not released yet")
    which.add_argument("--released", dest="status", action="store_const", const="released",
                       help="only released messages")
    p.add_argument("--limit", type=positive, metavar="N", help="the N most recent")

    p = qsub.add_parser("show", parents=[common, out],
                        help="one message: envelope, client, reason, trace, releases")
    p.add_argument("id", metavar="ID")
    p.add_argument("--message", action="store_true", help="also print the message itself")

    p = qsub.add_parser("release", parents=[common, out],
                        help="relay one message to the downstream with its original envelope")
    p.add_argument("id", metavar="ID")
    p.add_argument("--force", action="store_true", help="send it again even if released before")

    p = qsub.add_parser("delete", parents=[common, out], help="remove one message for good")
    p.add_argument("id", metavar="ID")

    p = qsub.add_parser("purge", parents=[common, out],
                        help="remove the messages older than the retention (quarantine_keep)")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="instead of quarantine_keep, e.g. 7d, 12h")
    p.add_argument("--dry-run", action="store_true", help="only count (and list with --json)")


def _duration(text: str) -> float:
    from ..units import parse_duration
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration above zero, got {text!r}")
    return seconds


class Failed(Exception):
    """Exit 1 with this message (and, for --json, a document saying so)."""

    def __init__(self, message: str, doc: dict | None = None):
        super().__init__(message)
        self.doc = doc


def quarantine_command(args, config_path: str | None) -> int:
    from ..config import find_config_path, load_gate_config
    from ..errors import ConfigError, StoreError
    from ..stores.quarantine import MaildirQuarantine
    try:
        config = load_gate_config(find_config_path(config_path))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    store = MaildirQuarantine(config.quarantine, mode=config.quarantine_mode)
    handler = {"list": _list, "show": _show, "release": _release, "delete": _delete,
               "purge": _purge}
    try:
        doc, text = handler[args.quarantine_command](args, store, config)
    except (KeyError, StoreError, Failed) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"smtpgate quarantine {args.quarantine_command}: {message}", file=sys.stderr)
        if args.json and isinstance(e, Failed) and e.doc is not None:
            print(json.dumps(e.doc, indent=2, ensure_ascii=False))
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    elif isinstance(text, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(text)
    else:
        print(text)
    return 0


# --- commands ------------------------------------------------------------------------------
_SUMMARY = ("id", "stored", "status", "tx", "client_ip", "sender", "recipients", "size", "reason",
            "delivered")


def _list(args, store, config):
    items = store.list()
    if args.status:
        items = [m for m in items if m["status"] == args.status]
    if args.limit:
        items = items[-args.limit:]
    doc = {"quarantine": config.quarantine,
           "messages": [{k: _iso(m.get(k)) if k == "stored" else m.get(k) for k in _SUMMARY}
                        for m in items]}
    rows = [(m["id"], _iso(m.get("stored")), m["status"], m.get("sender"),
             ",".join(m.get("recipients") or []), m.get("size"), _short(m.get("reason"), 60))
            for m in items]
    text = _table(rows, ("ID", "STORED", "STATUS", "FROM", "TO", "SIZE", "REASON")) if rows \
        else f"no messages in {config.quarantine}"
    return doc, text


def _show(args, store, config):
    qid = store.find(args.id)
    meta, raw = store.get(qid)
    meta = dict(meta, stored=_iso(meta.get("stored")))
    if args.json:
        if args.message:
            meta["message"] = raw.decode("utf-8", "surrogateescape")
        return meta, ""
    lines = [f"{k + ':':14} {_fmt(meta.get(k))}" for k in
             ("id", "status", "stored", "tx", "client_ip", "client_name", "helo", "sender",
              "recipients", "policy", "reason", "delivered", "size", "file")]
    verdict = meta.get("verdict") or {}
    if verdict:
        lines.append(f"{'reply:':14} {verdict.get('code') or '-'} {verdict.get('enhanced') or ''} "
                     f"{verdict.get('text') or ''}".rstrip())
    trace = meta.get("trace") or []
    if trace:
        lines += ["", "trace:"]
        rows = [(e.get("stage"), e.get("rule"), ("shadow:" if e.get("shadow") else "") + str(e.get("action")),
                 _short(e.get("reason") or e.get("reply") or "", 100)) for e in trace]
        lines.append(_table(rows, ("STAGE", "RULE", "ACTION", "REASON")))
    for r in meta.get("releases") or []:
        lines.append(f"\nrelease {_iso(r.get('at'))} by {r.get('by')}: "
                     f"{'ok' if r.get('ok') else 'failed'} — {r.get('reply')}")
    text = "\n".join(lines) + "\n"
    if args.message:
        return meta, text.encode("utf-8") + b"\n--- message ---\n" + raw
    return meta, text.rstrip("\n")


def _release(args, store, config):
    qid = store.find(args.id)
    with store.lock(qid):
        meta, raw = store.get(qid)
        if meta.get("status") == "released" and not args.force:
            raise Failed(f"{qid} was released already (use --force to send it again)")
        if not meta.get("recipients"):
            raise Failed(f"{qid} has no recipients recorded")
        result = asyncio.run(relay(config, meta, raw))
        attempt = {"at": time.time(), "by": _user(), **result}
        store.record_release(qid, attempt)
    doc = {"id": qid, **attempt, "at": _iso(attempt["at"])}
    if not result["ok"]:
        raise Failed(f"{qid} not released: {result['reply']}", doc)
    accepted = [r for r, rep in result["recipients"].items() if rep.startswith("2")]
    return doc, f"released {qid} to {', '.join(accepted)}: {result['reply']}"


def _delete(args, store, config):
    qid = store.find(args.id)
    with store.lock(qid):
        store.delete(qid)
    return {"id": qid, "deleted": True}, f"deleted {qid}"


def _purge(args, store, config):
    from ..units import format_duration
    keep = args.older_than or config.quarantine_keep
    if not keep:
        doc = {"quarantine": config.quarantine, "older_than": None, "dry_run": args.dry_run,
               "purged": 0, "ids": []}
        return doc, "quarantine_keep is 0 (keep for ever): nothing purged; use --older-than"
    gone = store.purge(keep, dry_run=args.dry_run)
    doc = {"quarantine": config.quarantine, "older_than": keep, "dry_run": args.dry_run,
           "purged": len(gone), "ids": gone}
    verb = "would purge" if args.dry_run else "purged"
    return doc, (f"{verb} {len(gone)} message{'' if len(gone) == 1 else 's'} older than "
                 f"{format_duration(keep)} from {config.quarantine}")


async def relay(config, meta: dict, raw: bytes) -> dict:
    """Send one held message downstream as its original client sent it. Never raises for
    downstream trouble: the result says what happened (``ok``, every reply)."""
    from ..mail.session import Session, new_id
    from ..errors import RelayError
    from ..smtp.relay import Downstream
    session = Session(new_id(), meta.get("client_ip") or "127.0.0.1", int(meta.get("client_port") or 0),
                      meta.get("client_name"), meta.get("helo"), bool(meta.get("esmtp", True)),
                      bool(meta.get("tls", False)), meta.get("proto") or "ESMTP")
    params = list(meta.get("sender_params") or [])
    utf8 = "SMTPUTF8" in (p.upper() for p in params)
    out = {"ok": False, "mail": None, "recipients": {}, "reply": None}
    downstream = Downstream(config.downstream, config.hostname)
    try:
        await downstream.open(session)
        reply = await downstream.mail(f"<{meta.get('sender') or ''}>", params, meta.get("tx"), utf8)
        out["mail"] = out["reply"] = str(reply)
        if not reply.is_positive:
            return out
        for rcpt in meta["recipients"]:
            out["recipients"][rcpt] = str(await downstream.rcpt(f"<{rcpt}>", [], utf8))
        if not any(r.startswith("2") for r in out["recipients"].values()):
            out["reply"] = "no recipient accepted"
            await downstream.reset()
            return out
        reply = await downstream.data(_without_forgeries(raw, config.auth_id))
        out["reply"], out["ok"] = str(reply), reply.is_positive
    except RelayError as exc:
        out["reply"] = f"{exc.reply} ({exc})"
    finally:
        await downstream.close()
    return out


def _without_forgeries(raw: bytes, hostname: str) -> bytes:
    """The held bytes are the message as received; what leaves for the mailbox loses the
    Authentication-Results fields forged with our authserv-id, as at DATA (RFC 8601 §5)."""
    from ..mail.message import Message
    message = Message(raw)
    message.remove_authentication_results(hostname)
    return message.raw


# --- formatting ----------------------------------------------------------------------------
def _iso(t) -> str | None:
    if not isinstance(t, (int, float)):
        return t
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _short(text, limit: int) -> str:
    text = str(text or "").replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(rows, header) -> str:
    rows = [tuple("-" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header, *rows])


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "?"
