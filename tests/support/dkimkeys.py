"""DKIM keys and signatures for tests: RSA 2048 keys made with the ``openssl`` command (the
tests that use them ask ``require_tool("openssl")``), Ed25519 keys with PyNaCl, messages
signed with dkimpy, and the TXT records that publish the keys::

    key = rsa_key(openssl)                       # or ed25519_key()
    zones = {"example.org": {"sel._domainkey": {"TXT": key.record}}}
    signed = sign(raw, key, "example.org", "sel")
"""
from __future__ import annotations

import base64
import functools
import subprocess
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing


@dataclass(frozen=True)
class Key:
    private: bytes  # what dkimpy signs with: a PEM (RSA) or a base64 seed (Ed25519)
    public: str     # base64, as in p=
    kind: str       # rsa | ed25519

    @property
    def record(self) -> str:
        """The key's TXT record (``v=DKIM1; k=rsa; p=...``)."""
        return f"v=DKIM1; k={self.kind}; p={self.public}"

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256" if self.kind == "rsa" else b"ed25519-sha256"


@functools.lru_cache(maxsize=4)
def rsa_key(openssl: str, n: int = 0) -> Key:
    """A fresh RSA 2048 key (``n`` tells keys apart: ``rsa_key(openssl, 1)`` is another)."""
    pem = subprocess.run([openssl, "genrsa", "2048"], capture_output=True, check=True, timeout=60).stdout
    der = subprocess.run([openssl, "rsa", "-pubout", "-outform", "DER"], input=pem, capture_output=True,
                         check=True, timeout=60).stdout
    return Key(pem, base64.b64encode(der).decode(), "rsa")


def ed25519_key() -> Key:
    signing = nacl.signing.SigningKey.generate()
    return Key(signing.encode(nacl.encoding.Base64Encoder),
               signing.verify_key.encode(nacl.encoding.Base64Encoder).decode(), "ed25519")


class _Expiring(dkim.DKIM):
    """dkimpy's signer with an ``x=`` tag (it has no option for one): for expired signatures."""

    expires: int = 0

    def gen_header(self, fields, *args, **kwargs):
        fields = [f for f in fields if f[0] != b"b"] + [(b"x", str(self.expires).encode()), (b"b", b"0" * 60)]
        return super().gen_header(fields, *args, **kwargs)


def sign(raw: bytes, key: Key, domain: str, selector: str, *, expires: int | None = None,
         headers: tuple[str, ...] = ("From", "To", "Subject", "Message-ID")) -> bytes:
    """``raw`` with a DKIM-Signature of ``domain`` prepended (relaxed/relaxed)."""
    signer = _Expiring(raw) if expires is not None else dkim.DKIM(raw)
    if expires is not None:
        signer.expires = expires
    field = signer.sign(selector.encode(), domain.encode(), key.private, signature_algorithm=key.algorithm,
                        canonicalize=(b"relaxed", b"relaxed"), include_headers=[h.encode() for h in headers])
    return field + raw


def absurd_rsa_record() -> str:
    """A key record no signer needs: a 4096-bit modulus with a 9001-bit public exponent (one
    verification would cost seconds). Written as DER by hand: no library makes such a key."""

    def der(tag: int, body: bytes) -> bytes:
        n = len(body)
        size = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
            (n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + size + body

    def integer(v: int) -> bytes:
        return der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))

    n, e = (1 << 4095) | 1, (1 << 9000) | 1
    algorithm = der(0x30, der(0x06, b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01") + der(0x05, b""))
    spki = der(0x30, algorithm + der(0x03, b"\x00" + der(0x30, integer(n) + integer(e))))
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()
