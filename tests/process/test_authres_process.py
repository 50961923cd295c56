"""Forged Authentication-Results (RFC 8601 §5) through the real gate: fields claiming the
gate's own authserv-id (its ``hostname``, gate.test in these gates) are gone before any rule
runs and before the downstream gets the message; other fields stay, and a message without
one arrives byte for byte."""
import json

from tests.support.constants import PLUGINS

POLICY = "domains: [example.com]\nrules:\n  - seen_authres: {}\n"

FORGED = (b"Authentication-Results: Gate.Test; spf=pass smtp.mailfrom=bank.example\r\n"
          b"Received: from mx.other.example by mx.other.example\r\n"
          b"Authentication-Results: mx.other.example; dkim=pass header.d=other.example\r\n"
          b"Authentication-Results: (looks legit)\r\n gate.test 1;\r\n dkim=pass header.d=bank.example\r\n"
          b"From: <ceo@bank.example>\r\nSubject: pay now\r\n\r\n"
          b"Authentication-Results: gate.test; body lines are no header\r\n")
CLEAN = (b"Received: from mx.other.example by mx.other.example\r\n"
         b"Authentication-Results: mx.other.example; spf=pass\r\n"
         b"From: <a@other.example>\r\nSubject: hello\r\n\r\nbody\r\n")


def test_forged_fields_are_removed_before_rules_and_downstream(gate_factory, downstream):
    gate = gate_factory(policies={"default.yaml": POLICY}, plugins=[PLUGINS / "seen_authres.py"],
                        config={"log": {"format": "json", "level": "info"}})
    with gate.smtp() as c:
        c.ehlo()
        assert c.sendmail("ceo@bank.example", ["user@example.com"], FORGED) == {}
        assert c.sendmail("a@other.example", ["user@example.com"], CLEAN) == {}
    forged, clean = downstream.wait_for_messages(2)
    assert forged.data == (
        b"X-Seen-AR: mx.other.example\r\n"
        b"Received: from mx.other.example by mx.other.example\r\n"
        b"Authentication-Results: mx.other.example; dkim=pass header.d=other.example\r\n"
        b"From: <ceo@bank.example>\r\nSubject: pay now\r\n\r\n"
        b"Authentication-Results: gate.test; body lines are no header\r\n")
    assert clean.data == b"X-Seen-AR: mx.other.example\r\n" + CLEAN
    logged = [json.loads(line) for line in gate.wait_for_log('"tx"').splitlines()
              if line.startswith("{") and '"rules"' in line]
    reasons = [e.get("reason") for entry in logged for e in entry.get("rules", [])]
    assert "removed 2 forged Authentication-Results" in reasons, logged


def test_a_message_without_forged_fields_is_byte_identical(gate, downstream):
    with gate.smtp() as c:
        c.ehlo()
        assert c.sendmail("a@other.example", ["user@example.com"], CLEAN) == {}
    [got] = downstream.wait_for_messages(1)
    assert got.data == CLEAN
