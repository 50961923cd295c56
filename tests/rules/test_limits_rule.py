"""The limits rule through ``smtpgate.testing``: a fake clock moved by hand, the fake
downstream, the gate's real stores (in-memory SQLite; one test on the real Redis)."""
from __future__ import annotations

import pytest

from smtpgate import OptionError, Session
from smtpgate.stores import open_stores
from smtpgate.testing import FakeClock, Harness
from smtpgate_rules.limits import Limits

from tests.unit.test_stores import delete_redis_keys, new_prefix, redis_state, require_redis

HOUR = 3600


@pytest.fixture
async def make():
    """`make(options, **harness_kwargs) -> Harness` with the limits rule; closed after."""
    made = []

    def build(options=None, **kwargs):
        kwargs.setdefault("clock", FakeClock())
        h = Harness([(Limits, options or {})], **kwargs)
        made.append(h)
        return h
    yield build
    for h in made:
        await h.aclose()


def rate(per, max, within="1h"):
    return {"rates": [{"per": per, "max": max, "within": within}]}


async def test_a_client_past_its_rate_is_deferred_until_the_window_frees_up(make):
    h = make(rate("client", 2))
    for _ in range(2):
        assert (await h.send()).reply.code == 250
    r = await h.send()
    assert str(r.reply) == ("451 4.7.1 Too many messages from your address (at most 2 per 1h), "
                            "try again in 5400 seconds")  # 2 * (1 - f) + 1 <= 2 at f = 1/2 into the next hour
    assert r.replies["mail"] is r.reply and len(h.relayed) == 2
    [entry] = [e for e in r.trace if e.rule == "limits" and e.stage == "mail"]
    assert entry.action == "tempfail" and "client 192.0.2.1: 2.0 of 2 per 1h" in entry.reason
    h.clock.advance(5399)
    assert (await h.send()).reply.code == 451  # not a second early
    h.clock.advance(1)
    assert (await h.send()).reply.code == 250


async def test_the_window_slides_rather_than_resetting_on_the_hour(make):
    h = make(rate("client", 4))
    h.clock.advance(HOUR - 60)  # 4 messages late in one hour
    for _ in range(4):
        assert (await h.send()).reply.code == 250
    h.clock.advance(120)  # a new fixed hour has begun, but the last hour still holds 4
    assert (await h.send()).reply.code == 451
    h.clock.advance(HOUR / 4)  # 4 * 3/4 = 3 in the window: one more fits
    assert (await h.send()).reply.code == 250
    assert (await h.send()).reply.code == 451


async def test_several_rates_each_apply_and_a_refusal_counts_nowhere(make):
    h = make({"rates": [{"per": "client", "max": 3, "within": "1d"},
                        {"per": "sender", "max": 1, "within": "10m"}]})
    assert (await h.send(sender="a@sender.test")).reply.code == 250
    r = await h.send(sender="a@sender.test")
    assert str(r.reply).startswith("451 4.7.1 Too many messages from this sender (at most 1 per 10m)")
    assert (await h.send(sender="b@sender.test")).reply.code == 250
    assert (await h.send(sender="c@sender.test")).reply.code == 250
    r = await h.send(sender="d@sender.test")  # the client's 3 per day are used up
    assert str(r.reply).startswith("451 4.7.1 Too many messages from your address (at most 3 per 1d)")
    counters = {(c.kind, c.value): c.current for c in await h.stores.limits.counters()}
    assert counters[("client", "192.0.2.1")] == 3 and ("sender", "d@sender.test") not in counters


async def test_client_net_groups_a_24_and_a_64_like_the_greylist(make):
    h = make(rate("client_net", 1))
    assert (await h.send(client_ip="192.0.2.1")).reply.code == 250
    assert (await h.send(client_ip="192.0.2.200")).reply.code == 451
    assert (await h.send(client_ip="::ffff:192.0.2.7")).reply.code == 451  # IPv4-mapped is IPv4
    assert (await h.send(client_ip="192.0.3.1")).reply.code == 250
    assert (await h.send(client_ip="2001:db8:1:2::1")).reply.code == 250
    assert (await h.send(client_ip="2001:db8:1:2:ffff::9")).reply.code == 451
    assert (await h.send(client_ip="2001:db8:1:3::1")).reply.code == 250
    values = sorted(c.value for c in await h.stores.limits.counters("client_net"))
    assert values == ["192.0.2.0/24", "192.0.3.0/24", "2001:db8:1:2::/64", "2001:db8:1:3::/64"]


async def test_senders_are_keyed_as_the_sender_state_keys_them(make):
    h = make({"rates": [{"per": "sender", "max": 1, "within": "1h"},
                        {"per": "sender_domain", "max": 3, "within": "1h"}]})
    assert (await h.send(sender="Alice+news@Sender.test")).reply.code == 250
    assert (await h.send(sender="alice@sender.test")).reply.code == 451  # the same sender
    assert (await h.send(sender="bob@sender.test")).reply.code == 250
    assert (await h.send(sender="carol@SENDER.test")).reply.code == 250
    r = await h.send(sender="dave@sender.test")
    assert "from this sender's domain (at most 3 per 1h)" in str(r.reply)
    # the null sender (bounces) has no sender to count: only client rates apply to it
    assert (await h.send(sender="")).reply.code == 250
    assert (await h.send(sender="")).reply.code == 250


async def test_recipient_rates_refuse_at_rcpt_one_recipient_at_a_time(make):
    h = make(rate("recipient", 1, "1d"))
    assert (await h.send(recipients=["Bob@example.com"])).reply.code == 250
    r = await h.send(recipients=["bob@example.com", "carol@example.com"])
    bob, carol = r.replies["rcpt"]
    assert str(bob).startswith("451 4.7.1 Too many messages for this recipient (at most 1 per 1d)")
    assert carol.code == 250 and r.reply.code == 250
    assert h.relayed[-1].recipients == ["carol@example.com"]


async def test_a_transaction_counts_once_however_many_policies_check_it(make):
    clock = FakeClock()
    stores = open_stores("sqlite://:memory:", clock)
    try:
        loose, tight = Limits(rate("client", 5)), Limits(rate("client", 2))
        h = Harness([loose, tight], clock=clock, stores=stores)
        loose.gate = tight.gate = h.context
        for _ in range(2):
            assert (await h.send()).reply.code == 250
        assert (await h.send()).reply.code == 451  # the tighter one, on the shared counter
        [c] = await stores.limits.counters()
        # counted once per transaction (not 2 per send); the looser entry, first, counted
        # the refused one before the tighter refused it: a hit counts once an entry passed it
        assert c.current == 3
    finally:
        await stores.close()


async def test_shadow_mode_traces_the_refusal_and_refuses_nothing(make):
    h = make()
    rule = Limits(rate("client", 1), h.context)
    rule.mode = "shadow"
    h2 = Harness([rule], clock=h.clock, stores=h.stores)
    assert (await h2.send()).reply.code == 250
    r = await h2.send()
    assert r.reply.code == 250 and len(h2.relayed) == 2
    [entry] = [e for e in r.trace if e.rule == "limits" and e.stage == "mail"]
    assert entry.shadow and entry.action == "tempfail" and entry.reply.startswith("451 4.7.1")
    [c] = await h.stores.limits.counters()
    assert c.current == 1  # what would have been refused is not counted


async def test_connections_past_the_cap_get_421_and_slots_come_back(make):
    h = make({"connections": 2})
    rule = h.runtime.policies.session_policy.rules[0]
    sessions = [Session(f"s{i}", "192.0.2.1") for i in range(3)]
    assert await rule.on_connect(sessions[0]) is None
    assert await rule.on_connect(sessions[1]) is None
    verdict = await rule.on_connect(sessions[2])
    assert str(verdict.reply("connect")) == "421 4.7.0 Too many connections from 192.0.2.1, try again later"
    assert await rule.on_connect(Session("other", "192.0.2.2")) is None  # per client address
    assert await rule.on_connect(Session("v6a", "2001:db8::1")) is None  # IPv6: per /64
    assert await rule.on_connect(Session("v6b", "2001:db8::2:1")) is None
    assert (await rule.on_connect(Session("v6c", "2001:db8::ffff"))).code == 421
    # the whole gate: a refused connection is answered 421 at once, no MAIL reached
    r = await h.send()
    assert str(r.reply).startswith("421 4.7.0") and "mail" not in r.replies and h.relayed == []
    await rule.on_disconnect(sessions[2])  # refused: held no slot, gives none back
    await rule.on_disconnect(sessions[0])
    assert (await h.send()).reply.code == 250  # its slot is free again, and given back after
    assert await h.stores.limits.connections(now=h.clock.now()) == {"192.0.2.1": 1, "192.0.2.2": 1,
                                                                    "2001:db8::/64": 2}


async def test_a_slot_is_refreshed_at_mail_and_a_dead_gates_slots_expire(make):
    h = make({"connections": 1, "connection_ttl": "10m"})
    rule = h.runtime.policies.session_policy.rules[0]
    dead = Session("dead", "192.0.2.1")
    assert await rule.on_connect(dead) is None  # never disconnects: its gate died
    assert (await h.send()).reply.code == 421
    h.clock.advance(600)
    assert (await h.send()).reply.code == 421  # still live at its expiry
    h.clock.advance(1)
    assert (await h.send()).reply.code == 250


async def test_the_limits_are_shared_through_one_redis():
    require_redis()
    prefix = new_prefix()
    clock = FakeClock()
    stores = [open_stores(redis_state(prefix), clock) for _ in range(2)]
    try:
        gates = [Harness([(Limits, rate("sender_domain", 3))], clock=clock, stores=s) for s in stores]
        replies = [(await gates[i % 2].send(sender=f"u{i}@sender.test")).reply.code for i in range(5)]
        assert replies == [250, 250, 250, 451, 451]
    finally:
        for s in stores:
            await s.close()
        delete_redis_keys(prefix)


@pytest.mark.parametrize("options, problem", [
    ({"rates": [{"per": "helo", "max": 1, "within": "1h"}]}, "per: expected one of client, client_net"),
    ({"rates": [{"per": "client", "max": 0, "within": "1h"}]}, "max: expected 1 or more"),
    ({"rates": [{"per": "client", "max": 1}]}, "within is required"),
    ({"rates": [{"per": "client", "max": 1, "within": "1h", "burst": 2}]}, "unknown key 'burst'"),
    ({"connections": -1}, "expected 0 (no limit) or more"),
    ({"message": "wait {seconds}"}, "only {what}"),
])
def test_bad_options_are_refused_with_the_reason(options, problem):
    with pytest.raises(OptionError) as e:
        Limits(options)
    assert problem in str(e.value)
