"""The resolver on a real DNS server (tests/support/dnsserver.py on loopback): answers, errors,
TCP fallback, TTL and negative caching, shared in-flight queries, PTR / FCrDNS, budgets."""
import asyncio
import time

import pytest

from tests.support.dnsserver import DnsServer
from smtpgate import DnsError, Session
from smtpgate.config.gate import DnsConfig
from smtpgate.resolver import Resolver, reverse_name
from smtpgate.testing import FakeClock, FakeResolver

ZONES = {
    "example.test": {
        "@": {"A": "192.0.2.1", "MX": ["10 mx", "20 mx2.other.test."], "TXT": "v=spf1 mx -all"},
        "mx": {"A": ["192.0.2.10", "192.0.2.11"], "AAAA": "2001:db8::10"},
        "www": {"CNAME": "alias"},
        "alias": {"CNAME": "@"},
        "big": {"TXT": [f"{i} " + "x" * 200 for i in range(10)]},
        "host": {"A": "192.0.2.55"},
        "liar": {"A": "192.0.2.99"},
        "v6host": {"AAAA": "2001:db8::55"},
        "slow": {"A": "192.0.2.77"},
        "broken": {"A": "192.0.2.78"},
        "deep.empty": {"A": "192.0.2.79"},  # "empty.example.test" is an empty non-terminal
    },
    "2.0.192.in-addr.arpa": {
        "55": {"PTR": ["liar.example.test.", "host.example.test."]},
        "66": {"PTR": "liar.example.test."},
    },
    "8.b.d.0.1.0.0.2.ip6.arpa": {
        reverse_name("2001:db8::55").removesuffix(".8.b.d.0.1.0.0.2.ip6.arpa"): {"PTR": "v6host.example.test."},
    },
}


@pytest.fixture
def ns():
    server = DnsServer(ZONES, negative_ttl=60).start()
    server.timeout_names.add("slow.example.test")
    server.servfail_names.add("broken.example.test")
    yield server
    server.stop()


def resolver(ns, **kw):
    kw.setdefault("timeout", 0.3)
    kw.setdefault("attempts", 1)
    return Resolver([ns.address], **kw)


async def test_answers_of_each_type(ns):
    r = resolver(ns)
    assert await r.resolve("example.test") == ["192.0.2.1"]
    assert sorted(await r.resolve("EXAMPLE.test.", "mx")) == ["10 mx.example.test", "20 mx2.other.test"]
    assert await r.resolve("example.test", "TXT") == ["v=spf1 mx -all"]
    assert sorted(await r.resolve("mx.example.test")) == ["192.0.2.10", "192.0.2.11"]
    assert await r.resolve("mx.example.test", "AAAA") == ["2001:db8::10"]


async def test_cname_chain_is_followed(ns):
    answer = await resolver(ns).lookup("www.example.test", "A")
    assert answer.records == ("192.0.2.1",)
    assert await resolver(ns).resolve("www.example.test", "CNAME") == ["alias.example.test"]


async def test_nxdomain_and_nodata_are_empty_not_errors(ns):
    r = resolver(ns)
    nx = await r.lookup("nope.example.test")
    assert nx.records == () and nx.nxdomain and nx.ttl == 60  # the SOA's negative TTL
    nodata = await r.lookup("host.example.test", "AAAA")
    assert nodata.records == () and not nodata.nxdomain
    ent = await r.lookup("empty.example.test")
    assert ent.records == () and not ent.nxdomain


async def test_malformed_names_are_not_asked(ns):
    r = resolver(ns)
    for name in ("", "a..b", "x" * 64 + ".test", "a b.test", ("a." * 130) + "test"):
        assert await r.resolve(name) == []
    assert ns.queries == []


async def test_servfail_timeout_and_refused_are_dns_errors(ns):
    r = resolver(ns, timeout=0.2, attempts=2)
    with pytest.raises(DnsError) as e:
        await r.resolve("broken.example.test")
    assert e.value.kind == "servfail"
    started = time.monotonic()
    with pytest.raises(DnsError) as e:
        await r.resolve("slow.example.test")
    assert e.value.kind == "timeout"
    assert time.monotonic() - started < 2.0
    assert ns.count("slow.example.test") == 2  # attempts: 2 tries, each waited `timeout`
    with pytest.raises(DnsError) as e:
        await r.resolve("elsewhere.invalid")
    assert e.value.kind == "refused"


async def test_truncated_udp_answer_is_retried_over_tcp(ns):
    texts = await resolver(ns).resolve("big.example.test", "TXT")
    assert len(texts) == 10
    assert [t for _, _, t in ns.queries] == ["udp", "tcp"]


async def test_answers_are_cached_for_their_ttl():
    clock = FakeClock()
    with DnsServer({"example.test": {"h": {"A": "192.0.2.1"}}}, ttl=30, negative_ttl=10) as ns:
        r = resolver(ns, clock=clock)
        assert await r.resolve("h.example.test") == ["192.0.2.1"]
        ns.set("example.test", "h", "A", "192.0.2.2")
        clock.advance(29)
        assert await r.resolve("h.example.test") == ["192.0.2.1"]
        assert ns.count("h.example.test") == 1
        clock.advance(2)
        assert await r.resolve("h.example.test") == ["192.0.2.2"]
        assert ns.count("h.example.test") == 2


async def test_negative_answers_are_cached_for_the_soa_minimum():
    clock = FakeClock()
    with DnsServer({"example.test": {}}, ttl=300, negative_ttl=10) as ns:
        r = resolver(ns, clock=clock)
        assert await r.resolve("new.example.test") == []
        ns.set("example.test", "new", "A", "192.0.2.9")
        clock.advance(9)
        assert await r.resolve("new.example.test") == []
        clock.advance(2)
        assert await r.resolve("new.example.test") == ["192.0.2.9"]
        assert ns.count("new.example.test") == 2


async def test_errors_are_not_cached(ns):
    r = resolver(ns, attempts=1)
    for _ in range(2):
        with pytest.raises(DnsError):
            await r.resolve("broken.example.test")
    assert ns.count("broken.example.test") == 2
    ns.servfail_names.clear()
    assert await r.resolve("broken.example.test") == ["192.0.2.78"]


async def test_concurrent_identical_queries_share_one_lookup(ns):
    ns.delays["host.example.test"] = 0.2
    r = resolver(ns, timeout=1)
    results = await asyncio.gather(*(r.resolve("host.example.test") for _ in range(20)))
    assert results == [["192.0.2.55"]] * 20
    assert ns.count("host.example.test") == 1


async def test_cache_is_bounded():
    with DnsServer({"example.test": {f"h{i}": {"A": "192.0.2.1"} for i in range(5)}}) as ns:
        r = resolver(ns, cache_size=3)
        for i in range(5):
            await r.resolve(f"h{i}.example.test")
        assert len(r._cache) == 3


async def test_ptr_and_forward_confirmed_reverse_dns(ns):
    r = resolver(ns)
    assert sorted(await r.ptr("192.0.2.55")) == ["host.example.test", "liar.example.test"]
    assert await r.fcrdns("192.0.2.55") == "host.example.test"  # liar's A is another address
    assert await r.fcrdns("192.0.2.66") is None  # a name, but it does not point back
    assert await r.fcrdns("192.0.2.200") is None  # no PTR at all
    assert await r.fcrdns("2001:db8::55") == "v6host.example.test"
    assert await r.fcrdns("::ffff:192.0.2.55") == "host.example.test"
    assert await r.fcrdns("not-an-ip") is None


async def test_fcrdns_failures_raise():
    with DnsServer({"2.0.192.in-addr.arpa": {}}) as ns:
        ns.servfail_names.add("9.2.0.192.in-addr.arpa")
        with pytest.raises(DnsError):
            await resolver(ns).fcrdns("192.0.2.9")


def test_reverse_names():
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert reverse_name("192.0.2.1", "zen.example.") == "1.2.0.192.zen.example"
    assert reverse_name("2001:db8::1", "bl.test") == "1.0.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.bl.test"
    assert reverse_name("::ffff:10.1.2.3", "bl.test") == "3.2.1.10.bl.test"


async def test_session_budget_bounds_all_dns_waiting(ns):
    r = resolver(ns, timeout=5, attempts=1, session_budget=0.3)
    session = Session("s1", "192.0.2.1")
    dns = r.for_session(session)
    assert await dns.resolve("host.example.test") == ["192.0.2.55"]
    started = time.monotonic()
    with pytest.raises(DnsError) as e:
        await dns.resolve("slow.example.test")
    assert e.value.kind == "timeout" and "budget" in str(e.value)
    assert time.monotonic() - started < 1.0  # not the 5 s per-query timeout
    started = time.monotonic()
    with pytest.raises(DnsError):  # spent: later lookups fail at once...
        await dns.resolve("new.example.test")
    assert time.monotonic() - started < 0.1
    assert ns.count("new.example.test") == 0
    assert await dns.resolve("host.example.test") == ["192.0.2.55"]  # ...cached answers cost nothing
    assert r.for_session(session).budget is dns.budget
    # another session has a budget of its own, and the resolver itself has none
    assert await r.for_session(Session("s2", "192.0.2.2")).resolve("host.example.test") == ["192.0.2.55"]


async def test_budget_counts_parallel_waits_once():
    clock = FakeClock()
    fake = FakeResolver({("a.test", "A"): ["192.0.2.1"]}, clock=clock, session_budget=10)
    session = Session("s", "192.0.2.1")
    dns = fake.for_session(session)
    await asyncio.gather(dns.resolve("a.test"), dns.resolve("a.test"))
    clock.advance(0)
    assert dns.budget.spent == 0
    fake.latency[("a.test", "A")] = 4
    await dns.resolve("a.test")
    assert dns.budget.spent == 4
    await dns.resolve("a.test")
    with pytest.raises(DnsError):  # 12 s > 10 s: the answer came too late
        await dns.resolve("a.test")


async def test_fake_resolver_scripts_errors():
    fake = FakeResolver({("a.test", "A"): "SERVFAIL", ("b.test", "A"): "TIMEOUT",
                         ("c.test", "TXT"): "just text", ("d.test", "A"): DnsError("refused")})
    for name, kind in (("a.test", "servfail"), ("b.test", "timeout"), ("d.test", "refused")):
        with pytest.raises(DnsError) as e:
            await fake.resolve(name)
        assert e.value.kind == kind
    assert await fake.resolve("c.test", "TXT") == ["just text"]
    assert await fake.resolve("missing.test") == []


def test_resolver_from_gate_config():
    cfg = DnsConfig(nameservers=[("127.0.0.1", 5353)], timeout=1.5, attempts=3)
    r = Resolver.from_config(cfg)
    assert r.nameservers == [("127.0.0.1", 5353)] and r.timeout == 1.5 and r.attempts == 3
    assert r.config == cfg


def test_system_resolvers_are_read_lazily():
    r = Resolver([], timeout=1)
    assert r._nameservers == []
    assert r.nameservers and all(isinstance(p, int) for _, p in r.nameservers)


def test_one_resolver_per_process_kept_across_reloads():
    from smtpgate.clock import Clock
    from smtpgate.runtime.loading import process_resolver
    a = process_resolver(DnsConfig(nameservers=[("127.0.0.1", 53)]), Clock())
    assert process_resolver(DnsConfig(nameservers=[("127.0.0.1", 53)]), Clock()) is a
    b = process_resolver(DnsConfig(nameservers=[("127.0.0.1", 54)]), Clock())
    assert b is not a and b.nameservers == [("127.0.0.1", 54)]


async def test_a_session_shares_identical_lookups_and_counts_each_once(ns):
    ns.delays["host.example.test"] = 0.2
    r = resolver(ns, timeout=1, cache=False)  # no process-wide sharing: the session's own
    dns = r.for_session(Session("s", "192.0.2.1"))
    results = await asyncio.gather(*(dns.resolve("host.example.test") for _ in range(20)))
    assert results == [["192.0.2.55"]] * 20
    assert ns.count("host.example.test") == 1
    assert dns.budget.queries == 1


async def test_a_session_causes_at_most_max_queries_lookups(ns):
    r = resolver(ns, session_queries=3)
    dns = r.for_session(Session("s", "192.0.2.1"))
    for name in ("host", "mx", "liar"):
        await dns.resolve(f"{name}.example.test")
    with pytest.raises(DnsError) as e:
        await dns.resolve("v6host.example.test", "AAAA")
    assert e.value.kind == "timeout" and "query limit" in str(e.value)
    assert ns.count("v6host.example.test") == 0
    assert await dns.resolve("host.example.test") == ["192.0.2.55"]  # cached: still served
    other = r.for_session(Session("s2", "192.0.2.2"))  # another session has its own count
    assert await other.resolve("v6host.example.test", "AAAA") == ["2001:db8::55"]


async def test_a_session_has_at_most_max_inflight_lookups_at_once():
    class Counting(FakeResolver):
        now = peak = 0

        async def _query(self, name, rdtype):
            Counting.now += 1
            Counting.peak = max(Counting.peak, Counting.now)
            await asyncio.sleep(0.01)
            Counting.now -= 1
            return await super()._query(name, rdtype)

    r = Counting({(f"h{i}.test", "A"): ["192.0.2.1"] for i in range(30)})
    r.session_inflight = 4
    dns = r.for_session(Session("s", "192.0.2.1"))
    assert await asyncio.gather(*(dns.resolve(f"h{i}.test") for i in range(30))) == [["192.0.2.1"]] * 30
    assert Counting.peak == 4
    Counting.peak = 0  # two sessions: four each
    a, b = r.for_session(Session("a", "192.0.2.1")), r.for_session(Session("b", "192.0.2.2"))
    await asyncio.gather(*(s.resolve(f"h{i}.test") for i in range(10) for s in (a, b)))
    assert Counting.peak == 8


def test_session_limits_from_gate_config():
    cfg = DnsConfig(budget=4.0, max_queries_per_session=7, max_inflight_per_session=3)
    r = Resolver.from_config(cfg)
    assert (r.session_budget, r.session_queries, r.session_inflight) == (4.0, 7, 3)
    budget = r.for_session(Session("s", "192.0.2.1")).budget
    assert (budget.seconds, budget.max_queries) == (4.0, 7)


async def test_resolve_many_answers_each_name_once_and_keeps_failures_apart(ns):
    r = resolver(ns, session_queries=3)
    dns = r.for_session(Session("s1", "192.0.2.1"))
    found = await dns.resolve_many(["host.example.test", "broken.example.test", "HOST.example.test",
                                    "host.example.test", "nothing.example.test"])
    assert list(found) == ["host.example.test", "broken.example.test", "HOST.example.test",
                           "nothing.example.test"]
    assert found["host.example.test"] == ["192.0.2.55"] and found["nothing.example.test"] == []
    assert isinstance(found["broken.example.test"], DnsError)
    assert ns.count("host.example.test") == 1
    # the session's query budget holds across the batch: a fourth name is refused, not asked
    more = await dns.resolve_many(["liar.example.test"])
    assert isinstance(more["liar.example.test"], DnsError) and ns.count("liar.example.test") == 0
