"""Sender and client keys: how every counting or remembering rule names who sent a message.

One sender keeps one key across retries and forwarding (``sender_key``); one client keeps
one key across the addresses of its network (``client_key``). The greylist triplets, the
sender state machines, the limits counters and the gate's own per-client connection count
all key with these, so ``smtpgate greylist``, ``senders`` and ``limits`` agree on what
``Alice+x@Example.org`` or ``192.0.2.7`` is.
"""
from __future__ import annotations

import functools
import ipaddress
import re

_SRS0 = re.compile(r"^srs0[=+-][^=]+=[^=]+=([^=]+)=(.+)$")
_SRS1 = re.compile(r"^srs1[=+-][^=]+=[^=]+=[=+-][^=]+=[^=]+=([^=]+)=(.+)$")
_BATV = re.compile(r"^(?:prvs|msprvs\d*|btv1)=[^=]+=(.+)$")
_NUMBER_TOKEN = re.compile(r"(?<![^-_.=+])\d+(?![^-_.=+])")


# Both are pure functions of their arguments, asked for the same few clients and senders over
# and over (every rule that counts, on every transaction): remember the recent answers.
@functools.lru_cache(maxsize=4096)
def sender_key(address: str) -> str | None:
    """A sender address as one sender, whatever the retry or the forwarder made of it.

    Lower case (the local part too: no real MTA varies it between retries); an SRS0/SRS1
    forwarding address becomes the original sender; BATV (``prvs=tag=user``) loses its tag;
    ``+extension`` goes; numbers that stand alone between separators (VERP and per-message
    bounce addresses: ``bounce-123-456``) become ``#``; a quoted local part is kept as is.
    None for the null sender and for anything without an ``@``."""
    address = address.strip().strip("<>").lower()
    if not address or "@" not in address:
        return None
    for _ in range(3):  # SRS1 wraps SRS0 wraps BATV: peel at most a few layers
        local, _, domain = address.rpartition("@")
        m = _SRS1.match(local) or _SRS0.match(local)
        if m:
            address = f"{m.group(2)}@{m.group(1)}"
            continue
        m = _BATV.match(local)
        if m:
            address = f"{m.group(1)}@{domain}"
            continue
        break
    local, _, domain = address.rpartition("@")
    if not local.startswith('"'):
        local = _NUMBER_TOKEN.sub("#", local.split("+", 1)[0] or local)
    return f"{local}@{domain.rstrip('.')}"


@functools.lru_cache(maxsize=4096)
def client_key(ip: str, ipv4_prefix: int | None = None, ipv6_prefix: int | None = None) -> str | None:
    """A client address written canonically (IPv4-mapped IPv6 as IPv4, no zone, no
    brackets); given a prefix length for its family, its network instead (``192.0.2.0/24``,
    ``2001:db8::/64``). None if ``ip`` is not an address (a Unix socket, a test's name)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    length = ipv4_prefix if addr.version == 4 else ipv6_prefix
    if length is None:
        return str(addr)
    return str(ipaddress.ip_network(f"{addr}/{length}", strict=False))
