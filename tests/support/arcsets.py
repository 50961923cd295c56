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
            timestamp: int | None = None) -> bytes:
    """``raw`` as a hop ``domain`` relays it: its Authentication-Results (``results``, e.g.
    ``"dkim=pass header.d=example.org; arc=none"``) and the ARC set it seals over them."""
    stamped = f"Authentication-Results: {domain}; {results}\r\n".encode() + raw
    fields = dkim.arc_sign(stamped, selector.encode(), domain.encode(), key.private, domain.encode(),
                           timestamp=timestamp)
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
