"""Address maps and conditions for the ``rewrite`` rule: parsed and compiled once, at load.

A map key is an address (``old@a.example``), a domain (``@old.example``), every subdomain
(``@.old.example``) or a regular expression (``/^(.+)\\.(.+)@old\\.example$/``); the value is
an address, or ``@domain`` to keep the local part. Regular expressions match the whole
address, case-insensitively, and their values may use ``\\1`` / ``\\g<1>`` / ``\\g<name>``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from smtpgate import AddressError, parse_address

_GROUP_REF = re.compile(r"\\g<([^>]*)>|\\(\d{1,2})|\\(.)|\\$", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_regex(key: str) -> bool:
    return len(key) >= 2 and key.startswith("/") and key.endswith("/")


def compile_regex(key: str) -> re.Pattern:
    try:
        return re.compile(key[1:-1], re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{key}: bad regular expression: {e}") from None


def check_address(text: str, what: str) -> str:
    """A mailbox as written in configuration (ASCII: domains in their xn-- form)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what}: expected an address, got {text!r}")
    if _CONTROL.search(text):
        raise ValueError(f"{what}: control characters (CR, LF, NUL...) are not allowed")
    if not text.isascii():
        raise ValueError(f"{what}: write addresses in ASCII (domains in their xn-- form): {text!r}")
    try:
        return str(parse_address(text))
    except AddressError as e:
        raise ValueError(f"{what}: not a valid address {text!r} ({e.text})") from None


def check_domain(text: str, what: str) -> str:
    """``@domain`` (or ``@.domain`` where allowed) -> the domain, lower case."""
    domain = text[1:]
    check_address("x@" + domain.lstrip("."), what)
    return domain.lower()


def valid_result(text: str) -> str | None:
    """A rewritten address as a valid mailbox, or None (the input held something a mailbox cannot)."""
    if _CONTROL.search(text):
        return None
    try:
        return str(parse_address(text, smtputf8=True))
    except AddressError:
        return None


@dataclass(frozen=True)
class _Template:
    """A regex map's value: literal text and group references, expanded without ``re``'s
    escapes (a ``\\n`` in configuration never becomes a line break)."""

    parts: tuple  # str (literal text) or ("group", number or name)

    @classmethod
    def parse(cls, text: str, pattern: re.Pattern, what: str) -> "_Template":
        parts, pos = [], 0
        for m in _GROUP_REF.finditer(text):
            parts.append(text[pos:m.start()])
            pos = m.end()
            name, number, other = m.group(1), m.group(2), m.group(3)
            if other is not None or m.group(0) == "\\":
                if other == "\\":
                    parts.append("\\")
                    continue
                raise ValueError(f"{what}: only \\1, \\g<1> and \\g<name> may follow a backslash")
            ref: int | str = int(number) if number is not None else (int(name) if name.isdigit() else name)
            if isinstance(ref, int) and ref > pattern.groups:
                raise ValueError(f"{what}: refers to group {ref}, the expression has {pattern.groups}")
            if isinstance(ref, str) and ref not in pattern.groupindex:
                raise ValueError(f"{what}: refers to group {ref!r}, which the expression does not name")
            parts.append(("group", ref))
        parts.append(text[pos:])
        return cls(tuple(p for p in parts if p != ""))

    def expand(self, m: re.Match) -> str:
        return "".join(p if isinstance(p, str) else (m.group(p[1]) or "") for p in self.parts)


class AddressMap:
    """``lookup(address)`` -> the new address, or None when no entry applies."""

    def __init__(self, given) -> None:
        if not isinstance(given, dict):
            raise ValueError(f"expected a mapping of old: new addresses, got {given!r}")
        self.exact: dict[str, str] = {}
        self.domains: dict[str, str] = {}
        self.subdomains: list[tuple[str, str]] = []
        self.regexes: list[tuple[re.Pattern, _Template]] = []
        for key, value in given.items():
            key = str(key)
            what = f"{key!r}"
            if not isinstance(value, str):
                raise ValueError(f"{what}: expected the new address as text, got {value!r}")
            if is_regex(key):
                pattern = compile_regex(key)
                if _CONTROL.search(value) or not value.isascii():
                    raise ValueError(f"{what}: the new address must be ASCII text without control characters")
                self.regexes.append((pattern, _Template.parse(value, pattern, what)))
                continue
            new = ("@" + check_domain(value, what)) if value.startswith("@") else check_address(value, what)
            if key.startswith("@."):
                self.subdomains.append((check_domain(key, what), new))
            elif key.startswith("@"):
                self.domains[check_domain(key, what)] = new
            elif "@" in key:
                self.exact[check_address(key, what).lower()] = new
            else:
                raise ValueError(f"{what}: expected old@domain, @domain, @.domain or /regex/")

    def __bool__(self) -> bool:
        return bool(self.exact or self.domains or self.subdomains or self.regexes)

    def lookup(self, address: str) -> str | None:
        """The exact address first, then each expression in the order written (they usually
        carve exceptions out of a domain), then the domain, then subdomains. The result may
        still be invalid (an expression copies text from the client): check it."""
        if not address:
            return None
        local, _, domain = address.rpartition("@")
        if not local:
            return None
        new = self.exact.get(address.lower())
        if new is None:
            for pattern, template in self.regexes:
                m = pattern.fullmatch(address)
                if m:
                    new = template.expand(m)
                    break
        domain = domain.lower()
        if new is None:
            new = self.domains.get(domain)
        if new is None:
            new = next((n for d, n in self.subdomains if domain.endswith(d)), None)
        if new is None:
            return None
        if new.startswith("@"):
            new = local + new
        return None if new == address else new


class Patterns:
    """Address patterns for conditions: ``<>``, ``a@b``, ``@b``, ``@.b`` or ``/regex/``."""

    def __init__(self, given, what: str) -> None:
        items = given if isinstance(given, list) else [given]
        self.null = False
        self.exact: set[str] = set()
        self.domains: set[str] = set()
        self.subdomains: list[str] = []
        self.regexes: list[re.Pattern] = []
        for i, item in enumerate(items):
            where = f"{what}[{i}]" if isinstance(given, list) else what
            if not isinstance(item, str) or not item:
                raise ValueError(f"{where}: expected an address pattern, got {item!r}")
            if item == "<>":
                self.null = True
            elif is_regex(item):
                self.regexes.append(compile_regex(item))
            elif item.startswith("@."):
                self.subdomains.append(check_domain(item, where))
            elif item.startswith("@"):
                self.domains.add(check_domain(item, where))
            elif "@" in item:
                self.exact.add(check_address(item, where).lower())
            else:
                raise ValueError(f"{where}: expected <>, a@domain, @domain, @.domain or /regex/, got {item!r}")

    def matches(self, address: str) -> bool:
        if not address:
            return self.null
        domain = address.rpartition("@")[2].lower()
        return (address.lower() in self.exact or domain in self.domains
                or any(domain.endswith(d) for d in self.subdomains)
                or any(p.fullmatch(address) for p in self.regexes))


CONDITION_KEYS = ("sender", "recipient", "client", "authenticated", "header")


@dataclass
class Context:
    """What a condition looks at: the envelope as the client sent it, and the message."""

    sender: str
    recipients: list[str]
    client_ip: str
    authenticated: bool = False
    message: object = None  # smtpgate.Message, at DATA only


class Condition:
    """``{sender, recipient, client, authenticated, header}``: every key given must match; a
    key matches when any of its values does."""

    def __init__(self, given, what: str) -> None:
        at = f"{at}" if what else ""
        if not isinstance(given, dict) or not given:
            raise ValueError(f"{what or 'conditions'}: expected a mapping of conditions ({', '.join(CONDITION_KEYS)})")
        for key in given:
            if key not in CONDITION_KEYS:
                raise ValueError(f"{at}{key}: unknown condition (known: {', '.join(CONDITION_KEYS)})")
        self.sender = Patterns(given["sender"], f"{at}sender") if "sender" in given else None
        self.recipient = Patterns(given["recipient"], f"{at}recipient") if "recipient" in given else None
        self.client = None
        if "client" in given:
            nets = given["client"] if isinstance(given["client"], list) else [given["client"]]
            self.client = []
            for i, n in enumerate(nets):
                try:
                    self.client.append(ipaddress.ip_network(str(n), strict=False))
                except ValueError:
                    raise ValueError(f"{at}client: expected an IP address or network, got {n!r}") from None
        self.authenticated = given.get("authenticated")
        if "authenticated" in given and not isinstance(self.authenticated, bool):
            raise ValueError(f"{at}authenticated: expected true or false, got {self.authenticated!r}")
        self.header: list[tuple[str, re.Pattern]] | None = None
        if "header" in given:
            headers = given["header"]
            if not isinstance(headers, dict) or not headers:
                raise ValueError(f"{at}header: expected a mapping of header name: regular expression")
            self.header = []
            for name, expr in headers.items():
                if not isinstance(expr, str):
                    raise ValueError(f"{at}header.{name}: expected a regular expression, got {expr!r}")
                try:
                    self.header.append((str(name), re.compile(expr)))
                except re.error as e:
                    raise ValueError(f"{at}header.{name}: bad regular expression {expr!r}: {e}") from None

    @property
    def needs(self) -> set[str]:
        """What must be known to decide: ``recipient`` (RCPT on) and ``header`` (DATA only)."""
        return {k for k in ("recipient", "header") if getattr(self, k) is not None}

    def matches(self, ctx: Context, header_value) -> bool:
        if self.sender is not None and not self.sender.matches(ctx.sender):
            return False
        if self.recipient is not None and not any(self.recipient.matches(r) for r in ctx.recipients):
            return False
        if self.client is not None:
            try:
                ip = ipaddress.ip_address(ctx.client_ip)
            except ValueError:
                return False
            if not any(ip.version == n.version and ip in n for n in self.client):
                return False
        if self.authenticated is not None and self.authenticated != ctx.authenticated:
            return False
        if self.header is not None:
            if ctx.message is None:
                return False
            if not any(p.search(v) for name, p in self.header for v in header_value(ctx.message, name)):
                return False
        return True
