"""Inbound TLS of the real gate: the TLS 1.2 floor, tls.ciphers, what was negotiated in the
transaction's log line, and the certificate re-read on SIGHUP (renewed: served to new
connections; broken: refused, logged, the old one kept).

Certificates come from a test CA (tests/support/testca.py, the openssl command); the
clients verify them against it, so the peer certificate's serial number tells which one the
gate served.
"""
from __future__ import annotations

import json
import re
import signal
import smtplib
import ssl
import subprocess
import sys

import pytest

from tests.support.gateproc import wait_until
from tests.support.testca import TestCA

FROM, TO = "alice@sender.test", "user@example.com"
BODY = b"Subject: tls\r\n\r\nhi\r\n"


@pytest.fixture
def ca(tmp_path, require_tool) -> TestCA:
    return TestCA(tmp_path / "ca", require_tool("openssl"))


@pytest.fixture
def tls_gate(gate_factory, ca, tmp_path):
    """A gate serving the test CA's certificate serial 1 for 127.0.0.1 from tmp_path/tls/."""
    cert, key = ca.issue("served", ["127.0.0.1", "gate.test"], serial=1)
    return gate_factory(config={"tls": {"cert": str(cert), "key": str(key)}})


def client_context(ca: TestCA, **limits) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    for name, value in limits.items():
        setattr(ctx, name, value)
    return ctx


def served_serial(gate, ctx: ssl.SSLContext) -> int:
    """Connect, STARTTLS (verifying against the CA), and return the certificate's serial."""
    with gate.smtp() as client:
        client.starttls(context=ctx)
        return int(client.sock.getpeercert()["serialNumber"], 16)


def transaction_lines(gate, start: int = 0) -> list[str]:
    return [line for line in gate.log_text()[start:].splitlines() if " transaction " in line]


def test_negotiated_protocol_and_cipher_in_the_log_line(tls_gate, ca, downstream):
    with tls_gate.smtp() as client:
        client.starttls(context=client_context(ca))
        version, cipher = client.sock.version(), client.sock.cipher()[0]
        client.sendmail(FROM, [TO], BODY)
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == BODY
    assert version in ("TLSv1.2", "TLSv1.3")
    tls_gate.wait_for_log(" transaction ")
    [line] = transaction_lines(tls_gate)
    assert f" tls={version} cipher={cipher} " in line, line


def test_plain_session_logs_no_tls(tls_gate, downstream):
    with tls_gate.smtp() as client:
        client.sendmail(FROM, [TO], BODY)
    downstream.wait_for_messages(1)
    tls_gate.wait_for_log(" transaction ")
    [line] = transaction_lines(tls_gate)
    assert " tls=" not in line and " cipher=" not in line


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_and_the_gate_serves_on(tls_gate, ca, downstream):
    # A client that can speak TLS 1.1 only (OpenSSL's security level 0 lets it offer that).
    old = client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_1,
                         maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with tls_gate.smtp() as client:
        client.ehlo()
        with pytest.raises(ssl.SSLError) as refused:
            client.starttls(context=old)
    # The gate ends the handshake at the client's hello, and says why in one line.
    log = tls_gate.wait_for_log("TLS handshake failed")
    assert re.search(r"client=127\.0\.0\.1: TLS handshake failed: UNSUPPORTED_PROTOCOL", log), log
    assert "Traceback" not in log
    with tls_gate.smtp() as client:  # a modern client right after is served
        client.starttls(context=client_context(ca))
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.sendmail(FROM, [TO], BODY)
    downstream.wait_for_messages(1)
    assert tls_gate.is_running()


def test_ciphers_restrict_tls_1_2(gate_factory, ca):
    cert, key = ca.issue("served", ["127.0.0.1"], serial=1)
    gate = gate_factory(config={"tls": {"cert": str(cert), "key": str(key),
                                        "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384"}})
    tls12 = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    with gate.smtp() as client:
        client.starttls(context=tls12)
        assert client.sock.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    other = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    other.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # none the gate allows
    with gate.smtp() as client:
        client.ehlo()
        with pytest.raises(ssl.SSLError):
            client.starttls(context=other)


def test_a_cipher_list_openssl_rejects_is_a_located_config_error(tmp_path, ca):
    from tests.process.test_operations import write_config
    cert, key = ca.issue("served", ["127.0.0.1"], serial=1)
    q = json.dumps
    path = write_config(tmp_path / "cfg", extra=(f"tls:\n  cert: {q(str(cert))}\n  key: {q(str(key))}\n"
                                                 "  ciphers: NO-SUCH-CIPHER\n"))
    done = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert re.search(rf"{re.escape(str(path))}:12:\d+: tls\.ciphers: OpenSSL selects no cipher",
                     done.stderr + done.stdout), done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_key_that_does_not_match_stops_the_start_with_a_clear_error(tmp_path, ca):
    from tests.process.test_operations import write_config
    cert, _ = ca.issue("one", ["127.0.0.1"], serial=1)
    _, other_key = ca.issue("two", ["127.0.0.1"], serial=2)
    q = json.dumps
    path = write_config(tmp_path / "cfg", extra=f"tls: {{cert: {q(str(cert))}, key: {q(str(other_key))}}}\n")
    done = subprocess.run([sys.executable, "-m", "smtpgate", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "configuration refused" in done.stderr and f"cannot use the certificate {cert}" in done.stderr
    assert "Traceback" not in done.stderr


def reloaded(gate, start: int, workers: int, what: str) -> str:
    """Wait until every worker logged ``what`` after ``start``; the log since then."""
    if not wait_until(lambda: gate.log_text()[start:].count(what) >= workers, 10):
        pytest.fail(f"not every worker logged {what!r}\n{gate.log_text()}", pytrace=False)
    return gate.log_text()[start:]


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_serves_a_renewed_certificate_and_keeps_the_old_one_when_broken(
        gate_factory, ca, downstream, workers):
    cert, key = ca.issue("served", ["127.0.0.1", "gate.test"], serial=1)
    tls_gate = gate_factory(config={"tls": {"cert": str(cert), "key": str(key)}, "workers": workers})
    ctx = client_context(ca)
    assert served_serial(tls_gate, ctx) == 1
    cert_path = tls_gate.config["tls"]["cert"]
    key_path = tls_gate.config["tls"]["key"]
    kept = open(cert_path, "rb").read()

    # Renewed: a new key and certificate written over the configured files.
    new_cert, new_key = ca.issue("renewed", ["127.0.0.1", "gate.test"], serial=2)
    open(key_path, "wb").write(new_key.read_bytes())
    open(cert_path, "wb").write(new_cert.read_bytes())
    mark = len(tls_gate.log_text())
    tls_gate.send_signal(signal.SIGHUP)
    reloaded(tls_gate, mark, workers, "configuration reloaded")
    # Each new connection, whichever worker takes it, gets the renewed certificate.
    assert [served_serial(tls_gate, ctx) for _ in range(3 * workers)] == [2] * 3 * workers

    # Broken: the old certificate back but the new key kept (a half-finished renewal).
    open(cert_path, "wb").write(kept)
    mark = len(tls_gate.log_text())
    tls_gate.send_signal(signal.SIGHUP)
    log = reloaded(tls_gate, mark, workers, "reload refused")
    assert f"cannot use the certificate {cert_path} with the key {key_path}" in log, log
    assert "KEY_VALUES_MISMATCH" in log.upper(), log
    assert "configuration reloaded" not in log
    # still the one loaded before
    assert [served_serial(tls_gate, ctx) for _ in range(3 * workers)] == [2] * 3 * workers
    with tls_gate.smtp() as client:
        client.starttls(context=ctx)
        client.sendmail(FROM, [TO], BODY)
    downstream.wait_for_messages(1)
