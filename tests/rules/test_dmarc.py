"""The dmarc rule through smtpgate.testing: spf, dkim and dmarc together on the real test
DNS server, messages signed with dkimpy in the test, _dmarc records served by it, the
gate's Authentication-Results parsed back with authres."""
import random
import time

import authres
import pytest

from smtpgate.resolver import Resolver
from smtpgate.testing import FakeClock, FakeResolver, Harness, message
from smtpgate_rules.dkim import Dkim
from smtpgate_rules.dmarc import Dmarc
from smtpgate_rules.dmarc.orgdomain import aligned, org_domain
from smtpgate_rules.dmarc.record import parse
from smtpgate_rules.spf import Spf
from tests.support.dkimkeys import ed25519_key, sign
from tests.support.dnsserver import DnsServer

KEY = ed25519_key()
SPF_IP = "192.0.2.1"  # example.org's SPF allows it; 203.0.113.9 is allowed by nobody


def raw(author="alice@example.org"):
    return message(subject="dmarc").replace(b"sender@sender.example", author.encode())


ZONES = {
    "example.org": {"@": {"TXT": "v=spf1 ip4:192.0.2.1 -all"},
                    "_dmarc": {"TXT": "v=DMARC1; p=reject; rua=mailto:agg@example.org"},
                    "sel._domainkey": {"TXT": KEY.record},
                    "strict": {"TXT": "v=spf1 -all"},
                    "_dmarc.strict": {"TXT": "v=DMARC1; p=reject; adkim=s; aspf=s"},
                    "_dmarc.q": {"TXT": "v=DMARC1; p=quarantine"},
                    "_dmarc.n": {"TXT": "v=DMARC1; p=none"},
                    "_dmarc.half": {"TXT": "v=DMARC1; p=reject; pct=50"},
                    "_dmarc.two": {"TXT": ["v=DMARC1; p=none", "v=DMARC1; p=none; pct=10"]}},
    "example.co.uk": {"_dmarc": {"TXT": ["v=DMARC1; p=reject; sp=quarantine", "unrelated text"]}},
    "xn--bnk-qla.example": {"_dmarc": {"TXT": "v=DMARC1; p=reject"}},
    "other.example": {"@": {"TXT": "v=spf1 ip4:192.0.2.1 -all"},
                      "sel._domainkey": {"TXT": KEY.record}},
}


@pytest.fixture(scope="module")
def ns():
    with DnsServer(ZONES) as server:
        yield server


def harness(ns, options=None, rules=(Spf, Dkim)):
    resolver = Resolver([ns.address], timeout=0.5, attempts=1)
    spf = {"check_helo": False, "on_fail": "accept"}  # dmarc judges; spf only reports
    h = Harness([(r, spf if r is Spf else {}) for r in rules] + [(Dmarc, options or {})],
                resolver=resolver, hostname="gate.example", clock=FakeClock(time.time()))
    return h


def dmarc_of(h) -> Dmarc:
    return next(r for r in h.runtime.policies.session_policy.rules if r.name == "dmarc")


def auth_header(h):
    field = h.relayed[-1].data.partition(b"\r\n")[0].decode()
    return authres.all_features().parse(field)


async def test_dkim_aligned_relaxed_passes_and_the_header_says_so(ns):
    h = harness(ns)
    signed = sign(raw("alice@mail.example.org"), KEY, "example.org", "sel")
    result = await h.send(signed, sender="bounce@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    data = result.transaction.results.get("dmarc").data
    assert (data["result"], data["aligned"], data["policy_domain"]) == ("pass", ["dkim"], "example.org")
    header = auth_header(h)
    assert header.authserv_id == "gate.example"
    assert [(r.method, r.result) for r in header.results] == [("spf", "fail"), ("dkim", "pass"), ("dmarc", "pass")]
    assert header.results[2].header_from == "mail.example.org"


async def test_spf_aligned_passes_without_a_signature(ns):
    result = await harness(ns).send(raw(), sender="bounce@example.org", client_ip=SPF_IP)
    data = result.transaction.results.get("dmarc").data
    assert (result.reply.code, data["result"], data["aligned"]) == (250, "pass", ["spf"])


async def test_unaligned_pass_fails_and_p_reject_refuses_at_end_of_data(ns):
    h = harness(ns)
    signed = sign(raw(), KEY, "other.example", "sel")  # a valid signature, of another domain
    result = await h.send(signed, sender="bounce@other.example", client_ip=SPF_IP)
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.1")
    assert h.relayed == []
    data = result.transaction.results.get("dmarc").data
    assert (data["result"], data["disposition"]) == ("fail", "reject")
    assert data["record"]["rua"] == "mailto:agg@example.org"  # what an aggregate report needs
    assert data["dkim"] == [{"domain": "other.example", "selector": "sel", "result": "pass", "aligned": False}]
    assert data["spf"]["domain"] == "other.example" and data["spf"]["aligned"] is False


async def test_strict_alignment_wants_the_exact_domain(ns):
    signed = sign(raw("alice@strict.example.org"), KEY, "example.org", "sel")
    result = await harness(ns).send(signed, sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 550
    assert aligned("strict.example.org", "example.org", strict=False)
    assert not aligned("strict.example.org", "example.org", strict=True)


async def test_quarantine_holds_or_adds_a_header_and_none_is_recorded(ns):
    h = harness(ns)
    result = await h.send(raw("a@q.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 554 and len(h.quarantine.held) == 1 and h.relayed == []
    h = harness(ns, {"on_quarantine": "header"})
    result = await h.send(raw("a@q.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    assert b"\r\nX-DMARC-Quarantine: dmarc fail, policy of q.example.org\r\n" in h.relayed[0].data
    h = harness(ns)
    result = await h.send(raw("a@n.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    [dmarc] = [r for r in auth_header(h).results if r.method == "dmarc"]
    assert (dmarc.method, dmarc.result, dmarc.policy) == ("dmarc", "fail", "none")


async def test_subdomain_policy_from_the_organisational_domain(ns):
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    h = harness(ns, rules=())
    result = await h.send(raw("x@a.b.example.co.uk"))
    data = result.transaction.results.get("dmarc").data
    assert (data["policy_domain"], data["policy"], data["disposition"]) == ("example.co.uk", "quarantine", "quarantine")
    result = await h.send(raw("x@example.co.uk"))
    assert result.reply.code == 550  # the organisational domain itself: p


async def test_pct_sampling_takes_the_rules_random(ns):
    h = harness(ns)
    rule = dmarc_of(h)
    rule.random = random.Random()
    rule.random.random = lambda: 0.7  # 70 >= pct=50: outside the sample -> quarantine
    result = await h.send(raw("a@half.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    data = result.transaction.results.get("dmarc").data
    assert (data["sampled"], data["disposition"], data["override"]) == (False, "quarantine", "sampled_out")
    rule.random.random = lambda: 0.2
    result = await h.send(raw("a@half.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 550


async def test_soften_caps_the_policy_per_author_domain(ns):
    h = harness(ns, {"soften": {"example.org": "none"}})
    result = await h.send(raw(), sender="x@other.example", client_ip="203.0.113.9")
    data = result.transaction.results.get("dmarc").data
    assert (result.reply.code, data["disposition"], data["override"]) == (250, "none", "local_policy")
    h = harness(ns, {"soften": {"*": "quarantine"}})
    assert (await h.send(raw(), sender="x@other.example", client_ip="203.0.113.9")).reply.code == 554


async def test_no_record_and_broken_from_are_recorded_never_refused(ns):
    h = harness(ns)
    result = await h.send(raw("a@other.example"), sender="x@nowhere.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    assert result.transaction.results.get("dmarc").data["result"] == "none"
    nobody = raw().replace(b"From: alice@example.org\r\n", b"From: undisclosed-recipients:;\r\n")
    result = await h.send(nobody, sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    assert [r.result for r in auth_header(h).results if r.method == "dmarc"] == ["none"]


@pytest.mark.parametrize("froms", [b"From: bob@other.example, alice@example.org",
                                   b"From: bob@other.example\r\nFrom: alice@example.org"])
async def test_every_from_domain_is_judged_and_the_strictest_failing_policy_applies(ns, froms):
    # RFC 7489 §6.6.1: a p=reject domain beside another address (or in a second From field)
    # is not a way around its policy
    h = harness(ns)
    two = raw().replace(b"From: alice@example.org", froms)
    signed = sign(two, KEY, "other.example", "sel")
    result = await h.send(signed, sender="x@other.example", client_ip="203.0.113.9")
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.1")
    data = result.transaction.results.get("dmarc").data
    assert data["from_domain"] == "example.org" and data["disposition"] == "reject"
    assert [(a["from_domain"], a["result"]) for a in data["authors"]] == [
        ("other.example", "none"), ("example.org", "fail")]
    if froms.count(b"From:") > 1:
        return  # dkimpy verifies every From field, so a signature over one of two never passes
    # both aligned: it passes
    both = sign(signed, KEY, "example.org", "sel")
    result = await h.send(both, sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    assert [(r.header_from, r.result) for r in auth_header(h).results if r.method == "dmarc"] == [
        ("other.example", "none"), ("example.org", "pass")]


async def test_policy_lookup_failure_is_temperror():
    resolver = FakeResolver({("_dmarc.example.org", "TXT"): "SERVFAIL"})
    h = Harness([(Dmarc, {"on_dns_error": "tempfail"})], resolver=resolver)
    result = await h.send(raw())
    assert (result.reply.code, result.reply.enhanced) == (451, "4.7.1")
    assert result.transaction.results.get("dmarc").data["result"] == "temperror"


def test_record_parsing():
    r = parse("v=DMARC1; p=Reject; sp=none; pct=20; adkim=s; rua=mailto:a@example.org")
    assert (r.p, r.sp, r.pct, r.adkim, r.aspf, r.rua) == ("reject", "none", 20, "s", "r", "mailto:a@example.org")
    assert parse("v=spf1 -all") is None
    assert parse("v=DMARC1; p=bogus") is None
    assert parse("v=DMARC1; p=bogus; rua=mailto:a@example.org").p == "none"


@pytest.mark.parametrize("name", ["Bad Header:", "X-Dmarc\n"])
def test_bad_quarantine_header_fails_at_load(name):
    from smtpgate import OptionError
    with pytest.raises(OptionError):
        Harness([(Dmarc, {"quarantine_header": name})])


async def test_several_records_end_policy_discovery(ns):
    # RFC 7489 §6.6.3 step 5: two records at two.example.org, so DMARC does not apply there,
    # and example.org's p=reject is not looked up in their place
    h = harness(ns)
    result = await h.send(raw("a@two.example.org"), sender="x@other.example", client_ip="203.0.113.9")
    assert result.reply.code == 250
    assert result.transaction.results.get("dmarc").data["result"] == "none"


async def test_spf_alignment_relaxed_and_strict(ns):
    # SPF passes for example.org; the author is a subdomain: relaxed (example.org's record)
    # aligns, strict (strict.example.org's aspf=s) does not
    h = harness(ns)
    result = await h.send(raw("alice@mail.example.org"), sender="bounce@example.org", client_ip=SPF_IP)
    data = result.transaction.results.get("dmarc").data
    assert (result.reply.code, data["result"], data["aligned"]) == (250, "pass", ["spf"])
    result = await h.send(raw("alice@strict.example.org"), sender="bounce@example.org", client_ip=SPF_IP)
    data = result.transaction.results.get("dmarc").data
    assert (result.reply.code, data["spf"]["result"], data["spf"]["aligned"]) == (550, "pass", False)


async def test_an_internationalised_from_domain_is_looked_up_as_its_a_label(ns):
    # SMTPUTF8 mail: From: alice@bänk.example has the policy of xn--bnk-qla.example
    h = harness(ns)
    utf8 = raw().replace(b"alice@example.org", "alice@bänk.example".encode())
    result = await h.send(utf8, sender="x@other.example", client_ip="203.0.113.9")
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.1")
    assert result.transaction.results.get("dmarc").data["from_domain"] == "xn--bnk-qla.example"


@pytest.mark.parametrize("policy, on_quarantine, code", [("reject", "quarantine", 550), ("quarantine", "header", 250),
                                                          ("quarantine", "quarantine", 554)])
@pytest.mark.parametrize("junk", [b"x\x00y", "x\u00e4\u200b\x00".encode(), b"x\xffy"])
async def test_a_from_domain_with_junk_gets_its_policy_never_a_crash(policy, on_quarantine, code, junk):
    # the domain has no DMARC record of its own but its organisational domain does; writing
    # it raw into the reply or the header crashed the rule (a 451 on every retry)
    resolver = FakeResolver({("_dmarc.example.org", "TXT"): f"v=DMARC1; p={policy}"})
    h = Harness([(Dmarc, {"on_quarantine": on_quarantine})], resolver=resolver)
    result = await h.send(raw("a@x.example.org").replace(b"a@x.example.org", b"a@" + junk + b".example.org"))
    assert result.reply.code == code
    assert "error" not in [t.action for t in result.transaction.trace]
    if on_quarantine == "header":
        assert b"X-DMARC-Quarantine: dmarc fail, policy of x" in h.relayed[0].data


async def test_a_folded_from_address_is_judged_as_a_reader_sees_it(ns):
    # folded inside the domain, parsed without unfolding it read as the domain "ex" (no
    # policy): a way around example.org's p=reject
    h = harness(ns)
    folded = raw().replace(b"From: alice@example.org", b"From: alice@ex\r\n ample.org")
    result = await h.send(folded, sender="x@other.example", client_ip="203.0.113.9")
    assert (result.reply.code, result.reply.enhanced) == (550, "5.7.1")
    assert result.transaction.results.get("dmarc").data["from_domain"] == "example.org"
