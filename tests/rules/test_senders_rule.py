"""The senders rule through smtpgate.testing (no sockets, a FakeClock): every state x event
pair of the default machine, what states do, the pipeline's events, keys, decay, shadow
mode, validation, and the Python API for plugin authors as a user writes it."""
from __future__ import annotations


import pytest
import yaml

from smtpgate import (KNOWN_EVENTS, MachineRule, OptionError, Rule, StoreError, Verdict, sender_key)
from smtpgate.stores import Stores
from smtpgate.stores.senders import SenderStore
from smtpgate.testing import FakeClock, Harness, message
from smtpgate_rules.senders.defaults import DEFAULT_INITIAL, DEFAULT_STATES
from smtpgate_rules.greylist import Greylist
from smtpgate_rules.senders import Senders
from tests.support.constants import ROOT

KEY = "sender@sender.example"  # the harness's default sender
DAY = 86400


class Emit(Rule):
    """Publishes the event named by the HELO (``ev-NAME.test``) at MAIL, then discards the
    transaction: nothing is delivered or refused, so that event is the only one."""

    name = "emit"

    async def on_mail(self, tx):
        helo = tx.session.helo or ""
        if helo.startswith("ev-"):
            tx.results.event(self, helo[3:].split(".")[0], why="emitted by the test")
            return Verdict.discard("test event")
        return None


class Refuse(Rule):
    """Refuses recipients whose local part starts with ``trap``."""

    name = "refuse"

    async def on_rcpt(self, tx, rcpt):
        if rcpt.local.startswith("trap"):
            return Verdict.reject("no such trap", 550)
        return None


def senders_of(h, name="senders") -> MachineRule:
    return next(r for r in h.runtime.policies.session_policy.rules if getattr(r, "name", None) == name)


async def emit(h, event, sender=KEY):
    return await h.send(sender=sender, helo=f"ev-{event}.test")


async def state_of(h, key=KEY) -> str:
    return (await senders_of(h).current(key)).state


# --- every state x event of the default machine -------------------------------------------
# (events needed, state after, time in the state needed first); absent: the state stays.
EXPECTED = {
    "new": {"delivered": (1, "probation", 0), "rejected": (2, "suspect", 0), "banned_attachment": (1, "suspect", 0),
            "dnsbl_listed": (1, "suspect", 0), "downstream_rejected": (3, "suspect", 0)},
    "probation": {"delivered": (5, "trusted", DAY), "rejected": (2, "suspect", 0),
                  "banned_attachment": (1, "suspect", 0), "dnsbl_listed": (1, "suspect", 0),
                  "downstream_rejected": (3, "suspect", 0)},
    "trusted": {"rejected": (3, "suspect", 0), "banned_attachment": (1, "suspect", 0),
                "dnsbl_listed": (2, "suspect", 0), "downstream_rejected": (5, "suspect", 0)},
    "suspect": {"delivered": (5, "probation", 2 * DAY), "rejected": (3, "blocked", 0),
                "banned_attachment": (2, "blocked", 0), "dnsbl_listed": (3, "blocked", 0),
                "downstream_rejected": (5, "blocked", 0)},
    "blocked": {},
}
PAIRS = [(s, e) for s in EXPECTED for e in sorted(KNOWN_EVENTS)]


@pytest.mark.parametrize("state, event", PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
async def test_every_state_and_event_of_the_default_machine(state, event):
    needed, after, wait = EXPECTED[state].get(event, (6, state, 0))
    async with Harness([(Emit, {}), (Senders, {})]) as h:
        await senders_of(h).move(KEY, state, "test start")
        h.clock.advance(wait)
        for _ in range(needed - 1):
            assert (await emit(h, event)).reply.code == 250
            assert await state_of(h) == state
            h.clock.advance(60)
        await emit(h, event)
        assert await state_of(h) == after
        record = await h.stores.senders.get("senders", KEY)
        assert record.counts[event] == needed + (event == "manual")
        if after != state:
            last = record.history[-1]
            assert (last.event, last.src, last.dst, last.rule) == (event, state, after, "emit")


def test_the_expected_table_covers_the_default_machine():
    rule = Senders({}, None)
    assert set(EXPECTED) == set(rule.machine.states)
    for state, events in rule.machine.states.items():
        assert set(events) == set(EXPECTED[state])  # nothing in the machine the table misses


async def test_min_time_holds_probation_back_from_trusted():
    async with Harness([(Emit, {}), (Senders, {})]) as h:
        await senders_of(h).move(KEY, "probation", "test")
        for _ in range(8):  # eight deliveries in the first hours
            await emit(h, "delivered")
            h.clock.advance(600)
        assert await state_of(h) == "probation"
        h.clock.advance(DAY)
        await emit(h, "delivered")
        assert await state_of(h) == "trusted"


# --- the pipeline's own events ----------------------------------------------------------

async def test_a_delivery_moves_a_new_sender_to_probation_naming_the_downstream():
    async with Harness([(Senders, {})]) as h:
        r = await h.send(sender="Sender@Sender.Example")
        assert r.reply.code == 250
        assert r.transaction.results.get("senders").data["after"] == "probation"
        [change] = (await h.stores.senders.get("senders", KEY)).history
        assert (change.event, change.src, change.dst, change.rule, change.why) == (
            "delivered", "new", "probation", "downstream", "250 2.0.0 Ok: queued")
        assert [e.reason for e in r.trace if e.stage == "end"] == [f"{KEY}: new -> probation (delivered)"]


async def test_a_rule_s_refusal_is_rejected_once_per_transaction_with_its_name():
    async with Harness([(Senders, {}), (Refuse, {})]) as h:
        r = await h.send(recipients=["trap1@example.com", "trap2@example.com", "trap3@example.com"])
        assert r.reply.code == 550
        record = await h.stores.senders.get("senders", KEY)
        assert record.counts == {"rejected": 1} and record.state == "new"
        await h.send(recipients=["trap@example.com"])
        record = await h.stores.senders.get("senders", KEY)
        assert record.state == "suspect" and record.history[-1].rule == "refuse"
        assert record.history[-1].why.endswith("no such trap")


async def test_the_downstream_refusing_a_recipient_is_downstream_rejected():
    async with Harness([(Senders, {})], relay_replies={"rcpt:nobody@example.com": "550 5.1.1 no such user"}) as h:
        r = await h.send(recipients=["nobody@example.com", "rcpt@example.com"])
        assert r.reply.code == 250
        record = await h.stores.senders.get("senders", KEY)
        assert record.counts == {"downstream_rejected": 1, "delivered": 1}
        assert record.state == "probation"  # the delivery came after it


async def test_the_greylist_publishes_its_events_through_the_public_api():
    async with Harness([(Senders, {}), (Greylist, {"delay": "5m"})]) as h:
        assert (await h.send()).reply.code == 451
        h.clock.advance(301)
        assert (await h.send()).reply.code == 250
        record = await h.stores.senders.get("senders", KEY)
        assert record.counts == {"greylisted": 1, "greylist_passed": 1, "delivered": 1}


async def test_a_rejection_by_the_machine_itself_is_not_fed_back():
    async with Harness([(Senders, {})]) as h:
        await senders_of(h).move(KEY, "blocked", "test")
        for _ in range(3):
            assert (await h.send()).reply.code == 554
        record = await h.stores.senders.get("senders", KEY)
        assert "rejected" not in record.counts
        h.clock.advance(7 * DAY + 1)  # quiet for its ttl, although it kept trying
        assert await state_of(h) == "suspect"


# --- what states do ------------------------------------------------------------------------

async def test_blocked_is_refused_at_mail_with_554():
    async with Harness([(Senders, {}), (Refuse, {})]) as h:
        await senders_of(h).move(KEY, "blocked", "test")
        r = await h.send()
        assert "rcpt" not in r.replies
        assert str(r.replies["mail"]) == f"554 5.7.1 Sender {KEY} is blocked by local policy"
        assert r.trace[0].reason == f"senders: {KEY} is blocked"
        assert h.relayed == []


async def test_trusted_skips_greylisting_and_the_trace_says_why():
    async with Harness([(Senders, {}), (Greylist, {"delay": "1h"})]) as h:
        await senders_of(h).move(KEY, "trusted", "test")
        r = await h.send()
        assert r.reply.code == 250
        [entry] = [e for e in r.trace if e.rule == "greylist"]
        assert (entry.action, entry.reason) == ("continue", f"skipped: senders: {KEY} is trusted")
        assert (await h.send(sender="other@else.example")).reply.code == 451  # others still wait


async def test_suspect_is_tagged_and_the_rest_of_the_message_stays_byte_identical():
    async with Harness([(Senders, {})]) as h:
        await senders_of(h).move(KEY, "suspect", "test")
        raw = message("hello")
        await h.send(raw)
        assert h.relayed[0].data == b"X-Smtpgate-Sender: suspect\r\n" + raw


async def test_the_sender_state_is_readable_by_any_later_rule():
    seen = []

    class Reader(Rule):
        name = "reader"

        async def on_rcpt(self, tx, rcpt):
            seen.append(tx.sender_state("senders"))
            seen.append(tx.sender_state())

    async with Harness([(Senders, {}), (Reader, {})]) as h:
        await senders_of(h).move(KEY, "trusted", "why")
        await h.send()
        assert seen[0] is seen[1]
        assert (seen[0].key, seen[0].state, seen[0].tracked, seen[0].counts) == (KEY, "trusted", True, {"manual": 1})
        await h.send(sender="")
        assert seen[-1] is None  # the null sender is not tracked


STATES = {
    "new": {"events": {"delivered": "limited"}},
    "limited": {"rate": "2/1h", "events": {"rejected": "deferred"}},
    "deferred": {"tempfail": "451 4.7.1 Later, {key}", "events": {"delivered": "refused"}},
    "refused": {"reject": "550 5.7.1 No thanks ({state})", "at": "rcpt"},
}


async def test_rate_tempfail_and_reject_at_rcpt_with_postmaster_still_reachable():
    async with Harness([(Senders, {"states": STATES})]) as h:
        rule = senders_of(h)
        await rule.move(KEY, "limited", "t")
        assert [(await h.send()).reply.code for _ in range(3)] == [250, 250, 451]
        h.clock.advance(3601)
        assert (await h.send()).reply.code == 250
        await rule.move(KEY, "deferred", "t")
        assert str((await h.send()).reply) == f"451 4.7.1 Later, {KEY}"
        await rule.move(KEY, "refused", "t")
        r = await h.send(recipients=["rcpt@example.com", "postmaster@example.com"])
        assert [str(x) for x in r.replies["rcpt"]] == ["550 5.7.1 No thanks (refused)", "250 2.1.5 Ok"]
        assert h.relayed[-1].recipients == ["postmaster@example.com"]


# --- keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, sender, client, key", [
    ({}, "Alice+news@Example.ORG", "192.0.2.1", "alice@example.org"),
    ({}, "prvs=1234abcd=bob@example.org", "192.0.2.1", "bob@example.org"),
    ({}, "SRS0=HHH=TT=orig.example=carol@forwarder.example", "192.0.2.1", "carol@orig.example"),
    ({}, "bounce-12345@lists.example", "192.0.2.1", "bounce-#@lists.example"),
    ({"key": "sender_domain"}, "a@Sub.Example.org", "192.0.2.1", "sub.example.org"),
    ({"key": "client_ip"}, "a@x.example", "192.0.2.77", "192.0.2.77"),
    ({"key": "client_ip"}, "a@x.example", "::ffff:192.0.2.77", "192.0.2.77"),
    ({"key": "client_net"}, "a@x.example", "192.0.2.77", "192.0.2.0/24"),
    ({"key": "client_net", "ipv4_prefix": 16}, "a@x.example", "192.0.2.77", "192.0.0.0/16"),
    ({"key": "client_net"}, "a@x.example", "2001:db8:1:2:3::9", "2001:db8:1:2::/64"),
])
async def test_keys(options, sender, client, key):
    async with Harness([(Senders, options)]) as h:
        await h.send(sender=sender, client_ip=client)
        [record] = await h.stores.senders.records("senders")
        assert record.key == key
        assert senders_of(h).normalise_key(sender if "sender" in options.get("key", "sender") else client) == key


async def test_the_null_sender_is_never_tracked():
    async with Harness([(Senders, {})]) as h:
        assert (await h.send(sender="")).reply.code == 250
        assert await h.stores.senders.records() == []
    assert sender_key("<>") is None and sender_key("") is None


# --- time ------------------------------------------------------------------------------------

async def test_decay_is_applied_lazily_when_read_and_recorded_when_written():
    async with Harness([(Emit, {}), (Senders, {})]) as h:
        rule = senders_of(h)
        await rule.move(KEY, "trusted", "test")
        start = h.clock.now()
        h.clock.advance(61 * DAY)
        assert await state_of(h) == "probation"  # read: decayed in memory only
        assert (await h.stores.senders.get("senders", KEY)).state == "trusted"
        await emit(h, "greylisted")
        record = await h.stores.senders.get("senders", KEY)
        decay = record.history[-1]
        assert (decay.event, decay.src, decay.dst, decay.at) == ("decay", "trusted", "probation", start + 60 * DAY)
        h.clock.advance(31 * DAY)
        assert await state_of(h) == "new"


async def test_a_key_idle_for_forget_after_starts_again():
    async with Harness([(Senders, {"forget_after": "10d"})]) as h:
        await senders_of(h).move(KEY, "suspect", "test")
        h.clock.advance(10 * DAY + 1)
        view = await senders_of(h).current(KEY)
        assert (view.state, view.tracked) == ("new", False)


# --- two gates, shadow mode, store failures ----------------------------------------------------

async def test_two_gates_sharing_stores_share_the_states():
    clock = FakeClock()
    async with Harness([(Senders, {})], clock=clock) as one:
        async with Harness([(Senders, {}), (Refuse, {})], clock=clock, stores=one.stores) as two:
            await one.send()
            assert await state_of(two) == "probation"
            for _ in range(2):
                await two.send(recipients=["trap@example.com"])
            assert await state_of(one) == "suspect"


async def test_shadow_mode_tracks_but_neither_refuses_nor_skips():
    async with Harness([(Senders, {}), (Greylist, {})]) as h:
        rule = senders_of(h)
        rule.mode = "shadow"
        await rule.move(KEY, "blocked", "t")
        r = await h.send()
        assert r.reply.code == 451  # not refused at MAIL; greylisted as anyone
        [entry] = [e for e in r.trace if e.rule == "senders" and e.stage == "mail"]
        assert (entry.action, entry.shadow) == ("reject", True)
        await rule.move(KEY, "trusted", "t")
        r = await h.send(sender=KEY, recipients=["other@example.com"])
        assert r.reply.code == 451  # the greylist was not skipped
        assert "greylisted" in (await h.stores.senders.get("senders", KEY)).counts


class BrokenStore(SenderStore):
    async def get(self, machine, key):
        raise StoreError("Redis down")

    async def update(self, machine, key, change, now=None):
        raise StoreError("Redis down")

    async def close(self):
        pass


@pytest.mark.parametrize("on_error, code", [("tempfail", 451), ("accept", 250)])
async def test_a_store_failure_is_451_unless_on_error_accept(on_error, code):
    stores = Stores("sqlite://:memory:", senders=BrokenStore())
    async with Harness([(Senders, {})], stores=stores) as h:
        senders_of(h).on_error = on_error
        r = await h.send()
        assert r.reply.code == code
        assert [e.reason for e in r.transaction.trace if e.stage == "mail"] == ["StoreError: Redis down"]
        if code == 451:
            assert str(r.reply) == "451 4.3.0 Local error in processing, try again later"
    await stores.close()


async def test_the_mail_record_holds_the_key_and_state_and_keeps_the_key_when_the_store_fails():
    async with Harness([(Senders, {})]) as h:
        r = await h.send()
        assert r.transaction.results.get("senders").data["key"] == KEY and r.transaction.results.get("senders").data["state"] == "new"
        assert f"{KEY}: new" in r.transaction.results.get("senders").msg
    stores = Stores("sqlite://:memory:", senders=BrokenStore())
    async with Harness([(Senders, {})], stores=stores) as h:
        senders_of(h).on_error = "accept"
        r = await h.send()
        assert r.reply.code == 250 and r.transaction.results.get("senders").data["key"] == KEY
        assert "state" not in r.transaction.results.get("senders").data
    await stores.close()


# --- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key, text", [
    ({"key": "recipient"}, "key", "expected one of sender, sender_domain, client_ip, client_net"),
    ({"initial": "new"}, "initial", "only with states"),
    ({"states": []}, "states", "expected a mapping"),
    ({"states": {"new": {"events": {"delivered": "gone"}}}}, "states.new.events.delivered", "unknown state 'gone'"),
    ({"states": {"new": {"events": {"delivered": [{"to": "new2"}, {"to": "nope"}]}}, "new2": {}}},
     "states.new.events.delivered[1].to", "unknown state 'nope'"),
    ({"states": {"new": {}, "lost": {}}}, "states.lost", "unreachable"),
    ({"states": {"new": {"events": {"spam_scored": "b"}}, "b": {}}}, "states.new.events.spam_scored",
     "no rule publishes the event 'spam_scored'"),
    ({"states": {"new": {"events": {"rejected": {"to": "b", "count": 0}}}, "b": {}}},
     "states.new.events.rejected.count", "expected a whole number 1-1000, got 0"),
    ({"states": {"new": {"events": {"rejected": {"to": "b", "within": "1h"}}}, "b": {}}},
     "states.new.events.rejected.within", "has no effect with count 1"),
    ({"states": {"new": {"events": {"rejected": {"to": "b", "count": 2, "within": "soon"}}}, "b": {}}},
     "states.new.events.rejected.within", "expected a duration"),
    ({"states": {"new": {"events": {"rejected": {"to": "b", "min_time": -1}}}, "b": {}}},
     "states.new.events.rejected.min_time", "duration of zero or more"),
    ({"states": {"new": {"events": {"rejected": {"to": "b", "after": "1h"}}}, "b": {}}},
     "states.new.events.rejected.after", "unknown key"),
    ({"states": {"new": {"events": {"rejected": {"count": 2}}}}}, "states.new.events.rejected", "needs to:"),
    ({"states": {"new": {"ttl": "1d"}}}, "states.new.ttl", "needs decay_to too"),
    ({"states": {"new": {"colour": "red"}}}, "states.new.colour", "unknown key"),
    ({"states": {"new": {"skip": ["nosuchrule"]}}}, "states.new.skip[0]", "no rule named 'nosuchrule'"),
    ({"states": {"new": {"skip": ["senders"]}}}, "states.new.skip[0]", "its own rule"),
    ({"states": {"new": {"reject": "451 4.7.1 no"}}}, "states.new.reject", "a reject needs a 5xx code"),
    ({"states": {"new": {"tempfail": "554 no"}}}, "states.new.tempfail", "a tempfail needs a 4xx code"),
    ({"states": {"new": {"reject": True, "tempfail": True}}}, "states.new.tempfail", "not both"),
    ({"states": {"new": {"at": "data"}}}, "states.new.at", "only with reject or tempfail"),
    ({"states": {"new": {"reject": "hi {sender}"}}}, "states.new.reject", "only {key}, {state} and {machine}"),
    ({"states": {"new": {"add_header": "X-Bad Name: v"}}}, "states.new.add_header", "not a header name"),
    ({"states": {"new": {"add_header": "no colon"}}}, "states.new.add_header", 'expected "Name: value"'),
    ({"states": {"new": {"rate": "often"}}}, "states.new.rate", 'expected "N/DURATION"'),
    ({"states": {"new": {"rate": {"max": 0, "per": "1h"}}}}, "states.new.rate.max", "expected 1-1000"),
    ({"machine": "Bad Name!"}, "machine", "a machine name is"),
])
def test_bad_options_are_refused_naming_the_value(options, key, text):
    with pytest.raises(OptionError) as e:
        Senders(options, None)
    assert e.value.key == key
    assert text in str(e.value)


def test_the_default_machine_is_the_one_the_doc_prints():
    doc = (ROOT / "docs/rules/senders.md").read_text()
    block = doc.split("`senders: {}` is exactly:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == {"initial": DEFAULT_INITIAL, "states": DEFAULT_STATES}


# --- the Python API, as a plugin author writes it ------------------------------------------------

def load_doc_plugin():
    """The example plugin of docs/rules/senders.md, exactly as printed."""
    doc = (ROOT / "docs/rules/senders.md").read_text()
    code = doc.split("```python\n# plugins/reputation.py\n", 1)[1].split("```", 1)[0]
    namespace = {"__name__": "reputation_example"}
    exec(compile(code, "docs/rules/senders.md", "exec"), namespace)
    return namespace["DomainReputation"]


async def test_the_doc_s_python_machine_runs_as_a_user_writes_it():
    DomainReputation = load_doc_plugin()
    async with Harness([(DomainReputation, {}), (Greylist, {"delay": "1h"})]) as h:
        rule = senders_of(h, "domain_reputation")
        assert (await h.send(sender="a@partner.example")).reply.code == 451  # unknown: greylisted
        await rule.feed("partner.example", ["delivered"] * 3)
        assert (await rule.current("partner.example")).state == "known"
        r = await h.send(sender="b@partner.example")  # known: the greylist is skipped
        assert r.reply.code == 250
        spam = message("hi", "buy VIAGRA now\r\n")
        for _ in range(5):
            await h.send(spam, sender="c@partner.example")
        assert (await rule.current("partner.example")).state == "bad"
        r = await h.send(sender="d@partner.example")
        assert str(r.replies["mail"]) == "554 5.7.1 Mail from partner.example is refused for now"
        h.clock.advance(3 * DAY + 1)
        assert (await rule.current("partner.example")).state == "unknown"
        history = (await h.stores.senders.get("domain_reputation", "partner.example")).history
        assert [(c.event, c.dst) for c in history] == [("delivered", "known"), ("spam_scored", "bad")]


def test_state_handlers_are_checked_when_the_class_is_made():
    from smtpgate import Machine, PluginError, state
    m = Machine("m", {"a": {}}, initial="a")
    with pytest.raises(PluginError, match="unknown state"):
        type("X", (MachineRule,), {"name": "x", "machine": m, "h": state("zzz")(_handler)})
    with pytest.raises(PluginError, match="must take"):
        type("X", (MachineRule,), {"name": "x", "machine": m, "h": state("a", at="rcpt")(_handler)})
    with pytest.raises(PluginError, match="async def"):
        type("X", (MachineRule,), {"name": "x", "machine": m, "h": state("a")(lambda self, tx, sender: None)})
    with pytest.raises(ValueError, match="at: expected"):
        state("a", at="connect")


async def _handler(self, tx, sender):
    return None


def test_a_machine_rule_without_a_machine_or_with_unknown_events_is_refused():
    class NoMachine(MachineRule):
        name = "test_no_machine"

    with pytest.raises(OptionError, match="no state machine"):
        NoMachine({}, None)
    from smtpgate import Machine

    class Unknown(MachineRule):
        name = "test_unknown_events"
        machine = Machine("u", {"a": {"made_up_event": "b"}, "b": {}}, initial="a")

    with pytest.raises(OptionError, match="made_up_event"):
        Unknown({}, None)


async def test_a_machine_listed_again_by_a_domain_policy_counts_each_event_once(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("domains: [localhost]\nrules:\n  - senders: {}\n")
    (tmp_path / "policies" / "example.yaml").write_text(
        "domains: [example.com]\nextends: default\nrules:\n  - senders: {forget_after: 30d}\n")
    (tmp_path / "gate.yaml").write_text("state: \"sqlite://:memory:\"\npolicies: policies\n")
    h = Harness.from_config(str(tmp_path / "gate.yaml"))
    try:
        assert (await h.send()).reply.code == 250
        record = await h.stores.senders.get("senders", KEY)
        assert record.counts == {"delivered": 1} and record.state == "probation"
    finally:
        await h.aclose()


async def test_events_of_a_shadow_rule_do_not_reach_the_machine():
    class Lister(Rule):
        name = "lister"
        publishes = ("listed_here",)

        async def on_mail(self, tx):
            tx.results.event(self, "dnsbl_listed", why="shadow")

    lister = Lister({}, None)
    lister.mode = "shadow"
    async with Harness([lister, (Senders, {})]) as h:
        r = await h.send()
        assert r.transaction.results.get("lister").events == ["dnsbl_listed"]
        assert r.transaction.results.get("lister").shadow
        assert [(e.name, e.rule) for e in r.transaction.results.events] == [("delivered", "downstream")]
        record = await h.stores.senders.get("senders", KEY)
        assert record.history[-1].event == "delivered"


@pytest.mark.parametrize("name", ["Bad", "with space", "", "x" * 65, "a-b", 3])
def test_event_names_are_checked_when_published(name):
    from smtpgate.mail.session import Session, Transaction
    tx = Transaction("t", Session("s", "192.0.2.1"), "a@b.example")
    with pytest.raises(ValueError, match="event name"):
        tx.results.event("rule", name)
    assert tx.results.events == [] and "rule" not in tx.results
