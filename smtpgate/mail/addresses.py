"""SMTP envelope paths: parsing ``MAIL FROM:`` / ``RCPT TO:`` arguments, and the open-relay check.

Pure functions, standard library only.

* :func:`parse_path` reads the argument after the colon (RFC 5321 ``Path`` with an optional
  source route, or a bare mailbox the way Postfix accepts it, or ``<>``, or ``<Postmaster>``)
  and the ESMTP parameters after it. Every malformed input raises :class:`AddressError`,
  which carries the SMTP reply to give; nothing else is ever raised.
* :func:`relay_refusal` says why a recipient must be refused as relaying whatever its domain
  (source routes, ``%`` / ``!`` hacks, routing characters in quoted local parts, address
  literals, bare IPs, trailing dots, non-LDH domains), or returns ``None``.
* :func:`normalise_domain` gives the form used for policy lookup (lower case, A-labels).
* :func:`helo_refusal` says why an EHLO/HELO argument is neither a domain nor an address
  literal (RFC 5321 §4.1.1.1), or returns ``None``.

The relay decision for a recipient is, in this order::

    addr = parse_path(arg, smtputf8=...).address       # AddressError -> its reply
    if addr is None: -> 501 (no null recipient)
    if (why := relay_refusal(addr)): -> 550 5.7.1 why
    if addr.domain == "": -> the gate's own postmaster (RFC 5321 §4.5.1)
    policy = lookup(normalise_domain(addr.domain)) or -> 550 5.7.1 relaying denied
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field
from encodings import idna as _idna

from ..errors import SmtpgateError
from .reply import Reply

__all__ = [
    "Address",
    "AddressError",
    "helo_refusal",
    "ParsedPath",
    "normalise_domain",
    "parse_address",
    "parse_path",
    "relay_refusal",
]

MAX_LOCAL = 64      # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255    # octets, RFC 5321 §4.5.3.1.2
MAX_PATH = 256      # octets including the angle brackets, RFC 5321 §4.5.3.1.3


class AddressError(SmtpgateError):
    """A malformed envelope path; ``code``, ``enhanced`` and ``text`` are the reply to give."""

    def __init__(self, code: int, enhanced: str, text: str):
        self.code = code
        self.enhanced = enhanced
        self.text = text
        super().__init__(f"{code} {enhanced} {text}")

    @property
    def reply(self) -> Reply:
        return Reply(self.code, self.text, self.enhanced)


def _syntax(text: str = "Bad address syntax") -> AddressError:
    return AddressError(501, "5.1.3", text)


def _command(text: str = "Syntax: MAIL FROM:<address> / RCPT TO:<address>") -> AddressError:
    return AddressError(501, "5.5.4", text)


# --- character classes -------------------------------------------------------------------

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_DOT_ATEXT = _ATEXT | {"."}  # a dot-string's characters (RFC 5321 4.1.2)
# Lenient domain characters for parsing: LDH, dots and underscores (seen in the wild);
# relay_refusal() is the strict check.
_DOMAIN_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
# _Parser.take's runs of those characters, matched in C (the sets are ASCII only).
_RUNS = {chars: re.compile("[" + re.escape("".join(sorted(chars))) + "]*")
         for chars in (_ATEXT, _DOT_ATEXT, _DOMAIN_ASCII)}
# What parse_path refuses anywhere in the argument: controls (_is_control) and surrogates.
_BAD_IN_COMMAND = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f-\x9f\s]")  # \s: what str.isspace() says
_CONTROL_OR_SP = re.compile("[ \x00-\x1f\x7f-\x9f]")  # _is_control, or the space character
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_LDH_STR = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]\Z")
# After unquoting, these would re-parse as routing or structure (RFC 5322 specials except
# ".", plus the percent hack and UUCP bang).
_ROUTING_IN_LOCAL = frozenset('@%!:,;<>[]()\\"')
# Full stops the idna codec treats as label separators (RFC 3490 §3.1).
_OTHER_DOTS = ("\u3002", "\uff0e", "\uff61")


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def _utf8_ok(ch: str) -> bool:
    """A non-ASCII character usable in an SMTPUTF8 address: no controls, surrogates, spaces."""
    cat = unicodedata.category(ch)
    return cat not in ("Cc", "Cs", "Zs", "Zl", "Zp")


def _octets(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


# --- values ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Address:
    """A mailbox as the client wrote it.

    ``local`` keeps quotes and case; ``domain`` is as written (``""`` only for the bare
    ``Postmaster`` of RFC 5321 §4.5.1); ``route`` is the source route text (``"@a,@b"``) or
    ``""``. ``is_quoted`` / ``is_literal`` are derived from ``local`` / ``domain``.
    """

    local: str
    domain: str
    route: str = ""
    is_quoted: bool = field(default=None, compare=False)  # type: ignore[assignment]
    is_literal: bool = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        quoted = len(self.local) >= 2 and self.local.startswith('"') and self.local.endswith('"')
        literal = self.domain.startswith("[")
        for name, value in (("is_quoted", quoted), ("is_literal", literal)):
            given = getattr(self, name)
            if given is not None and bool(given) != value:
                raise ValueError(f"Address.{name}={given!r} contradicts {self.local!r}@{self.domain!r}")
            object.__setattr__(self, name, value)

    @property
    def domain_lower(self) -> str:
        return self.domain.lower()

    @property
    def unquoted_local(self) -> str:
        """The local part with its quotes and quoted-pair backslashes removed."""
        if not self.is_quoted:
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1], flags=re.S)

    @property
    def is_postmaster(self) -> bool:
        return not self.is_quoted and self.local.isascii() and self.local.lower() == "postmaster"

    @property
    def is_ascii(self) -> bool:
        """False when the address needs SMTPUTF8 (RFC 6531) to be sent."""
        return self.local.isascii() and self.domain.isascii()

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def wire(self) -> str:
        """``<local@domain>`` for the downstream: route dropped, case and quoting kept."""
        return f"<{self}>"


@dataclass(frozen=True)
class ParsedPath:
    """A parsed ``MAIL FROM:`` / ``RCPT TO:`` argument. ``address`` is None for ``<>``."""

    address: Address | None
    params: list[str] = field(default_factory=list)

    @property
    def is_null(self) -> bool:
        return self.address is None

    def wire(self) -> str:
        return "<>" if self.address is None else self.address.wire()


# --- parser ------------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str, smtputf8: bool):
        self.s = text
        self.i = 0
        self.utf8 = smtputf8

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def non_ascii(self, ch: str) -> None:
        if not self.utf8:
            raise AddressError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        if not _utf8_ok(ch):
            raise _syntax()

    def take(self, allowed: frozenset[str]) -> str:
        """The run from here of characters in ``allowed`` and non-ASCII ones (which need SMTPUTF8)."""
        start, s, run = self.i, self.s, _RUNS[allowed]
        while True:
            self.i = run.match(s, self.i).end()  # the ASCII run, in C
            if self.i < len(s) and ord(s[self.i]) > 0x7F:
                self.non_ascii(s[self.i])
                self.i += 1
                continue
            return s[start:self.i]

    def domain(self) -> str:
        dom = self.take(_DOMAIN_ASCII)
        if not dom:
            raise _syntax("Bad address syntax: missing domain")
        # Leading dots and empty labels are syntax errors; one trailing dot (an absolute
        # name) parses, and relay_refusal() refuses it for recipients.
        body = dom[:-1] if dom.endswith(".") else dom
        if not body or any(not label for label in body.split(".")):
            raise _syntax("Bad address syntax: empty label in domain")
        if _octets(dom) > MAX_DOMAIN:
            raise _syntax("Domain too long")
        return dom

    def literal(self) -> str:
        start = self.i
        self.i += 1  # "["
        end = self.s.find("]", self.i)
        if end < 0:
            raise _syntax("Bad address literal")
        content = self.s[self.i:end]
        self.i = end + 1
        if not content or any(not (33 <= ord(c) <= 126) or c in "[\\" for c in content):
            raise _syntax("Bad address literal")
        tag, colon, rest = content.partition(":")
        try:
            if not colon:
                if content.count(".") != 3:
                    raise ValueError
                ipaddress.IPv4Address(content)
            elif tag.lower() == "ipv6":
                ipaddress.IPv6Address(rest)
            elif not (_LDH_STR.match(tag) and rest):
                raise ValueError
        except ValueError:
            raise _syntax("Bad address literal") from None
        return self.s[start:self.i]

    def route(self) -> str:
        start = self.i
        while True:
            if self.peek() != "@":
                raise _syntax("Bad source route")
            self.i += 1
            self.domain()
            ch = self.peek()
            if ch == ",":
                self.i += 1
                continue
            if ch == ":":
                text = self.s[start:self.i]
                self.i += 1
                return text
            raise _syntax("Bad source route")

    def local(self) -> str:
        start = self.i
        if self.peek() == '"':
            self.i += 1
            while True:
                if self.i >= len(self.s):
                    raise _syntax("Bad address syntax: unterminated quoted string")
                ch = self.s[self.i]
                if ch == '"':
                    self.i += 1
                    break
                if ch == "\\":
                    nxt = self.s[self.i + 1:self.i + 2]
                    if not nxt or not (32 <= ord(nxt) <= 126):
                        raise _syntax("Bad address syntax: bad quoted pair")
                    self.i += 2
                    continue
                if ord(ch) > 0x7F:
                    self.non_ascii(ch)
                elif not (32 <= ord(ch) <= 126):
                    raise _syntax()
                self.i += 1
            text = self.s[start:self.i]
            if text == '""':
                raise _syntax("Bad address syntax: empty local part")
        else:
            text = self.take(_DOT_ATEXT)
            if not text:
                raise _syntax("Bad address syntax: empty local part")
            if any(not atom for atom in text.split(".")):
                raise _syntax("Bad address syntax: misplaced dot in local part")
        if _octets(text) > MAX_LOCAL:
            raise _syntax("Local part too long")
        return text

    def mailbox(self, route: str) -> Address:
        local = self.local()
        if self.peek() != "@":
            # RFC 5321 §4.5.1: "Postmaster" (any case) without a domain.
            if not route and not local.startswith('"') and local.lower() == "postmaster":
                return Address(local, "", "")
            raise _syntax("Bad address syntax: missing domain")
        self.i += 1
        domain = self.literal() if self.peek() == "[" else self.domain()
        return Address(local, domain, route)


def parse_path(arg: str, *, smtputf8: bool = False) -> ParsedPath:
    """Parse what follows ``MAIL FROM:`` or ``RCPT TO:``.

    ``smtputf8``: non-ASCII is allowed in the address (and parameters). For MAIL, the caller
    decides this from its own EHLO offer; an address that is not ``is_ascii`` still needs the
    ``SMTPUTF8`` parameter on MAIL, which the caller checks.
    """
    if not isinstance(arg, str):
        raise _command()
    bad = _BAD_IN_COMMAND.search(arg)
    if bad:
        if _is_control(bad.group()):
            raise AddressError(501, "5.5.2", "Syntax error: control character in command")
        raise AddressError(501, "5.5.2", "Syntax error: bad character in command")
    p = _Parser(arg, smtputf8)
    while p.peek() == " ":
        p.i += 1
    if p.i >= len(arg):
        raise _command()
    start = p.i
    bracketed = p.peek() == "<"
    if bracketed:
        p.i += 1
        if p.peek() == ">":
            p.i += 1
            address = None
        else:
            route = p.route() if p.peek() == "@" else ""
            address = p.mailbox(route)
            if p.peek() != ">":
                raise _syntax("Bad address syntax: expected '>'")
            p.i += 1
        path_octets = _octets(arg[start:p.i])
    else:
        route = p.route() if p.peek() == "@" else ""
        address = p.mailbox(route)
        path_octets = _octets(arg[start:p.i]) + 2
    if p.i < len(arg) and arg[p.i] != " ":
        raise _syntax("Bad address syntax: unexpected text after address" if not bracketed
                      else "Bad address syntax: text after '>'")
    if path_octets > MAX_PATH:
        raise _syntax("Path too long")
    params = [w for w in arg[p.i:].split(" ") if w]
    for param in params:
        key, _, _ = param.partition("=")
        if not _KEYWORD.match(key):
            raise _command("Bad ESMTP parameter syntax")
        if not param.isascii() and not smtputf8:
            raise _command("Non-ASCII ESMTP parameter requires SMTPUTF8")
    return ParsedPath(address, params)


def parse_address(text: str, *, smtputf8: bool = True) -> Address:
    """One mailbox, with or without angle brackets and without parameters (for the CLI,
    configuration and maps). ``<>`` is refused: use :func:`parse_path` where it is allowed."""
    parsed = parse_path(text.strip(" "), smtputf8=smtputf8)
    if parsed.params:
        raise _syntax("Bad address syntax: unexpected text after address")
    if parsed.address is None:
        raise _syntax("Bad address syntax: null address")
    return parsed.address


# --- relay check -------------------------------------------------------------------------

def _label_refusal(label: str) -> str | None:
    if label.isascii():
        return None if _LDH_LABEL.match(label) else f"domain label {label!r} is not letters, digits and hyphens"
    # A U-label must be the canonical spelling of an xn-- A-label: that refuses width
    # variants, alternative dots and other spellings that map onto some other name.
    try:
        ace = _idna.ToASCII(label).decode("ascii")
        back = _idna.ToUnicode(ace)
    except (UnicodeError, ValueError):
        return f"domain label {label!r} is not a valid internationalised label"
    if not ace.lower().startswith("xn--") or back != label.lower() or not _LDH_LABEL.match(ace):
        return f"domain label {label!r} is not a canonical internationalised label"
    return None


def relay_refusal(addr: Address) -> str | None:
    """Why ``addr`` must be refused as relaying whatever its domain, or None.

    None does not mean "accept": the caller still looks ``normalise_domain(addr.domain)`` up
    in the governed domains. An address without a domain (RFC 5321 ``<Postmaster>``) gets
    None only when it is the unquoted ``Postmaster``; the caller handles it as local.
    """
    if addr.route:
        return "source routes are not accepted"
    local = addr.local
    if not local or local == '""':
        return "empty local part"
    unquoted = addr.unquoted_local
    if addr.is_quoted:
        bad = sorted(set(unquoted) & _ROUTING_IN_LOCAL)
        if bad:
            return f"quoted local part holds routing characters ({''.join(bad)})"
    elif local.startswith('"'):
        return "malformed quoted local part"
    else:
        if "%" in local:
            return "percent-hack routing in the local part"
        if "!" in local:
            return "UUCP bang path in the local part"
        if set(local) & _ROUTING_IN_LOCAL:
            return "routing characters in the local part"
    if not addr.is_quoted and _CONTROL_OR_SPACE.search(local):
        return "bad characters in the local part"
    if _CONTROL.search(unquoted):
        return "control characters in the local part"

    domain = addr.domain
    if domain == "":
        return None if addr.is_postmaster else "no domain"
    if addr.is_literal or domain.startswith("[") or domain.endswith("]"):
        return "address literals are not accepted"
    if domain.endswith("."):
        return "domain with a trailing dot"
    labels = domain.split(".")
    if any(not label for label in labels):
        return "empty label in domain"
    # (only digits and dots, or a colon, can make an IP address: skip the exception otherwise)
    if ":" in domain or not domain.strip("0123456789."):
        try:
            ipaddress.ip_address(domain)
            return "IP addresses are not accepted as domains"
        except ValueError:
            pass
    if labels[-1].isascii() and labels[-1].isdigit():
        return "numeric top-level label (an IP address in disguise)"
    if _octets(normalise_domain(domain)) > 253:
        return "domain too long"
    if any(dot in domain for dot in _OTHER_DOTS):
        return "domain with a non-ASCII full stop"
    for label in labels:
        why = _label_refusal(label)
        if why:
            return why
    # Belt and braces: the name the policy lookup sees must be these labels, one by one
    # (an ASCII label passed as LDH above is its own A-label: nothing to compare).
    if not domain.isascii() and normalise_domain(domain) != ".".join(_idna.ToASCII(l).decode("ascii") for l in labels).lower():
        return "domain does not normalise label by label"
    return None


def helo_refusal(name: str) -> str | None:
    """Why ``name`` is no EHLO/HELO argument (RFC 5321 §4.1.1.1), or None.

    Strict on what could smuggle structure downstream (spaces, controls, ``=``, ``+``,
    brackets that are no address literal, non-ASCII, over 255 octets); lenient on names real
    MTAs send: underscores, a bare word like ``localhost``, an IP without brackets, a
    trailing dot, labels over 63 octets.
    """
    if _octets(name) > MAX_DOMAIN:
        return "name longer than 255 octets"
    if _CONTROL_OR_SP.search(name):
        return "spaces or control characters in the name"
    if not name.isascii():
        return "non-ASCII name (send its A-label form)"
    if name.startswith("["):
        try:
            parser = _Parser(name, smtputf8=False)
            parser.literal()
        except AddressError:
            parser = None
        if parser is None or parser.i != len(name):
            return "not a valid address literal"
        # IPv6 is the only tag registered for a General-address-literal (RFC 5321 §4.1.3).
        tag, colon, _ = name[1:-1].partition(":")
        if colon and tag.lower() != "ipv6":
            return "not a valid address literal"
        return None
    if not _RUNS[_DOMAIN_ASCII].fullmatch(name):  # a character outside _DOMAIN_ASCII
        return "not a domain name or address literal"
    body = name[:-1] if name.endswith(".") else name
    if not body or any(not label for label in body.split(".")):
        return "empty label in the name"
    return None


def normalise_domain(domain: str) -> str:
    """Lower case, U-labels turned into A-labels where the stdlib ``idna`` codec can."""
    low = domain.lower()
    if low.isascii():
        return low
    try:
        return domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return low
