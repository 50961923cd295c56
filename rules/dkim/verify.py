"""DKIM signatures (RFC 6376, RSA and Ed25519 per RFC 8463) with dkimpy: the one module of the
rules that imports it.

Verification is split so that no DNS happens inside dkimpy: ``signatures`` parses the
message and names each signature's key record; the rule fetches those records through the
gate's asynchronous resolver; ``verify`` then hands dkimpy the prefetched answers. It is
synchronous CPU work (canonicalisation, hashing, one public-key operation per signature),
safe to run in a worker thread.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

# dkimpy logs every failed key at error level; failures are our results, not log noise
_QUIET = logging.getLogger("smtpgate_rules.dkim.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
# What dkimpy raises, besides its own errors, on a signature it cannot process: binascii.Error
# (a ValueError) for a b= that is not base64, ValueError from PyNaCl for an Ed25519 b= of the
# wrong length, IndexError for an i= as long as d=. A hostile signature, never a crash (a
# crash is a 451 on every retry).
_UNPROCESSABLE = (dkim.DKIMException, ValueError, IndexError)
# An RSA key's cost is its owner's choice: a 16384-bit modulus with a 16384-bit public
# exponent takes seconds per signature. RFC 8301 §3.1 asks verifiers for 1024 to 4096 bits;
# keys past these limits are refused unchecked (no signer needs them).
MAX_RSA_BITS = 8192
MAX_EXPONENT_BITS = 64
_LABELS = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                     r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass
class Signature:
    """One ``DKIM-Signature`` field: where its key lives and what it claims. ``problem``: why
    it cannot be checked at all (a syntax error), else None."""

    index: int
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    expires: int | None = None
    problem: str | None = None

    @property
    def key_name(self) -> str | None:
        """The TXT record holding the key (``sel._domainkey.example.org``), None if unusable."""
        if self.problem:
            return None
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass
class Verified:
    """One signature's outcome: ``result`` is ``pass``, ``fail``, ``neutral`` (could not be
    processed), ``permerror`` (no usable key) or ``temperror`` (the key lookup failed)."""

    signature: Signature
    result: str
    reason: str | None = None

    def as_dict(self) -> dict:
        s = self.signature
        return {"domain": s.domain, "selector": s.selector, "algorithm": s.algorithm,
                "identity": s.identity, "result": self.result, "reason": self.reason}


class Checker:
    """A parsed message and its signatures (``signatures``), checked one by one."""

    def __init__(self, raw: bytes):
        try:
            self._dkim = dkim.DKIM(raw, logger=_QUIET)
        # dkimpy raises IndexError, not its own error, on a header section that starts with a
        # continuation line (real mail does): unparseable either way, never a crash
        except (dkim.DKIMException, IndexError) as e:  # a header section dkimpy cannot parse: nothing verifies
            self._dkim = None
            head = raw[:raw.find(b"\r\n\r\n") + 1].lower()
            self.signatures = [Signature(0, problem=f"message not parseable: {_text(e)}")] \
                if b"dkim-signature" in head else []
            return
        fields = [v for n, v in self._dkim.headers if n.lower() == b"dkim-signature"]
        self.signatures = [_signature(i, v) for i, v in enumerate(fields)]

    def verify(self, sig: Signature, key: str | None, now: float) -> Verified:
        """Check ``sig`` with its key record ``key`` (the TXT text; None: no record) at time
        ``now`` (the gate's clock decides expiry, RFC 6376 §3.5 x=)."""
        if sig.problem:
            return Verified(sig, "neutral", sig.problem)
        if sig.expires is not None and sig.expires < now:
            return Verified(sig, "fail", "signature expired")
        if not key:
            return Verified(sig, "permerror", "no key for signature")
        d = self._dkim
        try:
            sigtags, include, fields = d.verify_headerprep(sig.index)
        except _UNPROCESSABLE as e:
            return Verified(sig, "neutral", _text(e))
        try:
            d.pk, d.keysize, d.ktag, d.seqtlsrpt = dkim.evaluate_pk(sig.key_name, key.encode())
        except (dkim.DKIMException, ValueError) as e:  # binascii.Error is a ValueError
            return Verified(sig, "permerror", f"bad key record: {_text(e)}")
        costly = _too_costly(d.ktag, d.pk)
        if costly:
            return Verified(sig, "permerror", costly)
        try:
            ok = d.verify_sig_process(sigtags, include, fields[sig.index], None)
        except dkim.DKIMException as e:
            return Verified(sig, "fail", _text(e))
        except _UNPROCESSABLE as e:  # not dkimpy's own error, yet about the signature, not us
            return Verified(sig, "neutral", f"signature not processable: {_text(e)}")
        return Verified(sig, "pass" if ok else "fail", None if ok else "signature did not verify")


def key_record(texts: list[str]) -> str | None:
    """The key record among a name's TXT records: the first holding ``p=`` (RFC 6376
    §3.6.2.2 lets a verifier choose), else the first; None when there are none."""
    return next((t for t in texts if "p=" in t), texts[0] if texts else None)


def key_problem(name: str, text: str) -> str | None:
    """Why the key record ``text`` is refused before any signature is checked with it (a
    key too costly to use), else None; a record dkimpy cannot parse is its to report."""
    try:
        pk, _, ktag, _ = dkim.evaluate_pk(name, text.encode())
    except (dkim.DKIMException, ValueError):
        return None
    return _too_costly(ktag, pk)


def _too_costly(ktag, pk) -> str | None:
    if ktag != b"rsa" or not pk:
        return None
    bits, exponent = pk["modulus"].bit_length(), pk["publicExponent"].bit_length()
    if bits > MAX_RSA_BITS:
        return f"RSA key of {bits} bits, more than {MAX_RSA_BITS}"
    if exponent > MAX_EXPONENT_BITS:
        return f"RSA public exponent of {exponent} bits, more than {MAX_EXPONENT_BITS}"
    return None


def _signature(index: int, value: bytes) -> Signature:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as e:
        return Signature(index, problem=f"bad tag list: {_text(e)}")
    text = {k.decode("ascii", "replace"): v.decode("utf-8", "replace") for k, v in tags.items()}
    sig = Signature(index, text.get("d", "").strip().rstrip(".").lower(), text.get("s", "").strip().lower(),
                    text.get("a", "").strip(), text.get("i", "").strip())
    missing = [t for t in ("v", "a", "b", "bh", "d", "h", "s") if t not in text]
    if missing:
        sig.problem = "missing " + ", ".join(f"{t}=" for t in missing)
    elif not _LABELS.match(sig.domain) or not _LABELS.match(sig.selector):
        sig.problem = "d= or s= is not a domain name"
    elif text.get("x", "").strip().isdigit():
        sig.expires = int(text["x"].strip())
    return sig


def _text(e: Exception) -> str:
    """dkimpy's message without its parenthesised detail (base64 blobs): ``body hash mismatch``."""
    return " ".join(str(e).split(" (")[0].split())[:160] or type(e).__name__
