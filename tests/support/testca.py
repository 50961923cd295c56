"""A throw-away certificate authority for TLS tests, made with the ``openssl`` command.

    ca = TestCA(tmp_path / "ca", openssl)
    cert, key = ca.issue("gate", names=["127.0.0.1", "gate.test"], serial=1)

Certificates are P-256 (quick to make), valid for two days, and carry what Python's default
client context checks: the names as subjectAltName (an IP address as ``IP:``), serverAuth,
and the key identifiers.
"""
from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _san(name: str) -> str:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"DNS:{name}"
    return f"IP:{name}"


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, openssl: str, name: str = "smtpgate test CA") -> None:
        self.folder = folder
        self.openssl = openssl
        folder.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = folder / "ca.pem", folder / "ca.key"
        self._run("req", "-x509", *_KEY, "-days", "2", "-subj", f"/CN={name}",
                  "-keyout", str(self.key), "-out", str(self.cert),
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-addext", "subjectKeyIdentifier=hash")

    def issue(self, stem: str, names: list[str], serial: int) -> tuple[Path, Path]:
        """A server certificate for ``names`` (the first is the CN) signed by this CA, with
        the given serial number: (certificate file, key file)."""
        cert, key, csr = (self.folder / f"{stem}.pem", self.folder / f"{stem}.key",
                          self.folder / f"{stem}.csr")
        ext = self.folder / f"{stem}.ext"
        ext.write_text(f"subjectAltName={','.join(_san(n) for n in names)}\n"
                       "basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=serverAuth\n"
                       "subjectKeyIdentifier=hash\n"
                       "authorityKeyIdentifier=keyid\n")
        self._run("req", "-new", *_KEY, "-subj", f"/CN={names[0]}", "-keyout", str(key),
                  "-out", str(csr))
        self._run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                  "-set_serial", str(serial), "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return cert, key

    def _run(self, *args: str) -> None:
        done = subprocess.run([self.openssl, *args], capture_output=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.decode(errors='replace')}")
