"""XCLIENT and XFORWARD arguments from a trusted forwarder (Postfix's XCLIENT_README and
XFORWARD_README): parsed, xtext-decoded and checked, without sockets.

What the gate does with them is the conversation's (``Conversation.xclient`` / ``xforward``);
who may send them is ``trusted_forwarders`` in gate.yaml, checked by the front.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..mail.reply import Reply

# What the EHLO reply lists to a trusted forwarder. LOGIN (a SASL name) is not listed: the gate
# offers no AUTH, so a LOGIN given anyway is accepted and ignored, as are DESTADDR/DESTPORT.
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO")
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XCLIENT_IGNORED = frozenset({"LOGIN", "DESTADDR", "DESTPORT"})
# The special values: the forwarder does not know (or not yet) the attribute.
UNKNOWN = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
MAX_VALUE = 255  # Postfix's own limit for one value

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


class ForwardError(ValueError):
    """The arguments are malformed: ``reply`` says why (501)."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True)
class Forwarded:
    """The real client as the forwarder describes it; None: not given, or unknown to it."""

    addr: str | None = None
    port: int | None = None
    name: str | None = None
    helo: str | None = None
    proto: str | None = None
    ident: str | None = None  # XFORWARD: the forwarder's queue id, for the logs
    given: frozenset[str] = frozenset()  # the attributes named, known or not


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext: ``+HH`` is the octet HH; anything else stands for itself."""
    if "+" in value:
        if "+" in _XTEXT_HEX.sub("", value):
            raise ValueError("a '+' not followed by two upper-case hex digits")
        raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
        value = raw.encode("latin-1").decode("utf-8", "replace")
    if any(not c.isprintable() for c in value):
        raise ValueError("control characters")
    return value


def parse(command: str, arg: str | None) -> Forwarded:
    """``XCLIENT``/``XFORWARD`` arguments -> Forwarded, or ForwardError (501 5.5.4)."""
    allowed = XCLIENT_ATTRIBUTES if command == "XCLIENT" else XFORWARD_ATTRIBUTES
    ignored = _XCLIENT_IGNORED if command == "XCLIENT" else frozenset()
    words = (arg or "").split()
    if not words:
        raise ForwardError(Reply(501, f"Syntax: {command} attribute=value...", "5.5.4"))
    values: dict[str, str | None] = {}
    for word in words:
        name, eq, raw = word.partition("=")
        name = name.upper()
        if not eq or (name not in allowed and name not in ignored):
            raise ForwardError(Reply(501, f"Bad {command} attribute name", "5.5.4"))
        try:
            value = xtext_decode(raw)
        except ValueError:
            raise ForwardError(Reply(501, f"Bad {command} attribute value", "5.5.4")) from None
        if len(value) > MAX_VALUE:
            raise ForwardError(Reply(501, f"Bad {command} attribute value", "5.5.4"))
        if name not in ignored:
            values[name] = None if value.upper() in UNKNOWN or not value else value
    return _checked(command, values)


def _checked(command: str, values: dict[str, str | None]) -> Forwarded:
    def bad(what: str) -> ForwardError:
        return ForwardError(Reply(501, f"Bad {command} {what} syntax", "5.5.4"))

    addr = values.get("ADDR")
    if addr is not None:
        text = addr[5:] if addr[:5].upper() == "IPV6:" else addr
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise bad("address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        addr = str(ip)
    port = values.get("PORT")
    if port is not None and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise bad("port")
    proto = values.get("PROTO")
    if proto is not None:
        proto = proto.upper()
        if proto not in ("SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"):
            raise bad("protocol")
    for key in ("NAME", "HELO", "IDENT"):
        if values.get(key) is not None and any(c.isspace() for c in values[key]):
            raise bad(key.lower())
    return Forwarded(addr=addr, port=int(port) if port is not None else None,
                     name=values.get("NAME"), helo=values.get("HELO"), proto=proto,
                     ident=values.get("IDENT"), given=frozenset(values))
