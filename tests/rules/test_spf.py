"""SPF (RFC 7208): check_host on scripted DNS, the RFC's macro examples, the limits, the
`spf` rule in a harness, and the whole thing on the real test DNS server."""
import pytest

from tests.support.dnsserver import DnsServer
from smtpgate_rules.spf.check import (check_helo as spf_check_helo, check_host as spf_check_host,
                                      check_mailfrom as spf_check_mailfrom)
from smtpgate.resolver import Resolver
from smtpgate_rules.spf.check import _Context, _expand
from smtpgate.testing import FakeResolver, Harness, message
from smtpgate_rules.spf import Spf

IP = "192.0.2.3"


def dns(records: dict) -> FakeResolver:
    """{"name TYPE": value(s)}"""
    return FakeResolver({tuple(k.rsplit(" ", 1)): v for k, v in records.items()})


async def check(records, ip=IP, domain="example.org", sender="user@example.org", helo="mx.example.org", **kw):
    return await spf_check_host(dns(records), ip, domain, sender, helo, **kw)


@pytest.mark.parametrize("record, result", [
    ("v=spf1 ip4:192.0.2.0/24 -all", "pass"),
    ("v=spf1 ip4:192.0.2.3 -all", "pass"),
    ("v=spf1 ip4:198.51.100.0/24 -all", "fail"),
    ("v=spf1 ip4:198.51.100.0/24 ~all", "softfail"),
    ("v=spf1 ip4:198.51.100.0/24 ?all", "neutral"),
    ("v=spf1 ip4:198.51.100.0/24", "neutral"),  # no match, no all: the default
    ("v=spf1 -ip4:192.0.2.3 +all", "fail"),
    ("v=spf1 ip6:2001:db8::/32 -all", "fail"),  # an IPv4 client never matches ip6
    ("V=SPF1 IP4:192.0.2.3 -ALL", "pass"),  # case does not matter
    ("v=spf1  ip4:192.0.2.3   -all", "pass"),  # nor repeated spaces
    ("v=spf1 foo=bar ip4:192.0.2.3 -all", "pass"),  # unknown modifiers are ignored
])
async def test_basic_mechanisms_and_qualifiers(record, result):
    assert (await check({"example.org TXT": record})).result == result


async def test_no_record_is_none_and_other_txt_is_ignored():
    assert (await check({})).result == "none"
    assert (await check({"example.org TXT": ["google-site-verification=x", "v=spf10 -all"]})).result == "none"
    assert (await check({}, domain="nodot")).result == "none"


async def test_two_records_are_permerror():
    r = await check({"example.org TXT": ["v=spf1 -all", "v=spf1 +all"]})
    assert r.result == "permerror" and "2 SPF records" in r.problem


@pytest.mark.parametrize("record", [
    "v=spf1 ip4:192.0.2.3 -all ip4:999.0.0.1",   # a syntax error anywhere, even after a match
    "v=spf1 ip4:192.0.2.3 bogus -all",
    "v=spf1 ip4:192.0.2.3 a:example.org/33",
    "v=spf1 ip4:192.0.2.3 ip4:192.0.2.0/024",
    "v=spf1 ip4:192.0.2.3 include:",
    "v=spf1 ip4:192.0.2.3 redirect=a.example redirect=b.example",
    "v=spf1 ip4:192.0.2.3 exists:%{x}.example.org",
    "v=spf1 ip4:192.0.2.3 include:example.123",  # toplabel may not be all digits
    "v=spf1 ip4:192.0.2.3 all:foo",
    "v=spf1 ip4:192.0.2.3 -",
    "v=spf1 a/24\n",  # a term ends where the text ends: a trailing LF is not dropped
    "v=spf1 mx\n",
])
async def test_syntax_errors_are_permerror_before_evaluation(record):
    assert (await check({"example.org TXT": record})).result == "permerror"


async def test_a_and_mx_with_cidr():
    base = {"example.org A": ["198.51.100.1"], "other.example A": ["192.0.2.200"],
            "example.org MX": ["10 mx1.example.org", "20 mx2.example.org"],
            "mx1.example.org A": ["198.51.100.9"], "mx2.example.org A": ["192.0.2.3"]}
    for record, result in [("v=spf1 a -all", "fail"),
                           ("v=spf1 a:other.example -all", "fail"),
                           ("v=spf1 a:other.example/24 -all", "pass"),
                           ("v=spf1 mx -all", "pass"),
                           ("v=spf1 mx:example.org -all", "pass")]:
        assert (await check({**base, "example.org TXT": record})).result == result, record


async def test_ipv6_clients_use_aaaa_and_ip6():
    records = {"example.org TXT": "v=spf1 a//64 ip6:2001:db8:1::/48 -all",
               "example.org AAAA": ["2001:db8:2::1"], "example.org A": ["192.0.2.3"]}
    assert (await check(records, ip="2001:db8:2::abcd")).result == "pass"
    assert (await check(records, ip="2001:db8:1::9")).result == "pass"
    assert (await check(records, ip="2001:db8:3::1")).result == "fail"
    # an IPv4-mapped IPv6 client is an IPv4 client
    assert (await check({"example.org TXT": "v=spf1 ip4:192.0.2.3 -all"}, ip="::ffff:192.0.2.3")).result == "pass"


async def test_include():
    base = {"example.org TXT": "v=spf1 include:_spf.provider.example -all"}
    assert (await check({**base, "_spf.provider.example TXT": "v=spf1 ip4:192.0.2.0/24 -all"})).result == "pass"
    # the included policy's fail is just "no match" here
    r = await check({**base, "_spf.provider.example TXT": "v=spf1 -all"})
    assert r.result == "fail" and r.mechanism == "-all"
    r = await check({"example.org TXT": "v=spf1 include:_spf.provider.example ~all",
                     "_spf.provider.example TXT": "v=spf1 -all"})
    assert r.result == "softfail"
    # an include without a record is a permerror, a DNS failure a temperror
    assert (await check(base)).result == "permerror"
    assert (await check({**base, "_spf.provider.example TXT": "SERVFAIL"})).result == "temperror"


async def test_exists_with_macros():
    records = {"example.org TXT": "v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all",
               "3.2.0.192.user._spf.example.org A": ["127.0.0.2"]}
    assert (await check(records)).result == "pass"
    assert (await check(records, sender="other@example.org")).result == "fail"


async def test_redirect():
    records = {"example.org TXT": "v=spf1 ip4:198.51.100.1 redirect=_spf.example.net",
               "_spf.example.net TXT": "v=spf1 ip4:192.0.2.0/24 -all"}
    assert (await check(records)).result == "pass"
    r = await check(records, ip="203.0.113.5")
    assert r.result == "fail"
    # "all" anywhere makes redirect ignored
    records["example.org TXT"] = "v=spf1 ?all redirect=_spf.example.net"
    assert (await check(records)).result == "neutral"
    # a redirect to a domain without a record is a permerror
    assert (await check({"example.org TXT": "v=spf1 redirect=nothing.example"})).result == "permerror"


async def test_ten_lookup_limit():
    def chain(n):
        recs = {"example.org TXT": "v=spf1 include:i1.example -all"}
        for i in range(1, n):
            recs[f"i{i}.example TXT"] = f"v=spf1 include:i{i + 1}.example -all"
        recs[f"i{n}.example TXT"] = "v=spf1 ip4:192.0.2.3 -all"
        return recs
    ok = await check(chain(10))
    assert ok.result == "pass" and ok.lookups == 10
    over = await check(chain(11))
    assert over.result == "permerror" and "10" in over.problem
    # mechanisms without DNS do not count
    many = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(30)) + " ip4:192.0.2.3 -all"
    assert (await check({"example.org TXT": many})).result == "pass"


async def test_void_lookup_limit():
    two = "v=spf1 a:n1.example a:n2.example ip4:192.0.2.3 -all"
    assert (await check({"example.org TXT": two})).result == "pass"
    three = "v=spf1 a:n1.example a:n2.example exists:n3.example ip4:192.0.2.3 -all"
    r = await check({"example.org TXT": three})
    assert r.result == "permerror" and "void" in r.problem


async def test_mx_with_more_than_ten_names_is_permerror():
    records = {"example.org TXT": "v=spf1 mx -all",
               "example.org MX": [f"{i} mx{i}.example.org" for i in range(11)]}
    assert (await check(records)).result == "permerror"


async def test_dns_errors_are_temperror():
    assert (await check({"example.org TXT": "SERVFAIL"})).result == "temperror"
    assert (await check({"example.org TXT": "v=spf1 a:x.example -all", "x.example A": "TIMEOUT"})).result == "temperror"
    # the ptr mechanism alone ignores a failed PTR lookup (RFC 7208 5.5)
    r = await check({"example.org TXT": "v=spf1 ptr -all", "3.2.0.192.in-addr.arpa PTR": "SERVFAIL"})
    assert r.result == "fail"


async def test_ptr_mechanism():
    records = {"example.org TXT": "v=spf1 ptr -all",
               "3.2.0.192.in-addr.arpa PTR": ["evil.example", "mail.example.org"],
               "mail.example.org A": ["192.0.2.3"], "evil.example A": ["192.0.2.3"]}
    assert (await check(records)).result == "pass"
    records["mail.example.org A"] = ["192.0.2.4"]  # no longer confirms
    assert (await check(records)).result == "fail"


async def test_exp_explains_a_fail():
    records = {"example.org TXT": "v=spf1 mx -all exp=explain._spf.%{d}",
               "explain._spf.example.org TXT": "%{i} is not one of %{d}'s designated mail servers."}
    r = await check(records)
    assert r.result == "fail"
    assert r.explanation == "192.0.2.3 is not one of example.org's designated mail servers."
    # a broken exp only loses the explanation
    records["explain._spf.example.org TXT"] = "SERVFAIL"
    r = await check(records)
    assert r.result == "fail" and r.explanation is None


# RFC 7208 section 7.4: the macro examples, verbatim
RFC_SENDER = "strong-bad@email.example.com"


@pytest.mark.parametrize("spec, expanded", [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{S}", "strong-bad%40email.example.com"),
    ("a%%b%_c%-d", "a%b c%20d"),
])
async def test_rfc_macro_examples(spec, expanded):
    import ipaddress
    ctx = _Context(FakeResolver(), ipaddress.ip_address("192.0.2.3"), RFC_SENDER, "mx.example.com",
                   "gate.example", 0, 10, 2)
    assert await _expand(ctx, spec, "email.example.com") == expanded


async def test_rfc_macro_example_ipv6():
    import ipaddress
    ctx = _Context(FakeResolver(), ipaddress.ip_address("2001:db8::cb01"), RFC_SENDER, "h", "r", 0, 10, 2)
    assert await _expand(ctx, "%{ir}.%{v}._spf.%{d2}", "email.example.com") == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


async def test_exp_only_macros_are_refused_outside_exp():
    r = await check({"example.org TXT": "v=spf1 exists:%{t}.example.org -all"})
    assert r.result == "permerror"


async def test_mailfrom_and_helo_identities():
    fake = dns({"example.org TXT": "v=spf1 ip4:192.0.2.3 -all",
                "mx.example.org TXT": "v=spf1 -all"})
    r = await spf_check_mailfrom(fake, IP, "user@example.org", "mx.example.org")
    assert (r.result, r.domain, r.identity) == ("pass", "example.org", "mailfrom")
    # the null sender is checked as postmaster@HELO
    r = await spf_check_mailfrom(fake, IP, "", "mx.example.org")
    assert (r.result, r.domain, r.identity, r.sender) == ("fail", "mx.example.org", "helo",
                                                          "postmaster@mx.example.org")
    # address literals and bare words are no domain: none
    assert (await spf_check_helo(fake, IP, "[192.0.2.3]")).result == "none"
    assert (await spf_check_helo(fake, IP, "localhost")).result == "none"
    # an empty local part is postmaster
    r = await spf_check_host(fake, IP, "example.org", "@example.org")
    assert r.sender == "postmaster@example.org"


# --- the rule ------------------------------------------------------------------------------

SPF_DNS = {"sender.example TXT": "v=spf1 ip4:192.0.2.0/24 -all",
           "soft.example TXT": "v=spf1 ~all",
           "broken.example TXT": "v=spf1 bogus",
           "down.example TXT": "SERVFAIL",
           "mail.sender.example TXT": "v=spf1 a -all",
           "mail.sender.example A": ["192.0.2.1"]}


def harness(options=None, records=SPF_DNS, **kw):
    return Harness([(Spf, options or {})], resolver=dns(records), **kw)


async def test_rule_publishes_the_result_for_later_rules():
    from smtpgate import Rule

    seen = {}

    class Reader(Rule):
        name = "reader"

        async def on_rcpt(self, results):  # only the argument it needs, by name
            seen.update(results.get("spf").data)

    h = Harness([(Spf, {}), (Reader, {})], resolver=dns(SPF_DNS))
    result = await h.send(sender="someone@Sender.Example")
    assert result.reply.code == 250
    assert seen["result"] == "pass" and seen["domain"] == "sender.example"
    record = result.transaction.results.get("spf")
    assert (record.outcome, record.pass_[0]) == ("pass", "mailfrom sender.example: pass")
    assert seen["identity"] == "mailfrom" and seen["helo"]["result"] == "pass"
    assert h.relayed[0].data == message()  # no header unless asked: byte-identical


async def test_rule_rejects_fail_at_rcpt_but_not_for_postmaster():
    h = harness()
    result = await h.send(client_ip="203.0.113.9")
    assert result.replies["mail"].code == 250
    reply = result.replies["rcpt"][0]
    assert (reply.code, reply.enhanced) == (550, "5.7.23") and "sender.example" in reply.text
    result = await h.send(client_ip="203.0.113.9", recipients=["postmaster@example.com"])
    assert result.reply.code == 250


async def test_rule_helo_fail_counts_unless_switched_off():
    # the client is allowed for the sender, but its HELO name's policy says fail
    records = {**SPF_DNS, "mail.sender.example A": ["198.51.100.1"]}
    result = await harness(records=records).send()
    assert result.reply.code == 550 and "HELO" in result.reply.text
    result = await harness({"check_helo": False}, records=records).send()
    assert result.reply.code == 250


async def test_rule_options_for_each_result():
    assert (await harness().send(sender="a@soft.example")).reply.code == 250
    r = (await harness({"on_softfail": "tempfail"}).send(sender="a@soft.example")).reply
    assert (r.code, r.enhanced) == (451, "4.7.23")
    assert (await harness().send(sender="a@broken.example")).reply.code == 250
    r = (await harness({"on_permerror": "reject"}).send(sender="a@broken.example")).reply
    assert (r.code, r.enhanced) == (550, "5.7.24")
    assert (await harness().send(sender="a@down.example")).reply.code == 250
    r = (await harness({"on_dns_error": "tempfail"}).send(sender="a@down.example")).reply
    assert (r.code, r.enhanced) == (451, "4.7.24")
    r = (await harness({"on_fail": "accept"}).send(client_ip="203.0.113.9")).reply
    assert r.code == 250


async def test_rule_dns_budget_spent_is_temperror():
    fake = dns(SPF_DNS)
    fake.session_budget = 5
    fake.latency[("sender.example", "TXT")] = 6
    h = Harness([(Spf, {"on_dns_error": "tempfail", "check_helo": False})], resolver=fake)
    result = await h.send()
    assert result.reply.code == 451
    assert result.transaction.results.get("spf").data["result"] == "temperror"


async def test_rule_prepends_authentication_results():
    h = harness({"header": True}, hostname="gate.example")
    result = await h.send(sender="a@sender.example")
    assert result.reply.code == 250
    raw = h.relayed[0].data
    first, _, rest = raw.partition(b"\r\n")
    assert first == (b"Authentication-Results: gate.example; spf=pass smtp.mailfrom=a@sender.example; "
                     b"spf=pass smtp.helo=mail.sender.example")
    assert rest == message()


async def test_rule_reports_auth_results_and_the_header_parses_with_authres():
    import authres

    h = harness({}, hostname="gate.example")  # header: false -> recorded, no header
    result = await h.send(sender="a@sender.example")
    assert [(a.method, a.result, a.properties) for a in result.transaction.results.auth_results()] == [
        ("spf", "pass", (("smtp", "mailfrom", "a@sender.example"),)),
        ("spf", "pass", (("smtp", "helo", "mail.sender.example"),))]
    assert h.relayed[0].data == message()
    h = harness({"header": True}, hostname="gate.example")
    await h.send(sender="a@sender.example")
    field = h.relayed[0].data.partition(b"\r\n")[0].decode()
    parsed = authres.AuthenticationResultsHeader.parse(field)
    assert parsed.authserv_id == "gate.example"
    assert [(r.method, r.result, r.smtp_mailfrom or r.smtp_helo) for r in parsed.results] == [
        ("spf", "pass", "a@sender.example"), ("spf", "pass", "mail.sender.example")]


async def test_rule_null_sender_uses_the_helo_identity():
    h = harness({"header": True}, hostname="gate.example")
    result = await h.send(sender="")
    assert result.reply.code == 250
    spf = result.transaction.results.get("spf").data
    assert (spf["result"], spf["domain"], spf["identity"]) == ("pass", "mail.sender.example", "helo")
    assert h.relayed[0].data.startswith(b"Authentication-Results: gate.example; spf=pass smtp.helo=mail.sender.example\r\n")


async def test_rule_bad_options_fail_at_load():
    from smtpgate import OptionError
    with pytest.raises(OptionError):
        Spf({"on_fail": "bounce"})
    with pytest.raises(OptionError):
        Spf({"authserv_id": "two words"})


# --- on the real DNS server --------------------------------------------------------------

async def test_check_host_on_the_real_dns_server():
    zones = {"example.org": {"@": {"TXT": "v=spf1 include:_spf.example.net mx -all", "MX": "10 mx"},
                             "mx": {"A": "192.0.2.25"}},
             "example.net": {"_spf": {"TXT": "v=spf1 ip4:198.51.100.0/24 ~all"},
                             "slow": {"TXT": "v=spf1 -all"}}}
    with DnsServer(zones) as ns:
        ns.timeout_names.add("slow.example.net")
        r = Resolver([ns.address], timeout=0.3, attempts=1)
        assert (await spf_check_host(r, "198.51.100.7", "example.org", "a@example.org")).result == "pass"
        assert (await spf_check_host(r, "192.0.2.25", "example.org", "a@example.org")).result == "pass"
        assert (await spf_check_host(r, "203.0.113.1", "example.org", "a@example.org")).result == "fail"
        assert (await spf_check_host(r, "203.0.113.1", "slow.example.net", "a@slow.example.net")).result == "temperror"
        assert (await spf_check_host(r, "203.0.113.1", "none.example.org", "a@none.example.org")).result == "none"


async def test_a_space_from_the_macro_underscore_is_queried_on_the_real_resolver():
    # RFC 7208 §7.3: %_ puts a space in the name; it goes out as the octet 32 of a label.
    zones = {"example.org": {"@": {"TXT": "v=spf1 a:mail%_hub.example.org -all"},
                             "mail\\032hub": {"A": "192.0.2.25"}}}
    with DnsServer(zones) as ns:
        r = Resolver([ns.address], timeout=0.3, attempts=1)
        assert (await spf_check_host(r, "192.0.2.25", "example.org", "a@example.org")).result == "pass"
        assert (await spf_check_host(r, "192.0.2.26", "example.org", "a@example.org")).result == "fail"
