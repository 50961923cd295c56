"""limits: rates per client, client network, sender, sender domain and recipient over sliding
windows, and concurrent connections per client — counted in the gate's state store, so
every gate on one Redis limits together.

- CONNECT: ``connections: N`` — the N+1th concurrent connection of one client address gets
  ``421 4.7.0`` and is closed at once (not delayed to MAIL: a 421 closes the channel).
  The slot is given back when the session ends (``on_disconnect``); a gate that dies
  leaks it for ``connection_ttl`` at most (a live session refreshes its slot at MAIL).
- MAIL: the rates ``per`` ``client``, ``client_net``, ``sender``, ``sender_domain``.
- RCPT: the rates ``per`` ``recipient``.
Past a rate: ``451 4.7.1`` with the time the window lets one more through. A refused
attempt is not counted, and the rates of one stage pass (and count) together or not at all.
How a window slides (two weighted fixed buckets, O(1) per check): smtpgate/stores/limits.py.

Written only against the public plugin API; the counters are ``self.gate.stores.limits``.
Documentation: docs/rules/limits.md. CLI: ``smtpgate limits`` (cli.py).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from smtpgate import (Option, OptionError, Rule, StoreError, Verdict, client_key, duration, integer,
                      list_of, prefix_length, sender_key, string)

KINDS = ("client", "client_net", "sender", "sender_domain", "recipient")
AT_MAIL = ("client", "client_net", "sender", "sender_domain")
DEFAULT_MESSAGE = "Too many messages {what} (at most {max} per {within}), try again in {wait} seconds"
WHAT = {"client": "from your address", "client_net": "from your network", "sender": "from this sender",
        "sender_domain": "from this sender's domain", "recipient": "for this recipient"}
# Unique in the fleet for this process's lifetime: a session's connection slot is
# "<this>:<session id>", so two gates never take each other's slots.
PROCESS_TOKEN = secrets.token_hex(6)


@dataclass(frozen=True)
class Rate:
    per: str
    max: int
    within: float


def rate(value) -> Rate:
    """``{per: client|client_net|sender|sender_domain|recipient, max: N, within: DURATION}``."""
    if not isinstance(value, dict):
        raise ValueError(f"expected {{per: ..., max: N, within: DURATION}}, got {value!r}")
    unknown = set(value) - {"per", "max", "within"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (known: per, max, within)")
    missing = [k for k in ("per", "max", "within") if k not in value]
    if missing:
        raise ValueError(f"{missing[0]} is required")
    if value["per"] not in KINDS:
        raise ValueError(f"per: expected one of {', '.join(KINDS)}, got {value['per']!r}")
    try:
        top = integer(value["max"])
    except ValueError as e:
        raise ValueError(f"max: {e}") from None
    if top < 1:
        raise ValueError(f"max: expected 1 or more, got {top}")
    try:
        within = duration(value["within"])
    except ValueError as e:
        raise ValueError(f"within: {e}") from None
    if within < 1:
        raise ValueError(f"within: expected 1s or more, got {value['within']!r}")
    return Rate(value["per"], top, within)


rate.__name__ = "rate"


def human(seconds: float) -> str:
    """``3600`` -> ``1h``: a window as an admin writes it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Limits(Rule):
    """Rates over sliding windows and concurrent connections, shared through the state store."""

    name = "limits"
    rates = Option(list_of(rate), [], "the rates: [{per, max, within}, ...]")
    connections = Option(integer, 0, "concurrent connections per client address, IPv6 per "
                                     "ipv6_prefix network (0: no limit)")
    connection_ttl = Option(duration, "1h", "how long a connection slot lives without a MAIL "
                                            "(what a crashed gate leaks at most)")
    ipv4_prefix = Option(prefix_length(32), 24, "the IPv4 network client_net keys by")
    ipv6_prefix = Option(prefix_length(128), 64, "the IPv6 network client_net and connections key by")
    message = Option(string, DEFAULT_MESSAGE, "the 451 text; {what} {max} {within} {wait} {after}")

    def setup(self):
        if self.connections < 0:
            raise OptionError("connections", f"expected 0 (no limit) or more, got {self.connections}")
        if self.connection_ttl < 60:
            raise OptionError("connection_ttl", "must be 1m or more")
        try:
            sample = self.message.format(what="from x", max=1, within="1h", wait=1, after="2026-01-01T00:00:00Z")
        except (KeyError, IndexError, ValueError) as e:
            raise OptionError("message", f"only {{what}}, {{max}}, {{within}}, {{wait}} and {{after}} "
                                         f"can be filled in ({e!r})") from None
        if any(c in sample for c in "\r\n\x00"):
            raise OptionError("message", "must be one line")
        self.at_mail = [r for r in self.rates if r.per in AT_MAIL]
        self.at_rcpt = [r for r in self.rates if r.per == "recipient"]
        self._slot = f"limits.connection.{id(self)}"  # session.data: [client, member, refreshed at]

    # -- keys: the same normalisation as the greylist and sender-state rules ---------------
    def key_for(self, kind: str, text: str) -> str | None:
        """``text`` (an address, a sender, a recipient) as ``kind`` counts it; None: not counted
        (the null sender has no sender or sender domain)."""
        if kind in ("client", "client_net", "connections"):
            # connections: IPv6 by its network, as the gate's own max_connections_per_client,
            # so rotating addresses inside one subscriber's /64 does not evade the cap
            prefixes = {"client_net": (self.ipv4_prefix, self.ipv6_prefix),
                        "connections": (None, self.ipv6_prefix)}.get(kind, ())
            return client_key(text, *prefixes) or text.strip().lower()
        if kind in ("sender", "sender_domain"):
            sender = sender_key(text)
            if sender is None:
                return None
            return sender if kind == "sender" else sender.rpartition("@")[2]
        if kind == "recipient":
            return text.strip().strip("<>").lower() or None
        raise ValueError(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)}, connections)")

    def _store(self):
        store = getattr(getattr(self.gate, "stores", None), "limits", None)
        if store is None:
            raise StoreError("the limits rule needs the gate's limits store (state:)")
        return store

    # -- connections -------------------------------------------------------------------
    async def on_connect(self, session):
        if not self.connections:
            return None
        client = self.key_for("connections", session.client_ip)
        member = f"{PROCESS_TOKEN}:{session.id}"
        now = self.clock.now()
        added, live = await self._store().connect(client, member, self.connections, now, self.connection_ttl)
        if not added:
            return Verdict.tempfail(f"Too many connections from {client}, try again later", 421, "4.7.0",
                                    reason=f"{live} connections from {client} (at most {self.connections})")
        session.data[self._slot] = [client, member, now]
        return None

    async def on_disconnect(self, session):
        slot = session.data.pop(self._slot, None)
        if slot is not None:
            await self._store().disconnect(slot[0], slot[1])

    async def _heartbeat(self, session, now: float) -> None:
        slot = session.data.get(self._slot)
        if slot is not None and now - slot[2] >= self.connection_ttl / 2:
            await self._store().touch(slot[0], slot[1], now, self.connection_ttl)
            slot[2] = now

    # -- rates -------------------------------------------------------------------------
    async def on_mail(self, tx):
        now = self.clock.now()
        if self.connections:
            await self._heartbeat(tx.session, now)
        texts = {"client": tx.session.client_ip, "client_net": tx.session.client_ip,
                 "sender": tx.sender, "sender_domain": tx.sender}
        return await self._check(tx, [(r, texts[r.per]) for r in self.at_mail], now)

    async def on_rcpt(self, tx, rcpt):
        return await self._check(tx, [(r, rcpt.address) for r in self.at_rcpt], self.clock.now())

    async def _check(self, tx, rates, now: float):
        counted = tx.data.setdefault("limits.counted", [])  # one count per counter and transaction
        checks, used = [], []
        for r, text in rates:
            value = self.key_for(r.per, text)
            if value is None:
                continue
            name = f"{r.per}:{r.within:g}:{value}"
            checks.append((r.per, value, r.within, r.max, name not in counted))  # the store's RateCheck
            used.append((r, name))
        if not checks:
            return None
        outcome = await self._store().hit(checks, now)
        if outcome.allowed:
            counted.extend(name for (r, name), c in zip(used, checks) if c[4])
            return None
        worst = max(outcome.refused, key=lambda i: used[i][0].within)
        r = used[worst][0]
        retry_at = outcome.retry_at if outcome.retry_at is not None else now
        wait = max(1, math.ceil(retry_at - now))
        text = self.message.format(what=WHAT[r.per], max=r.max, within=human(r.within), wait=wait,
                                   after=utc(math.ceil(retry_at)))
        why = ", ".join(f"{used[i][0].per} {checks[i][1]}: {outcome.estimates[i]:.1f} of {used[i][0].max} "
                        f"per {human(used[i][0].within)}" for i in outcome.refused)
        return Verdict.tempfail(text, 451, "4.7.1", reason=f"rate limit: {why}; one more at {utc(math.ceil(retry_at))}")
