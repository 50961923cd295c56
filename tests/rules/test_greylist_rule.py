"""The greylist rule through smtpgate.testing: a FakeClock moved by hand, never a sleep.

Each harness has its own in-memory SQLite store unless a test shares one between "gates".
"""
from __future__ import annotations

import ipaddress

import pytest

from smtpgate import ConfigError, OptionError, Rule, StoreError
from smtpgate.pipeline.plugins import PluginRegistry
from smtpgate.stores import Stores, make_allow, open_stores
from smtpgate.testing import FakeClock, FakeResolver, Harness
from smtpgate_rules.fcrdns import Fcrdns
from smtpgate_rules.greylist import Greylist, normalise_sender
from tests.support.constants import T0
from tests.support.redisproc import delete_redis_keys, new_prefix, redis_state, require_redis

DAY = 86400
FIRST = "451 4.7.1 Greylisted, please try again in 300 seconds (after 2026-01-01T00:05:00Z)"


@pytest.fixture
async def make():
    """`make(options=None, **harness_kwargs) -> Harness` with the greylist rule; closed after."""
    made = []

    def build(options=None, rules_before=(), **kwargs):
        kwargs.setdefault("clock", FakeClock())
        h = Harness([*rules_before, (Greylist, options or {})], **kwargs)
        made.append(h)
        return h

    yield build
    for h in made:
        await h.aclose()


def rcpt_reply(result, i=0):
    return str(result.replies["rcpt"][i])


def events(result):
    """The events rules published (the pipeline's own, like delivered, left out)."""
    return [e.name for e in result.transaction.results.events if e.rule != "downstream"]


def decided(result, rcpt="rcpt@example.com"):
    return result.transaction.results.get("greylist").data[rcpt]


# --- the life of a triplet -----------------------------------------------------------------

async def test_first_attempt_is_deferred_with_the_earliest_retry_time(make):
    h = make()
    r = await h.send()
    assert str(r.reply) == FIRST
    assert h.relayed == []
    assert events(r) == ["greylisted"]
    [entry] = [e for e in r.trace if e.rule == "greylist"]
    assert entry.action == "tempfail" and "new" in entry.reason and "192.0.2.0/24" in entry.reason
    assert decided(r, "rcpt@example.com")["outcome"] == "new"


async def test_an_early_retry_is_deferred_until_the_same_time(make):
    h = make()
    await h.send()
    h.clock.advance(100)
    r = await h.send()
    assert str(r.reply) == "451 4.7.1 Greylisted, please try again in 200 seconds (after 2026-01-01T00:05:00Z)"
    h.clock.advance(199.5)
    r = await h.send()
    assert str(r.reply).endswith("try again in 1 seconds (after 2026-01-01T00:05:00Z)")


async def test_a_retry_after_the_delay_passes_and_is_relayed(make):
    h = make()
    await h.send()
    h.clock.advance(300)
    r = await h.send()
    assert r.reply.code == 250
    assert [m.recipients for m in h.relayed] == [["rcpt@example.com"]]
    assert events(r) == ["greylist_passed"]
    h.clock.advance(3600)
    r = await h.send()
    assert r.reply.code == 250 and events(r) == []
    assert decided(r, "rcpt@example.com")["outcome"] == "passed_before"
    assert len(h.relayed) == 2


async def test_a_retry_after_the_window_starts_again(make):
    h = make({"delay": "10m", "retry_window": "1h"})
    await h.send()
    h.clock.advance(3601)
    r = await h.send()
    assert str(r.reply) == ("451 4.7.1 Greylisted, please try again in 600 seconds "
                            "(after 2026-01-01T01:10:01Z)")
    assert decided(r, "rcpt@example.com")["outcome"] == "restarted"
    h.clock.advance(600)
    assert (await h.send()).reply.code == 250


async def test_a_pass_expires_after_pass_ttl_and_is_refreshed_by_use(make):
    h = make({"pass_ttl": "10d"})
    await h.send()
    h.clock.advance(300)
    assert (await h.send()).reply.code == 250
    for _ in range(3):  # used every 9 days: keeps passing long past the first 10 days
        h.clock.advance(9 * DAY)
        assert (await h.send()).reply.code == 250
    h.clock.advance(10 * DAY + 1)
    r = await h.send()
    assert r.reply.code == 451 and "300 seconds" in str(r.reply)


async def test_each_recipient_is_its_own_triplet(make):
    h = make()
    await h.send(recipients=["a@example.com"])
    h.clock.advance(300)
    r = await h.send(recipients=["a@example.com", "b@example.com"])
    assert [x.code for x in r.replies["rcpt"]] == [250, 451]
    assert r.reply.code == 250 and h.relayed[0].recipients == ["a@example.com"]


# --- auto-whitelist --------------------------------------------------------------------------

async def test_a_client_with_enough_passed_triplets_is_not_greylisted(make):
    h = make({"auto_whitelist_after": 2})
    for rcpt in ("a@example.com", "b@example.com"):
        await h.send(recipients=[rcpt], client_ip="192.0.2.10")
    h.clock.advance(300)
    for rcpt in ("a@example.com", "b@example.com"):
        assert (await h.send(recipients=[rcpt], client_ip="192.0.2.10")).reply.code == 250
    r = await h.send(sender="news@other.example", recipients=["c@example.com"], client_ip="192.0.2.99")
    assert r.reply.code == 250
    assert decided(r, "c@example.com")["outcome"] == "auto"
    r = await h.send(recipients=["c@example.com"], client_ip="198.51.100.1")
    assert r.reply.code == 451


async def test_auto_whitelist_off(make):
    h = make({"auto_whitelist_after": 0})
    for rcpt in "abcdefg":
        await h.send(recipients=[f"{rcpt}@example.com"])
    h.clock.advance(300)
    for rcpt in "abcdefg":
        assert (await h.send(recipients=[f"{rcpt}@example.com"])).reply.code == 250
    assert (await h.send(recipients=["new@example.com"])).reply.code == 451


# --- exemptions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("local", ["postmaster", "abuse", "Abuse", "POSTMASTER"])
async def test_postmaster_and_abuse_are_never_greylisted(make, local):
    h = make()
    r = await h.send(recipients=[f"{local}@example.com"])
    assert r.reply.code == 250 and len(h.relayed) == 1


@pytest.mark.parametrize("whitelist, client_ip, exempt", [
    (["192.0.2.7"], "192.0.2.7", True),
    (["192.0.2.7"], "192.0.2.8", False),
    (["192.0.2.0/24"], "192.0.2.8", True),
    (["10.0.0.0/8", "2001:db8::/32"], "2001:db8:5::1", True),
    (["2001:db8::/32"], "2001:db9::1", False),
    (["192.0.2.0/24"], "::ffff:192.0.2.1", True),
])
async def test_client_whitelist(make, whitelist, client_ip, exempt):
    h = make({"whitelist_clients": whitelist})
    assert ((await h.send(client_ip=client_ip)).reply.code == 250) is exempt


@pytest.mark.parametrize("whitelist, sender, exempt", [
    (["alice@partner.example"], "alice@partner.example", True),
    (["alice@partner.example"], "Alice@Partner.Example", True),
    (["alice@partner.example"], "alice+lists@partner.example", True),  # after normalisation
    (["alice@partner.example"], "bob@partner.example", False),
    (["@partner.example"], "bob@partner.example", True),
    (["@partner.example"], "bob@mail.partner.example", False),
    (["partner.example"], "bob@mail.partner.example", True),
    (["partner.example"], "bob@partner.example", True),
    ([".partner.example"], "bob@partner.example", False),
    ([".partner.example"], "bob@mail.partner.example", True),
    (["partner.example"], "bob@notpartner.example", False),
    (["partner.example"], "SRS0=h=tt=partner.example=bob@forwarder.example", True),
])
async def test_sender_whitelist(make, whitelist, sender, exempt):
    h = make({"whitelist_senders": whitelist})
    assert ((await h.send(sender=sender)).reply.code == 250) is exempt


@pytest.mark.parametrize("whitelist, rcpt, exempt", [
    (["sales@example.com"], "sales@example.com", True),
    (["sales@example.com"], "Sales@Example.COM", True),
    (["sales@example.com"], "info@example.com", False),
    (["@example.com"], "info@example.com", True),
    (["example.com"], "info@example.com", True),
    ([".example.com"], "info@example.com", False),
])
async def test_recipient_whitelist(make, whitelist, rcpt, exempt):
    h = make({"whitelist_recipients": whitelist}, domains=["example.com"])
    assert ((await h.send(recipients=[rcpt])).reply.code == 250) is exempt


async def test_client_name_from_the_session(make):
    h = make({"whitelist_client_names": ["trusted.example"]})
    assert (await h.send(client_name="mx1.trusted.example")).reply.code == 250
    assert (await h.send(client_name="mx1.untrusted.example")).reply.code == 451
    assert (await h.send(client_name="trusted.example.evil.example")).reply.code == 451


def ptr_records(ip, name, forward):
    rev = ipaddress.ip_address(ip).reverse_pointer
    records = {(rev, "PTR"): [name]}
    if forward:
        records[(name, "A" if ":" not in ip else "AAAA")] = forward
    return FakeResolver(records)


@pytest.mark.parametrize("suffix, name, forward, exempt", [
    ("trusted.example", "out-7.mail.trusted.example", ["192.0.2.1"], True),
    (".trusted.example", "out-7.mail.trusted.example", ["192.0.2.1"], True),
    (".trusted.example", "trusted.example", ["192.0.2.1"], False),
    ("trusted.example", "out-7.mail.trusted.example", ["192.0.2.99"], False),  # not confirmed
    ("trusted.example", "out-7.mail.trusted.example", [], False),
    ("trusted.example", "mail.other.example", ["192.0.2.1"], False),
])
async def test_client_name_as_the_fcrdns_rule_found_it(make, suffix, name, forward, exempt):
    resolver = ptr_records("192.0.2.1", name, forward)
    h = make({"whitelist_client_names": [suffix]}, rules_before=[(Fcrdns, {})], resolver=resolver)
    assert ((await h.send(client_ip="192.0.2.1")).reply.code == 250) is exempt
    assert [q[1] for q in resolver.queries].count("PTR") == 1  # fcrdns asked; greylist did not again


async def test_greylist_makes_no_dns_lookups_of_its_own(make, caplog):
    resolver = ptr_records("192.0.2.1", "out-7.mail.trusted.example", ["192.0.2.1"])
    h = make({"whitelist_client_names": ["trusted.example"]}, resolver=resolver)
    assert (await h.send(client_ip="192.0.2.1")).reply.code == 451  # no fcrdns rule: no name
    assert (await h.send(client_ip="192.0.2.1")).reply.code == 451
    assert resolver.queries == []
    said = [r.message for r in caplog.records if "needs the fcrdns rule" in r.message]
    assert len(said) == 1  # the admin is told, once


async def test_no_dns_is_asked_without_name_whitelists(make):
    resolver = FakeResolver()
    h = make(resolver=resolver)
    await h.send()
    assert resolver.queries == []


async def test_a_failing_fcrdns_lookup_means_no_name(make):
    resolver = FakeResolver({(ipaddress.ip_address("192.0.2.1").reverse_pointer, "PTR"): "SERVFAIL"})
    h = make({"whitelist_client_names": ["trusted.example"]}, rules_before=[(Fcrdns, {})], resolver=resolver)
    assert (await h.send()).reply.code == 451


# --- the null sender ----------------------------------------------------------------------------

async def test_the_null_sender_is_greylisted_per_network_and_recipient(make):
    h = make()
    r = await h.send(sender="")
    assert str(r.reply) == FIRST
    assert decided(r, "rcpt@example.com")["sender"] == ""
    h.clock.advance(300)
    assert (await h.send(sender="", client_ip="192.0.2.200")).reply.code == 250  # same /24
    assert (await h.send(sender="", recipients=["other@example.com"])).reply.code == 451
    assert (await h.send(sender="", client_ip="198.51.100.1")).reply.code == 451


async def test_the_null_sender_can_be_skipped(make):
    h = make({"null_sender": "skip"})
    assert (await h.send(sender="")).reply.code == 250
    assert (await h.send(sender="someone@sender.example")).reply.code == 451


# --- pooled senders and the SPF hook -------------------------------------------------------------

async def test_pooled_sender_domains_are_keyed_by_domain(make):
    h = make({"pooled_senders": ["bigmail.example"]})
    r = await h.send(sender="alice@bigmail.example", client_ip="198.51.100.1")
    assert r.reply.code == 451
    assert decided(r, "rcpt@example.com")["client"] == "domain:bigmail.example"
    h.clock.advance(300)
    assert (await h.send(sender="alice@bigmail.example", client_ip="203.0.113.77")).reply.code == 250
    assert (await h.send(sender="alice@smtp.bigmail.example", client_ip="203.0.113.77")).reply.code == 451


async def test_unpooled_senders_retrying_from_another_network_wait_again(make):
    h = make()
    await h.send(sender="alice@bigmail.example", client_ip="198.51.100.1")
    h.clock.advance(300)
    assert (await h.send(sender="alice@bigmail.example", client_ip="203.0.113.77")).reply.code == 451


class PublishSpf(Rule):
    """Stands in for the spf rule: reports a result at MAIL, under the spf rule's name."""

    name = "publish_spf"
    result: object = None

    async def on_mail(self, results):
        if self.result is not None:
            results.add("spf", data=self.result)


def spf(result):
    rule = PublishSpf({}, None)
    rule.result = result
    return rule


@pytest.mark.parametrize("published, options, pooled", [
    ({"result": "pass", "domain": "bigmail.example"}, {}, True),
    ({"result": "Pass", "domain": "BigMail.Example."}, {}, True),
    ({"result": "pass"}, {}, True),  # no domain: the sender's
    ({"result": "pass", "domain": "bigmail.example"}, {"spf_pooling": False}, False),
    ({"result": "softfail", "domain": "bigmail.example"}, {}, False),
    ({"result": "fail"}, {}, False),
    ({"result": "pass", "domain": "mx.bigmail.example", "identity": "helo"}, {}, False),
    ({"result": "pass", "domain": "bigmail.example", "identity": "mailfrom", "helo": {}}, {}, True),
    (None, {}, False),
])
async def test_an_spf_pass_published_by_another_rule_keys_by_domain(make, published, options, pooled):
    h = make(options, rules_before=[spf(published)])
    r = await h.send(sender="alice@bigmail.example", client_ip="198.51.100.1")
    client = decided(r, "rcpt@example.com")["client"]
    assert client == ("domain:bigmail.example" if pooled else "198.51.100.0/24")
    h.clock.advance(300)
    r = await h.send(sender="alice@bigmail.example", client_ip="203.0.113.77")
    assert (r.reply.code == 250) is pooled


async def test_one_triplet_is_keyed_by_its_network_or_its_spf_domain_as_each_message_says(make):
    # the rule remembers its keys of messages without an SPF result: one with it is keyed afresh
    publisher = spf(None)
    h = make({}, rules_before=[publisher])
    clients = []
    for published in (None, {"result": "pass", "domain": "bigmail.example"}, None, {"result": "pass"}):
        publisher.result = published
        r = await h.send(sender="alice@bigmail.example", client_ip="198.51.100.1")
        clients.append(decided(r)["client"])
    assert clients == ["198.51.100.0/24", "domain:bigmail.example"] * 2


# --- client networks ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, first, retry, passes", [
    ({}, "192.0.2.1", "192.0.2.254", True),
    ({}, "192.0.2.1", "192.0.3.1", False),
    ({}, "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),
    ({}, "2001:db8:1:2::1", "2001:db8:1:3::1", False),
    ({}, "::ffff:192.0.2.1", "192.0.2.9", True),
    ({"ipv4_prefix": 32}, "192.0.2.1", "192.0.2.2", False),
    ({"ipv4_prefix": 32}, "192.0.2.1", "192.0.2.1", True),
    ({"ipv4_prefix": 16}, "192.0.2.1", "192.0.3.1", True),
    ({"ipv6_prefix": 48}, "2001:db8:1:2::1", "2001:db8:1:3::1", True),
    ({"ipv6_prefix": 128}, "2001:db8:1:2::1", "2001:db8:1:2::2", False),
])
async def test_clients_are_keyed_by_network(make, options, first, retry, passes):
    h = make(options)
    assert (await h.send(client_ip=first)).reply.code == 451
    h.clock.advance(300)
    assert ((await h.send(client_ip=retry)).reply.code == 250) is passes


# --- sender normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("sender, key", [
    ("", ""),
    ("Alice@Example.ORG", "alice@example.org"),
    ("alice@example.org.", "alice@example.org"),
    ("alice+newsletter@example.org", "alice@example.org"),
    ("alice+a+b@example.org", "alice@example.org"),
    ("first-last@example.org", "first-last@example.org"),  # "-" is no extension separator
    ("bounce-123-456@lists.example", "bounce-#-#@lists.example"),
    ("bounce-123-456-7@lists.example", "bounce-#-#-#@lists.example"),
    ("msg.2024.77@lists.example", "msg.#.#@lists.example"),
    ("user123@example.org", "user123@example.org"),  # digits inside a word stay
    ("123@example.org", "#@example.org"),
    ("list-bounces+bob=example.com@lists.example", "list-bounces@lists.example"),  # Mailman VERP
    ("prvs=1234567890=alice@example.org", "alice@example.org"),  # BATV
    ("PRVS=1234abcdef=Alice@Example.org", "alice@example.org"),
    ("msprvs1=17ab2cdEF=bounces-123@example.org", "bounces-#@example.org"),
    ("SRS0=HHH=TT=example.org=alice@forwarder.example", "alice@example.org"),
    ("SRS0+HHH=TT=example.org=alice@forwarder.example", "alice@example.org"),
    ("srs0=HHH=TT=Example.ORG=Alice+tag@forwarder.example", "alice@example.org"),
    ("SRS1=XXX=first.example==HHH=TT=example.org=alice@second.example", "alice@example.org"),
    ("SRS0=HHH=TT=example.org=prvs=1234567890=alice@forwarder.example", "alice@example.org"),
    ("SRS0=broken@forwarder.example", "srs0=broken@forwarder.example"),
    ('"john doe"@example.org', '"john doe"@example.org'),
    ("<alice@example.org>", "alice@example.org"),
])
def test_sender_normalisation(sender, key):
    assert normalise_sender(sender) == key


async def test_senders_that_vary_per_message_keep_one_triplet(make):
    h = make()
    assert (await h.send(sender="bounce-123-456@lists.example")).reply.code == 451
    h.clock.advance(300)
    assert (await h.send(sender="bounce-124-999@lists.example")).reply.code == 250
    assert (await h.send(sender="prvs=0123456789=bounce-125-1@lists.example")).reply.code == 250


# --- modes, allow entries, sharing, failures ----------------------------------------------------

async def test_shadow_mode_records_and_logs_but_never_defers(make):
    rule = Greylist({}, None)
    h = make()
    rule.gate, rule.mode = h.context, "shadow"
    h2 = Harness([rule], clock=h.clock, stores=h.stores)
    r = await h2.send()
    assert r.reply.code == 250 and len(h2.relayed) == 1
    [entry] = [e for e in r.trace if e.rule == "greylist"]
    assert entry.shadow and entry.action == "tempfail" and entry.reply.startswith("451 4.7.1")
    assert events(r) == []
    assert (await h.stores.greylist.get("192.0.2.0/24", "sender@sender.example", "rcpt@example.com")).attempts == 1


async def test_allow_entries_in_the_store_let_clients_through(make):
    h = make()
    await h.stores.greylist.add_allow(make_allow("client", "198.51.100.0/24", T0, 3600))
    r = await h.send(client_ip="198.51.100.9")
    assert r.reply.code == 250
    assert decided(r, "rcpt@example.com")["outcome"] == "allowed"
    # the entry that let it through is named, in the rule's data and in the trace (the log line)
    assert decided(r, "rcpt@example.com")["allow"] == "client 198.51.100.0/24"
    [entry] = [e for e in r.trace if e.rule == "greylist"]
    assert entry.result == "pass: rcpt@example.com: allowed (client 198.51.100.0/24)"
    h.clock.advance(3601)
    assert (await h.send(client_ip="198.51.100.9")).reply.code == 451


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_two_gates_on_one_state(make, tmp_path, backend):
    """Greylisted by one gate, the retry reaches another gate of the fleet and passes."""
    prefix = new_prefix()
    if backend == "redis":
        require_redis()
        state = redis_state(prefix)
    else:
        state = f"sqlite://{tmp_path / 'state.db'}"
    clock = FakeClock()
    a, b = make(state=state, clock=clock), make(state=state, clock=clock)
    try:
        assert a.stores is not b.stores
        assert (await a.send()).reply.code == 451
        clock.advance(300)
        assert (await b.send()).reply.code == 250
        assert len(b.relayed) == 1
    finally:
        await a.aclose()
        await b.aclose()
        if backend == "redis":
            delete_redis_keys(prefix)


class _Failing:
    async def attempt(self, *args, **kwargs):
        raise StoreError("Redis redis://127.0.0.1:6379/0: ConnectionError: refused")

    async def close(self):
        pass


async def test_a_store_failure_defers_unless_on_error_accept(make):
    stores = Stores("redis://127.0.0.1:6379/0", greylist=_Failing())
    h = make(stores=stores)
    r = await h.send()
    assert str(r.reply).startswith("451 4.3.0")
    rule = Greylist({}, None)
    rule.gate, rule.on_error = h.context, "accept"
    h2 = Harness([rule], clock=h.clock, stores=stores)
    assert (await h2.send()).reply.code == 250


async def test_a_gate_without_stores_is_a_crash_not_a_pass():
    rule = Greylist({}, None)
    h = Harness([rule])
    rule.gate = type("Ctx", (), {"clock": h.clock, "stores": None})()
    assert str((await h.send()).reply).startswith("451 4.3.0")
    await h.aclose()


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key, text", [
    ({"delay": "soon"}, "delay", 'expected a duration like "5m"'),
    ({"delay": "2d"}, "retry_window", "must be longer than delay"),
    ({"retry_window": "5m"}, "retry_window", "must be longer than delay"),
    ({"pass_ttl": 0}, "pass_ttl", "longer than zero"),
    ({"auto_whitelist_after": -1}, "auto_whitelist_after", "0 (off) or more"),
    ({"auto_whitelist_after": "5"}, "auto_whitelist_after", "whole number"),
    ({"ipv4_prefix": 33}, "ipv4_prefix", "prefix length 0-32"),
    ({"ipv6_prefix": -1}, "ipv6_prefix", "prefix length 0-128"),
    ({"ipv4_prefix": "24"}, "ipv4_prefix", "prefix length 0-32"),
    ({"whitelist_clients": ["192.0.2.300"]}, "whitelist_clients", "IP address or network"),
    ({"whitelist_senders": ["a@b@c"]}, "whitelist_senders", "user@domain"),
    ({"whitelist_recipients": ["not a domain"]}, "whitelist_recipients", "domain"),
    ({"whitelist_client_names": ["bad..name"]}, "whitelist_client_names", "domain"),
    ({"pooled_senders": [42]}, "pooled_senders", "expected text"),
    ({"null_sender": "allow"}, "null_sender", "greylist, skip"),
    ({"spf_pooling": "yes"}, "spf_pooling", "true or false"),
    ({"message": "wait {minutes}"}, "message", "{wait} and {after}"),
    ({"message": "two\nlines"}, "message", "one line"),
    ({"dealy": "5m"}, "dealy", "unknown option"),
])
def test_bad_options_are_refused_naming_the_option(options, key, text):
    with pytest.raises(OptionError) as info:
        Greylist(options, None)
    assert info.value.key == key and text in str(info.value)


def test_defaults():
    rule = Greylist({}, None)
    assert (rule.delay, rule.retry_window, rule.pass_ttl, rule.auto_whitelist_after) == \
        (300, 2 * DAY, 35 * DAY, 5)
    assert (rule.ipv4_prefix, rule.ipv6_prefix, rule.null_sender, rule.spf_pooling) == (24, 64, "greylist", True)


async def test_a_custom_message(make):
    h = make({"message": "Come back after {after} ({wait}s), see https://example.com/greylisting"})
    r = await h.send()
    assert str(r.reply) == ("451 4.7.1 Come back after 2026-01-01T00:05:00Z (300s), "
                            "see https://example.com/greylisting")


def test_the_rule_is_registered_by_entry_point():
    registry = PluginRegistry.load()
    assert registry.get("greylist") is Greylist


def write_config(tmp_path, rules_yaml):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(f"domains: [example.com]\nrules:\n{rules_yaml}")
    (tmp_path / "gate.yaml").write_text(f"state: sqlite://{tmp_path / 'state.db'}\npolicies: policies\n")
    return str(tmp_path / "gate.yaml")


async def test_from_a_real_config(tmp_path):
    path = write_config(tmp_path, "  - greylist: {delay: 2m, whitelist_clients: [198.51.100.0/24]}\n")
    h = Harness.from_config(path)
    try:
        r = await h.send()
        assert str(r.reply) == ("451 4.7.1 Greylisted, please try again in 120 seconds "
                                "(after 2026-01-01T00:02:00Z)")
        assert (await h.send(client_ip="198.51.100.1")).reply.code == 250
        h.clock.advance(120)
        assert (await h.send()).reply.code == 250
    finally:
        await h.aclose()
    assert (tmp_path / "state.db").exists()


def test_bad_options_in_a_policy_are_reported_with_file_and_line(tmp_path):
    path = write_config(tmp_path, "  - greylist:\n      delay: 3d\n")
    with pytest.raises(ConfigError) as info:
        Harness.from_config(path)
    text = str(info.value)
    assert "policies/default.yaml:" in text and "retry_window" in text and "must be longer than delay" in text
