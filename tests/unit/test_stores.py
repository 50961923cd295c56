"""The greylist store: one suite, run against both backends (SQLite in tmp_path, the real
Redis on 127.0.0.1:6379 DB 15 under a key prefix of its own per test).

Times are explicit (`now=`): the stores never read a clock. No test sleeps.
"""
from __future__ import annotations

import ast
import asyncio
import ipaddress
import pathlib
import random
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from smtpgate import StoreError
from smtpgate.stores import Params, Selector, make_allow, open_greylist_store, triplet_value
from smtpgate.stores.greylist import DELAY_BUCKETS, GRACE, client_allow_key, client_candidates, masked_hex
from smtpgate.stores.sqlite_store import GREYLIST_SCHEMA, SqliteGreylistStore
from tests.support.constants import T0
from tests.support.redisproc import (REDIS_URL, UNREACHABLE_REDIS_URL, delete_redis_keys, new_prefix,
                                     redis_state, require_redis)
from tests.support.stores import backend, store_maker  # noqa: F401 (backend: a fixture)
from tests.support.constants import ROOT

P = Params(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400, auto_whitelist_after=0)
C, S, R = "192.0.2.0/24", "alice@sender.example", "bob@example.com"


@pytest.fixture
async def make_store(backend, tmp_path):
    """`make_store()` -> a new store on this test's state (each call: another "gate")."""
    async with store_maker(open_greylist_store, backend, tmp_path) as make:
        yield make


@pytest.fixture
async def store(make_store):
    return make_store()


async def attempt(store, now, params=P, key=(C, S, R), **kw):
    return await store.attempt(*key, now=now, params=params, **kw)


# --- the decisive operation --------------------------------------------------------------------

async def test_first_attempt_too_early_pass_and_passed_before(store):
    a = await attempt(store, T0)
    assert (a.outcome, a.entry.attempts, a.entry.passed, a.deferred) == ("new", 1, False, True)
    assert a.retry_at(P) == T0 + 300 and a.entry.expires == T0 + 2 * 86400
    a = await attempt(store, T0 + 299)
    assert (a.outcome, a.entry.attempts, a.entry.first_seen) == ("too_early", 2, T0)
    a = await attempt(store, T0 + 300)
    assert (a.outcome, a.entry.attempts, a.entry.passed) == ("passed_now", 3, True)
    assert (a.entry.passed_at, a.entry.retry_delay, a.entry.expires) == (T0 + 300, 300, T0 + 300 + P.pass_ttl)
    assert not a.deferred
    a = await attempt(store, T0 + 400)
    assert (a.outcome, a.entry.attempts, a.entry.last_seen) == ("passed_before", 4, T0 + 400)
    stored = await store.get(C, S, R)
    assert stored == a.entry
    assert stored.first_seen == T0 and stored.state(T0 + 400) == "passed"


async def test_retry_after_the_window_restarts_the_wait(store):
    await attempt(store, T0)
    a = await attempt(store, T0 + 2 * 86400 + 1)
    assert (a.outcome, a.entry.first_seen, a.entry.attempts) == ("restarted", T0 + 2 * 86400 + 1, 1)
    assert a.retry_at(P) == T0 + 2 * 86400 + 301
    a = await attempt(store, T0 + 2 * 86400 + 301)
    assert a.outcome == "passed_now"


async def test_a_pass_lives_pass_ttl_and_is_refreshed_on_use(store):
    await attempt(store, T0)
    await attempt(store, T0 + 300)
    day = 86400
    a = await attempt(store, T0 + 300 + 30 * day)  # within 35d: passes, and lives 35d from now
    assert a.outcome == "passed_before" and a.entry.expires == T0 + 300 + 65 * day
    a = await attempt(store, T0 + 300 + 64 * day)
    assert a.outcome == "passed_before"
    a = await attempt(store, T0 + 300 + 64 * day + P.pass_ttl + 1)  # unused for longer than pass_ttl
    assert (a.outcome, a.entry.passed, a.entry.attempts) == ("new", False, 1)


async def test_the_null_sender_is_a_sender_like_any_other(store):
    a = await attempt(store, T0, key=(C, "", R))
    assert a.outcome == "new" and a.entry.sender == ""
    assert (await attempt(store, T0 + 300, key=(C, "", R))).outcome == "passed_now"
    assert (await attempt(store, T0 + 300, key=(C, S, R))).outcome == "new"


async def test_dry_run_answers_without_writing(store):
    a = await attempt(store, T0, dry_run=True)
    assert a.outcome == "new" and a.entry.first_seen == T0
    assert await store.get(C, S, R) is None
    await attempt(store, T0)
    a = await attempt(store, T0 + 300, dry_run=True)
    assert a.outcome == "passed_now"
    assert (await store.get(C, S, R)).attempts == 1
    assert (await store.stats(T0 + 300, 0)).counters == {"new": 1}


async def test_auto_whitelist_counts_live_passed_triplets_of_a_client(store):
    p = Params(300, 2 * 86400, 35 * 86400, auto_whitelist_after=3)
    for i in range(3):
        key = (C, S, f"user{i}@example.com")
        await attempt(store, T0, p, key)
        assert (await attempt(store, T0 + 300, p, key)).outcome == "passed_now"
    assert await store.passed_count(C, T0 + 300) == 3
    assert await store.passed_count("198.51.100.0/24", T0 + 300) == 0
    a = await attempt(store, T0 + 400, p, (C, "other@else.example", R))
    assert (a.outcome, a.entry.passed, a.passed_count) == ("auto", True, 3)
    assert await store.passed_count(C, T0 + 400) == 4  # and it keeps the client whitelisted
    # another network is not concerned; after the passes expire, the client is greylisted again
    assert (await attempt(store, T0 + 400, p, ("198.51.100.0/24", S, R))).outcome == "new"
    later = T0 + 400 + p.pass_ttl + 1
    assert await store.passed_count(C, later) == 0
    assert (await attempt(store, later, p, (C, "third@else.example", R))).outcome == "new"


async def test_auto_whitelist_is_off_at_zero(store):
    for i in range(6):
        key = (C, S, f"user{i}@example.com")
        await attempt(store, T0, key=key)
        await attempt(store, T0 + 300, key=key)
    a = await attempt(store, T0 + 400, key=(C, "x@y.example", R))
    assert a.outcome == "new" and a.passed_count is None


# --- the allow list --------------------------------------------------------------------------

@pytest.mark.parametrize("allowed, client_ip, hit", [
    ("192.0.2.7", "192.0.2.7", True),
    ("192.0.2.7", "192.0.2.8", False),
    ("192.0.2.0/24", "192.0.2.200", True),
    ("198.51.100.0/22", "198.51.103.255", True),
    ("198.51.100.0/22", "198.51.104.0", False),
    ("10.0.0.0/8", "10.200.3.4", True),
    ("192.0.2.0/29", "192.0.2.7", True),
    ("192.0.2.0/29", "192.0.2.8", False),
    ("2001:db8::/32", "2001:db8:ffff::1", True),
    ("2001:db8:8000::/33", "2001:db8:7fff::1", False),
    ("2001:db8:8000::/33", "2001:db8:8000::1", True),
    ("2001:db8:1:2::/63", "2001:db8:1:3::99", True),
    ("2001:db8:1:2::/63", "2001:db8:1:4::1", False),
    ("192.0.2.0/24", "::ffff:192.0.2.9", True),
    ("0.0.0.0/0", "203.0.113.1", True),
])
async def test_client_allow_entries_cover_their_network(store, allowed, client_ip, hit):
    await store.add_allow(make_allow("client", allowed, T0, None))
    a = await attempt(store, T0, key=("203.0.113.0/24", S, R), client_ip=client_ip)
    assert (a.outcome == "allowed") is hit
    if hit:
        assert a.allow.kind == "client" and a.allow.value == str(ipaddress.ip_network(allowed, strict=False))


async def test_sender_domain_triplet_and_null_sender_allow_entries(store):
    await store.add_allow(make_allow("sender", "alice@sender.example", T0, None))
    await store.add_allow(make_allow("sender", "@partner.example", T0, None))
    await store.add_allow(make_allow("triplet", triplet_value(C, "x@y.example", R), T0, None))
    assert (await attempt(store, T0, key=(C, S, R))).outcome == "allowed"
    assert (await attempt(store, T0, key=(C, "bob@partner.example", R))).outcome == "allowed"
    assert (await attempt(store, T0, key=(C, "bob@sub.partner.example", R))).outcome == "new"
    assert (await attempt(store, T0, key=(C, "x@y.example", R))).outcome == "allowed"
    assert (await attempt(store, T0, key=("198.51.100.0/24", "x@y.example", R))).outcome == "new"
    assert (await attempt(store, T0, key=(C, "", R))).outcome == "new"
    await store.add_allow(make_allow("sender", "<>", T0, None))
    assert (await attempt(store, T0, key=(C, "", "z@example.com"))).outcome == "allowed"
    assert await store.get(C, S, R) is None  # an allowed attempt stores nothing


async def test_allow_entries_expire(store):
    await store.add_allow(make_allow("client", "192.0.2.0/24", T0, 3600, note="ticket 42"))
    assert (await attempt(store, T0 + 3600, client_ip="192.0.2.1")).outcome == "allowed"
    assert (await attempt(store, T0 + 3601, client_ip="192.0.2.1")).outcome == "new"
    [entry] = await store.allow_entries()
    assert (entry.note, entry.expires) == ("ticket 42", T0 + 3600)
    assert await store.allow_entries(T0 + 3601) == []
    assert await store.purge(T0 + 3601, dry_run=True) == (0, 1)
    assert await store.purge(T0 + 3601) == (0, 1)
    assert await store.allow_entries() == []


async def test_an_allow_entry_note_naming_expires_changes_nothing(store):
    # Redis reads an entry's expiry only when its JSON names one: a note that does must
    # neither make a lasting entry expire nor an expired one live
    await store.add_allow(make_allow("sender", "@lasting.example", T0, None, note='expires'))
    await store.add_allow(make_allow("sender", "@gone.example", T0, 60, note='"expires": null'))
    assert (await attempt(store, T0 + 60, key=(C, "a@gone.example", R))).outcome == "allowed"
    assert (await attempt(store, T0 + 61, key=(C, "a@gone.example", R))).outcome == "new"
    found = await attempt(store, T0 + 10 ** 6, key=(C, "a@lasting.example", R))
    assert (found.outcome, found.allow.note, found.allow.expires) == ("allowed", "expires", None)


async def test_a_replaced_allow_entry_is_answered_as_it_now_is(store):
    # Redis keeps the entries it matched parsed, by their JSON: a replaced one is read afresh
    for note, ttl in (("first", None), ("second", 600), ("first", None)):
        await store.add_allow(make_allow("sender", "@often.example", T0, ttl, note=note))
        found = (await attempt(store, T0, key=(C, "a@often.example", R))).allow
        assert (found.note, found.expires) == (note, None if ttl is None else T0 + ttl)


# The precedence (docs/rules/greylist.md, "The allow list"): most specific first. Each
# entry covers the decision on (C, S, R) from the address IP.
IP = "192.0.2.9"
PRECEDENCE = [("triplet", triplet_value(C, S, R)), ("sender", S), ("sender", "@sender.example"),
              ("client", IP), ("client", "192.0.2.0/25"), ("client", "192.0.0.0/16")]


def _named(a) -> tuple[str, str] | None:
    return (a.allow.kind, a.allow.value.removesuffix("/32")) if a.allow else None


@pytest.mark.parametrize("more, less", [(m, l) for i, m in enumerate(PRECEDENCE) for l in PRECEDENCE[i + 1:]],
                         ids=lambda e: e[1])
async def test_of_two_allow_entries_covering_a_decision_the_more_specific_is_named(store, more, less):
    await store.add_allow(make_allow(*less, T0, None))
    await store.add_allow(make_allow(*more, T0, 60))
    assert _named(await attempt(store, T0 + 60, client_ip=IP)) == more
    assert _named(await attempt(store, T0 + 61, client_ip=IP)) == less  # an expired entry is never named
    assert _named(await attempt(store, T0 + 61, dry_run=True, client_ip=IP)) == less


async def test_the_named_entry_walks_down_the_precedence_as_entries_expire(store):
    for i, entry in reversed(list(enumerate(PRECEDENCE))):  # added least specific first
        await store.add_allow(make_allow(*entry, T0, 10 * (i + 1)))
    for i, entry in enumerate(PRECEDENCE):
        a = await attempt(store, T0 + 10 * i + 5, client_ip=IP)
        assert (a.outcome, _named(a)) == ("allowed", entry)
    assert (await attempt(store, T0 + 10 * len(PRECEDENCE) + 5, client_ip=IP)).outcome == "new"


async def test_ipv6_client_entries_are_named_longest_prefix_first(store):
    ip, nets = "2001:db8:1:2::9", ["2001:db8:1:2::9/128", "2001:db8:1:2::/64", "2001:db8:1::/48", "::/0"]
    await store.add_allow(make_allow("client", "192.0.2.0/24", T0, None))  # the other family: never named
    for i, net in reversed(list(enumerate(nets))):
        await store.add_allow(make_allow("client", net, T0, 10 * (i + 1)))
    for i, net in enumerate(nets):
        a = await attempt(store, T0 + 10 * i + 5, key=("2001:db8:1:2::/64", S, R), client_ip=ip)
        assert a.allow.value == str(ipaddress.ip_network(net))
    assert (await attempt(store, T0 + 45, key=("2001:db8:1:2::/64", S, R), client_ip=ip)).allow is None


async def test_the_null_senders_entry_comes_after_its_triplet_and_before_its_client(store):
    key = (C, "", R)
    await store.add_allow(make_allow("client", "192.0.2.0/24", T0, None))
    await store.add_allow(make_allow("sender", "<>", T0, 20))
    await store.add_allow(make_allow("triplet", triplet_value(*key), T0, 10))
    named = [_named(await attempt(store, T0 + t, key=key, client_ip=IP)) for t in (5, 15, 25)]
    assert named == [("triplet", triplet_value(*key)), ("sender", "<>"), ("client", "192.0.2.0/24")]


def test_allow_values_are_checked():
    with pytest.raises(ValueError):
        make_allow("client", "not-a-network", T0, None)
    with pytest.raises(ValueError):
        make_allow("sender", "no-at-sign", T0, None)
    assert make_allow("sender", "@Example.ORG", T0, None).value == "@example.org"


def test_masked_hex_agrees_with_ipaddress():
    rng = random.Random(7)
    for _ in range(500):
        v6 = rng.random() < 0.5
        bits = 128 if v6 else 32
        n = rng.getrandbits(bits)
        plen = rng.randint(0, bits)
        addr = ipaddress.IPv6Address(n) if v6 else ipaddress.IPv4Address(n)
        net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
        hexdigits = f"{n:0{bits // 4}x}"
        assert masked_hex(hexdigits, plen) == f"{int(net.network_address):0{bits // 4}x}"
        assert client_allow_key(str(net))[0] == f"client:{6 if v6 else 4}:{masked_hex(hexdigits, plen)}/{plen}"


def test_client_candidates_are_the_allow_keys_of_each_length_in_use_of_the_clients_family():
    # kept per (address, lengths): asked again with other lengths, an address gets their keys
    assert client_candidates("192.0.2.77", [("4", 24), ("6", 64), ("4", 32)]) == [
        "client:4:c000024d/32", "client:4:c0000200/24"]  # the longest prefix first
    assert client_candidates("192.0.2.77", [("4", 8)]) == ["client:4:c0000000/8"]
    assert client_candidates("::ffff:192.0.2.77", [("4", 8)]) == ["client:4:c0000000/8"]
    assert client_candidates("2001:db8::1", [("4", 24), ("6", 32)]) == ["client:6:20010db8" + "0" * 24 + "/32"]
    assert client_candidates("192.0.2.77", []) == []
    assert client_candidates("unix-socket", [("4", 24)]) == client_candidates(None, [("4", 24)]) == []
    keys = client_candidates("192.0.2.77", [("4", 24)])
    keys.append("changed by its caller")
    assert client_candidates("192.0.2.77", [("4", 24)]) == ["client:4:c0000200/24"]


# --- list, delete, purge, stats ---------------------------------------------------------------

async def fill(store):
    """Three pending, two passed, one expired; two clients and a pooled domain."""
    keys = {
        "p1": (C, S, R), "p2": (C, "", R), "p3": ("2001:db8:1::/64", S, "carol@example.com"),
        "ok1": ("198.51.100.0/24", "news-#@list.example", R), "ok2": ("domain:bigmail.example", S, R),
        "old": ("203.0.113.0/24", "old@x.example", R),
    }
    await attempt(store, T0 - 3 * 86400, key=keys["old"])  # window gone: expired
    for name in ("ok1", "ok2"):
        await attempt(store, T0 - 600, key=keys[name])
        await attempt(store, T0 - 100 if name == "ok1" else T0 - 200, key=keys[name])
    for i, name in enumerate(("p1", "p2", "p3")):
        await attempt(store, T0 + i, key=keys[name])
    return keys


async def test_list_filters_orders_and_limits(store):
    await fill(store)
    now = T0 + 10
    everything = await store.entries(Selector(), now)
    assert [e.key[0] for e in everything][:3] == ["2001:db8:1::/64", C, C]  # most recent first
    assert len(everything) == 6
    assert {e.state(now) for e in everything} == {"pending", "passed", "expired"}
    assert len(await store.entries(Selector(state="pending"), now)) == 3
    assert {e.client for e in await store.entries(Selector(state="passed"), now)} == \
        {"198.51.100.0/24", "domain:bigmail.example"}
    assert [e.sender for e in await store.entries(Selector(client="192.0.2.77"), now)] == ["", S]
    assert len(await store.entries(Selector(client="192.0.0.0/16"), now)) == 2
    assert len(await store.entries(Selector(client="2001:db8::/32"), now)) == 1
    assert len(await store.entries(Selector(client="domain:bigmail.example"), now)) == 1
    assert len(await store.entries(Selector(sender=S), now)) == 3
    assert len(await store.entries(Selector(sender="<>"), now)) == 1
    assert len(await store.entries(Selector(sender="@list.example"), now)) == 1
    assert len(await store.entries(Selector(recipient="Carol@Example.com"), now)) == 1
    assert len(await store.entries(Selector(state="pending", sender=S), now)) == 2
    assert len(await store.entries(Selector(), now, limit=2)) == 2


async def test_delete_by_client_sender_and_triplet(store):
    keys = await fill(store)
    await store.add_allow(make_allow("client", "192.0.2.0/25", T0, None))
    await store.add_allow(make_allow("sender", S, T0, None))
    await store.add_allow(make_allow("triplet", triplet_value(*keys["ok1"]), T0, None))
    assert await store.delete(Selector(client="192.0.2.9")) == (2, 1)
    assert await store.get(*keys["p1"]) is None
    assert await store.delete(Selector(sender=S)) == (2, 1)  # p3 and ok2, and the sender entry
    assert await store.delete(Selector(client=keys["ok1"][0], sender=keys["ok1"][1],
                                       recipient=keys["ok1"][2])) == (1, 1)
    assert [e.key for e in await store.entries(Selector(), T0)] == [keys["old"]]
    assert await store.allow_entries() == []
    assert await store.delete(Selector(sender="nobody@nowhere.example")) == (0, 0)


async def test_deleting_a_passed_triplet_takes_it_out_of_the_auto_whitelist(store):
    p = Params(300, 2 * 86400, 35 * 86400, auto_whitelist_after=1)
    await attempt(store, T0, p)
    await attempt(store, T0 + 300, p)
    assert await store.passed_count(C, T0 + 300) == 1
    await store.delete(Selector(client=C, sender=S, recipient=R))
    assert await store.passed_count(C, T0 + 300) == 0


async def test_purge_drops_expired_entries(store):
    await fill(store)
    assert await store.purge(T0 + 10, dry_run=True) == (1, 0)
    assert len(await store.entries(Selector(), T0 + 10)) == 6
    assert await store.purge(T0 + 10) == (1, 0)
    assert len(await store.entries(Selector(), T0 + 10)) == 5
    assert await store.purge(T0 + 10) == (0, 0)


async def test_stats(store):
    await fill(store)
    key = ("198.51.100.0/24", "late@x.example", R)
    await attempt(store, T0 - 86400, key=key)
    await attempt(store, T0 - 86400 + 5 * 3600, key=key)  # passes after 5 hours
    st = await store.stats(T0 + 10, auto_whitelist_after=2)
    assert (st.pending, st.passed, st.expired, st.auto_whitelisted) == (3, 3, 1, 1)
    assert st.counters["new"] == 7 and st.counters["passed_now"] == 3
    assert st.pass_rate == pytest.approx(3 / 7)
    assert st.retry_delays == {"5m-10m": 2, "4h-12h": 1}
    doc = st.as_dict()
    assert list(doc["retry_delays"]) == [label for _, label in DELAY_BUCKETS]
    assert doc["outcomes"]["too_early"] == 0 and doc["pass_rate"] == pytest.approx(3 / 7)
    assert (await store.stats(T0 + 10, auto_whitelist_after=0)).auto_whitelisted == 0


# --- two gates, restarts, failures ------------------------------------------------------------

async def test_two_gates_racing_on_one_triplet_lose_nothing(make_store):
    gates = [make_store(), make_store()]
    n = 60
    first = await asyncio.gather(*(attempt(gates[i % 2], T0 + 1) for i in range(2 * n)))
    outcomes = sorted(a.outcome for a in first)
    assert outcomes.count("new") == 1 and outcomes.count("too_early") == 2 * n - 1
    assert sorted(a.entry.attempts for a in first) == list(range(1, 2 * n + 1))
    second = await asyncio.gather(*(attempt(gates[i % 2], T0 + 301) for i in range(2 * n)))
    outcomes = [a.outcome for a in second]
    assert outcomes.count("passed_now") == 1 and outcomes.count("passed_before") == 2 * n - 1
    entry = await gates[0].get(C, S, R)
    assert entry.attempts == 4 * n and entry.retry_delay == 300
    st = await gates[1].stats(T0 + 301, 0)
    assert (st.counters["new"], st.counters["passed_now"], st.retry_delays) == (1, 1, {"5m-10m": 1})


RACER = textwrap.dedent("""
    import asyncio, sys
    from smtpgate.stores import Params, open_greylist_store
    async def main(url, n):
        store = open_greylist_store(url)
        p = Params(300, 172800, 3024000, 0)
        await asyncio.gather(*(store.attempt("192.0.2.0/24", "a@b.example", "c@example.com",
                                             now=1767225601.0, params=p) for _ in range(n)))
        await store.close()
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


async def test_worker_processes_racing_on_one_triplet_lose_nothing(make_store):
    procs = [subprocess.Popen([sys.executable, "-c", RACER, make_store.url, "150"]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    store = make_store()
    assert (await store.get("192.0.2.0/24", "a@b.example", "c@example.com")).attempts == 450
    assert (await store.stats(T0, 0)).counters == {"new": 1, "too_early": 449}


async def test_state_survives_a_restart(make_store):
    first = make_store()
    await attempt(first, T0)
    await first.add_allow(make_allow("client", "198.51.100.0/24", T0, None))
    await first.close()
    again = make_store()
    assert (await again.get(C, S, R)).attempts == 1
    assert (await attempt(again, T0 + 300)).outcome == "passed_now"
    assert (await attempt(again, T0, key=("x", S, R), client_ip="198.51.100.5")).outcome == "allowed"


async def test_a_script_the_server_lost_is_loaded_again_alone_and_in_a_pipeline(tmp_path):
    require_redis()
    async with store_maker(open_greylist_store, "redis", tmp_path) as make:
        await _script_lost(make())


async def _script_lost(store):
    assert (await attempt(store, T0)).outcome == "new"
    script = store.link.scripts["attempt"]
    for calls in (1, 3):  # one call goes alone, several share a pipeline
        script.sha = "0" * 40  # as after a restart or SCRIPT FLUSH: the server knows no such script
        found = await asyncio.gather(*(attempt(store, T0 + 1) for _ in range(calls)))
        assert [a.outcome for a in found] == ["too_early"] * calls
    assert (await store.get(C, S, R)).attempts == 5  # each call counted once, none twice


async def test_redis_decisions_of_two_timings_in_one_process_keep_their_own(tmp_path):
    """The script's timing arguments are made once per Params (a cache keyed by its value)."""
    require_redis()
    async with store_maker(open_greylist_store, "redis", tmp_path) as make:
        store = make()
        short, long = Params(delay=60, retry_window=600), Params(delay=300, retry_window=600)
        await attempt(store, T0, params=short)
        assert (await attempt(store, T0 + 100, params=long)).outcome == "too_early"
        assert (await attempt(store, T0 + 100, params=short)).outcome == "passed_now"
        assert (await attempt(store, T0 + 100, key=(C, "x@y.example", R), params=long)).outcome == "new"
        assert (await attempt(store, T0 + 800, key=(C, "x@y.example", R), params=short)).outcome == "restarted"


def test_redis_timing_arguments_follow_every_field_of_the_params():
    """The per-Params cache of the script's timing arguments is keyed by the whole value."""
    from smtpgate.stores.redis_store import _timing_args
    base = Params(delay=300, retry_window=600, pass_ttl=3600, auto_whitelist_after=0)
    changed = [Params(60, 600, 3600, 0), Params(300, 900, 3600, 0), Params(300, 600, 7200, 0),
               Params(300, 600, 3600, 5)]
    assert _timing_args(base) == ("300.0", "600.0", "3600.0", "0")
    assert [_timing_args(p) for p in changed] == [
        ("60.0", "600.0", "3600.0", "0"), ("300.0", "900.0", "3600.0", "0"),
        ("300.0", "600.0", "7200.0", "0"), ("300.0", "600.0", "3600.0", "5")]


async def test_an_unreachable_redis_is_a_store_error():
    store = open_greylist_store(f"{UNREACHABLE_REDIS_URL}?socket_connect_timeout=0.5")
    with pytest.raises(StoreError, match=f"Redis {UNREACHABLE_REDIS_URL}"):
        await attempt(store, T0)
    await store.close()


async def test_an_unusable_sqlite_path_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("")
    store = open_greylist_store(f"sqlite://{tmp_path / 'file' / 'state.db'}")
    with pytest.raises(StoreError):
        await attempt(store, T0)
    await store.close()


def test_unknown_state_urls_are_refused():
    with pytest.raises(StoreError, match="unknown state URL"):
        open_greylist_store("mysql://x")


async def test_redis_keys_carry_ttls(tmp_path):
    import redis.asyncio as aioredis
    require_redis()
    async with store_maker(open_greylist_store, "redis", tmp_path) as make_store:
        store = make_store()
        await attempt(store, T0)
        await attempt(store, T0 + 300, key=(C, "x@y.example", R))
        await attempt(store, T0 + 600, key=(C, "x@y.example", R))
        r = aioredis.Redis.from_url(REDIS_URL)
        try:
            pending = await r.ttl(store.triplet_key(C, S, R))
            passed = await r.ttl(store.triplet_key(C, "x@y.example", R))
            awl = await r.ttl(store.awl_key(C))
        finally:
            await r.aclose()
    assert 2 * 86400 + GRACE - 5 <= pending <= 2 * 86400 + GRACE
    assert P.pass_ttl + GRACE - 5 <= passed <= P.pass_ttl + GRACE
    assert awl >= passed


# --- SQLite only: WAL, the schema and its migrations ------------------------------------------

def _v1_database(path: pathlib.Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    for statement in GREYLIST_SCHEMA[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('greylist', 1)")
    conn.execute("INSERT INTO greylist VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (C, S, R, T0, T0 + 10, 2, 0, T0 + 2 * 86400))
    conn.execute("INSERT INTO greylist VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (C, "old@pass.example", R, T0 - 900, T0 - 100, 3, 1, T0 + 86400))
    conn.commit()
    conn.close()


async def test_sqlite_migrates_an_older_schema_in_place(tmp_path):
    path = tmp_path / "state.db"
    _v1_database(path)
    store = SqliteGreylistStore(f"sqlite://{path}")
    try:
        entry = await store.get(C, S, R)
        assert (entry.attempts, entry.passed, entry.retry_delay) == (2, False, None)
        assert (await attempt(store, T0 + 300)).outcome == "passed_now"
        assert (await attempt(store, T0, key=(C, "old@pass.example", R))).outcome == "passed_before"
        await store.add_allow(make_allow("client", "10.0.0.0/8", T0, None))
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM meta WHERE component = 'greylist'").fetchone() == (len(GREYLIST_SCHEMA),)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_sqlite_refuses_a_schema_newer_than_it_knows(tmp_path):
    path = tmp_path / "state.db"
    _v1_database(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET version = 99 WHERE component = 'greylist'")
    conn.commit()
    conn.close()
    store = SqliteGreylistStore(f"sqlite://{path}")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        await store.get(C, S, R)
    await store.close()


async def test_sqlite_sweeps_long_expired_rows_on_its_own(tmp_path):
    store = SqliteGreylistStore(f"sqlite://{tmp_path / 'state.db'}")
    gone, kept = ("203.0.113.0/24", S, R), ("198.51.100.0/24", S, R)
    try:
        await attempt(store, T0, key=gone)
        await attempt(store, T0 + GRACE, key=kept)
        await attempt(store, T0 + 2 * 86400 + GRACE + 1)  # the periodic sweep runs here
        assert await store.get(*gone) is None  # expired more than GRACE ago
        assert await store.get(*kept) is not None
    finally:
        await store.close()


# --- boundaries -------------------------------------------------------------------------------

def _importers(library: str) -> set[str]:
    found = set()
    for path in (ROOT / "smtpgate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            if any(n == library or n.startswith(library + ".") for n in names):
                found.add(str(path.relative_to(ROOT / "smtpgate")))
    return found


def test_sqlite3_and_redis_each_have_one_importer():
    assert _importers("sqlite3") == {"stores/sqlite_store.py"}
    assert _importers("redis") == {"stores/redis_store.py"}


async def test_a_busy_redis_store_serves_every_waiter_in_turn():
    """64 tasks sending decisions back to back through 4 connections: none may wait past
    pool_timeout (redis-py's own blocking pool is unfair: a waiter could starve)."""
    require_redis()
    prefix = new_prefix()
    store = open_greylist_store(f"{redis_state(prefix)}&max_connections=4&pool_timeout=1.5")
    jobs = iter(range(4000))

    async def worker():
        for i in jobs:
            await attempt(store, T0, key=(C, f"s{i}@x.example", R))
    try:
        await asyncio.gather(*(worker() for _ in range(64)))
        assert (await store.stats(T0, 0)).counters["new"] == 4000
    finally:
        await store.close()
        delete_redis_keys(prefix)
