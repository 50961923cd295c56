"""The arc rule through smtpgate.testing, on real signatures: RSA 2048 keys the tests generate
(openssl), messages DKIM-signed and ARC-sealed by a "forwarding hop" with dkimpy, keys served
by the real test DNS server; what the gate relays is checked with dkimpy's own verifiers (the
downstream's view) and its ARC-Authentication-Results parsed back with authres.

dkimpy (and RFC 8617) seal ARC with rsa-sha256 only, so there is no Ed25519 ARC case; an
Ed25519 DKIM signature still travels inside a sealed message (the round trip signs with both)."""
import subprocess
import time

import authres
import dkim
import pytest

from smtpgate import OptionError
from smtpgate.resolver import Resolver
from smtpgate.testing import FakeClock, Harness, message
from smtpgate_rules.arc import Arc, chain
from smtpgate_rules.dkim import Dkim
from smtpgate_rules.dmarc import Dmarc
from smtpgate_rules.rewrite import Rewrite
from tests.support.arcsets import arc_hop, txt_lookup
from tests.support.dkimkeys import absurd_rsa_record, ed25519_key, rsa_key, sign
from tests.support.dnsserver import DnsServer

RAW = message(subject="quarterly figures", body="hello\r\nsecond line\r\n").replace(
    b"sender@sender.example", b"alice@example.org")
GATE = "gate.example"


@pytest.fixture(scope="module")
def openssl():
    from tests.support.gateproc import require_tool
    return require_tool("openssl")


@pytest.fixture(scope="module")
def keys(openssl):
    return {"author": rsa_key(openssl), "fwd": rsa_key(openssl, 1), "gate": rsa_key(openssl, 2),
            "ed": ed25519_key()}


@pytest.fixture
def ns(keys):
    zones = {"example.org": {"rsa._domainkey": {"TXT": keys["author"].record},
                             "ed._domainkey": {"TXT": keys["ed"].record},
                             "_dmarc": {"TXT": "v=DMARC1; p=reject"}},
             "fwd.example": {"arc._domainkey": {"TXT": keys["fwd"].record},
                             "slow._domainkey": {"TXT": keys["fwd"].record}},
             GATE: {"seal._domainkey": {"TXT": keys["gate"].record}}}
    with DnsServer(zones) as server:
        server.timeout_names.add("slow._domainkey.fwd.example")
        yield server


@pytest.fixture
def gate_key(tmp_path, keys):
    path = tmp_path / "arc.pem"
    path.write_bytes(keys["gate"].private)
    return str(path)


def harness(ns, gate_key, options=None, rules=(), arc_entry=None, dkim_rule=True):
    """dkim, arc, then ``rules`` (they run after arc at DATA, like an edit)."""
    resolver = Resolver([ns.address], timeout=0.3, attempts=1)
    arc = arc_entry or (Arc, {"key": gate_key, "selector": "seal", "domain": GATE, **(options or {})})
    return Harness([(Dkim, {})] * dkim_rule + [arc, *rules], resolver=resolver, hostname=GATE,
                   clock=FakeClock(time.time()))


def arc_sets(data: bytes) -> dict[str, str]:
    """The delivered message's ARC fields of the newest instance, by name (values unfolded)."""
    fields = dkim.rfc822_parse(data)[0]
    out = {}
    for name, value in fields:
        text = " ".join(value.decode().split())
        if name.decode().lower().startswith("arc-") and name.decode() not in out:
            out[name.decode()] = text
    return out


def aar_results(data: bytes) -> authres.AuthenticationResultsHeader:
    aar = arc_sets(data)["ARC-Authentication-Results"]
    instance, _, value = aar.partition(";")
    assert instance.strip().startswith("i=")
    return authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value.strip())


def gate_header(data: bytes) -> authres.AuthenticationResultsHeader:
    """The gate's own Authentication-Results field of the delivered message, parsed."""
    [value] = [" ".join(v.decode().split()) for n, v in dkim.rfc822_parse(data)[0]
               if n == b"Authentication-Results" and v.split(b";")[0].strip() == GATE.encode()]
    return authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)


def chain_of(result) -> dict:
    return result.transaction.results.get("arc").data["chain"]


async def test_round_trip_tagged_subject_breaks_dkim_but_the_seal_carries_dkim_pass(ns, gate_key, keys):
    signed = sign(sign(RAW, keys["author"], "example.org", "rsa"), keys["ed"], "example.org", "ed")
    assert dkim.verify(signed, dnsfunc=txt_lookup(ns))
    h = harness(ns, gate_key, rules=[(Dmarc, {}), (Rewrite, {"subject_prefix": "[external] "})])
    result = await h.send(signed, sender="alice@example.org")
    assert result.reply.code == 250
    delivered = h.relayed[0].data
    assert b"Subject: [external] quarterly figures" in delivered
    assert not dkim.verify(delivered, dnsfunc=txt_lookup(ns))  # the tag broke the author's signature
    cv, sets, why = dkim.arc_verify(delivered, dnsfunc=txt_lookup(ns))
    assert (cv, why) == (b"pass", "success") and [s["instance"] for s in sets] == [1]
    assert arc_sets(delivered)["ARC-Seal"].startswith("i=1; cv=none; a=rsa-sha256; d=gate.example; s=seal;")
    aar = aar_results(delivered)
    assert aar.authserv_id == GATE
    assert [(r.method, r.result, r.header_d, r.header_s) for r in aar.results if r.method == "dkim"] == [
        ("dkim", "pass", "example.org", "ed"), ("dkim", "pass", "example.org", "rsa")]
    assert [(r.method, r.result) for r in aar.results if r.method in ("arc", "dmarc")] == [
        ("arc", "none"), ("dmarc", "pass")]
    # the set sits on top, above the gate's own Authentication-Results, in the order RFC 8617 shows
    assert [n for n, _ in dkim.rfc822_parse(delivered)[0][:4]] == [
        b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results", b"Authentication-Results"]
    seal_entry = [e for e in result.trace if e.stage == "seal"][0]
    assert seal_entry.rule == "arc" and "add ARC-Seal" in seal_entry.reason


async def test_incoming_valid_chain_is_pass_and_sealed_on_with_cv_pass(ns, gate_key, keys):
    signed = sign(RAW, keys["author"], "example.org", "rsa")
    forwarded = arc_hop(signed, keys["fwd"], "fwd.example", "arc", "dkim=pass header.d=example.org; arc=none")
    h = harness(ns, gate_key, rules=[(Rewrite, {"subject_prefix": "[external] "})])
    result = await h.send(forwarded)
    assert chain_of(result)["cv"] == "pass" and chain_of(result)["instances"] == 1
    assert chain_of(result)["signers"] == ["fwd.example"]
    assert ns.count("arc._domainkey.fwd.example") == 1  # fetched once, before dkimpy ran
    delivered = h.relayed[0].data
    assert arc_sets(delivered)["ARC-Seal"].startswith("i=2; cv=pass;")
    cv, sets, why = dkim.arc_verify(delivered, dnsfunc=txt_lookup(ns))
    assert (cv, why) == (b"pass", "success") and [s["instance"] for s in sets] == [2, 1]
    ours = [r for r in aar_results(delivered).results if r.method == "arc"]
    assert [(r.result, [(p.type, p.name, p.value) for p in r.properties][0]) for r in ours] == [
        ("pass", ("header", "oldest-pass", "1"))]


async def test_broken_chain_is_fail_and_sealed_on_with_cv_fail(ns, gate_key, keys):
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none")
    broken = forwarded.replace(b"second line", b"second lime")  # altered after the hop sealed it
    h = harness(ns, gate_key)
    result = await h.send(broken)
    assert result.reply.code == 250
    found = chain_of(result)
    assert found["cv"] == "fail" and "did not validate" in found["reason"]
    delivered = h.relayed[0].data
    assert arc_sets(delivered)["ARC-Seal"].startswith("i=2; cv=fail;")
    assert [r.result for r in aar_results(delivered).results if r.method == "arc"] == ["fail"]
    assert [(r.method, r.result) for r in gate_header(delivered).results if r.method == "arc"] == [
        ("arc", "fail")]


async def test_a_chain_an_earlier_hop_sealed_with_cv_fail_is_not_sealed_again(ns, gate_key, keys):
    first = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none").replace(b"second line", b"altered")
    second = arc_hop(first, keys["fwd"], "fwd.example", "arc", "arc=fail")  # that hop saw it fail
    assert b"cv=fail" in second.partition(b"\r\n\r\n")[0]
    h = harness(ns, gate_key)
    result = await h.send(second)
    found = chain_of(result)
    assert (found["cv"], found["ended"], found["instances"]) == ("fail", True, 2)
    assert b"i=3" not in h.relayed[0].data
    assert "ended the chain" in result.transaction.results.get("arc").msg[0]
    assert [r.result for r in gate_header(h.relayed[0].data).results if r.method == "arc"] == ["fail"]


async def test_a_chain_whose_key_is_missing_fails(ns, gate_key, keys):
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "gone", "arc=none")
    result = await harness(ns, gate_key).send(forwarded)
    assert chain_of(result)["cv"] == "fail"


async def test_a_key_lookup_timeout_fails_the_chain_or_defers(ns, gate_key, keys):
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "slow", "arc=none")
    result = await harness(ns, gate_key).send(forwarded)
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "fail" and "key lookup failed" in chain_of(result)["reason"]
    h = harness(ns, gate_key, {"on_dns_error": "tempfail"})
    result = await h.send(forwarded)
    assert (result.reply.code, result.reply.enhanced) == (451, "4.7.29")
    assert h.relayed == []


async def test_unsealed_message_is_cv_none_and_sealed_i1(ns, gate_key):
    h = harness(ns, gate_key)
    result = await h.send(RAW)
    assert chain_of(result) == {"cv": "none", "instances": 0, "reason": None, "signers": [], "oldest_pass": 0,
                                 "ended": False}
    cv, _, _ = dkim.arc_verify(h.relayed[0].data, dnsfunc=txt_lookup(ns))
    assert cv == b"pass"


async def test_a_forged_gate_result_never_reaches_the_seal(ns, gate_key):
    forged = b"Authentication-Results: gate.example; dkim=pass header.d=bank.example\r\n" + RAW
    h = harness(ns, gate_key)
    await h.send(forged)
    aar = aar_results(h.relayed[0].data)
    assert "bank.example" not in str(aar)
    assert [(r.method, r.result) for r in aar.results] == [("dkim", "none"), ("arc", "none")]


async def test_authserv_id_option_names_the_seal_s_results(ns, gate_key):
    # a client's field claiming that id is not taken into the seal either
    forged = b"Authentication-Results: example.com; dkim=pass header.d=bank.example\r\n" + RAW
    h = harness(ns, gate_key, {"authserv_id": "example.com"})
    await h.send(forged)
    aar = aar_results(h.relayed[0].data)
    assert aar.authserv_id == "example.com" and "bank.example" not in str(aar)
    assert dkim.arc_verify(h.relayed[0].data, dnsfunc=txt_lookup(ns))[0] == b"pass"


async def test_signed_headers_option(ns, gate_key):
    h = harness(ns, gate_key, {"headers": ["From", "Subject", "Date"]})
    await h.send(RAW)
    ams = arc_sets(h.relayed[0].data)["ARC-Message-Signature"]
    assert "h=from : subject : date;" in ams
    assert dkim.arc_verify(h.relayed[0].data, dnsfunc=txt_lookup(ns))[0] == b"pass"


async def test_shadow_arc_adds_no_set_and_reports_no_arc_result(ns, gate_key):
    rule = Arc({"key": gate_key, "selector": "seal", "domain": GATE}, None)
    rule.mode = "shadow"
    h = harness(ns, gate_key, arc_entry=rule)
    rule.gate = h.context
    result = await h.send(RAW)
    delivered = h.relayed[0].data
    assert b"ARC-" not in delivered.partition(b"\r\n\r\n")[0]
    assert [r.method for r in gate_header(delivered).results] == ["dkim"]  # a shadow result is not vouched for
    entry = [e for e in result.trace if e.stage == "seal"][0]
    assert entry.shadow and "add ARC-Seal" in entry.reason


async def test_a_failure_half_way_through_the_set_leaves_none_of_it(ns, gate_key, monkeypatch):
    real = chain.seal

    def half_broken(*args):
        fields = real(*args)
        return fields[:1] + [(fields[1][0], "bare\nLF")] + fields[2:]  # the second field is bad

    monkeypatch.setattr(chain, "seal", half_broken)
    for on_error, code in (("accept", 250), ("tempfail", 451)):
        rule = Arc({"key": gate_key, "selector": "seal", "domain": GATE}, None)
        rule.on_error = on_error
        h = harness(ns, gate_key, arc_entry=rule)
        rule.gate = h.context
        result = await h.send(RAW)
        assert result.reply.code == code
        entry = [e for e in result.trace if e.stage == "seal"][0]
        assert entry.action == "error"
        if code == 250:
            assert b"ARC-" not in h.relayed[0].data.partition(b"\r\n\r\n")[0]
        else:
            assert h.relayed == []


async def test_no_seal_without_the_rule_s_own_result(ns, gate_key):
    class Crashing(Arc):
        async def on_data(self, tx, message):
            raise RuntimeError("verifier bug")

    rule = Crashing({"key": gate_key, "selector": "seal", "domain": GATE}, None)
    rule.on_error = "accept"
    h = harness(ns, gate_key, arc_entry=rule)
    rule.gate = h.context
    result = await h.send(RAW)
    assert result.reply.code == 250
    assert b"ARC-" not in h.relayed[0].data.partition(b"\r\n\r\n")[0]
    assert "not sealed" in result.transaction.results.get("arc").err[0]


# --- the key option ------------------------------------------------------------------

def test_pkcs1_and_pkcs8_keys_load(tmp_path, openssl, keys):
    pkcs8 = keys["gate"].private
    pkcs1 = subprocess.run([openssl, "rsa", "-traditional"], input=pkcs8, capture_output=True,
                           check=True, timeout=60).stdout
    assert b"BEGIN RSA PRIVATE KEY" in pkcs1 and b"BEGIN PRIVATE KEY" in pkcs8
    for pem in (pkcs1, pkcs8, pkcs8.replace(b"\n", b"\r\n")):
        path = tmp_path / "k.pem"
        path.write_bytes(pem)
        Arc({"key": str(path), "selector": "s", "domain": "example.org"}, None)


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read"),
    (b"hello\n", "not a PEM file"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an RSA private key"),
    ("ed25519", "not an RSA private key"),
    ("rsa512", "512 bits"),
    ("encrypted", "encrypted"),
])
def test_a_bad_key_is_refused_at_load(tmp_path, openssl, content, problem):
    path = tmp_path / "k.pem"
    if content == "ed25519":
        content = subprocess.run([openssl, "genpkey", "-algorithm", "ed25519"], capture_output=True,
                                 check=True, timeout=60).stdout
    elif content == "rsa512":
        content = subprocess.run([openssl, "genrsa", "512"], capture_output=True, check=True, timeout=60).stdout
    elif content == "encrypted":
        content = subprocess.run([openssl, "genrsa", "-aes128", "-passout", "pass:x", "1024"],
                                 capture_output=True, check=True, timeout=60).stdout
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(OptionError, match=problem) as e:
        Arc({"key": str(path), "selector": "s", "domain": "example.org"}, None)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("options, problem", [
    ({"headers": ["Subject"]}, "must include from"),
    ({"headers": ["From", "Received"]}, "received must not be signed"),
    ({"headers": ["From", "Authentication-Results"]}, "must not be signed"),
    ({"domain": "not a domain"}, "expected a domain name"),
    ({"selector": ""}, "expected a domain name"),
    ({"authserv_id": "two words"}, "expected a domain name"),
])
def test_bad_options_are_refused(gate_key, options, problem):
    with pytest.raises(OptionError, match=problem):
        Arc({"key": gate_key, "selector": "s", "domain": "example.org", **options}, None)


def test_check_config_names_the_file_and_line_of_a_bad_key(tmp_path):
    from smtpgate.config import check_config
    (tmp_path / "bad.pem").write_text("not a key\n")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        "domains: [example.com]\nrules:\n  - arc:\n      selector: s\n      domain: example.org\n"
        f"      key: {tmp_path / 'bad.pem'}\n")
    (tmp_path / "gate.yaml").write_text("policies: policies\n")
    [problem] = map(str, check_config(str(tmp_path / "gate.yaml")))
    assert problem == (f"{tmp_path}/policies/default.yaml:6:12: rules[0].arc.key: {tmp_path / 'bad.pem'}: "
                       "not a PEM file (no -----BEGIN line)")


async def test_a_message_dkimpy_cannot_seal_is_relayed_without_a_set(ns, gate_key):
    no_from = RAW.replace(b"From: alice@example.org\r\n", b"")
    h = harness(ns, gate_key)
    result = await h.send(no_from)
    assert result.reply.code == 250
    assert b"ARC-" not in h.relayed[0].data.partition(b"\r\n\r\n")[0]
    assert "From header field MUST be signed" in result.transaction.results.get("arc").err[0]


async def test_a_header_section_dkimpy_cannot_parse_is_none_or_fail_never_a_crash(ns, gate_key):
    garbage = b"no colon here\r\n" + RAW
    h = harness(ns, gate_key, dkim_rule=False)
    result = await h.send(garbage)
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "none"
    assert "Unexpected characters" in result.transaction.results.get("arc").err[0]  # not sealed
    sealed = b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=fwd.example; s=arc; b=AAAA\r\n" + garbage
    result = await h.send(sealed)
    assert result.reply.code == 250 and chain_of(result)["cv"] == "fail"


async def test_more_sets_than_max_sets_fail_unchecked(ns, gate_key, keys):
    forwarded = RAW
    for i in range(3):
        forwarded = arc_hop(forwarded, keys["fwd"], "fwd.example", "arc", "arc=none" if i == 0 else "arc=pass",
                            authserv_id=f"hop{i}.fwd.example")
    result = await harness(ns, gate_key).send(forwarded)
    assert (chain_of(result)["cv"], chain_of(result)["instances"]) == ("pass", 3)
    before = ns.count("arc._domainkey.fwd.example")
    result = await harness(ns, gate_key, {"max_sets": 2}).send(forwarded)
    assert chain_of(result)["cv"] == "fail" and "more than max_sets 2" in chain_of(result)["reason"]
    assert ns.count("arc._domainkey.fwd.example") == before  # nothing looked up


async def test_a_flood_of_signing_keys_in_one_set_fails_unchecked(ns, gate_key, keys):
    # ARC-Seal fields counted against max_sets is not enough: ARC-Message-Signature fields
    # naming a thousand keys would cost a thousand lookups
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none", authserv_id="hop.fwd.example")
    flood = b"".join(f"ARC-Message-Signature: i=1; a=rsa-sha256; d=k{i}.fwd.example; s=arc; h=from; "
                     f"bh=AAAA; b=AAAA\r\n".encode() for i in range(1000))
    before = len(ns.queries)
    result = await harness(ns, gate_key).send(flood + forwarded)
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "fail" and "1001 ARC signing keys named" in chain_of(result)["reason"]
    assert len(ns.queries) - before <= 1  # the dkim rule's lookups only: none for the chain


async def test_an_absurd_key_fails_the_chain_unchecked(ns, gate_key, keys, caplog):
    # dkimpy would take seconds over a key with a 9000-bit public exponent: the rule never
    # hands it one (the dkim rule's key limits)
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none", authserv_id="hop.fwd.example")
    ns.set("fwd.example", "arc._domainkey", "TXT", absurd_rsa_record())
    result = await harness(ns, gate_key, dkim_rule=False).send(forwarded)
    assert result.reply.code == 250 and chain_of(result)["cv"] == "fail"
    assert "missing public key: b'arc._domainkey.fwd.example.'" in caplog.text  # dkimpy never had it


@pytest.mark.parametrize("instance, reason", [(b"i=0", "without a valid instance"), (b"i=-3", "without a valid instance"),
                                              (b"i=99", "i=99 above 50"), (b"i=" + b"9" * 40, "above 50")])
async def test_a_chain_with_an_impossible_instance_fails_and_is_relayed(ns, gate_key, keys, instance, reason):
    # dkimpy reads ARC fields with no instance in 1..50 as no chain at all (cv=none); a
    # chain someone broke is a failed one (RFC 8617 §4.2.1), and never a crash
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none", authserv_id="hop.fwd.example")
    h = harness(ns, gate_key)
    result = await h.send(forwarded.replace(b"i=1", instance))
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "fail" and reason in chain_of(result)["reason"]
    assert chain_of(result)["instances"] <= 50
    assert [r.result for r in gate_header(h.relayed[0].data).results if r.method == "arc"] == ["fail"]


async def test_dkimpy_never_makes_a_lookup_of_its_own(ns, gate_key, keys, monkeypatch):
    # every dkimpy default lookup ends in dnsplug._get_txt: a blocking dnspython query on the
    # event loop. dkim, arc and dmarc verify and seal over the gate's own answers only.
    def blocking(name, timeout=5):
        raise AssertionError(f"dkimpy looked up {name!r} itself")
    monkeypatch.setattr(dkim.dnsplug, "_get_txt", blocking)
    signed = sign(RAW, keys["author"], "example.org", "rsa")
    forwarded = arc_hop(signed, keys["fwd"], "fwd.example", "arc", "arc=none", authserv_id="hop.fwd.example")
    h = harness(ns, gate_key, rules=[(Dmarc, {}), (Rewrite, {"subject_prefix": "[ext] "})])
    result = await h.send(forwarded)
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "pass"
    assert [s["result"] for s in result.transaction.results.get("dkim").data["signatures"]] == ["pass"]
    assert "error" not in [t.action for t in result.transaction.trace]


async def test_a_seal_dkimpy_trips_over_fails_the_chain_never_a_crash(ns, gate_key, keys):
    # found by fuzzing: dkimpy's base64 check of bh= looks at b= instead (a slip), so an
    # ARC-Message-Signature with a byte in bh= that is no base64 raised binascii.Error
    forwarded = arc_hop(RAW, keys["fwd"], "fwd.example", "arc", "arc=none", authserv_id="hop.fwd.example")
    start = forwarded.index(b" bh=", forwarded.index(b"ARC-Message-Signature:")) + 4
    broken = forwarded[:start] + b"\x9a" + forwarded[start + 1:]
    h = harness(ns, gate_key)
    result = await h.send(broken)
    assert result.reply.code == 250
    assert chain_of(result)["cv"] == "fail"
    assert "error" not in [t.action for t in result.transaction.trace]


@pytest.mark.parametrize("line, problem", [
    ("max_sets: 51", "7:17: rules[0].arc.max_sets: expected 1 to 50 (RFC 8617's instance range), got 51"),
    ("headers: [to]", "7:16: rules[0].arc.headers: must include from (RFC 6376 §5.4)"),
    ("headers: [from, received]", "7:16: rules[0].arc.headers: item 1: received must not be signed (it changes on the way)"),
    ("authserv_id: 'a;b'", "7:20: rules[0].arc.authserv_id: expected a domain name, got 'a;b'"),
])
def test_check_config_names_the_file_and_line_of_each_bad_option(tmp_path, gate_key, line, problem):
    from smtpgate.config import check_config
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        f"domains: [example.com]\nrules:\n  - arc:\n      selector: s\n      domain: example.org\n"
        f"      key: {gate_key}\n      {line}\n")
    (tmp_path / "gate.yaml").write_text("policies: policies\n")
    assert [str(p) for p in check_config(str(tmp_path / "gate.yaml"))] == [
        f"{tmp_path}/policies/default.yaml:{problem}"]
