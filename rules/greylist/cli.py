"""``smtpgate greylist``: look into and steer the greylist state of a running gate fleet.

Reads gate.yaml's ``state:`` (SQLite or Redis) and the policies; a triplet is keyed exactly
as the greylist rule of the policy governing its recipient keys it (its prefix lengths,
pooled domains and normalisation), because the command asks that very rule instance.
Safe while gates run: SQLite in WAL mode, every write a short transaction; Redis with
atomic scripts and SCAN.

Contributed by the greylist rule through the ``smtpgate.commands`` entry point
(pyproject.toml), as a third-party rule ships its own command (docs/writing-rules.md).

Exit status: 0 done, 1 the store failed, 2 bad arguments or configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress

from smtpgate import Session, duration
from smtpgate.cli_api import (GreylistSelector, UsageError, answer, json_parent, make_allow, positive, table,
                              triplet_value, utc)

RULE_NAME = "greylist"
DEFAULT_AUTO_WHITELIST_AFTER = 5


# --- argument parsing ---------------------------------------------------------------------

def add_parser(sub, common: argparse.ArgumentParser):
    """The ``smtpgate.commands`` entry point: add ``greylist`` and return its handler."""
    g = sub.add_parser("greylist", parents=[common], help="greylist entries: list, show, allow, "
                                                          "delete, purge, stats")
    gsub = g.add_subparsers(dest="greylist_command", metavar="COMMAND", required=True)
    out = json_parent()

    p = gsub.add_parser("list", parents=[common, out], help="greylist entries")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--pending", dest="state", action="store_const", const="pending",
                       help="only triplets still waiting for their retry")
    state.add_argument("--passed", dest="state", action="store_const", const="passed",
                       help="only triplets that passed and have not expired")
    state.add_argument("--allowed", dest="state", action="store_const", const="allowed",
                       help="the allow list instead of the triplets")
    p.add_argument("--client", metavar="IP|CIDR", help="entries of clients in this network "
                                                       "(or domain:DOMAIN for pooled senders)")
    p.add_argument("--sender", metavar="ADDR", help="this sender (normalised), or @DOMAIN")
    p.add_argument("--recipient", metavar="ADDR")
    p.add_argument("--limit", type=positive, metavar="N", help="at most N entries, most recent first")

    p = gsub.add_parser("show", parents=[common, out],
                        help="one triplet as the gate keys it, and what it would answer now")
    p.add_argument("client", metavar="CLIENT", help="the client IP address")
    p.add_argument("sender", metavar="SENDER", help="the envelope sender (<> for the null sender)")
    p.add_argument("recipient", metavar="RECIPIENT")

    for name, text in (("allow", "let a client, sender or triplet through without delay"),
                       ("delete", "forget triplets and allow entries")):
        p = gsub.add_parser(name, parents=[common, out], help=text)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--client", metavar="IP|CIDR")
        which.add_argument("--sender", metavar="ADDR|@DOMAIN")
        which.add_argument("--triplet", nargs=3, metavar=("CLIENT", "SENDER", "RECIPIENT"))
        if name == "allow":
            p.add_argument("--ttl", metavar="DURATION", help="how long (default: until deleted)")
            p.add_argument("--note", default="", metavar="TEXT", help="why (shown by list --allowed)")

    p = gsub.add_parser("purge", parents=[common, out], help="drop expired entries")
    p.add_argument("--dry-run", action="store_true", help="only count them")

    gsub.add_parser("stats", parents=[common, out], help="pending, passed, auto-whitelisted, pass "
                                                         "rate, retry delays")
    return greylist_command


# --- running ---------------------------------------------------------------------------

def greylist_command(args, context) -> int:
    """The handler: ``context`` is smtpgate's ``CommandContext`` (the runtime on demand)."""
    context.runtime()  # a configuration error is reported (exit 2) before anything else
    return answer(f"greylist {args.greylist_command}", lambda: asyncio.run(_run(args, context)), args.json)


async def _run(args, context):
    stores = context.runtime().stores
    try:
        handler = {"list": _list, "show": _show, "allow": _allow, "delete": _delete,
                   "purge": _purge, "stats": _stats}[args.greylist_command]
        return await handler(args, context, stores.greylist, context.now())
    finally:
        await stores.close()


# --- helpers ---------------------------------------------------------------------------

def _any_rule(context):
    """The default policy's greylist rule (else another policy's), or None."""
    found = context.rules(RULE_NAME)
    return found[0] if found else None


def _rule_for(context, recipient: str):
    """(policy, greylist rule or None) for the recipient's domain; (None, None) if ungoverned."""
    policy = context.policy_for(recipient)
    if policy is None:
        return None, None
    return policy, next((r for r in policy.rules if r.name == RULE_NAME), None)


def _sender_arg(text: str) -> str:
    text = text.strip()
    return "" if text in ("<>", "") else text


def _normalise_sender(context, sender: str) -> str:
    sender = _sender_arg(sender)
    if sender.startswith("@"):
        return sender.lower()
    rule = _any_rule(context)
    return rule.normalise_sender(sender) if rule is not None else sender.lower()


def _client_selector(text: str) -> str:
    if text.lower().startswith("domain:"):
        return text.lower()
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise UsageError(f"--client: expected an IP address or network (or domain:DOMAIN), got {text!r}") from None


def _triplet_key(context, client: str, sender: str, recipient: str) -> tuple[str, str, str]:
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise UsageError(f"expected the client's IP address, got {client!r}") from None
    if "@" not in recipient:
        raise UsageError(f"expected a recipient address, got {recipient!r}")
    policy, rule = _rule_for(context, recipient)
    if rule is None:
        rule = _any_rule(context)
    if rule is None:
        raise UsageError("no policy uses the greylist rule, so there is no key to compute")
    return rule.key_for(client, _sender_arg(sender), recipient)


def _entry_doc(e, now) -> dict:
    return {"client": e.client, "sender": e.sender or "<>", "recipient": e.recipient,
            "state": e.state(now), "first_seen": utc(e.first_seen), "last_seen": utc(e.last_seen),
            "attempts": e.attempts, "passed_at": utc(e.passed_at), "retry_delay": e.retry_delay,
            "expires": utc(e.expires)}


def _allow_doc(a) -> dict:
    return {"kind": a.kind, "value": a.value, "created": utc(a.created), "expires": utc(a.expires),
            "note": a.note}


def _selector(args, context):
    if args.client:
        return GreylistSelector(client=_client_selector(args.client))
    if args.sender:
        return GreylistSelector(sender=_normalise_sender(context, args.sender) or "<>")
    client, sender, recipient = _triplet_key(context, *args.triplet)
    return GreylistSelector(client=client, sender=sender or "<>", recipient=recipient)


# --- commands ----------------------------------------------------------------------------

async def _list(args, context, store, now):
    if args.state == "allowed":
        allowed = await store.allow_entries()
        if args.limit:
            allowed = allowed[:args.limit]
        docs = [_allow_doc(a) for a in allowed]
        rows = [(d["kind"], d["value"], d["created"], d["expires"] or "never", d["note"]) for d in docs]
        text = table(rows, ("KIND", "VALUE", "CREATED", "EXPIRES", "NOTE")) if rows else "no allow entries"
        return {"allowed": docs, "count": len(docs)}, text
    selector = GreylistSelector(state=args.state,
                        client=_client_selector(args.client) if args.client else None,
                        sender=(_normalise_sender(context, args.sender) or "<>") if args.sender else None,
                        recipient=args.recipient.lower() if args.recipient else None)
    entries = await store.entries(selector, now, args.limit)
    docs = [_entry_doc(e, now) for e in entries]
    rows = [(d["client"], d["sender"], d["recipient"], d["first_seen"], d["last_seen"], d["attempts"],
             d["state"], d["expires"]) for d in docs]
    text = (table(rows, ("CLIENT", "SENDER", "RECIPIENT", "FIRST SEEN", "LAST SEEN", "ATTEMPTS", "STATE",
                         "EXPIRES")) + f"\n{len(docs)} entr{'y' if len(docs) == 1 else 'ies'}") \
        if rows else "no entries"
    return {"entries": docs, "count": len(docs), "limit": args.limit}, text


async def _show(args, context, store, now):
    try:
        ipaddress.ip_address(args.client)
    except ValueError:
        raise UsageError(f"expected the client's IP address, got {args.client!r}") from None
    if "@" not in args.recipient:
        raise UsageError(f"expected a recipient address, got {args.recipient!r}")
    sender = _sender_arg(args.sender)
    policy, rule = _rule_for(context, args.recipient)
    doc: dict = {"client": args.client, "sender": sender or "<>", "recipient": args.recipient,
                 "policy": policy.name if policy else None, "now": utc(now)}
    if policy is None:
        doc.update(answer="554 5.7.1 Relay access denied (no policy governs this domain)", greylisted=False)
        return doc, _show_text(doc)
    if rule is None:
        doc.update(answer=f"not greylisted: policy {policy.name} has no greylist rule", greylisted=False)
        return doc, _show_text(doc)
    doc["greylisted"] = True
    doc["mode"] = rule.mode
    session = Session("cli", args.client)
    doc.update(await rule.explain(args.client, sender, args.recipient, now=now, session=session))
    if doc.get("allow"):
        doc["allow"] = {**doc["allow"], "created": utc(doc["allow"]["created"]),
                        "expires": utc(doc["allow"]["expires"])}
    key = doc["key"]
    entry = await store.get(key["client"], key["sender"], key["recipient"])
    doc["entry"] = _entry_doc(entry, now) if entry else None
    key["sender"] = key["sender"] or "<>"
    return doc, _show_text(doc)


def _show_text(doc) -> str:
    lines = [f"triplet as received: {doc['client']} {doc['sender']} {doc['recipient']}",
             f"policy:              {doc['policy'] or '- (no policy governs the domain)'}"]
    key = doc.get("key")
    if key:
        lines.append(f"key:                 {key['client']} {key['sender']} {key['recipient']}")
    entry = doc.get("entry")
    if key is not None:
        if entry:
            lines.append(f"stored:              {entry['state']}, {entry['attempts']} attempt(s), first "
                         f"{entry['first_seen']}, last {entry['last_seen']}, expires {entry['expires']}"
                         + (f", passed {entry['passed_at']}" if entry.get("passed_at") else ""))
        elif doc.get("outcome") != "exempt":
            lines.append("stored:              nothing (never seen, or forgotten)")
        if doc.get("allow"):
            a = doc["allow"]
            lines.append(f"allow entry:         {a['kind']} {a['value']} until {a['expires'] or 'deleted'}")
        if doc.get("reason"):
            lines.append(f"exempt:              {doc['reason']}")
        if doc.get("passed_count") is not None:
            lines.append(f"client's passes:     {doc['passed_count']} live passed triplet(s) "
                         f"(auto-whitelist at {doc['options']['auto_whitelist_after']})")
        lines.append(f"decision now:        {doc.get('outcome')}"
                     + (" (rule in shadow mode: logged only)" if doc.get("mode") == "shadow" else ""))
    lines.append(f"answer now:          {doc['answer']}")
    if doc.get("passes_from"):
        lines.append(f"passes from:         {doc['passes_from']}")
    return "\n".join(lines)


async def _allow(args, context, store, now):
    ttl = None
    if args.ttl is not None:
        try:
            ttl = duration(args.ttl)
        except ValueError as e:
            raise UsageError(f"--ttl: {e}") from None
    if args.client and _client_selector(args.client).startswith("domain:"):
        raise UsageError("--client takes an IP address or network")
    try:
        if args.client:
            entry = make_allow("client", _client_selector(args.client), now, ttl, args.note)
        elif args.sender:
            sender = _normalise_sender(context, args.sender)
            if sender and "@" not in sender:
                raise UsageError(f"--sender: expected ADDR or @DOMAIN, got {args.sender!r}")
            entry = make_allow("sender", sender or "<>", now, ttl, args.note)
        else:
            entry = make_allow("triplet", triplet_value(*_triplet_key(context, *args.triplet)), now, ttl, args.note)
    except ValueError as e:
        raise UsageError(str(e)) from None
    await store.add_allow(entry)
    doc = _allow_doc(entry)
    until = f"until {doc['expires']}" if doc["expires"] else "until deleted"
    return {"allowed": doc}, f"allowed {entry.kind} {entry.value} {until}"


async def _delete(args, context, store, now):
    triplets, allows = await store.delete(_selector(args, context))
    doc = {"deleted": {"triplets": triplets, "allow_entries": allows}}
    return doc, f"deleted {triplets} triplet(s) and {allows} allow entr{'y' if allows == 1 else 'ies'}"


async def _purge(args, context, store, now):
    triplets, allows = await store.purge(now, dry_run=args.dry_run)
    counts = {"triplets": triplets, "allow_entries": allows}
    verb = "would purge" if args.dry_run else "purged"
    doc = {"dry_run": args.dry_run, "would_purge" if args.dry_run else "purged": counts}
    return doc, f"{verb} {triplets} expired triplet(s) and {allows} expired allow entr{'y' if allows == 1 else 'ies'}"


async def _stats(args, context, store, now):
    rule = _any_rule(context)
    threshold = rule.auto_whitelist_after if rule is not None else DEFAULT_AUTO_WHITELIST_AFTER
    st = await store.stats(now, threshold)
    doc = st.as_dict()
    doc["auto_whitelist_after"] = threshold
    rate = "-" if doc["pass_rate"] is None else f"{doc['pass_rate'] * 100:.1f}%"
    lines = [table([("pending", doc["pending"]), ("passed", doc["passed"]), ("expired (not purged)", doc["expired"]),
                    (f"auto-whitelisted clients (>= {threshold} passes)", doc["auto_whitelisted"]),
                    ("allow entries", doc["allow_entries"]), ("pass rate (passed / greylisted)", rate)],
                   ("COUNT", "VALUE")),
             "", table([(k, v) for k, v in doc["outcomes"].items()], ("OUTCOME", "TOTAL")),
             "", table([(k, v) for k, v in doc["retry_delays"].items()], ("RETRY DELAY", "PASSES"))]
    return doc, "\n".join(lines)
