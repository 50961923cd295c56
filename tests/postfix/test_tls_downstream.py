"""``downstream.tls`` against real downstreams: the private Postfix with STARTTLS and a
certificate from a test CA, and the capturing downstream, which offers no STARTTLS.

- ``starttls``: TLS when offered (Postfix logs a TLS connection from the gate), plain
  text when not;
- ``required``: TLS with a verified certificate (``tls_ca``, the name ``downstream.host``)
  or nothing: a downstream without STARTTLS, or with a certificate from another CA or for
  another name, gets no message, and the client gets ``451 4.4.1``.
"""
from __future__ import annotations

import smtplib

import pytest

from tests.support import postfixproc
from tests.support.postfixproc import start_postfix
from tests.support.testca import TestCA

FROM, TO = "alice@sender.test", "user@example.com"
BODY = b"Subject: tls downstream\r\n\r\nhi\r\n"
TLS_FROM_GATE = r"TLS connection established from unknown\[127\.0\.0\.1\]"


@pytest.fixture
def ca(tmp_path, require_tool) -> TestCA:
    return TestCA(tmp_path / "ca", require_tool("openssl"))


@pytest.fixture
def tls_postfix(tmp_path, ca, downstream_factory, monkeypatch):
    """A private Postfix offering STARTTLS with the test CA's certificate for 127.0.0.1
    (``.relay``: the capturing downstream it relays to); ``start(names)`` makes one whose
    certificate carries other names."""
    # Postfix's smtpd takes its TLS entropy from tlsmgr (without it: "454 TLS not available")
    monkeypatch.setattr(postfixproc, "MASTER_CF",
                        postfixproc.MASTER_CF + "tlsmgr    unix  - - n 1000? 1 tlsmgr\n")
    started = []

    def start(names=("127.0.0.1", "localhost")):
        cert, key = ca.issue(f"postfix{len(started)}", list(names), serial=100 + len(started))
        relay = downstream_factory()
        pf = start_postfix(tmp_path / f"postfix{len(started)}", relay_port=relay.port, smtpd_options=(
            "smtpd_tls_security_level=may", f"smtpd_tls_cert_file={cert}",
            f"smtpd_tls_key_file={key}", "smtpd_tls_loglevel=1"))
        pf.relay = relay
        started.append(pf)
        return pf

    yield start
    for pf in started:
        code = pf.stop()
        print(f"--- postfix master pid {pf.pid} exited {code} ---\n{pf.log_text()[-4000:]}")


def relay_config(port: int, tls: str, ca: str | None = None) -> dict:
    downstream = {"port": port, "tls": tls}
    if ca is not None:
        downstream["tls_ca"] = ca
    return {"downstream": downstream}


def send(gate) -> tuple[int, str]:
    """One message through the gate: (the final code, its text), a refusal included."""
    try:
        with gate.smtp() as client:
            client.sendmail(FROM, [TO], BODY)
    except smtplib.SMTPSenderRefused as e:
        return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def test_starttls_uses_tls_when_offered(gate_factory, tls_postfix):
    pf = tls_postfix()
    gate = gate_factory(config=relay_config(pf.port, "starttls"), downstream_port=pf.port)
    assert send(gate) == (250, "")
    [msg] = pf.relay.wait_for_messages(1, timeout=20)
    assert b"hi\r\n" in msg.data
    pf.wait_for_log(TLS_FROM_GATE)


def test_starttls_falls_back_to_plain_when_not_offered(gate_factory, downstream):
    gate = gate_factory(config=relay_config(downstream.port, "starttls"))
    assert send(gate) == (250, "")
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == BODY
    assert not any(line.upper().startswith(b"STARTTLS") for line in downstream.transcript)


def test_starttls_falls_back_to_plain_when_the_handshake_fails(gate_factory, tmp_path, ca,
                                                              downstream_factory):
    # Postfix without its tlsmgr offers STARTTLS and then answers it "454 4.7.0 TLS not
    # available due to local problem": a real downstream whose TLS is broken.
    cert, key = ca.issue("postfix", ["127.0.0.1"], serial=100)
    relay = downstream_factory()
    pf = start_postfix(tmp_path / "postfix", relay_port=relay.port, smtpd_options=(
        "smtpd_tls_security_level=may", f"smtpd_tls_cert_file={cert}", f"smtpd_tls_key_file={key}"))
    try:
        gate = gate_factory(config=relay_config(pf.port, "starttls"), downstream_port=pf.port)
        assert send(gate) == (250, "")
        relay.wait_for_messages(1, timeout=20)
        log = gate.wait_for_log("STARTTLS failed")
        assert "relaying in plain text" in log and "454" in log, log
    finally:
        pf.stop()


def test_required_with_the_ca_relays_over_verified_tls(gate_factory, tls_postfix, ca):
    pf = tls_postfix()
    gate = gate_factory(config=relay_config(pf.port, "required", str(ca.cert)), downstream_port=pf.port)
    assert send(gate) == (250, "")
    pf.relay.wait_for_messages(1, timeout=20)
    pf.wait_for_log(TLS_FROM_GATE)
    assert "unavailable" not in gate.log_text() and "STARTTLS failed" not in gate.log_text()


def test_required_refuses_a_downstream_without_starttls(gate_factory, downstream):
    gate = gate_factory(config=relay_config(downstream.port, "required"))
    code, text = send(gate)
    assert code == 451 and text.startswith("4.4.1"), (code, text)
    assert downstream.messages == []
    assert not any(line.upper().startswith(b"MAIL") for line in downstream.transcript)
    log = gate.wait_for_log("unavailable")
    assert "STARTTLS" in log, log


@pytest.mark.parametrize("problem", ["another CA", "another name"])
def test_required_refuses_a_certificate_that_fails_verification(gate_factory, tls_postfix, ca,
                                                                 tmp_path, require_tool, problem):
    if problem == "another CA":
        pf = tls_postfix()
        trusted = TestCA(tmp_path / "other-ca", require_tool("openssl"), name="another CA").cert
    else:
        pf = tls_postfix(names=("mx.other.test",))
        trusted = ca.cert
    gate = gate_factory(config=relay_config(pf.port, "required", str(trusted)), downstream_port=pf.port)
    code, text = send(gate)
    assert code == 451 and text.startswith("4.4.1"), (code, text)
    log = gate.wait_for_log("unavailable")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
    # Postfix saw a TLS handshake fail and never a MAIL FROM: nothing went in plain text.
    assert "MAIL" not in pf.log_text() and "queued as" not in pf.log_text()
    assert pf.relay.messages == [] and pf.relay.connections == 0
