"""ARC (RFC 8617) with dkimpy: the one module of the arc rule that imports it.

No DNS happens inside dkimpy: ``key_names`` lists the key records an incoming chain's
signatures name, the rule fetches them through the gate's asynchronous resolver, and
``verify_chain`` hands dkimpy a lookup over those answers. ``seal`` signs a new ARC set over
the final message. Both are synchronous CPU work (hashing, RSA), safe in a worker thread.
dkimpy (like RFC 8617) signs ARC with rsa-sha256 only.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key
from dkim.util import InvalidTagValueList, parse_tag_value

from smtpgate_rules.dkim.verify import key_problem

# dkimpy logs every failed signature at error level; a failed chain is our result, not noise
_QUIET = logging.getLogger("smtpgate_rules.arc.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")
_ARC_FIELDS = _ARC_SIGNED + (b"arc-authentication-results",)
DOMAIN_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                   r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
#: header fields a seal may never sign: dkimpy's RFC 6376 list, ours, and those that change
#: on the way (the gate's own and later hops' trace and authentication fields)
NEVER_SIGNED = frozenset([h.decode() for h in dkim.DKIM.SHOULD_NOT]
                         + ["authentication-results", "arc-seal", "arc-message-signature",
                            "arc-authentication-results"])
# dkimpy's parser raises IndexError, not its own error, for a header section opening with a
# continuation line; a b= that is not base64 raises binascii.Error, undecodable bytes
# UnicodeDecodeError (both ValueErrors): either way a message it cannot read, never a crash
_UNPARSEABLE = (dkim.DKIMException, IndexError, ValueError)
MIN_BITS = 1024  # RFC 8301 §3.2: shorter RSA keys must not be used


class KeyProblem(ValueError):
    """The configured private key cannot sign ARC (why, in one line)."""


class SealFailed(Exception):
    """dkimpy could not seal this message (why, in one line): e.g. it has no From field."""


@dataclass
class Chain:
    """An incoming chain's validation: ``cv`` is ``none``, ``pass`` or ``fail``; ``instances``
    its sets (highest i=), ``reason`` why it failed, ``signers`` each set's sealing domain
    (newest first), ``oldest_pass`` the lowest instance whose AMS still verifies (RFC 8617
    §7.2 header.oldest-pass; 0 if none checked); ``ended``: an earlier hop sealed it with
    ``cv=fail``, so it fails and no sealer may add to it (RFC 8617 §5.1.1)."""

    cv: str
    instances: int = 0
    reason: str | None = None
    signers: list[str] = field(default_factory=list)
    oldest_pass: int = 0
    ended: bool = False

    def as_dict(self) -> dict:
        return {"cv": self.cv, "instances": self.instances, "reason": self.reason,
                "signers": self.signers, "oldest_pass": self.oldest_pass, "ended": self.ended}


def count_sets(raw: bytes) -> int:
    """How many ARC-Seal fields the header section holds (what validating would cost)."""
    return sum(1 for name, _ in _headers(raw) if name.lower() == b"arc-seal")


def key_names(raw: bytes) -> list[str]:
    """The distinct key records (``sel._domainkey.example.org``) the message's ARC-Seal and
    ARC-Message-Signature fields name, in order; malformed ones are left out (they fail)."""
    names: list[str] = []
    for name, value in _headers(raw):
        if name.lower() not in _ARC_SIGNED:
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue
        d = tags.get(b"d", b"").decode("ascii", "replace").strip().rstrip(".").lower()
        s = tags.get(b"s", b"").decode("ascii", "replace").strip().lower()
        if DOMAIN_NAME.match(d) and DOMAIN_NAME.match(s) and f"{s}._domainkey.{d}" not in names:
            names.append(f"{s}._domainkey.{d}")
    return names


def verify_chain(raw: bytes, keys: dict[str, str | None]) -> Chain:
    """Validate the ARC chain of ``raw`` with the key records in ``keys`` (``key_names``
    -> the TXT text, None: no record)."""

    def lookup(name, timeout=5):  # dkimpy's dnsfunc: only what was fetched, never a costly key
        name = _text(name).rstrip(".").lower()
        text = keys.get(name)
        return text.encode() if text and not key_problem(name, text) else None

    try:
        cv, sets, reason = dkim.ARC(raw, logger=_QUIET).verify(dnsfunc=lookup)
    except _UNPARSEABLE as e:
        return Chain("fail", reason=_why(e)) if count_sets(raw) else Chain("none")
    instances = max((s["instance"] for s in sets), default=0)
    if cv == dkim.CV_None and any(name.lower() in _ARC_FIELDS for name, _ in _headers(raw)):
        # ARC fields dkimpy found no instance in (i=0, i=-1, no i=): a broken chain, not none
        return Chain("fail", reason="ARC fields without a valid instance (i=1 to 50)")
    if instances > 50:  # RFC 8617 §4.2.1: i= is 1 to 50
        return Chain("fail", 50, f"instance i={str(instances)[:12]} above 50")
    signers = [_text(s.get("as-domain", b"")) for s in sets]
    passed = [s["instance"] for s in sets if s.get("ams-valid")]
    result = "fail" if cv is None else _text(cv)  # None: an earlier hop sealed cv=fail
    return Chain(result, instances, None if result in ("pass", "none") else reason, signers,
                 min(passed, default=0), ended=cv is None)


def check_private_key(pem: bytes) -> bytes:
    """``pem`` as dkimpy signs with (line ends made LF), if it is an RSA private key of at
    least ``MIN_BITS`` in PEM, PKCS#1 (``BEGIN RSA PRIVATE KEY``) or PKCS#8 (``BEGIN
    PRIVATE KEY``); else ``KeyProblem``."""
    pem = pem.replace(b"\r\n", b"\n")
    if b"-----BEGIN" not in pem:
        raise KeyProblem("not a PEM file (no -----BEGIN line)")
    if b"ENCRYPTED" in pem:
        raise KeyProblem("the key is encrypted: give it without a passphrase")
    try:
        key = parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError) as e:  # binascii.Error is a ValueError
        raise KeyProblem("not an RSA private key (PKCS#1 or PKCS#8); ARC signs with rsa-sha256 "
                         f"only: {_text(e)}") from None
    bits = key["modulus"].bit_length()
    if bits < MIN_BITS:
        raise KeyProblem(f"an RSA key of {bits} bits; at least {MIN_BITS} are needed (2048 advised)")
    return pem


def seal(raw: bytes, pem: bytes, domain: str, selector: str, authserv_id: str,
         headers: list[str] | None, timestamp: int) -> list[tuple[str, str]]:
    """The next ARC set for ``raw`` as ``[(name, value), ...]``, top to bottom (ARC-Seal,
    ARC-Message-Signature, ARC-Authentication-Results), values folded with CRLF. dkimpy
    builds the ARC-Authentication-Results from the message's Authentication-Results fields
    of ``authserv_id`` and takes cv from their ``arc`` result. [] when it seals nothing
    (no such field). ``SealFailed`` when dkimpy cannot seal it."""
    try:
        signer = dkim.ARC(raw, logger=_QUIET, signature_algorithm=b"rsa-sha256")
        include = [h.encode() for h in headers] if headers else signer.default_sign_headers()
        fields = signer.sign(selector.encode(), domain.encode(), pem, authserv_id.encode(),
                             include_headers=include, timestamp=timestamp)
    except _UNPARSEABLE as e:
        raise SealFailed(_why(e)) from None
    out = []
    for line in fields:
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        out.append((name, value.strip(" \t").removesuffix("\r\n")))
    return out


def _headers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields, as dkimpy splits them; for a header section it cannot parse, the
    lines that start a field (enough to count and name ARC fields)."""
    try:
        return dkim.rfc822_parse(raw)[0]
    except _UNPARSEABLE:
        end = raw.find(b"\r\n\r\n")
        lines = raw[:end if end >= 0 else len(raw)].split(b"\r\n")
        return [tuple(line.split(b":", 1)) for line in lines if b":" in line and line[:1] not in b" \t"]


def _why(e: Exception) -> str:
    if isinstance(e, (dkim.DKIMException, ValueError)):
        return _text(e)
    return "header section not parseable"


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())[:200]
