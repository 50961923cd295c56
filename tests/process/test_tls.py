"""Inbound STARTTLS: offered only when configured, works, and the session is marked TLS."""
import smtplib
import ssl
import subprocess

import pytest


@pytest.fixture
def cert(tmp_path, require_tool):
    openssl = require_tool("openssl")
    key, crt = tmp_path / "tls.key", tmp_path / "tls.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=gate.test", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    return str(crt), str(key)


def test_starttls_offered_and_used(gate_factory, downstream, cert):
    gate = gate_factory(config={"tls": {"cert": cert[0], "key": cert[1]}})
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with gate.smtp() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@sender.test", ["user@example.com"], b"Subject: tls\r\n\r\nhi\r\n")
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == b"Subject: tls\r\n\r\nhi\r\n"
    # XCLIENT PROTO is SMTP or ESMTP only: Postfix refuses ESMTPS (tests/postfix)
    assert msg.xclient.get("PROTO") == "ESMTP"


def test_no_starttls_without_tls_config(gate):
    with gate.smtp() as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        code, _ = client.docmd("STARTTLS")
        assert code >= 500
