"""The DNS resolver the rules share: asynchronous, cached, bounded per session.

This is the one module that imports dnspython; everything above it sees our own small
interface and our own error type:

- ``await resolver.resolve(name, rdtype)`` -> a list of strings: addresses for A/AAAA,
  host names for PTR/CNAME/NS (lower case, no final dot), ``"10 mx.example.org"`` for MX,
  the joined strings of each record for TXT. A name that does not exist (NXDOMAIN), has no
  record of that type (NODATA) or cannot exist (a malformed name) gives ``[]``.
- ``DnsError`` (``kind``: ``servfail``, ``timeout``, ``refused`` or ``error``) when the
  answer could not be had. Rules decide what that means (``on_dns_error``).
- ``await resolver.ptr(ip)``, ``await resolver.fcrdns(ip)`` (forward-confirmed reverse DNS).
- ``resolver.for_session(session)``: the same interface, charged to the session's DNS
  budget: DNS never stalls one client beyond ``session_budget`` seconds in all, one session
  causes at most ``session_queries`` lookups (cached answers are free) with at most
  ``session_inflight`` of them at once, and its identical lookups share one.

The cache (``BaseResolver``) keeps answers for their TTL and negative answers (NXDOMAIN,
NODATA) for the SOA's negative TTL (RFC 2308), per process; concurrent identical queries
share one lookup. ``smtpgate.testing.FakeResolver`` is a ``BaseResolver`` whose answers come
from a dict, so rules see the same behaviour in unit tests.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import metrics
from .clock import Clock
from .errors import SmtpgateError

log = logging.getLogger("smtpgate.dns")


def _dnspython():
    """dnspython, imported on first use: ``import smtpgate`` (every CLI command) stays fast."""
    import dns.asyncquery
    import dns.exception
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.resolver
    return dns

KINDS = ("servfail", "timeout", "refused", "error")
DEFAULT_SESSION_BUDGET = 10.0  # seconds of DNS waiting one client session may cost in all
DEFAULT_SESSION_QUERIES = 200  # lookups one session may cause
DEFAULT_SESSION_INFLIGHT = 16  # of them at once
MAX_CNAME_CHAIN = 16
MAX_PTR_NAMES = 10


class DnsError(SmtpgateError):
    """An answer could not be had. ``kind``: servfail | timeout | refused | error.

    NXDOMAIN is not an error: ``resolve`` returns ``[]`` for it."""

    def __init__(self, kind: str, name: str = "", rdtype: str = "", detail: str = ""):
        self.kind, self.name, self.rdtype, self.detail = kind, name, rdtype, detail
        text = f"DNS {kind}"
        if name:
            text += f" for {name} {rdtype}".rstrip()
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass(frozen=True)
class DnsAnswer:
    """One looked-up RRset. ``records`` is empty for NXDOMAIN and NODATA."""

    name: str
    rdtype: str
    records: tuple[str, ...] = ()
    ttl: float = 0.0  # seconds it may be cached (negative TTL for empty answers)
    nxdomain: bool = False


def normalise_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def reverse_name(ip: str, suffix: str | None = None) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa`` (IPv6: nibbles under ip6.arpa); with
    ``suffix`` the arpa zone is replaced by it (``1.2.0.192.zen.example``, for block lists)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    pointer = addr.reverse_pointer
    if suffix is None:
        return pointer
    base = pointer.rsplit(".", 2)[0]  # drop in-addr.arpa / ip6.arpa
    return f"{base}.{normalise_name(suffix)}"


class DnsBudget:
    """What DNS one session may cost: seconds of waiting, counted as wall time during which at
    least one of its lookups was awaited (parallel waits count once); and lookups, at most
    ``max_queries`` in all and ``max_inflight`` at once (``inflight`` shares identical ones)."""

    def __init__(self, seconds: float, clock: Clock, max_queries: int = DEFAULT_SESSION_QUERIES,
                 max_inflight: int = DEFAULT_SESSION_INFLIGHT):
        self.seconds = seconds
        self.clock = clock
        self.spent = 0.0
        self._active = 0
        self._since = 0.0
        self.max_queries = max_queries
        self.queries = 0  # lookups started for the session
        self.slots = asyncio.Semaphore(max_inflight)
        self.inflight: dict[tuple[str, str], asyncio.Future] = {}

    @property
    def remaining(self) -> float:
        spent = self.spent + (self.clock.monotonic() - self._since if self._active else 0.0)
        return self.seconds - spent

    async def wait(self, awaitable, what: str = "", rdtype: str = ""):
        """Await ``awaitable`` within what is left; past it, ``DnsError("timeout")``.

        Wrap shared tasks in ``asyncio.shield`` first: a spent budget cancels what it waits on."""
        remaining = self.remaining
        if remaining <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise DnsError("timeout", what, rdtype, "the session's DNS time budget is spent")
        if self._active == 0:
            self._since = self.clock.monotonic()
        self._active += 1
        try:
            result = await asyncio.wait_for(awaitable, remaining)
        except asyncio.TimeoutError:
            raise DnsError("timeout", what, rdtype, "the session's DNS time budget is spent") from None
        finally:
            self._active -= 1
            if self._active == 0:
                self.spent += self.clock.monotonic() - self._since
        if self.remaining < 0:  # a (fake) answer that came after the budget ran out
            raise DnsError("timeout", what, rdtype, "the session's DNS time budget is spent")
        return result


class _Lookups:
    """``resolve``, ``ptr`` and ``fcrdns`` on top of ``lookup``: shared by the resolver and
    its per-session view."""

    async def lookup(self, name: str, rdtype: str = "A") -> DnsAnswer:  # pragma: no cover
        raise NotImplementedError

    async def resolve(self, name: str, rdtype: str = "A") -> list[str]:
        return list((await self.lookup(name, rdtype)).records)

    async def resolve_many(self, names, rdtype: str = "A") -> dict[str, list[str] | DnsError]:
        """Each distinct name of ``names`` resolved at once, in order: its records, or the
        ``DnsError`` its lookup raised (one failure spoils none of the others; any other
        exception is raised). On a session's view every query counts against its budget."""
        names = list(dict.fromkeys(names))
        answers = await asyncio.gather(*(self.resolve(n, rdtype) for n in names), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, DnsError):
                raise answer
        return dict(zip(names, answers))

    async def ptr(self, ip: str) -> list[str]:
        """The PTR names of ``ip`` (``[]`` for none or a malformed address)."""
        try:
            name = reverse_name(ip)
        except ValueError:
            return []
        return await self.resolve(name, "PTR")

    async def fcrdns(self, ip: str) -> str | None:
        """Forward-confirmed reverse DNS: the first PTR name of ``ip`` whose A (or AAAA)
        records include ``ip`` again, else None. A failed PTR lookup raises ``DnsError``;
        failed forward lookups do too when no name could be confirmed."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        names = []
        for n in await self.ptr(str(addr)):
            if n and n not in names and _hostname_like(n):
                names.append(n)
        names = names[:MAX_PTR_NAMES]
        if not names:
            return None
        rdtype = "A" if addr.version == 4 else "AAAA"
        results = await asyncio.gather(*(self.resolve(n, rdtype) for n in names),
                                       return_exceptions=True)
        errors = []
        for n, found in zip(names, results):
            if isinstance(found, DnsError):
                errors.append(found)
                continue
            if isinstance(found, BaseException):
                raise found
            if any(_same_ip(a, addr) for a in found):
                return n
        if errors and len(errors) == len(names):
            raise errors[0]
        return None


class BaseResolver(_Lookups):
    """The cache, in-flight sharing and session budgets; subclasses answer ``_query``."""

    def __init__(self, clock: Clock | None = None, *, session_budget: float = DEFAULT_SESSION_BUDGET,
                 session_queries: int = DEFAULT_SESSION_QUERIES,
                 session_inflight: int = DEFAULT_SESSION_INFLIGHT,
                 cache: bool = True, cache_size: int = 50_000, max_ttl: float = 86_400.0):
        self.clock = clock
        self.session_budget = session_budget
        self.session_queries = session_queries
        self.session_inflight = session_inflight
        self.cache_enabled = cache
        self.cache_size = cache_size
        self.max_ttl = max_ttl
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    def _clock(self) -> Clock:
        if self.clock is None:
            self.clock = Clock()
        return self.clock

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:  # pragma: no cover
        raise NotImplementedError

    def cached(self, name: str, rdtype: str = "A") -> DnsAnswer | None:
        """The answer if it is at hand (cached, or a malformed name), without any waiting."""
        name, rdtype = normalise_name(name), rdtype.upper()
        if not _valid_name(name):
            return DnsAnswer(name, rdtype, (), 0.0, nxdomain=True)
        key = (name, rdtype)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self._clock().monotonic():
                self._cache.move_to_end(key)
                metrics.dns_cache_hit()
                return hit[1]
            del self._cache[key]
        return None

    async def lookup(self, name: str, rdtype: str = "A") -> DnsAnswer:
        hit = self.cached(name, rdtype)
        if hit is not None:
            return hit
        name, rdtype = normalise_name(name), rdtype.upper()
        key = (name, rdtype)
        if not self.cache_enabled:
            return await self._query(name, rdtype)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(lambda t, k=key: (self._inflight.pop(k, None), t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _fetch(self, key: tuple[str, str]) -> DnsAnswer:
        answer = await self._query(*key)
        ttl = min(answer.ttl, self.max_ttl)
        if ttl > 0:
            self._cache[key] = (self._clock().monotonic() + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    def clear_cache(self) -> None:
        self._cache.clear()

    def for_session(self, session: Any) -> "SessionResolver":
        """This resolver, charged to ``session``'s DNS budget (kept in ``session.data``)."""
        budget = session.data.get("dns_budget")
        if budget is None:
            budget = session.data["dns_budget"] = DnsBudget(
                self.session_budget, self._clock(), self.session_queries, self.session_inflight)
        return SessionResolver(self, budget)


class SessionResolver(_Lookups):
    """The resolver as one session uses it: every lookup counts against its budget.

    A lookup the session already has in flight is joined, not repeated or counted again; a
    new one needs time left and a query left, and waits for one of the session's slots."""

    def __init__(self, resolver: BaseResolver, budget: DnsBudget):
        self.resolver = resolver
        self.budget = budget

    async def lookup(self, name: str, rdtype: str = "A") -> DnsAnswer:
        hit = self.resolver.cached(name, rdtype)  # costs no waiting: served even past the budget
        if hit is not None:
            return hit
        budget = self.budget
        key = (normalise_name(name), rdtype.upper())
        task = budget.inflight.get(key)
        if task is None:
            if budget.remaining <= 0:
                raise DnsError("timeout", name, rdtype, "the session's DNS time budget is spent")
            if budget.queries >= budget.max_queries:
                raise DnsError("timeout", name, rdtype, "the session's DNS query limit is reached")
            budget.queries += 1
            task = asyncio.ensure_future(self._in_slot(*key))
            budget.inflight[key] = task
            task.add_done_callback(lambda t: (budget.inflight.pop(key, None),
                                              t.cancelled() or t.exception()))
        return await budget.wait(asyncio.shield(task), name, rdtype)

    async def _in_slot(self, name: str, rdtype: str) -> DnsAnswer:
        async with self.budget.slots:
            return await self.resolver.lookup(name, rdtype)

    def for_session(self, session: Any) -> "SessionResolver":
        return self


class Resolver(BaseResolver):
    """Queries nameservers (``[(host, port)]``; empty: the system's, from resolv.conf) over
    UDP, falling back to TCP for truncated answers. Each try waits ``timeout`` seconds;
    ``attempts`` rounds go over the servers; SERVFAIL and REFUSED move on to the next try."""

    def __init__(self, nameservers=(), timeout: float = 2.0, attempts: int = 2,
                 clock: Clock | None = None, **kwargs):
        super().__init__(clock, **kwargs)
        self.config = None  # the gate.yaml dns: section it was made from, if any
        self._nameservers = [tuple(ns) for ns in nameservers]
        self.timeout = timeout
        self.attempts = attempts

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        if not self._nameservers:  # read resolv.conf at the first query, not at import
            self._nameservers = system_nameservers()
        return self._nameservers

    @classmethod
    def from_config(cls, dns_config, clock: Clock | None = None) -> "Resolver":
        """From gate.yaml's ``dns:`` (``nameservers``, ``timeout``, ``attempts``, ``budget``,
        ``max_queries_per_session``, ``max_inflight_per_session``)."""
        budget = getattr(dns_config, "budget", None) or DEFAULT_SESSION_BUDGET
        r = cls(dns_config.nameservers, dns_config.timeout, dns_config.attempts, clock,
                session_budget=budget,
                session_queries=getattr(dns_config, "max_queries_per_session", DEFAULT_SESSION_QUERIES),
                session_inflight=getattr(dns_config, "max_inflight_per_session", DEFAULT_SESSION_INFLIGHT))
        r.config = dns_config
        return r

    async def _query(self, name: str, rdtype: str) -> DnsAnswer:
        metrics.dns_query(rdtype)
        dns = _dnspython()
        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError):
            return DnsAnswer(name, rdtype, (), 0.0, nxdomain=True)
        last = DnsError("error", name, rdtype, "no nameservers")
        for _ in range(self.attempts):
            for host, port in self.nameservers:
                q = dns.message.make_query(qname, qtype, use_edns=0, payload=1232)
                try:
                    response, _ = await dns.asyncquery.udp_with_fallback(
                        q, host, timeout=self.timeout, port=port)
                except dns.exception.Timeout:
                    last = DnsError("timeout", name, rdtype, f"no answer from {host}:{port}")
                    continue
                except (OSError, EOFError, dns.exception.DNSException) as e:
                    last = DnsError("error", name, rdtype, f"{host}:{port}: {type(e).__name__}: {e}")
                    continue
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return _parse(response, qname, qtype, name, rdtype)
                kind = {dns.rcode.SERVFAIL: "servfail", dns.rcode.REFUSED: "refused"}.get(rcode, "error")
                last = DnsError(kind, name, rdtype, f"{host}:{port} said {dns.rcode.to_text(rcode)}")
        log.debug("%s", last)
        raise last


def system_nameservers() -> list[tuple[str, int]]:
    """The system's resolvers (resolv.conf); 127.0.0.1:53 when there is none."""
    dns = _dnspython()
    try:
        found = dns.resolver.Resolver(configure=True).nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        found = []
    out = []
    for ns in found:
        text = str(ns)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            continue  # DoH/DoT URLs: not ours
        out.append((text, 53))
    return out or [("127.0.0.1", 53)]


# --- answers ---------------------------------------------------------------------------

def _parse(response, qname, qtype, name: str, rdtype: str) -> DnsAnswer:
    """Follow the CNAME chain from the question to the RRset asked for; negative TTL from
    the SOA in the authority section (RFC 2308), no caching without one."""
    dns = _dnspython()
    ttl = None
    current = qname
    for _ in range(MAX_CNAME_CHAIN):
        rrset = _find(response.answer, current, qtype)
        if rrset is not None:
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
            return DnsAnswer(name, rdtype, tuple(_text(qtype, rd) for rd in rrset), float(ttl))
        if qtype == dns.rdatatype.CNAME:
            break
        cname = _find(response.answer, current, dns.rdatatype.CNAME)
        if cname is None:
            break
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        current = cname[0].target
    negative = 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            negative = float(min(rrset.ttl, rrset[0].minimum))
            break
    if ttl is not None:
        negative = min(negative, ttl)
    return DnsAnswer(name, rdtype, (), negative, nxdomain=response.rcode() == dns.rcode.NXDOMAIN)


def _find(section, name, rdtype):
    dns = _dnspython()
    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
            return rrset
    return None


def _text(rdtype, rd) -> str:
    dns = _dnspython()
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(ipaddress.ip_address(rd.address))
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return rd.target.to_text(omit_final_dot=True).lower()
    if rdtype == dns.rdatatype.MX:
        return f"{rd.preference} {rd.exchange.to_text(omit_final_dot=True).lower()}"
    if rdtype == dns.rdatatype.TXT:
        return b"".join(rd.strings).decode("utf-8", "replace")
    return rd.to_text()


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(0 < len(label) <= 63 for label in labels) and not any(c.isspace() for c in name)


def _hostname_like(name: str) -> bool:
    return _valid_name(name) and "." in name


def _same_ip(text: str, addr) -> bool:
    try:
        return ipaddress.ip_address(text) == addr
    except ValueError:
        return False
