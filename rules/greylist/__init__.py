"""greylist: defer the first attempt of an unknown (client network, sender, recipient) triplet.

Real MTAs queue and retry; most spamware does not. The first attempt of a triplet gets
``451 4.7.1`` with the earliest retry time in the text; a retry after ``delay`` and within
``retry_window`` passes, and the triplet then passes at once for ``pass_ttl`` (refreshed on
every use). A client network with ``auto_whitelist_after`` live passed triplets is not
greylisted any more. Senders that retry from a pool of addresses (big providers) are keyed
by their domain instead of the network: a configured list, or an SPF pass the spf rule
reported (``tx.results.get("spf")``).

Reports per recipient in ``tx.results`` (``fail`` deferred, ``pass`` passed, ``skip``
exempt; the data, by recipient address, says what was decided) and publishes the events
``greylisted`` and ``greylist_passed``. In shadow mode the pipeline ignores the 451 and the
events, but the attempt is recorded in the store as in enforce mode (see docs/rules/greylist.md).

Host-name whitelists (``whitelist_client_names``) read the name the fcrdns rule verified at
CONNECT (``verified_client_name``): greylist makes no DNS lookups of its own, so that rule
must come before it in the policy.

Written only against the public plugin API, like any user's plugin. The state lives in the
gate's greylist store (``self.gate.stores.greylist``, SQLite or Redis by ``state:``).
Documentation: docs/rules/greylist.md.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import re
from datetime import datetime, timezone

from smtpgate import (GreylistParams, Option, OptionError, Rule, StoreError, Verdict, boolean, client_key,
                      duration, integer, list_of, network, one_of, prefix_length, sender_key, string)

NEVER_GREYLISTED = ("postmaster", "abuse")  # RFC 2142 role accounts: always reachable
DEFAULT_MESSAGE = "Greylisted, please try again in {wait} seconds (after {after})"


# --- keys: smtpgate's sender and client keys, as every counting rule uses them ----------

def normalise_sender(address: str) -> str:
    """The sender as a greylist triplet keys it (``smtpgate.sender_key``), so one sender
    keeps one triplet; ``""`` (the null sender) stays ``""``."""
    return sender_key(address) or address.strip().strip("<>").lower()


def normalise_recipient(address: str) -> str:
    return address.strip().strip("<>").lower()


# --- option types ----------------------------------------------------------------------

_LABELS = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?\Z")


def domain_pattern(value) -> str:
    """``example.org`` (it and every subdomain) or ``.example.org`` (subdomains only)."""
    text = string(value).strip().lower().rstrip(".")
    if not _LABELS.match(text.lstrip(".")) or text.startswith(".."):
        raise ValueError(f'expected a domain like "example.org" or ".example.org", got {value!r}')
    return text


def address_pattern(value) -> str:
    """``user@example.org``, ``@example.org`` (that domain), ``example.org`` (it and its
    subdomains) or ``.example.org`` (subdomains only)."""
    text = string(value).strip().lower()
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if "@" in local or not _LABELS.match(domain.rstrip(".")):
            raise ValueError(f'expected "user@domain", "@domain" or "domain", got {value!r}')
        return f"{local}@{domain.rstrip('.')}"
    return domain_pattern(text)


address_pattern.__name__ = "address or domain"
domain_pattern.__name__ = "domain"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Matcher:
    """Addresses and domains as ``address_pattern`` writes them."""

    def __init__(self, patterns):
        self.addresses = {p for p in patterns if "@" in p and not p.startswith("@")}
        self.domains = {p[1:] for p in patterns if p.startswith("@")}
        self.suffixes = tuple("." + p for p in patterns if "@" not in p and not p.startswith("."))
        self.suffixes += tuple(p for p in patterns if p.startswith("."))
        self.exact = {p for p in patterns if "@" not in p and not p.startswith(".")}
        #: it can match something (an empty one matches nothing: asked per recipient, not called)
        self.active = bool(self.addresses or self.domains or self.suffixes)

    def domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return domain in self.exact or domain in self.domains or domain.endswith(self.suffixes)

    def address(self, address: str) -> bool:
        address = address.lower()
        return address in self.addresses or ("@" in address and self.domain(address.rpartition("@")[2]))


# --- what the fcrdns rule found ----------------------------------------------------------

_NO_FCRDNS = object()


def verified_client_name(session):
    """The fcrdns rule's result for the session: the verified name, None (looked up, no
    name), or ``_NO_FCRDNS`` (the rule did not run). The one place that knows where fcrdns
    publishes (docs/rules/fcrdns.md)."""
    found = session.results.get("fcrdns")
    return _NO_FCRDNS if found is None else found.data.get("name")


# --- the rule --------------------------------------------------------------------------

class Greylist(Rule):
    """Greylisting at RCPT on (client network, normalised sender, recipient)."""

    name = "greylist"
    normalise_sender = staticmethod(normalise_sender)  # the CLI keys senders with it
    delay = Option(duration, "5m", "how long a new triplet must wait before a retry passes")
    retry_window = Option(duration, "2d", "how long after the first attempt a retry still counts")
    pass_ttl = Option(duration, "35d", "how long a passed triplet passes at once (refreshed on use)")
    auto_whitelist_after = Option(integer, 5, "live passed triplets after which a client is not "
                                              "greylisted any more (0: never)")
    ipv4_prefix = Option(prefix_length(32), 24, "the IPv4 network a client is keyed by")
    ipv6_prefix = Option(prefix_length(128), 64, "the IPv6 network a client is keyed by")
    whitelist_clients = Option(list_of(network), [], "client addresses and networks never greylisted")
    whitelist_client_names = Option(list_of(domain_pattern), [],
                                    "host-name suffixes (forward-confirmed reverse DNS) never greylisted")
    whitelist_senders = Option(list_of(address_pattern), [], "senders and sender domains never greylisted")
    whitelist_recipients = Option(list_of(address_pattern), [],
                                  "recipients and recipient domains never greylisted")
    pooled_senders = Option(list_of(domain_pattern), [],
                            "sender domains that send from a pool: keyed by domain, not network")
    spf_pooling = Option(boolean, True, "key by the sender's domain when a rule published an SPF pass")
    null_sender = Option(one_of("greylist", "skip"), "greylist",
                         "greylist the null sender <> (per client network and recipient) or skip it")
    message = Option(string, DEFAULT_MESSAGE, "the 451 text; {wait} = seconds, {after} = UTC time")

    def setup(self):
        if self.retry_window <= self.delay:
            raise OptionError("retry_window", f"must be longer than delay ({self.delay:g}s), "
                                              f"got {self.retry_window:g}s")
        if self.pass_ttl <= 0:
            raise OptionError("pass_ttl", "must be longer than zero")
        if self.auto_whitelist_after < 0:
            raise OptionError("auto_whitelist_after", f"expected 0 (off) or more, got {self.auto_whitelist_after}")
        try:
            sample = self.message.format(wait=300, after="2026-01-01T00:05:00Z")
        except (KeyError, IndexError, ValueError) as e:
            raise OptionError("message", f"only {{wait}} and {{after}} can be filled in ({e!r})") from None
        if any(c in sample for c in "\r\n\x00"):
            raise OptionError("message", "must be one line")
        self.params = GreylistParams(self.delay, self.retry_window, self.pass_ttl, self.auto_whitelist_after)
        self._clients = [n for n in self.whitelist_clients]
        self._client_names = _Matcher(self.whitelist_client_names)
        self._senders = _Matcher(self.whitelist_senders)
        self._recipients = _Matcher(self.whitelist_recipients)
        self._pooled = _Matcher(self.pooled_senders)
        self._warned = False  # whitelist_client_names without the fcrdns rule: said once
        # key_for without an SPF result is a pure function of its strings (the options are
        # fixed here), asked for the same few triplets over and over: ~0.7 -> 0.1 µs
        self._plain_key = functools.lru_cache(maxsize=4096)(self.key_for)

    # -- keys ----------------------------------------------------------------------------
    def client_network(self, ip: str) -> str:
        """``192.0.2.0/24`` (``ipv4_prefix``), ``2001:db8:1::/64`` (``ipv6_prefix``);
        IPv4-mapped IPv6 counts as IPv4; anything that is not an address is kept as written."""
        return client_key(ip, self.ipv4_prefix, self.ipv6_prefix) or ip.lower()

    def pool_domain(self, sender: str, spf=None) -> str | None:
        """The domain a pooled sender is keyed by, or None (key by network)."""
        domain = sender.rpartition("@")[2].lower().rstrip(".") if "@" in sender else ""
        if domain and self._pooled.active and self._pooled.domain(domain):
            return domain
        if spf is not None and self.spf_pooling:
            if isinstance(spf, str):
                spf = {"result": spf}
            if (isinstance(spf, dict) and str(spf.get("result", "")).lower() == "pass"
                    and spf.get("identity", "mailfrom") == "mailfrom"):
                spf_domain = str(spf.get("domain") or domain).lower().rstrip(".")
                if spf_domain:
                    return spf_domain
        return None

    def key_for(self, client_ip: str, sender: str, recipient: str, spf=None) -> tuple[str, str, str]:
        """The triplet exactly as the gate keys it: (client, sender, recipient)."""
        pool = self.pool_domain(sender, spf)
        client = f"domain:{pool}" if pool else self.client_network(client_ip)
        return client, normalise_sender(sender), normalise_recipient(recipient)

    # -- static exemptions ---------------------------------------------------------------
    def exemption(self, session, sender: str, recipient: str, *, client_names=True) -> str | None:
        """Why this recipient is not greylisted at all (no store involved), or None;
        ``client_names=False`` leaves out ``whitelist_client_names`` (the CLI has no session).
        Plain code: on_rcpt asks it for every recipient, without a coroutine of its own."""
        local = recipient.rpartition("@")[0].lower()
        if local in NEVER_GREYLISTED:
            return f"{local} is never greylisted"
        if self._recipients.active and self._recipients.address(recipient):
            return "whitelisted recipient"
        if not sender and self.null_sender == "skip":
            return "null sender (null_sender: skip)"
        if self._clients:
            key = client_key(session.client_ip)
            addr = ipaddress.ip_address(key) if key else None
            if addr is not None and any(addr.version == n.version and addr in n for n in self._clients):
                return "whitelisted client"
        if sender and self._senders.active and (self._senders.address(sender)
                                                or self._senders.address(normalise_sender(sender))):
            return "whitelisted sender"
        if self._client_names.active and client_names:
            name = self._client_name(session)
            if name and self._client_names.domain(name):
                return f"whitelisted client name {name}"
        return None

    def _client_name(self, session) -> str | None:
        """The client's forward-confirmed host name, as the fcrdns rule found it at CONNECT
        (or as PROXY/XCLIENT gave it). Greylist does no DNS of its own: without the fcrdns
        rule before it, only a name the session came with is matched."""
        found = verified_client_name(session)
        if found is _NO_FCRDNS and not session.client_name and not self._warned:
            self._warned = True
            self.log.warning("whitelist_client_names needs the fcrdns rule (first in the default "
                             "policy); without it only names given by PROXY/XCLIENT are matched")
        name = found if isinstance(found, str) else session.client_name
        return name.lower().rstrip(".") if name else None

    # -- the hook ------------------------------------------------------------------------
    def _store(self):
        stores = getattr(self.gate, "stores", None)
        store = getattr(stores, "greylist", None)
        if store is None:
            raise StoreError("the greylist rule needs the gate's greylist store (state:)")
        return store

    async def on_rcpt(self, tx, rcpt):
        results, client_ip = tx.results, tx.session.client_ip
        why = self.exemption(tx.session, tx.sender, rcpt.address)
        if why:
            results.add(self, skip=f"{rcpt.address}: {why}",
                        data={rcpt.address: {"outcome": "exempt", "reason": why}})
            return None
        spf = results.get("spf")
        if spf is None:
            client, sender, recipient = self._plain_key(client_ip, tx.sender, rcpt.address)
        else:
            client, sender, recipient = self.key_for(client_ip, tx.sender, rcpt.address, spf.data)
        now = self.clock.now()
        result = await self._store().attempt(client, sender, recipient, now=now, params=self.params,
                                             client_ip=client_ip)
        decided = {"outcome": result.outcome, "client": client, "sender": sender, "recipient": recipient}
        if result.deferred:
            text, after = self._deferral(result, now)
            decided["retry_at"] = after
            results.add(self, fail=f"{rcpt.address}: {result.outcome}, attempt {result.entry.attempts}",
                        data={rcpt.address: decided})
            results.event(self, "greylisted", why=f"{result.outcome}, attempt {result.entry.attempts}")
            return Verdict.tempfail(text, 451, "4.7.1",
                                    reason=f"greylisted ({result.outcome}, attempt {result.entry.attempts}): "
                                           f"{client} {sender or '<>'} {recipient}; passes after {after}")
        allow = result.allow
        if allow is None:
            results.add(self, pass_=f"{rcpt.address}: {result.outcome}", data={rcpt.address: decided})
        else:  # which allow entry let it through, in the trace and the log line
            decided["allow"] = named = f"{allow.kind} {allow.value}"
            results.add(self, pass_=f"{rcpt.address}: {result.outcome} ({named})", data={rcpt.address: decided})
        if result.outcome == "passed_now":
            results.event(self, "greylist_passed", why=f"retried after {result.entry.retry_delay:g}s")
        return None

    def _deferral(self, result, now: float) -> tuple[str, str]:
        """(the 451 text, the earliest retry time in UTC), both rounded up to the second."""
        retry_at = result.retry_at(self.params)
        after = _utc(math.ceil(retry_at))
        return self.message.format(wait=max(0, math.ceil(retry_at - now)), after=after), after

    # -- for `smtpgate greylist show` ---------------------------------------------------
    async def explain(self, client_ip: str, sender: str, recipient: str, *, now: float,
                      session=None, spf=None) -> dict:
        """What the gate would answer this triplet now, and why — without recording anything."""
        client, nsender, nrecipient = self.key_for(client_ip, sender, recipient, spf)
        out = {"key": {"client": client, "sender": nsender, "recipient": nrecipient},
               "options": {"delay": self.delay, "retry_window": self.retry_window, "pass_ttl": self.pass_ttl,
                           "auto_whitelist_after": self.auto_whitelist_after}}
        if session is not None:
            why = self.exemption(session, sender, recipient, client_names=False)
            if why:
                out.update(outcome="exempt", reason=why, answer="pass (not greylisted)", passes_from=_utc(now))
                return out
        store = self._store()
        entry = await store.get(client, nsender, nrecipient)
        result = await store.attempt(client, nsender, nrecipient, now=now, params=self.params,
                                     client_ip=client_ip, dry_run=True)
        out["entry"] = entry.as_dict(now) if entry else None
        out["outcome"] = result.outcome
        out["allow"] = result.allow.as_dict() if result.allow else None
        out["passed_count"] = result.passed_count
        if result.deferred:
            text, after = self._deferral(result, now)
            out["answer"] = f"451 4.7.1 {text}"
            out["passes_from"] = after
        else:
            out["answer"] = "pass (the downstream answers RCPT)"
            out["passes_from"] = _utc(now)
        return out

