"""The dkim rule through smtpgate.testing, on real signatures: keys the tests generate (RSA
2048 with openssl, Ed25519 with PyNaCl), messages signed with dkimpy, keys served by the
real test DNS server, the gate's Authentication-Results header parsed back with authres."""
import time

import authres
import pytest

from smtpgate.resolver import Resolver
from smtpgate.testing import FakeClock, FakeResolver, Harness, message
from smtpgate_rules.dkim import Dkim
from tests.support.constants import ROOT
from tests.support.dkimkeys import absurd_rsa_record, ed25519_key, rsa_key, sign
from tests.support.dnsserver import DnsServer

RAW = message(subject="signed", body="hello\r\nsecond line\r\n").replace(
    b"sender@sender.example", b"alice@example.org")


@pytest.fixture(scope="module")
def keys(request):
    from tests.support.gateproc import require_tool
    openssl = require_tool("openssl")
    return {"rsa": rsa_key(openssl), "other": rsa_key(openssl, 1), "ed": ed25519_key()}


@pytest.fixture
def ns(keys):
    zones = {"example.org": {"rsa._domainkey": {"TXT": keys["rsa"].record},
                             "ed._domainkey": {"TXT": keys["ed"].record}},
             "example.net": {"rsa._domainkey": {"TXT": keys["other"].record},
                             "slow._domainkey": {"TXT": keys["rsa"].record}}}
    with DnsServer(zones) as server:
        server.timeout_names.add("slow._domainkey.example.net")
        yield server


def harness(ns, options=None, **kw):
    resolver = Resolver([ns.address], timeout=0.3, attempts=1)
    return Harness([(Dkim, options or {})], resolver=resolver, hostname="gate.example",
                   clock=FakeClock(time.time()), **kw)


def header_of(h) -> authres.AuthenticationResultsHeader:
    field = h.relayed[-1].data.partition(b"\r\n")[0].decode()
    assert field.startswith("Authentication-Results: ")
    return authres.AuthenticationResultsHeader.parse(field)


def dkim_results(result):
    return [(s["domain"], s["selector"], s["result"]) for s in result.transaction.results.get("dkim").data["signatures"]]


async def test_valid_rsa_and_ed25519_signatures_pass(ns, keys):
    signed = sign(sign(RAW, keys["rsa"], "example.org", "rsa"), keys["ed"], "example.org", "ed")
    h = harness(ns)
    result = await h.send(signed, sender="alice@example.org")
    assert result.reply.code == 250
    assert dkim_results(result) == [("example.org", "ed", "pass"), ("example.org", "rsa", "pass")]
    parsed = header_of(h)
    assert parsed.authserv_id == "gate.example"
    assert [(r.method, r.result, r.header_d, r.header_s) for r in parsed.results] == [
        ("dkim", "pass", "example.org", "ed"), ("dkim", "pass", "example.org", "rsa")]
    assert h.relayed[0].data.partition(b"\r\n")[2] == signed  # the header only, prepended


async def test_body_altered_fails(ns, keys):
    signed = sign(RAW, keys["rsa"], "example.org", "rsa").replace(b"second line", b"second lime")
    h = harness(ns)
    result = await h.send(signed)
    assert result.reply.code == 250  # example.org is not listed: recorded, not refused
    [sig] = result.transaction.results.get("dkim").data["signatures"]
    assert sig["result"] == "fail" and "body hash" in sig["reason"]
    [r] = header_of(h).results
    assert (r.method, r.result, r.header_d) == ("dkim", "fail", "example.org") and "body hash" in r.reason


async def test_header_altered_fails(ns, keys):
    signed = sign(RAW, keys["ed"], "example.org", "ed").replace(b"Subject: signed", b"Subject: changed")
    result = await harness(ns).send(signed)
    assert dkim_results(result) == [("example.org", "ed", "fail")]


async def test_expired_signature_fails_by_the_gates_clock(ns, keys):
    signed = sign(RAW, keys["rsa"], "example.org", "rsa", expires=int(time.time()) + 3600)
    h = harness(ns)
    assert dkim_results(await h.send(signed)) == [("example.org", "rsa", "pass")]
    h.clock.advance(7200)
    result = await h.send(signed)
    [sig] = result.transaction.results.get("dkim").data["signatures"]
    assert (sig["result"], sig["reason"]) == ("fail", "signature expired")


async def test_wrong_key_fails_and_missing_key_is_permerror(ns, keys):
    wrong = sign(RAW, keys["rsa"], "example.net", "rsa")  # example.net publishes another key
    missing = sign(RAW, keys["rsa"], "example.org", "gone")
    h = harness(ns)
    assert dkim_results(await h.send(wrong)) == [("example.net", "rsa", "fail")]
    result = await h.send(missing)
    [sig] = result.transaction.results.get("dkim").data["signatures"]
    assert (sig["result"], sig["reason"]) == ("permerror", "no key for signature")


async def test_multiple_signatures_each_reported(ns, keys):
    signed = sign(sign(sign(RAW, keys["rsa"], "example.org", "rsa"), keys["rsa"], "example.net", "rsa"),
                  keys["ed"], "example.org", "ed")
    h = harness(ns)
    result = await h.send(signed)
    assert dkim_results(result) == [("example.org", "ed", "pass"), ("example.net", "rsa", "fail"),
                                    ("example.org", "rsa", "pass")]
    assert [r.result for r in header_of(h).results] == ["pass", "fail", "pass"]
    assert ns.count("rsa._domainkey.example.org") == 1


async def test_listed_domain_failure_is_refused_or_deferred(ns, keys):
    bad = sign(RAW, keys["rsa"], "example.net", "rsa")
    h = harness(ns, {"domains": ["example.net"]})
    reply = (await h.send(bad)).reply
    assert (reply.code, reply.enhanced) == (550, "5.7.20")
    assert h.relayed == []
    reply = (await harness(ns, {"domains": [".net"], "on_fail": "tempfail"}).send(bad)).reply
    assert (reply.code, reply.enhanced) == (451, "4.7.20")
    good_too = sign(bad, keys["other"], "example.net", "rsa")  # one of its signatures passes
    assert (await harness(ns, {"domains": ["example.net"]}).send(good_too)).reply.code == 250


async def test_required_signature_for_author_domain(ns, keys):
    h = harness(ns, {"require": ["example.org"]})
    reply = (await h.send(RAW)).reply
    assert (reply.code, reply.enhanced) == (550, "5.7.20")
    assert (await h.send(sign(RAW, keys["rsa"], "example.org", "rsa"))).reply.code == 250
    other = sign(RAW, keys["other"], "example.net", "rsa")  # passes, but not the author's domain
    assert (await h.send(other)).reply.code == 550


async def test_key_lookup_timeout_is_temperror_and_deferred_when_required(ns, keys):
    signed = sign(RAW, keys["rsa"], "example.net", "slow")
    h = harness(ns, {"domains": ["example.net"]})
    result = await h.send(signed)
    assert dkim_results(result) == [("example.net", "slow", "temperror")]
    assert (result.reply.code, result.reply.enhanced) == (451, "4.7.20")
    h = harness(ns, {"domains": ["example.net"], "on_dns_error": "accept"})
    assert (await h.send(signed)).reply.code == 250


async def test_unsigned_message_is_none_and_asks_for_the_header():
    h = Harness([(Dkim, {})], resolver=FakeResolver(), hostname="gate.example")
    result = await h.send(RAW)
    assert dkim_results(result) == []
    assert [(r.method, r.result) for r in header_of(h).results] == [("dkim", "none")]


async def test_broken_signature_fields_are_neutral_and_nothing_is_looked_up():
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x\r\n" + RAW
    raw = b"DKIM-Signature: garbage without tags\r\n" + raw
    resolver = FakeResolver()
    h = Harness([(Dkim, {})], resolver=resolver, hostname="gate.example")
    result = await h.send(raw)
    assert result.reply.code == 250
    sigs = result.transaction.results.get("dkim").data["signatures"]
    assert [s["result"] for s in sigs] == ["neutral", "neutral"]
    assert "missing" in sigs[1]["reason"]
    assert resolver.queries == []


async def test_too_many_signatures_are_not_all_checked(ns, keys):
    signed = RAW
    for _ in range(3):
        signed = sign(signed, keys["ed"], "example.org", "ed")
    result = await harness(ns, {"max_signatures": 2}).send(signed)
    data = result.transaction.results.get("dkim").data
    assert [s["result"] for s in data["signatures"]] == ["pass", "pass"] and data["unchecked"] == 1


async def test_a_flood_of_signatures_costs_max_signatures_lookups_and_one_line(ns, keys):
    one = sign(RAW, keys["ed"], "example.org", "ed")
    field = one[:len(one) - len(RAW)]  # the DKIM-Signature field sign() prepended
    flood = b"".join(field.replace(b"d=example.org", f"d=d{i}.example.org".encode()) for i in range(2000))
    h = harness(ns)
    result = await h.send(flood + one)
    record = result.transaction.results.get("dkim")
    assert result.reply.code == 250
    assert len(record.data["signatures"]) == 5 and record.data["unchecked"] == 1996
    assert len(ns.queries) <= 5
    assert len(header_of(h).results) <= 5


async def test_an_absurd_rsa_key_is_refused_unchecked(keys):
    # a signer's own DNS decides what a key costs: a 16384-bit exponent would cost seconds
    record = absurd_rsa_record()
    resolver = FakeResolver({("rsa._domainkey.example.org", "TXT"): record})
    h = Harness([(Dkim, {})], resolver=resolver, hostname="gate.example", clock=FakeClock(time.time()))
    result = await h.send(sign(RAW, keys["rsa"], "example.org", "rsa"))
    (sig,) = result.transaction.results.get("dkim").data["signatures"]
    assert (sig["result"], sig["reason"]) == ("permerror", "RSA public exponent of 9001 bits, more than 64")


async def test_a_required_author_beside_another_from_address_is_still_required(ns, keys):
    two = RAW.replace(b"From: alice@example.org", b"From: alice@example.org, eve@evil.example")
    assert two != RAW
    reply = (await harness(ns, {"require": ["example.org"]}).send(two)).reply
    assert (reply.code, reply.enhanced) == (550, "5.7.20")
    again = RAW.replace(b"From: alice@example.org", b"From: eve@evil.example\r\nFrom: alice@example.org")
    assert (await harness(ns, {"require": ["example.org"]}).send(again)).reply.code == 550
    signed = sign(two, keys["rsa"], "example.org", "rsa")
    assert (await harness(ns, {"require": ["example.org"]}).send(signed)).reply.code == 250


async def test_a_big_message_is_verified_in_a_thread_with_the_same_result(ns, keys):
    signed = sign(RAW.replace(b"hello\r\n", b"hello\r\n" + (b"y" * 70 + b"\r\n") * 5000), keys["rsa"],
                  "example.org", "rsa")
    result = await harness(ns, {"thread_above": "64k"}).send(signed)
    assert dkim_results(result) == [("example.org", "rsa", "pass")]


async def test_rfc8463_example_verifies_with_both_keys():
    # RFC 8463 Appendix A (tests/data/dkim/, with its licence): Ed25519 and RSA signatures
    data = ROOT / "tests" / "data" / "dkim"
    raw = (data / "rfc8463-a3.eml").read_bytes()
    records = dict(line.split(" ", 1) for line in (data / "rfc8463-a2.keys").read_text().splitlines())
    zone = {name.split(".football")[0]: {"TXT": text} for name, text in records.items()}
    with DnsServer({"football.example.com": zone}) as server:
        h = Harness([(Dkim, {})], resolver=Resolver([server.address], timeout=0.5, attempts=1),
                    hostname="gate.example")
        result = await h.send(raw, sender="joe@football.example.com")
    assert dkim_results(result) == [("football.example.com", "brisbane", "pass"),
                                    ("football.example.com", "test", "pass")]
    assert [r.header_a for r in header_of(h).results] == ["ed25519-sha256", "rsa-sha256"]


async def test_header_section_starting_with_a_continuation_line_is_relayed_not_a_crash(ns, keys):
    # real mail does this (corpus: enmime/low-quality/bad-header-start.raw); dkimpy's parser
    # raises IndexError on it, which must not become a 451 on every retry
    raw = b" leading continuation\r\n" + sign(RAW, keys["rsa"], "example.org", "rsa")
    result = await harness(ns).send(raw, sender="alice@example.org")
    assert result.reply.code == 250
    sigs = result.transaction.results.get("dkim").data["signatures"]
    assert [s["result"] for s in sigs] == ["neutral"]
    assert "not parseable" in sigs[0]["reason"]


async def test_signatures_dkimpy_trips_over_are_neutral_never_a_crash(ns, keys):
    # found by fuzzing: dkimpy raises IndexError (an i= as long as d=), binascii.Error (a b=
    # that is not base64 by the time it is decoded) and PyNaCl's ValueError (an Ed25519 b= of
    # the wrong length) — a crash would be a 451 on every retry
    ed = sign(RAW, keys["ed"], "example.org", "ed")
    b_value = ed[ed.index(b" b=") + 3:ed.index(b"\r\n", ed.index(b" b="))]
    broken = {
        "i= as long as d=": ed.replace(b"i=@example.org", b"i=example.org"),
        "b= padding": ed.replace(b_value, b_value[:-3]),
        "b= too short": ed.replace(b_value, b_value[:-8]),
        "bh= a character short": ed[:ed.index(b"bh=") + 3]
        + ed[ed.index(b"bh=") + 4:],
    }
    h = harness(ns)
    for what, raw in broken.items():
        assert raw != ed, what
        result = await h.send(raw)
        assert result.reply.code == 250, what
        [sig] = result.transaction.results.get("dkim").data["signatures"]
        assert sig["result"] in ("neutral", "fail"), what
