"""Organisational domains (RFC 7489 §3.2) from the public suffix list that ``publicsuffixlist``
ships (no download at run time): the one module of the rules that imports it."""
from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList


@functools.lru_cache(maxsize=1)
def _list() -> PublicSuffixList:
    return PublicSuffixList()  # parses the shipped list once per process (~0.1 s)


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """``mail.example.co.uk`` -> ``example.co.uk``; a public suffix itself (``co.uk``) is its
    own organisational domain."""
    domain = domain.strip().rstrip(".").lower()
    return _list().privatesuffix(domain) or domain


def aligned(a: str, b: str, strict: bool) -> bool:
    """Identifier alignment (§3.1): the same domain (strict), or the same organisational
    domain (relaxed)."""
    a, b = a.rstrip(".").lower(), b.rstrip(".").lower()
    return a == b if strict else org_domain(a) == org_domain(b)
