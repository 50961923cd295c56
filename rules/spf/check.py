"""SPF (RFC 7208): ``check_host()`` on our asynchronous resolver.

Why our own: the Python SPF libraries on PyPI are either blocking (pyspf: synchronous
dnspython calls, last released 2020) or young and bound to another DNS stack (emailsec:
aiodns, "early development"). Going through ``smtpgate.resolver`` instead means SPF
lookups share the per-process cache, the per-session DNS time budget and the tests' DNS
server, and nothing blocks the event loop.

Implemented: the record lookup and selection (§4.5), every mechanism (``all``, ``include``,
``a``, ``mx``, ``ptr``, ``ip4``, ``ip6``, ``exists``) with dual CIDR lengths, the
``redirect`` and ``exp`` modifiers (unknown modifiers are ignored), macros (§7, with
transformers, delimiters and URL-escaping uppercase letters; ``c``, ``r``, ``t`` only in
``exp``), the limits of §4.6.4 (10 DNS-querying terms, 10 MX records / PTR names, 2 void lookups)
and the results ``none``, ``neutral``, ``pass``, ``fail``, ``softfail``, ``temperror``,
``permerror``. A syntax error anywhere in a record is a ``permerror`` before anything is
evaluated (§4.6).

The resolver only needs ``await resolve(name, rdtype) -> list[str]`` raising
``DnsError`` for SERVFAIL and timeouts, which both ``Resolver`` and ``FakeResolver`` have.
"""
from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

from smtpgate import DnsError

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
MAX_LOOKUPS = 10
MAX_VOID = 2
MAX_NAMES = 10  # MX exchanges / PTR names looked at per mechanism

_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$", re.S)
_MACRO = re.compile(r"%(?:\{([slodiphcrtvSLODIPHCRTV])(\d*)(r?)([.+,/_=-]*)\}|(%)|(_)|(-))")
_MACRO_CHECK = re.compile(r"%(?:\{[slodiphcrtvSLODIPHCRTV]\d*r?[.+,/_=-]*\}|%|_|-)")
# The domain-spec may itself hold ":" and "/" (any visible character but "%" outside macros,
# §7.1): the dual-cidr-length is only what parses as one at the very end.
_DUAL_CIDR = re.compile(r"^(?::(?P<domain>.*?))?(?:/(?P<c4>0|[1-9]\d{0,1}))?(?://(?P<c6>0|[1-9]\d{0,2}))?\Z", re.S)
_TOPLABEL = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9]+\Z|^[A-Za-z0-9][A-Za-z0-9-]*-[A-Za-z0-9-]*[A-Za-z0-9]\Z|^[A-Za-z0-9]+-[A-Za-z0-9]\Z")


@dataclass
class SpfResult:
    """What ``check_host`` found. ``domain`` is the domain whose policy was checked (the
    sender's, or the HELO name for ``<>`` and HELO checks)."""

    result: str
    domain: str
    identity: str = "mailfrom"  # mailfrom | helo
    sender: str = ""
    client_ip: str = ""
    mechanism: str | None = None  # the directive that matched ("default" if none did)
    explanation: str | None = None  # from exp= on a fail
    problem: str | None = None  # why a temperror or permerror
    lookups: int = 0
    helo: dict | None = field(default=None)  # the HELO check's result, when one ran

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass
class _Context:
    resolver: object
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str
    receiver: str
    now: float
    max_lookups: int
    max_void: int
    lookups: int = 0
    voids: int = 0
    validated_name: str | None = None


async def check_host(resolver, ip: str, domain: str, sender: str, helo: str = "", *,
                     identity: str = "mailfrom", receiver: str = "unknown", now: float | None = None,
                     max_lookups: int = MAX_LOOKUPS, max_void: int = MAX_VOID) -> SpfResult:
    """RFC 7208 §4: the SPF result for ``ip`` sending as ``sender`` with policy ``domain``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return SpfResult("permerror", domain, identity, sender, ip, problem="not an IP address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    local, _, sdomain = sender.rpartition("@")
    sender = f"{local or 'postmaster'}@{sdomain or domain}"
    ctx = _Context(resolver, addr, sender, helo, receiver, time.time() if now is None else now,
                   max_lookups, max_void)
    domain = domain.rstrip(".").lower()
    try:
        result, mechanism, explanation = await _check(ctx, domain, 0)
        problem = None
    except _TempError as e:
        result, mechanism, explanation, problem = "temperror", None, None, str(e)
    except _PermError as e:
        result, mechanism, explanation, problem = "permerror", None, None, str(e)
    return SpfResult(result, domain, identity, sender, str(addr), mechanism, explanation, problem,
                     ctx.lookups)


async def check_mailfrom(resolver, ip: str, sender: str, helo: str, **kw) -> SpfResult:
    """The MAIL FROM identity (§2.4); the null sender is checked as postmaster@HELO."""
    if "@" in sender:
        return await check_host(resolver, ip, sender.rpartition("@")[2], sender, helo, **kw)
    return await check_helo(resolver, ip, helo, **kw)


async def check_helo(resolver, ip: str, helo: str, **kw) -> SpfResult:
    """The HELO identity (§2.3): ``none`` for address literals and names that are no FQDN."""
    name = (helo or "").strip()
    if not _valid_domain(name):
        return SpfResult("none", name, "helo", f"postmaster@{name}", ip,
                         problem="the HELO name is not a domain name")
    return await check_host(resolver, ip, name, f"postmaster@{name}", name, identity="helo", **kw)


# --- evaluation --------------------------------------------------------------------------

async def _check(ctx: _Context, domain: str, depth: int) -> tuple[str, str | None, str | None]:
    if depth > 20:
        raise _PermError("include/redirect nesting too deep")
    if not _valid_domain(domain):
        return "none", None, None
    record = await _record(ctx, domain)
    if record is None:
        return "none", None, None
    directives, modifiers = _parse(record)
    for qualifier, name, arg, text in directives:
        if await _matches(ctx, domain, name, arg, depth):
            result = QUALIFIERS[qualifier]
            explanation = await _explain(ctx, domain, modifiers) if result == "fail" else None
            return result, text, explanation
    if "redirect" in modifiers and not any(d[1] == "all" for d in directives):
        _count(ctx)
        target = await _expand_domain(ctx, modifiers["redirect"], domain)
        result, mechanism, explanation = await _check(ctx, target, depth + 1)
        if result == "none":
            raise _PermError(f"redirect={target} has no SPF record")
        return result, mechanism, explanation
    return "neutral", "default", None


async def _record(ctx: _Context, domain: str) -> str | None:
    try:
        texts = await ctx.resolver.resolve(_query_name(domain), "TXT")
    except DnsError as e:
        raise _TempError(f"TXT {domain}: {e.kind}") from None
    records = [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
    if len(records) > 1:
        raise _PermError(f"{domain} has {len(records)} SPF records")
    return records[0] if records else None


def _parse(record: str):
    """(directives, modifiers) or _PermError for any syntax error in the record."""
    directives, modifiers = [], {}
    for term in record.split(" ")[1:]:
        if not term:
            continue
        m = _MODIFIER.match(term)
        if m:
            name, value = m.group(1).lower(), m.group(2)
            _check_macro_string(value, term)
            if name in ("redirect", "exp"):
                if name in modifiers:
                    raise _PermError(f"more than one {name}= modifier")
                _check_domain_spec(value, term)
                modifiers[name] = value
            continue
        qualifier = term[0] if term[0] in QUALIFIERS else "+"
        body = term[1:] if term[0] in QUALIFIERS else term
        name = re.match(r"^[A-Za-z0-9]*", body).group(0).lower()
        arg = body[len(name):]
        if name not in MECHANISMS:
            raise _PermError(f"unknown mechanism {term!r}")
        directives.append((qualifier, name, _parse_arg(name, arg, term), term))
    return directives, modifiers


def _parse_arg(name: str, arg: str, term: str):
    if name == "all":
        if arg:
            raise _PermError(f"bad term {term!r}")
        return None
    if name in ("include", "exists"):
        if not arg.startswith(":") or len(arg) < 2:
            raise _PermError(f"{name} needs a domain: {term!r}")
        _check_domain_spec(arg[1:], term)
        return arg[1:]
    if name in ("a", "mx"):
        m = _DUAL_CIDR.match(arg)
        if not m or (m.group("domain") is not None and not m.group("domain")):
            raise _PermError(f"bad term {term!r}")
        c4 = int(m.group("c4")) if m.group("c4") else 32
        c6 = int(m.group("c6")) if m.group("c6") else 128
        if c4 > 32 or c6 > 128:
            raise _PermError(f"bad CIDR length in {term!r}")
        if m.group("domain"):
            _check_domain_spec(m.group("domain"), term)
        return m.group("domain"), c4, c6
    if name == "ptr":
        if arg and (not arg.startswith(":") or len(arg) < 2):
            raise _PermError(f"bad term {term!r}")
        if arg:
            _check_domain_spec(arg[1:], term)
        return arg[1:] or None
    # ip4 / ip6
    if not arg.startswith(":"):
        raise _PermError(f"{name} needs an address: {term!r}")
    text = arg[1:]
    address, _, length = text.partition("/")
    try:
        ip = ipaddress.IPv4Address(address) if name == "ip4" else ipaddress.IPv6Address(address)
        if length and (not length.isdigit() or (len(length) > 1 and length[0] == "0")):
            raise ValueError
        network = ipaddress.ip_network(f"{address}/{length or ip.max_prefixlen}", strict=False)
    except ValueError:
        raise _PermError(f"bad address in {term!r}") from None
    return network


async def _matches(ctx: _Context, domain: str, name: str, arg, depth: int) -> bool:
    ip = ctx.ip
    if name == "all":
        return True
    if name == "ip4" or name == "ip6":
        return ip.version == arg.version and ip in arg
    if name == "include":
        _count(ctx)
        target = await _expand_domain(ctx, arg, domain)
        result, _, _ = await _check(ctx, target, depth + 1)
        if result == "pass":
            return True
        if result in ("fail", "softfail", "neutral"):
            return False
        if result == "temperror":
            raise _TempError(f"include:{target}: temperror")
        raise _PermError(f"include:{target}: {'no SPF record' if result == 'none' else result}")
    if name == "a":
        _count(ctx)
        target = await _expand_domain(ctx, arg[0], domain) if arg[0] else domain
        addrs = await _addresses(ctx, target, void=True)
        return _in_any(ip, addrs, arg[1], arg[2])
    if name == "mx":
        _count(ctx)
        target = await _expand_domain(ctx, arg[0], domain) if arg[0] else domain
        records = await _lookup(ctx, target, "MX", void=True)
        if len(records) > MAX_NAMES:  # §4.6.4: counted per record, even if names repeat
            raise _PermError(f"mx:{target} has more than {MAX_NAMES} MX records")
        exchanges = _mx_hosts(records)
        for host in exchanges:
            if _in_any(ip, await _addresses(ctx, host), arg[1], arg[2]):
                return True
        return False
    if name == "exists":
        _count(ctx)
        target = await _expand_domain(ctx, arg, domain)
        return bool(await _lookup(ctx, target, "A", void=True))
    if name == "ptr":
        _count(ctx)
        target = (await _expand_domain(ctx, arg, domain) if arg else domain).lower()
        for host in await _validated_names(ctx):
            if host == target or host.endswith("." + target):
                return True
        return False
    raise _PermError(f"unknown mechanism {name}")  # pragma: no cover (parse refuses it)


def _count(ctx: _Context) -> None:
    ctx.lookups += 1
    if ctx.lookups > ctx.max_lookups:
        raise _PermError(f"more than {ctx.max_lookups} DNS-querying terms")


async def _lookup(ctx: _Context, name: str, rdtype: str, void: bool = False) -> list[str]:
    try:
        found = await ctx.resolver.resolve(_query_name(name), rdtype)
    except DnsError as e:
        raise _TempError(f"{rdtype} {name}: {e.kind}") from None
    if void and not found:
        ctx.voids += 1
        if ctx.voids > ctx.max_void:
            raise _PermError(f"more than {ctx.max_void} void lookups")
    return found


async def _addresses(ctx: _Context, name: str, void: bool = False) -> list[str]:
    return await _lookup(ctx, name, "A" if ctx.ip.version == 4 else "AAAA", void)


def _in_any(ip, addrs: list[str], c4: int, c6: int) -> bool:
    length = c4 if ip.version == 4 else c6
    for text in addrs:
        try:
            net = ipaddress.ip_network(f"{text}/{length}", strict=False)
        except ValueError:
            continue
        if net.version == ip.version and ip in net:
            return True
    return False


def _mx_hosts(records: list[str]) -> list[str]:
    hosts = []
    for rec in records:
        pref, _, host = rec.partition(" ")
        host = host.strip().rstrip(".")
        if host and host not in hosts:  # "0 ." (null MX, RFC 7505) has no host
            hosts.append(host)
    return hosts


async def _validated_names(ctx: _Context) -> list[str]:
    """§5.5: PTR names of the client whose addresses include it (at most 10 looked at)."""
    ptr_name = ctx.ip.reverse_pointer
    try:
        names = await ctx.resolver.resolve(ptr_name, "PTR")
    except DnsError:
        return []  # "If a DNS error occurs while doing the PTR RR lookup, this mechanism fails to match"
    out = []
    for host in names[:MAX_NAMES]:
        try:
            addrs = await ctx.resolver.resolve(host, "A" if ctx.ip.version == 4 else "AAAA")
        except DnsError:
            continue
        if _in_any(ctx.ip, addrs, 32, 128):
            out.append(host.lower())
    return out


async def _explain(ctx: _Context, domain: str, modifiers: dict) -> str | None:
    """§6.2: the exp= text on a fail; any problem just means no explanation."""
    if "exp" not in modifiers:
        return None
    try:
        target = await _expand_domain(ctx, modifiers["exp"], domain)
        texts = await ctx.resolver.resolve(_query_name(target), "TXT")
        if len(texts) != 1 or any(not 32 <= ord(c) < 127 for c in texts[0]):
            return None  # §6.2: the explanation is 7-bit ASCII; anything else is ignored
        if "%" in _MACRO_CHECK.sub("", texts[0]):
            return None  # a syntax error in it: as if there were no exp=
        text = await _expand(ctx, texts[0], domain, exp=True)
    except (DnsError, _PermError, _TempError):
        return None
    return text or None


# --- macros (§7) ---------------------------------------------------------------------------

def _check_macro_string(value: str, term: str) -> None:
    """A macro-string in a record (§7.1): visible ASCII, valid macros, and none of the letters
    c, r, t, which only the explanation text may use (§7.3)."""
    rest = _MACRO_CHECK.sub("", value)
    if "%" in rest or any(not (0x21 <= ord(c) <= 0x7e) for c in rest):
        raise _PermError(f"bad macro or character in {term!r}")
    if any(m.group(1) and m.group(1).lower() in "crt" for m in _MACRO.finditer(value)):
        raise _PermError(f"%{{c}}, %{{r}} and %{{t}} are only allowed in explanations: {term!r}")


def _check_domain_spec(spec: str, term: str) -> None:
    _check_macro_string(spec, term)
    if _MACRO.search(spec) and re.search(r"%\{[^}]*\}$", spec):
        return  # ends with a macro-expand
    tail = spec.rstrip(".")
    labels = tail.split(".")
    if len(labels) < 2 or not _TOPLABEL.match(labels[-1]):
        raise _PermError(f"bad domain in {term!r}")


async def _expand_domain(ctx: _Context, spec: str, domain: str) -> str:
    out = (await _expand(ctx, spec, domain)).rstrip(".")
    while len(out) > 253 and "." in out:
        out = out.split(".", 1)[1]
    return out.lower()


async def _expand(ctx: _Context, spec: str, domain: str, exp: bool = False) -> str:
    out, pos = [], 0
    for m in _MACRO.finditer(spec):
        out.append(spec[pos:m.start()])
        pos = m.end()
        if m.group(5):
            out.append("%")
        elif m.group(6):
            out.append(" ")
        elif m.group(7):
            out.append("%20")
        else:
            letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4)
            if letter.lower() in "crt" and not exp:
                raise _PermError(f"%{{{letter}}} is only allowed in exp=")
            value = await _macro_value(ctx, letter.lower(), domain)
            parts = re.split("[" + re.escape(delims or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                n = int(digits)
                if n == 0:
                    raise _PermError("a macro may not keep 0 labels")
                parts = parts[-n:]
            value = ".".join(parts)
            if letter.isupper():
                value = urllib.parse.quote(value, safe="-._~")
            out.append(value)
    out.append(spec[pos:])
    return "".join(out)


async def _macro_value(ctx: _Context, letter: str, domain: str) -> str:
    local, _, sdomain = ctx.sender.rpartition("@")
    ip = ctx.ip
    if letter == "s":
        return ctx.sender
    if letter == "l":
        return local
    if letter == "o":
        return sdomain
    if letter == "d":
        return domain
    if letter == "i":
        if ip.version == 4:
            return str(ip)
        return ".".join(ip.exploded.replace(":", ""))
    if letter == "p":
        if ctx.validated_name is None:
            names = await _validated_names(ctx)
            ctx.validated_name = next((n for n in names if n == domain or n.endswith("." + domain)),
                                      names[0] if names else "unknown")
        return ctx.validated_name
    if letter == "v":
        return "in-addr" if ip.version == 4 else "ip6"
    if letter == "h":
        return ctx.helo or "unknown"
    if letter == "c":
        return str(ip)
    if letter == "r":
        return ctx.receiver
    if letter == "t":
        return str(int(ctx.now))
    raise _PermError(f"unknown macro letter {letter}")  # pragma: no cover


def _query_name(name: str) -> str:
    """A name as the resolver takes it (DNS presentation format): a space, which ``%_`` puts
    in a name (§7.3), is written ``\\032``; the resolver refuses raw white space as junk."""
    return name.replace(" ", "\\032")


def _valid_domain(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253 or "." not in name or name.startswith("["):
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))
