"""The state-machine model (smtpgate.machines.machine): tables, guards, lazy decay, validation, DOT.

Pure: records are changed in memory with explicit times; the stores have their own suite.
"""
from __future__ import annotations

import re

import pytest

from smtpgate import KNOWN_EVENTS, Event, Machine, MachineError, Rule, Transition
from smtpgate.machines.machine import known_events
from tests.support.constants import T0
from tests.support.dot import parse_dot

DAY = 86400.0


def machine(**kw) -> Machine:
    table = kw.pop("table", {
        "new": {"delivered": "probation", "rejected": Transition("suspect", count=2, within="1h")},
        "probation": {"delivered": Transition("trusted", count=3, within="7d", min_time="1d"),
                      "rejected": "suspect"},
        "trusted": {"rejected": [Transition("blocked", count=5, within="1d"),
                                 Transition("suspect", count=2, within="1d")]},
        "suspect": {"rejected": Transition("blocked", count=2), "delivered": Transition("new", count=2)},
        "blocked": {},
    })
    kw.setdefault("decay", {"trusted": ("30d", "probation"), "probation": ("10d", "new"),
                            "blocked": ("1d", "suspect"), "suspect": ("2d", "new")})
    return Machine("test", table, initial=kw.pop("initial", "new"), **kw)


def fire(m, rec, name, at, rule=None):
    m.settle(rec, at)
    return m.fire(rec, Event(name, rule), at)


# --- the table --------------------------------------------------------------------------

def test_the_table_prints_as_state_event_next():
    m = machine()
    assert m.table["new"]["delivered"] == "probation"
    assert m.table["probation"]["rejected"] == "suspect"
    assert m.table["new"]["rejected"] == [Transition("suspect", count=2, within=3600)]
    assert list(m.table) == ["new", "probation", "trusted", "suspect", "blocked"]
    assert m.table["blocked"] == {}


def test_an_unknown_event_in_a_state_changes_nothing_but_is_counted():
    m = machine()
    rec = m.new_record("k", T0)
    assert fire(m, rec, "greylisted", T0) is None
    assert (rec.state, rec.counts) == ("new", {"greylisted": 1})


def test_a_plain_transition_moves_at_once_and_is_recorded():
    m = machine()
    rec = m.new_record("k", T0)
    change = fire(m, rec, "delivered", T0 + 5, rule="downstream")
    assert (rec.state, rec.since, rec.seen) == ("probation", T0 + 5, T0 + 5)
    assert (change.event, change.src, change.dst, change.at, change.rule) == ("delivered", "new", "probation",
                                                                              T0 + 5, "downstream")
    assert rec.history == [change]


def test_count_within_a_window_counts_the_current_event_and_forgets_old_ones():
    m = machine()
    rec = m.new_record("k", T0)
    assert fire(m, rec, "rejected", T0) is None
    assert fire(m, rec, "rejected", T0 + 3601) is None  # the first is out of the 1h window
    assert fire(m, rec, "rejected", T0 + 3700).dst == "suspect"


def test_counts_restart_when_a_state_is_entered():
    m = machine()
    rec = m.new_record("k", T0)
    fire(m, rec, "delivered", T0)  # -> probation
    fire(m, rec, "delivered", T0 + 1 * DAY)
    fire(m, rec, "delivered", T0 + 1.5 * DAY)
    assert rec.state == "probation"  # the delivery that led here does not count
    assert fire(m, rec, "delivered", T0 + 2 * DAY).dst == "trusted"


def test_min_time_in_the_state_holds_the_transition_back():
    m = machine()
    rec = m.new_record("k", T0)
    fire(m, rec, "delivered", T0)
    for i in range(1, 6):  # five deliveries within the first day: not yet
        assert fire(m, rec, "delivered", T0 + i * 3600) is None
    assert rec.state == "probation"
    assert fire(m, rec, "delivered", T0 + DAY).dst == "trusted"  # a day in: count already met


def test_the_first_guard_that_holds_wins():
    m = machine()
    rec = m.new_record("k", T0)
    rec.state = "trusted"
    assert fire(m, rec, "rejected", T0) is None
    assert fire(m, rec, "rejected", T0 + 1).dst == "suspect"  # 2 reached, 5 not
    rec2 = m.new_record("k2", T0)
    rec2.state, rec2.recent = "trusted", {"rejected": [T0] * 4}
    assert fire(m, rec2, "rejected", T0 + 1).dst == "blocked"


def test_event_times_kept_per_key_are_bounded_by_the_largest_count():
    m = machine()
    assert m.keep == {"rejected": 5, "delivered": 3}
    rec = m.new_record("k", T0)
    for i in range(20):
        m.fire(rec, Event("greylisted"), T0 + i)
    assert "greylisted" not in rec.recent and rec.counts["greylisted"] == 20  # no guard counts it
    rec.state = "blocked"  # no way out: events are only counted
    for i in range(50):
        m.fire(rec, Event("rejected"), T0 + i)
    assert rec.recent["rejected"] == [T0 + i for i in range(45, 50)] and rec.counts["rejected"] == 50


# --- decay and forgetting -----------------------------------------------------------------

def test_ttl_decay_is_lazy_and_happens_when_the_ttl_ran_out():
    m = machine()
    rec = m.new_record("k", T0)
    rec.state = "blocked"
    assert m.settle(rec, T0 + DAY - 1).state == "blocked"
    m.settle(rec, T0 + DAY + 100)
    assert (rec.state, rec.since) == ("suspect", T0 + DAY)
    [decay] = rec.history
    assert (decay.event, decay.src, decay.dst, decay.at) == ("decay", "blocked", "suspect", T0 + DAY)


def test_decays_chain_each_at_its_own_time():
    m = machine(forget_after="365d")
    rec = m.new_record("k", T0)
    rec.state = "trusted"
    m.settle(rec, T0 + 100 * DAY)
    assert rec.state == "new"
    assert [(c.src, c.dst, c.at) for c in rec.history] == [
        ("trusted", "probation", T0 + 30 * DAY), ("probation", "new", T0 + 40 * DAY)]


def test_an_event_restarts_the_idle_clock():
    m = machine()
    rec = m.new_record("k", T0)
    rec.state = "trusted"
    fire(m, rec, "greylisted", T0 + 29 * DAY)
    assert m.settle(rec, T0 + 58 * DAY).state == "trusted"
    assert m.settle(rec, T0 + 59 * DAY).state == "probation"


def test_an_idle_key_is_forgotten_after_forget_after():
    m = machine(forget_after="60d")
    rec = m.new_record("k", T0)
    fire(m, rec, "rejected", T0)
    assert rec.expires == T0 + 60 * DAY
    assert m.settle(rec, T0 + 60 * DAY) is rec
    assert m.settle(rec, T0 + 60 * DAY + 1) is None


def test_a_stored_state_the_machine_no_longer_has_starts_over():
    m = machine()
    rec = m.new_record("k", T0)
    rec.state = "gone"
    assert m.settle(rec, T0 + 1).state == "new"
    assert rec.history[-1].why == "state no longer declared"


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, where, text", [
    ({"initial": "nope"}, (None, None, "initial"), "initial state 'nope' is not one of the states"),
    ({"table": {"new": {"delivered": "elsewhere"}}}, ("new", "delivered", "to"), "unknown state 'elsewhere'"),
    ({"table": {"new": {"delivered": "new"}}}, ("new", "delivered", "to"), "to itself does nothing"),
    ({"table": {"new": {}, "lost": {}}}, ("lost", None, None), "unreachable"),
    ({"table": {"new": {"Bad-Event": "x"}, "x": {}}}, ("new", "Bad-Event", None), "event name"),
    ({"table": {"New": {}}, "initial": "New"}, ("New", None, None), "state name"),
    ({"table": {"new": {"d": "x"}, "x": {}}, "decay": {"x": ("0s", "new")}}, ("x", None, "ttl"), "longer than zero"),
    ({"table": {"new": {"d": "x"}, "x": {}}, "decay": {"x": ("1d", "x")}}, ("x", None, "decay_to"), "itself"),
    ({"table": {"new": {"d": "x"}, "x": {}}, "decay": {"x": ("1d", "y")}}, ("x", None, "decay_to"), "unknown"),
    ({"table": {"new": {"d": "x"}, "x": {}}, "decay": {"x": ("soon", "new")}}, ("x", None, "ttl"), "duration"),
    ({"forget_after": 0}, (None, None, "forget_after"), "longer than zero"),
])
def test_bad_machines_are_refused_with_the_place(kw, where, text):
    kw.setdefault("decay", {})
    with pytest.raises(MachineError) as e:
        machine(**kw)
    assert text in str(e.value)
    assert (e.value.state, e.value.event, e.value.field) == where


def test_a_state_reached_only_by_decay_is_reachable():
    Machine("m", {"new": {"bad": "suspect"}, "suspect": {}, "quiet": {}}, initial="new",
            decay={"suspect": ("1d", "quiet")})


@pytest.mark.parametrize("kw, text", [
    ({"count": 0}, "count: expected a whole number 1-1000"),
    ({"count": 1001}, "count: expected a whole number 1-1000"),
    ({"count": True}, "count"),
    ({"count": 2.5}, "count"),
    ({"count": 2, "within": "0s"}, "within: must be longer than zero"),
    ({"count": 2, "within": "later"}, "within"),
    ({"within": "1h"}, "within: has no effect with count 1"),
    ({"min_time": -5}, "min_time"),
])
def test_bad_guards_are_refused(kw, text):
    with pytest.raises(MachineError, match=re.escape(text)):
        Transition("x", **kw)


def test_events_no_rule_publishes_are_refused_and_plugins_declare_theirs():
    m = Machine("m", {"new": {"spam_scored": "bad"}, "bad": {}}, initial="new")
    with pytest.raises(MachineError) as e:
        m.check_events(KNOWN_EVENTS)
    assert (e.value.state, e.value.event) == ("new", "spam_scored")

    class Scorer(Rule):  # a plugin that declares the events it publishes
        name = "test_scorer"
        publishes = ("spam_scored",)

    assert "spam_scored" in known_events()
    m.check_events(known_events())
    assert KNOWN_EVENTS <= known_events()


def test_the_known_events_are_the_issue_s():
    assert KNOWN_EVENTS == {"delivered", "rejected", "greylisted", "greylist_passed", "banned_attachment",
                            "downstream_rejected", "dnsbl_listed", "manual"}


# --- DOT ----------------------------------------------------------------------------------

def test_dot_output_is_a_digraph_of_every_state_and_transition():
    m = machine(labels={"blocked": 'reject "554"\\ at mail'})
    g = parse_dot(m.to_dot())
    assert g["name"] == "test"
    assert set(g["nodes"]) == set(m.states) | {"__start__"}
    assert ("__start__", "new", {}) in g["edges"]
    assert g["nodes"]["new"]["peripheries"] == "2"
    assert g["nodes"]["blocked"]["label"] == 'blocked\nreject "554"\\ at mail'
    edges = {(a, b, attrs["label"]) for a, b, attrs in g["edges"] if a != "__start__"}
    assert ("new", "probation", "delivered") in edges
    assert ("probation", "trusted", "delivered x3 within 7d, after 1d in state") in edges
    assert ("trusted", "blocked", "rejected x5 within 1d") in edges
    assert ("trusted", "probation", "idle 30d") in edges
    dashed = [(a, b) for a, b, attrs in g["edges"] if attrs.get("style") == "dashed"]
    assert sorted(dashed) == sorted((s, t) for s, (_, t) in m.decay.items())
    n_transitions = sum(len(ts) for events in m.states.values() for ts in events.values())
    assert len(g["edges"]) == 1 + n_transitions + len(m.decay)


def test_a_view_is_the_frozen_state_its_fields_make():
    # view fills the frozen dataclass in directly (its __init__ is dear): the same value,
    # still frozen, its counts a copy of the record's
    from dataclasses import FrozenInstanceError, fields

    from smtpgate.machines.machine import SenderState
    m = machine()
    rec = m.new_record("alice@example.org", T0)
    fire(m, rec, "delivered", T0 + 1)
    view = m.view("alice@example.org", rec)
    assert type(view) is SenderState
    assert view == SenderState(m.name, "alice@example.org", rec.state, rec.since, rec.seen, dict(rec.counts), True)
    assert list(vars(view)) == [f.name for f in fields(SenderState)]
    assert view.counts is not rec.counts
    with pytest.raises(FrozenInstanceError):
        view.state = "x"
