"""ARC sets made the way a forwarding hop makes them, for tests (dkimpy's ``arc_sign``), and
a key lookup on the real test DNS server for dkimpy's own verifiers (the downstream's view)::

    forwarded = arc_hop(signed, key, "fwd.example", "arc", "dkim=pass header.d=example.org")
    dkim.arc_verify(delivered, dnsfunc=txt_lookup(ns))
"""
from __future__ import annotations

import dkim
import dns.resolver

from tests.support.dkimkeys import Key


def arc_hop(raw: bytes, key: Key, domain: str, selector: str, results: str,
            authserv_id: str | None = None) -> bytes:
    """``raw`` as a hop ``domain`` relays it: its Authentication-Results (``results``, e.g.
    ``"dkim=pass header.d=example.org; arc=none"``) under ``authserv_id`` (default: the
    domain; give each hop its own) and the ARC set it seals over them."""
    authserv_id = authserv_id or domain
    stamped = f"Authentication-Results: {authserv_id}; {results}\r\n".encode() + raw
    fields = dkim.arc_sign(stamped, selector.encode(), domain.encode(), key.private, authserv_id.encode())
    assert fields, "dkimpy sealed nothing"
    return b"".join(fields) + stamped


def txt_lookup(ns):
    """dkimpy's ``dnsfunc``, asking the test DNS server ``ns`` (a DnsServer) over loopback."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [ns.host], ns.port

    def lookup(name, timeout=5):
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return lookup
