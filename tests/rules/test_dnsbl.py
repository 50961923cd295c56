"""The dnsbl rule (and fcrdns) in a harness: scripted DNS, then the real test DNS server."""
import asyncio
import time

import pytest

from tests.support.dnsserver import DnsServer
from smtpgate import OptionError, Rule
from smtpgate.pipeline.policy import Policy, PolicySet
from smtpgate.resolver import Resolver
from smtpgate.testing import FakeResolver, Harness
from smtpgate_rules.dnsbl import Dnsbl
from smtpgate_rules.fcrdns import Fcrdns

LISTED = {("1.2.0.192.zen.test", "A"): ["127.0.0.2"]}


def harness(options, records=LISTED, **kw):
    return Harness([(Dnsbl, options)], resolver=FakeResolver(dict(records)), **kw)


async def test_listed_client_is_refused_at_rcpt_naming_the_list():
    h = harness({"lists": [{"zone": "zen.test"}]})
    result = await h.send()
    assert result.replies["mail"].code == 250  # the decision waits for RCPT
    reply = result.replies["rcpt"][0]
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert reply.text == "Service unavailable; client host [192.0.2.1] blocked using zen.test"
    assert h.relayed == []
    record = result.transaction.results.get("dnsbl")
    published = record.data
    assert published["score"] == 1 and published["listed"][0]["answers"] == ["127.0.0.2"]
    assert (record.outcome, record.fail, record.events) == ("fail", ["listed: zen.test"], ["dnsbl_listed"])
    entry = [e for e in result.trace if e.rule == "dnsbl" and e.stage == "rcpt"][0]
    assert entry.result == "fail: listed: zen.test; event dnsbl_listed"  # in the trace, the log line
    assert [(e.name, e.rule, e.why) for e in result.transaction.results.events] == [
        ("dnsbl_listed", "dnsbl", "zen.test"), ("rejected", "dnsbl", entry.reason)]


async def test_unlisted_client_passes():
    h = harness({"lists": ["zen.test"]})
    result = await h.send(client_ip="192.0.2.99")
    assert result.reply.code == 250 and len(h.relayed) == 1
    record = result.transaction.results.get("dnsbl")
    assert (record.outcome, record.pass_, record.events) == ("pass", ["not listed"], [])


async def test_postmaster_is_not_refused():
    h = harness({"lists": ["zen.test"]})
    assert (await h.send(recipients=["postmaster@example.com"])).reply.code == 250


async def test_lookups_start_at_connect_and_helo():
    seen = {}

    class Peek(Rule):
        name = "peek"

        async def on_connect(self, session):
            seen["connect"] = sorted(session.data.get("dnsbl_lookups", {}))

        async def on_helo(self, session):
            seen["helo"] = sorted(session.data.get("dnsbl_lookups", {}))

    resolver = FakeResolver(LISTED)
    h = Harness([(Dnsbl, {"lists": ["zen.test", {"zone": "dbl.test", "type": "domain"}]}), (Peek, {})],
                resolver=resolver)
    await h.send(helo="mail.sender.example", sender="a@sender.example")
    assert seen["connect"] == ["1.2.0.192.zen.test"]
    assert seen["helo"] == ["1.2.0.192.zen.test", "mail.sender.example.dbl.test"]
    assert sorted(resolver.queries) == [("1.2.0.192.zen.test", "A"), ("mail.sender.example.dbl.test", "A"),
                                        ("sender.example.dbl.test", "A")]


async def test_answer_filters():
    records = {("1.2.0.192.zen.test", "A"): ["127.0.0.1"], ("2.2.0.192.zen.test", "A"): ["127.0.0.4"],
               ("3.2.0.192.zen.test", "A"): ["127.0.0.12", "127.0.0.3"]}
    opts = {"lists": [{"zone": "zen.test", "answers": ["127.0.0.2-127.0.0.11"]}]}
    assert (await harness(opts, records).send(client_ip="192.0.2.1")).reply.code == 250
    assert (await harness(opts, records).send(client_ip="192.0.2.2")).reply.code == 554
    result = await harness(opts, records).send(client_ip="192.0.2.3")
    assert result.transaction.results.get("dnsbl").data["listed"][0]["answers"] == ["127.0.0.3"]
    single = {"lists": [{"zone": "zen.test", "answers": ["127.0.0.4", "127.0.1.0/24"]}]}
    assert (await harness(single, records).send(client_ip="192.0.2.2")).reply.code == 554
    assert (await harness(single, records).send(client_ip="192.0.2.3")).reply.code == 250


async def test_weights_and_threshold():
    records = {("1.2.0.192.a.test", "A"): ["127.0.0.2"], ("1.2.0.192.b.test", "A"): ["127.0.0.2"],
               ("2.2.0.192.a.test", "A"): ["127.0.0.2"]}
    opts = {"threshold": 2, "lists": [{"zone": "a.test", "weight": 1.5, "name": "List A"},
                                      {"zone": "b.test", "weight": 0.5}]}
    result = await harness(opts, records).send(client_ip="192.0.2.2")
    assert result.reply.code == 250  # 1.5 < 2, but the listing is published
    assert result.transaction.results.get("dnsbl").events == ["dnsbl_listed"]
    assert result.transaction.results.get("dnsbl").data["score"] == 1.5
    result = await harness(opts, records).send(client_ip="192.0.2.1")
    assert result.reply.code == 554
    assert result.reply.text.endswith("blocked using List A, b.test")


async def test_private_and_loopback_clients_are_skipped_unless_asked():
    records = {("1.0.0.127.zen.test", "A"): ["127.0.0.2"], ("5.1.168.192.zen.test", "A"): ["127.0.0.2"]}
    for ip in ("127.0.0.1", "192.168.1.5"):
        h = harness({"lists": ["zen.test"]}, records)
        assert (await h.send(client_ip=ip)).reply.code == 250
        assert h.resolver.queries == []
        assert (await harness({"lists": ["zen.test"], "check_private": True}, records)
                .send(client_ip=ip)).reply.code == 554


async def test_ipv6_clients_are_looked_up_by_nibbles():
    query = "1.0.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.zen.test"
    h = harness({"lists": ["zen.test"]}, {(query, "A"): ["127.0.0.2"]})
    assert (await h.send(client_ip="2001:db8::1")).reply.code == 554


async def test_domain_lists_check_sender_domain_and_helo():
    records = {("spammer.example.dbl.test", "A"): ["127.0.1.2"],
               ("bad-helo.example.dbl.test", "A"): ["127.0.1.2"]}
    opts = {"lists": [{"zone": "dbl.test", "type": "domain"}]}
    result = await harness(opts, records).send(sender="x@Spammer.Example")
    assert result.reply.code == 554 and "sender domain spammer.example" in result.reply.text
    result = await harness(opts, records).send(helo="bad-helo.example")
    assert result.reply.code == 554 and "HELO name bad-helo.example" in result.reply.text
    h = harness(opts, records)
    assert (await h.send(helo="[192.0.2.1]", sender="")).reply.code == 250
    assert h.resolver.queries == []  # address literals and <> are not looked up


async def test_dns_errors_accept_by_default_or_tempfail():
    records = {("1.2.0.192.zen.test", "A"): "SERVFAIL"}
    result = await harness({"lists": ["zen.test"]}, records).send()
    assert result.reply.code == 250
    assert result.transaction.results.get("dnsbl").data["errors"][0]["kind"] == "servfail"
    reply = (await harness({"lists": ["zen.test"], "on_dns_error": "tempfail"}, records).send()).reply
    assert (reply.code, reply.enhanced) == (451, "4.7.1")
    # a failed list whose weight cannot reach the threshold does not defer anybody
    opts = {"lists": [{"zone": "zen.test", "weight": 0.5}], "on_dns_error": "tempfail"}
    assert (await harness(opts, records).send()).reply.code == 250


async def test_dns_budget_bounds_the_wait():
    resolver = FakeResolver(LISTED, latency={("1.2.0.192.zen.test", "A"): 30}, session_budget=10)
    h = Harness([(Dnsbl, {"lists": ["zen.test"], "on_dns_error": "tempfail"})], resolver=resolver)
    result = await h.send()
    assert result.reply.code == 451
    assert result.transaction.results.get("dnsbl").data["errors"][0]["kind"] == "timeout"


async def test_shadow_mode_only_logs():
    rule = Dnsbl({"lists": ["zen.test"]}, None)
    h = harness({"lists": ["zen.test"]})
    rule.gate = h.context
    rule.mode = "shadow"
    h2 = Harness([rule], resolver=h.resolver)
    rule.gate = h2.context
    result = await h2.send()
    assert result.reply.code == 250
    assert [e.action for e in result.trace if e.rule == "dnsbl" and e.stage == "rcpt"] == ["reject"]


async def test_domain_policy_rule_starts_lookups_at_first_use():
    resolver = FakeResolver(LISTED)
    h = Harness([], resolver=resolver)
    rule = Dnsbl({"lists": ["zen.test"]}, h.context)
    domain_policy = Policy("example", ("example.com",), (), [rule], "<test>")
    default = Policy("default", ("other.example",), (), [], "<test>")
    h.runtime = type(h.runtime)(h.runtime.config, None, PolicySet([default, domain_policy]), h.runtime.stores)
    h._make_gate()
    result = await h.send()
    assert result.reply.code == 554
    assert (await h.send(recipients=["x@other.example"])).reply.code == 250


@pytest.mark.parametrize("options, key", [
    ({}, "lists"),
    ({"lists": []}, "lists"),
    ({"lists": [{"zone": "nodot"}]}, "lists"),
    ({"lists": [{"zone": "zen.test", "answers": ["127.0.0.9-127.0.0.2"]}]}, "lists"),
    ({"lists": [{"zone": "zen.test", "answers": ["somewhere"]}]}, "lists"),
    ({"lists": [{"zone": "zen.test", "type": "asn"}]}, "lists"),
    ({"lists": [{"zone": "zen.test", "wieght": 2}]}, "lists"),
    ({"lists": ["zen.test"], "code": 451}, "code"),
    ({"lists": ["zen.test"], "text": "blocked by {nope}"}, "text"),
    ({"lists": ["zen.test"], "on_dns_error": "ignore"}, "on_dns_error"),
])
def test_bad_options_fail_at_load(options, key):
    with pytest.raises(OptionError) as e:
        Dnsbl(options)
    assert e.value.key == key


async def test_custom_reply():
    h = harness({"lists": [{"zone": "zen.test", "name": "ZEN"}], "code": 550,
                 "text": "Go away {client_ip}: {lists}"})
    reply = (await h.send()).reply
    assert (reply.code, reply.text) == (550, "Go away 192.0.2.1: ZEN")


# --- fcrdns ---------------------------------------------------------------------------------

FCRDNS = {("1.2.0.192.in-addr.arpa", "PTR"): ["mail.sender.example"],
          ("mail.sender.example", "A"): ["192.0.2.1"],
          ("2.2.0.192.in-addr.arpa", "PTR"): ["forged.example"],
          ("forged.example", "A"): ["198.51.100.1"],
          ("3.2.0.192.in-addr.arpa", "PTR"): "SERVFAIL"}


async def test_fcrdns_sets_the_client_name_for_later_rules():
    names = []

    class Reader(Rule):
        name = "reader"

        async def on_rcpt(self, tx, rcpt):
            names.append(tx.session.client_name)

    h = Harness([(Fcrdns, {}), (Reader, {})], resolver=FakeResolver(FCRDNS))
    assert (await h.send(client_ip="192.0.2.1")).reply.code == 250
    assert (await h.send(client_ip="192.0.2.2")).reply.code == 250
    assert (await h.send(client_ip="192.0.2.3")).reply.code == 250
    assert names == ["mail.sender.example", None, None]


async def test_fcrdns_can_refuse_unverified_clients():
    h = Harness([(Fcrdns, {"unverified": "reject"})], resolver=FakeResolver(FCRDNS))
    reply = (await h.send(client_ip="192.0.2.2")).reply
    assert (reply.code, reply.enhanced) == (550, "5.7.25")  # given at MAIL
    assert (await h.send(client_ip="192.0.2.1")).reply.code == 250
    h = Harness([(Fcrdns, {"on_dns_error": "tempfail"})], resolver=FakeResolver(FCRDNS))
    reply = (await h.send(client_ip="192.0.2.3")).reply
    assert (reply.code, reply.enhanced) == (450, "4.7.25")


# --- on the real DNS server: lookups in parallel, within the budget ------------------------

async def test_lists_are_looked_up_in_parallel_on_a_real_server():
    zones = {f"bl{i}.test": {"1.2.0.192": {"A": "127.0.0.2"} if i == 2 else {}} for i in range(4)}
    with DnsServer(zones) as ns:
        for i in range(4):
            ns.delays[f"1.2.0.192.bl{i}.test"] = 0.3
        resolver = Resolver([ns.address], timeout=2, attempts=1)
        h = Harness([(Dnsbl, {"lists": [f"bl{i}.test" for i in range(4)]})], resolver=resolver)
        started = time.monotonic()
        result = await h.send()
        elapsed = time.monotonic() - started
        assert result.reply.code == 554 and "bl2.test" in result.reply.text
        assert elapsed < 0.9  # four 0.3 s lookups at once, not one after another
        assert sorted(n for n, _, _ in ns.queries) == [f"1.2.0.192.bl{i}.test" for i in range(4)]


async def test_timeouts_and_servfail_on_a_real_server():
    zones = {"bl.test": {"1.2.0.192": {"A": "127.0.0.2"}}, "bl2.test": {}}
    with DnsServer(zones) as ns:
        ns.timeout_names.add("1.2.0.192.bl.test")
        ns.servfail_names.add("1.2.0.192.bl2.test")
        resolver = Resolver([ns.address], timeout=0.3, attempts=1)
        h = Harness([(Dnsbl, {"lists": ["bl.test", "bl2.test"]})], resolver=resolver)
        result = await h.send()
        assert result.reply.code == 250
        kinds = sorted(e["kind"] for e in result.transaction.results.get("dnsbl").data["errors"])
        assert kinds == ["servfail", "timeout"]
        h = Harness([(Dnsbl, {"lists": ["bl.test", "bl2.test"], "on_dns_error": "tempfail"})],
                    resolver=resolver)
        assert (await h.send()).reply.code == 451


async def test_budget_cuts_a_slow_server_short():
    with DnsServer({"bl.test": {}}) as ns:
        ns.timeout_names.add("1.2.0.192.bl.test")
        resolver = Resolver([ns.address], timeout=5, attempts=1, session_budget=0.3)
        h = Harness([(Dnsbl, {"lists": ["bl.test"], "on_dns_error": "tempfail"})], resolver=resolver)
        started = time.monotonic()
        result = await h.send()
        assert time.monotonic() - started < 1.5
        assert result.reply.code == 451
        assert result.transaction.results.get("dnsbl").data["timed_out"]
        await asyncio.sleep(0)  # the background lookup goes on; nothing waits for it
