"""dkim, arc and dmarc on hostile mutations of signed and sealed messages (hypothesis,
in process through smtpgate.testing): no mutation may crash a rule — a crash is a 451 on
every retry — or let the gate write a header it should not. What this found is kept as
named tests in test_dkim.py, test_arc.py and test_dmarc.py."""
import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smtpgate.testing import FakeClock, FakeResolver, Harness, message
from smtpgate_rules.arc import Arc
from smtpgate_rules.dkim import Dkim
from smtpgate_rules.dmarc import Dmarc
from smtpgate_rules.rewrite import Rewrite
from tests.support.arcsets import arc_hop
from tests.support.dkimkeys import ed25519_key, rsa_key, sign

RAW = message(subject="s", body="b\r\n").replace(b"sender@sender.example", b"alice@example.org")
TOKENS = [b"\r\n", b"\r\n ", b" ", b"\t", b";", b"=", b":", b"\x00", b"\xff", b"i=", b"b=", b"bh=", b"h=",
          b"-", b"0", b"@", b"ARC-Seal: ", b"DKIM-Signature: ", b"From: ", b",", b"<", b'"', "ä".encode()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.support.gateproc import require_tool
    rsa, ed = rsa_key(require_tool("openssl")), ed25519_key()
    pem = tmp_path_factory.mktemp("arc") / "arc.pem"
    pem.write_bytes(rsa.private)
    bases = [sign(RAW, ed, "example.org", "ed"),
             arc_hop(sign(RAW, rsa, "example.org", "rsa"), rsa, "fwd.example", "arc", "arc=none")]
    records = {("arc._domainkey.fwd.example", "TXT"): rsa.record, ("rsa._domainkey.example.org", "TXT"): rsa.record,
               ("ed._domainkey.example.org", "TXT"): ed.record,
               ("_dmarc.example.org", "TXT"): "v=DMARC1; p=quarantine"}
    return bases, records, str(pem)


mutation = st.tuples(st.floats(0, 1), st.sampled_from(["insert", "delete", "byte"]),
                     st.sampled_from(TOKENS), st.integers(0, 255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.integers(0, 1), mutations=st.lists(mutation, min_size=1, max_size=6))
def test_no_mutation_crashes_a_rule(world, base, mutations):
    bases, records, pem = world
    raw = bytearray(bases[base])
    for where, op, token, byte in mutations:
        pos = int(where * (len(raw) - 10))
        if op == "insert":
            raw[pos:pos] = token
        elif op == "delete":
            del raw[pos:pos + 1 + byte % 8]
        else:
            raw[pos] = byte
    h = Harness([(Dkim, {"require": ["example.org"], "on_missing": "accept"}),
                 (Arc, {"key": pem, "selector": "s", "domain": "gate.example"}),
                 (Dmarc, {"on_quarantine": "header"}), (Rewrite, {"subject_prefix": "[x] "})],
                resolver=FakeResolver(records), hostname="gate.example", clock=FakeClock(time.time()))
    result = asyncio.run(h.send(bytes(raw)))
    assert [t for t in result.transaction.trace if t.action == "error"] == []
    for relayed in h.relayed:  # the gate's own header: one line, ASCII, within SMTP's limit
        ours = [line for line in relayed.data.split(b"\r\n\r\n")[0].split(b"\r\n")
                if line.startswith(b"Authentication-Results: gate.example;")]
        assert len(ours) == 1 and len(ours[0]) <= 990 and ours[0].isascii()
