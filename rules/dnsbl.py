"""dnsbl: DNS block lists for the client IP, the HELO name and the sender domain.

Lookups start as early as their subject is known — the client IP at CONNECT, the HELO name
at HELO, the sender domain at MAIL — and run in parallel in the background, charged to the
session's DNS budget (time, number of lookups, lookups at once) like any other; the decision
waits for them at RCPT (within the session's DNS time budget), so ``postmaster`` still gets
mail and a listed client reads ``554 5.7.1`` naming the list(s). A domain policy whose
dnsbl rule the session policy lacks starts its lookups at its first use instead.

Reported in ``tx.results`` at RCPT: ``fail`` naming each matching list (``pass`` when none
matched, ``err`` for failed lookups), the data ``{score, threshold, listed, errors,
timed_out}``, and the event ``dnsbl_listed`` for the sender state machines when any list
matched.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass

from smtpgate import (DnsError, Option, OptionError, Rule, Verdict, boolean, integer, list_of, number,
                      one_of, reverse_name, string)

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PLACEHOLDERS = {"what": "", "lists": "", "client_ip": ""}
_PRIVATE = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10")]  # not looked up by default
_TASKS = "dnsbl_lookups"  # session.data cache: query name -> asyncio.Task, shared by dnsbl rules


@dataclass(frozen=True)
class BlockList:
    zone: str
    type: str = "ip"  # ip | domain
    answers: tuple = ()  # (low, high) integer ranges of A answers that count
    weight: float = 1.0
    name: str = ""  # shown to the client; the zone unless given

    def counts(self, answer: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(answer))
        except ValueError:
            return False
        return any(lo <= value <= hi for lo, hi in self.answers)


def _domain(value) -> str:
    text = string(value).strip().rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or not all(_LABEL.match(l) for l in labels):
        raise ValueError(f"expected a DNS zone like zen.example.org, got {value!r}")
    return text


def _answer_range(value) -> tuple[int, int]:
    """``127.0.0.2``, ``127.0.0.2-127.0.0.11`` or ``127.0.0.0/24``."""
    text = string(value).strip()
    try:
        if "-" in text:
            lo, hi = (int(ipaddress.IPv4Address(p.strip())) for p in text.split("-", 1))
            if lo > hi:
                raise ValueError
            return lo, hi
        net = ipaddress.IPv4Network(text, strict=False)
        return int(net.network_address), int(net.broadcast_address)
    except ValueError:
        raise ValueError(f"expected an IPv4 answer, range (127.0.0.2-127.0.0.11) or network, "
                         f"got {value!r}") from None


def block_list(value) -> BlockList:
    """A list entry: ``{zone, type: ip|domain, answers: [...], weight, name}`` or just the zone."""
    if isinstance(value, str):
        value = {"zone": value}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping like {{zone: zen.example.org}}, got {value!r}")
    known = {"zone", "type", "answers", "weight", "name"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "zone" not in value:
        raise ValueError("zone: is required")
    def field(key, convert, default):
        try:
            return convert(value.get(key, default))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None

    zone = field("zone", _domain, None)
    kind = field("type", one_of("ip", "domain"), "ip")
    answers = field("answers", list_of(_answer_range), ["127.0.0.0/8"])
    if not answers:
        raise ValueError("answers: needs at least one answer or range")
    weight = field("weight", number, 1)
    name = field("name", string, zone)
    if any(c in name for c in "\r\n\x00"):
        raise ValueError("name: must be one line")
    return BlockList(zone, kind, tuple(answers), weight, name)


block_list.__name__ = "block list"


class Dnsbl(Rule):
    """Refuse recipients for clients (or HELO names, sender domains) on DNS block lists."""

    name = "dnsbl"
    lists = Option(list_of(block_list), doc="block lists: {zone, type: ip|domain, answers, weight, name}")
    threshold = Option(number, 1, "refuse when the weights of the matching lists add up to this")
    check_private = Option(boolean, False, "also look up loopback and private client addresses")
    on_dns_error = Option(one_of("accept", "tempfail"), "accept",
                          "when a lookup fails (SERVFAIL, timeout) and could have decided: "
                          "accept, or answer 451 4.7.1")
    code = Option(integer, 554, "the reply code for a listed client (5xx)")
    text = Option(string, "Service unavailable; {what} blocked using {lists}",
                  "the reply text; {what}, {lists} and {client_ip} are filled in")

    def setup(self):
        if not self.lists:
            raise OptionError("lists", "needs at least one list")
        if not 500 <= self.code <= 599:
            raise OptionError("code", f"expected a 5xx code, got {self.code}")
        try:
            self.text.format(**_PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as e:
            raise OptionError("text", f"unknown placeholder or bad braces: {e} "
                                      f"(known: {', '.join('{%s}' % k for k in _PLACEHOLDERS)})") from None
        if any(c in self.text for c in "\r\n\x00"):
            raise OptionError("text", "must be one line")
        self._ip_lists = [bl for bl in self.lists if bl.type == "ip"]
        self._domain_lists = [bl for bl in self.lists if bl.type == "domain"]

    # --- hooks: start lookups as soon as their subject is known ------------------------
    async def on_connect(self, session):
        self._start(session, self._queries_ip(session))

    async def on_helo(self, session):
        self._start(session, self._queries_domain(session.helo, "helo"))

    async def on_mail(self, tx):
        self._start_all(tx)

    async def on_rcpt(self, tx, rcpt):
        self._start_all(tx)
        queries = self._all_queries(tx)
        session = tx.session
        tasks = session.data.get(_TASKS, {})
        pending = [tasks[q] for q, _, _ in queries if not tasks[q].done()]
        timed_out = False
        if pending:
            dns = self.gate.resolver.for_session(session)
            try:
                await dns.budget.wait(asyncio.shield(asyncio.gather(*pending)), "dnsbl lookups")
            except DnsError:
                timed_out = True
        hits, errors, score = [], [], 0.0
        for query, bl, what in queries:
            task = tasks[query]
            if timed_out and task in pending:  # past the budget: what we waited for counts as failed
                outcome = DnsError("timeout", query, "A", "the session's DNS time budget is spent")
            else:
                outcome = task.result()
            if isinstance(outcome, DnsError):
                errors.append({"list": bl.name, "zone": bl.zone, "query": query, "kind": outcome.kind})
                continue
            matched = [a for a in outcome if bl.counts(a)]
            if matched:
                score += bl.weight
                hits.append({"list": bl.name, "zone": bl.zone, "type": bl.type, "subject": what[0],
                             "value": what[1], "query": query, "answers": matched, "weight": bl.weight})
        result = {"score": score, "threshold": self.threshold, "listed": hits, "errors": errors,
                  "timed_out": timed_out}
        lists = ", ".join(sorted({h["list"] for h in hits}))
        record = tx.results.add(self, data=result, fail=f"listed: {lists}" if hits else None,
                                err=f"lookups failed: {', '.join(sorted({e['zone'] for e in errors}))}"
                                if errors else None,
                                pass_="not listed" if not hits and not errors else None)
        if hits and "dnsbl_listed" not in record.events:
            tx.results.event(self, "dnsbl_listed", why=lists)
        if hits and score >= self.threshold:
            return self._refusal(session, hits, score)
        if errors and self.on_dns_error == "tempfail":
            failed = {e["zone"] for e in errors}
            at_stake = sum(bl.weight for bl in self.lists if bl.zone in failed)
            if score + at_stake >= self.threshold:
                return Verdict.tempfail("DNS block list lookup failed, try again later", 451, "4.7.1",
                                        reason=f"dnsbl lookup failed: {errors[0]['query']} {errors[0]['kind']}")
        return None

    # --- helpers -----------------------------------------------------------------------
    def _refusal(self, session, hits, score) -> Verdict:
        names = []
        for h in hits:
            if h["list"] not in names:
                names.append(h["list"])
        whats = []
        for h in hits:
            what = {"ip": f"client host [{h['value']}]", "helo": f"HELO name {h['value']}",
                    "sender": f"sender domain {h['value']}"}[h["subject"]]
            if what not in whats:
                whats.append(what)
        text = self.text.format(what=", ".join(whats), lists=", ".join(names), client_ip=session.client_ip)
        text = "".join(c for c in text if c.isprintable())
        return Verdict.reject(text, self.code, "5.7.1",
                              reason=f"dnsbl score {score:g} >= {self.threshold:g}: "
                                     + ", ".join(f"{h['query']} {'/'.join(h['answers'])}" for h in hits))

    def _queries_ip(self, session):
        if not self._ip_lists:
            return []
        try:
            addr = ipaddress.ip_address(session.client_ip)
        except ValueError:
            return []
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if not self.check_private and any(addr in net for net in _PRIVATE if net.version == addr.version):
            return []
        return [(reverse_name(str(addr), bl.zone), bl, ("ip", str(addr))) for bl in self._ip_lists]

    def _queries_domain(self, domain, subject):
        if not self._domain_lists or not domain:
            return []
        domain = domain.strip().rstrip(".").lower()
        labels = domain.split(".")
        if len(labels) < 2 or not all(_LABEL.match(l) for l in labels) or domain.startswith("["):
            return []  # address literals and names that are no domain are not looked up
        out = []
        for bl in self._domain_lists:
            query = f"{domain}.{bl.zone}"
            if len(query) <= 253:
                out.append((query, bl, (subject, domain)))
        return out

    def _all_queries(self, tx):
        s = tx.session
        return (self._queries_ip(s) + self._queries_domain(s.helo, "helo")
                + self._queries_domain(tx.sender_domain, "sender"))

    def _start_all(self, tx) -> None:
        self._start(tx.session, self._all_queries(tx))

    def _start(self, session, queries) -> None:
        if not queries:
            return
        resolver = self.gate.resolver
        if resolver is None:
            raise RuntimeError("dnsbl needs the gate's resolver")
        dns = resolver.for_session(session)  # background lookups count against the session too
        tasks = session.data.setdefault(_TASKS, {})
        for query, _, _ in queries:
            if query not in tasks:
                tasks[query] = asyncio.ensure_future(_lookup(dns, query))


async def _lookup(resolver, query: str):
    """The A answers of ``query``, or the DnsError (a value, so a task nobody awaits never
    logs "exception was never retrieved")."""
    try:
        return await resolver.resolve(query, "A")
    except DnsError as e:
        return e
