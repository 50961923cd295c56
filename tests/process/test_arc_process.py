"""ARC through the real gate process: keys served by the real test DNS server, messages
DKIM-signed (and ARC-sealed by a "forwarding hop") in the test, a capturing downstream, and
the delivered copies checked with dkimpy's own verifiers as the next hop would check them.
The policy is docs/rules/arc.md's example, with the test's key file."""
import json
import re
import smtplib

import dkim
import pytest

from tests.support.arcsets import arc_hop, txt_lookup
from tests.support.constants import ROOT
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dnsserver import DnsServer

GATE = "gate.test"  # the hostname the test gates are given: the gate's authserv-id
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: user@example.com\r\nSubject: quarterly figures\r\n"
           b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <q4@example.org>\r\n\r\n"
           b"Hello,\r\n.a line with a leading dot\r\nbye\r\n")


def documented_policy(key_path) -> str:
    """The example policy of docs/rules/arc.md, exactly as users read it, with our key file."""
    doc = (ROOT / "docs" / "rules" / "arc.md").read_text()
    [policy] = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if b.startswith("# policies/")]
    return policy.replace("/etc/smtpgate/arc.pem", str(key_path))


@pytest.fixture(scope="module")
def keys():
    from tests.support.gateproc import require_tool
    openssl = require_tool("openssl")
    return {"author": rsa_key(openssl), "fwd": rsa_key(openssl, 1), "gate": rsa_key(openssl, 2)}


@pytest.fixture
def ns(keys):
    zones = {"example.org": {"s1._domainkey": {"TXT": keys["author"].record},
                             "_dmarc": {"TXT": "v=DMARC1; p=reject"}},
             "fwd.example": {"arc._domainkey": {"TXT": keys["fwd"].record}},
             "example.com": {"arc2026._domainkey": {"TXT": keys["gate"].record}}}
    with DnsServer(zones) as server:
        yield server


@pytest.fixture
def arc_gate(gate_factory, ns, keys, tmp_path):
    key = tmp_path / "arc.pem"
    key.write_bytes(keys["gate"].private)
    return gate_factory(policies={"default.yaml": documented_policy(key)},
                        config={"dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}})


def send(gate, raw: bytes) -> None:
    with gate.smtp() as c:
        c.ehlo()
        assert c.sendmail("alice@example.org", ["user@example.com"], raw) == {}


def newest_seal(data: bytes) -> str:
    [value] = [" ".join(v.decode().split()) for n, v in dkim.rfc822_parse(data)[0][:1] if n == b"ARC-Seal"]
    return value


def test_round_trip_subject_tag_breaks_dkim_and_the_seal_carries_dkim_pass(arc_gate, downstream, ns, keys):
    signed = sign(MESSAGE, keys["author"], "example.org", "s1",
                  headers=("From", "To", "Subject", "Date", "Message-ID"))
    send(arc_gate, signed)
    [got] = downstream.wait_for_messages(1)
    assert b"\r\nSubject: [external] quarterly figures\r\n" in got.data
    assert not dkim.verify(got.data, dnsfunc=txt_lookup(ns))  # as expected: the tag broke it
    cv, sets, why = dkim.arc_verify(got.data, dnsfunc=txt_lookup(ns))
    assert (cv, why) == (b"pass", "success")
    [ours] = sets
    aar = " ".join(ours["aar-value"].decode().split())
    assert aar.startswith(f"i=1; {GATE}; ")
    assert "dkim=pass header.d=example.org header.s=s1" in aar and "arc=none" in aar
    assert "dmarc=pass header.from=example.org" in aar
    assert newest_seal(got.data).startswith("i=1; cv=none; a=rsa-sha256; d=example.com; s=arc2026;")
    # below the set: the gate's header, then the message exactly as the rules left it
    assert got.data.endswith(signed.replace(b"Subject: quarterly", b"Subject: [external] quarterly"))


def test_incoming_chains_pass_or_fail_and_are_sealed_on(arc_gate, downstream, ns, keys):
    signed = sign(MESSAGE, keys["author"], "example.org", "s1")
    forwarded = arc_hop(signed, keys["fwd"], "fwd.example", "arc", "dkim=pass header.d=example.org; arc=none")
    # changed after the hop sealed it, in a field its seal covers and the author's DKIM does not
    # (so dkim and DMARC still pass and the message is delivered)
    broken = forwarded.replace(b"Date: Mon, 30 Nov", b"Date: Tue, 30 Nov")
    send(arc_gate, forwarded)
    send(arc_gate, broken)
    good, bad = downstream.wait_for_messages(2)
    assert newest_seal(good.data).startswith("i=2; cv=pass;")
    cv, sets, _ = dkim.arc_verify(good.data, dnsfunc=txt_lookup(ns))
    assert cv == b"pass" and [s["instance"] for s in sets] == [2, 1]
    assert newest_seal(bad.data).startswith("i=2; cv=fail;")
    assert b"arc=fail" in bad.data.partition(b"\r\n\r\n")[0]


def test_try_shows_the_seal_stage(arc_gate, ns, keys, tmp_path):
    eml = tmp_path / "signed.eml"
    eml.write_bytes(sign(MESSAGE, keys["author"], "example.org", "s1"))
    done = arc_gate.cli("try", str(eml), "--from", "alice@example.org", "--to", "user@example.com", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [(e["stage"], e["rule"]) for e in doc["trace"] if e["stage"] in ("data", "seal")] == [
        ("data", "dkim"), ("data", "dmarc"), ("data", "arc"), ("data", "rewrite"), ("seal", "arc")]
    assert [c["header"] for c in doc["changes"] if c["rule"] == "arc"] == [
        "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]


def test_a_leading_continuation_line_cannot_join_the_gate_s_results(gate_factory, downstream, ns, keys, tmp_path):
    # Invalid but seen in real mail: it stays first, above the set and the gate's header,
    # attached to nothing (dkimpy cannot parse such a header section: no set, reported).
    key = tmp_path / "arc.pem"
    key.write_bytes(keys["gate"].private)
    policy = (f"domains: [example.com]\nrules:\n  - arc: {{key: {key}, selector: arc2026, domain: example.com}}\n")
    gate = gate_factory(policies={"default.yaml": policy},
                        config={"dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}})
    folded = b" ; dkim=pass header.d=bank.example\r\n" + MESSAGE
    send(gate, folded)
    [got] = downstream.wait_for_messages(1)
    first, second, rest = got.data.split(b"\r\n", 2)
    assert first == b" ; dkim=pass header.d=bank.example"
    assert second == b"Authentication-Results: gate.test; arc=none smtp.remote-ip=127.0.0.1"
    assert rest == MESSAGE
