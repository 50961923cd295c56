"""`smtpgate senders ...` on a gate.yaml in tmp_path, on both backends. The state is filled
through the store API with the real time (the CLI's clock). Most calls run `main(argv)` in
this process; one test runs every command as a subprocess, as a user does."""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

from smtpgate import Event
from smtpgate.cli.main import main
from smtpgate.stores import open_sender_store
from smtpgate_rules.senders import Senders
from tests.support.cligate import CliGate
from tests.support.dot import parse_dot
from tests.support.redisproc import UNREACHABLE_REDIS_URL

POLICY = "domains: [example.com]\nrules:\n  - senders: {}\n  - greylist: {}\n"
NETS = """domains: [nets.example]
rules:
  - senders:
      machine: nets
      key: client_net
      states:
        new: {events: {rejected: {to: bad, count: 2, within: 1h}}}
        bad: {tempfail: true, ttl: 1h, decay_to: new}
"""


class Gate(CliGate):
    """A gate.yaml, its policies and its state, for the CLI to work on."""

    def __init__(self, folder, state, subprocess_=False):
        super().__init__(folder, state, {"default": POLICY, "nets": NETS}, subprocess_)

    def cli(self, *args, expect=0):
        return self.run_cli(["senders", *args, "-c", str(self.config)], expect)

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def feed(self, key, events, at=None, machine=None):
        """Events for a key of the default machine, through the store, at the real time."""
        machine = machine or Senders({}, None).machine

        async def go():
            store = open_sender_store(self.state)
            try:
                return await machine.feed(store, key, [Event(e, "test") for e in events], at or time.time())
            finally:
                await store.close()
        return asyncio.run(go())


@pytest.fixture
def gate(state_url, tmp_path):
    return Gate(tmp_path, state_url)


def test_list_show_set_reset(gate):
    assert gate.cli("list").stdout.strip() == "no keys"
    gate.feed("alice@example.org", ["delivered"])
    gate.feed("bob@example.org", ["greylisted", "rejected", "rejected"])
    doc = gate.json("list")
    assert doc["machine"] == "senders" and doc["count"] == 2
    assert {k["key"]: (k["state"], k["counts"]) for k in doc["keys"]} == {
        "alice@example.org": ("probation", {"delivered": 1}),
        "bob@example.org": ("suspect", {"greylisted": 1, "rejected": 2})}
    assert [k["key"] for k in gate.json("list", "--state", "suspect")["keys"]] == ["bob@example.org"]
    assert gate.json("list", "--limit", "1")["count"] == 1
    text = gate.cli("list").stdout
    assert text.splitlines()[0].split() == ["KEY", "STATE", "SINCE", "LAST", "EVENT", "EVENTS"]
    assert "greylisted=1 rejected=2" in text and text.rstrip().endswith("2 keys")

    changed = gate.json("set", "Alice+News@Example.ORG", "blocked", "--reason", "phishing reported")
    assert changed["key"] == "alice@example.org"
    assert {k: changed["changed"][k] for k in ("event", "from", "to", "why", "rule")} == {
        "event": "manual", "from": "probation", "to": "blocked", "why": "phishing reported", "rule": "cli"}
    show = gate.json("show", "alice@example.org")
    assert (show["state"], show["tracked"], show["does"]) == ("blocked", True, ["reject 554 5.7.1 at mail"])
    assert [(h["event"], h["from"], h["to"], h["rule"]) for h in show["history"]] == [
        ("delivered", "new", "probation", "test"), ("manual", "probation", "blocked", "cli")]
    assert show["decays"]["to"] == "suspect"
    text = gate.cli("show", "alice@example.org").stdout
    assert "state:       blocked" in text and "phishing reported" in text and "decays to:   suspect" in text
    for column in ("WHEN", "EVENT", "FROM", "TO", "RULE", "WHY"):
        assert column in text

    assert gate.cli("reset", "alice@example.org").stdout.startswith("alice@example.org: forgotten")
    assert gate.cli("reset", "alice@example.org").stdout.strip() == "alice@example.org: was not tracked"
    show = gate.json("show", "alice@example.org")
    assert (show["state"], show["tracked"]) == ("new", False)


def test_decay_shows_on_reading(gate):
    day = 86400
    gate.feed("old@example.org", ["delivered"], at=time.time() - 31 * day)  # probation, quiet 31 days
    show = gate.json("show", "old@example.org")
    assert show["state"] == "new"
    assert [(h["event"], h["from"], h["to"]) for h in show["history"]][-1] == ("decay", "probation", "new")
    assert [k["state"] for k in gate.json("list", "--state", "new")["keys"]] == ["new"]
    assert gate.json("list", "--state", "probation")["keys"] == []


def test_another_machine_is_chosen_by_name_or_policy_and_keys_are_normalised_its_way(gate):
    doc = gate.json("set", "192.0.2.77", "bad", "--machine", "nets")
    assert doc["key"] == "192.0.2.0/24" and doc["machine"] == "nets"
    assert gate.json("show", "192.0.2.1", "--policy", "nets")["state"] == "bad"
    assert gate.json("list", "--machine", "nets")["keys"][0]["key"] == "192.0.2.0/24"
    assert gate.json("list")["keys"] == []  # the default machine is another namespace
    graph = parse_dot(gate.cli("graph", "--machine", "nets").stdout)
    assert set(graph["nodes"]) == {"__start__", "new", "bad"}


def test_graph_is_the_default_policy_s_machine_as_dot(gate):
    out = gate.cli("graph").stdout
    graph = parse_dot(out)
    machine = Senders({}, None).machine
    assert graph["name"] == "senders" and out == machine.to_dot()
    assert set(graph["nodes"]) == set(machine.states) | {"__start__"}
    assert graph["nodes"]["blocked"]["label"] == "blocked\nreject 554 5.7.1 at mail"


@pytest.mark.parametrize("args, text", [
    (("set", "a@b.example", "royalty"), "unknown state 'royalty'"),
    (("list", "--state", "royalty"), "unknown state 'royalty'"),
    (("show", "<>"), "is not a sender key"),
    (("show", "a@b.example", "--machine", "nope"), "no machine named 'nope' (machines: senders, nets)"),
    (("show", "a@b.example", "--policy", "nope"), "no policy named 'nope'"),
    (("set", "a@b.example", "new", "--reason", "two\nlines"), "--reason must be one line"),
])
def test_usage_errors_exit_2(gate, args, text):
    assert text in gate.cli(*args, expect=2).stderr


def _no_machine_gate(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("domains: [example.com]\nrules: []\n")
    (tmp_path / "gate.yaml").write_text(f"state: sqlite://{tmp_path / 's.db'}\npolicies: policies\n")
    return tmp_path / "gate.yaml"


def test_naming_a_key_with_no_machine_in_any_policy_is_a_usage_error(tmp_path):
    config = _no_machine_gate(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["senders", "show", "a@b.example", "-c", str(config)]) == 2
    assert "no policy uses a sender state machine" in err.getvalue()


def test_list_with_no_machine_in_any_policy_is_empty_as_a_subprocess(tmp_path):
    """As `greylist list` on an unused state: an empty listing, exit 0 (text and JSON)."""
    config = _no_machine_gate(tmp_path)
    run = [sys.executable, "-m", "smtpgate", "senders", "list", "-c", str(config)]
    done = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"machine": None, "key_kind": None, "keys": [], "count": 0}
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no keys")


def test_list_of_an_empty_state_is_empty(gate):
    assert gate.json("list") == {"machine": "senders", "key_kind": "sender", "keys": [], "count": 0}
    assert gate.cli("list").stdout.strip() == "no keys"


def test_a_store_failure_exits_1(tmp_path):
    gate = Gate(tmp_path, UNREACHABLE_REDIS_URL)
    assert "Redis" in gate.cli("list", expect=1).stderr


def test_every_command_as_a_subprocess(tmp_path):
    gate = Gate(tmp_path, f"sqlite://{tmp_path / 'state.db'}", subprocess_=True)
    assert "trusted" in gate.cli("set", "a@b.example", "trusted").stdout
    assert json.loads(gate.cli("list", "--json").stdout)["keys"][0]["state"] == "trusted"
    assert "skip greylist" in gate.cli("show", "a@b.example").stdout
    parse_dot(gate.cli("graph").stdout)
    assert "forgotten" in gate.cli("reset", "a@b.example").stdout
    assert gate.cli("set", "a@b.example", expect=2).stderr  # argparse: STATE is missing


BAD_POLICIES = {
    "a.yaml": ("domains: [a.example]\nrules:\n  - senders:\n      states:\n        new:\n          events:\n"
               "            delivered: good\n            spam_scored: good\n        good: {}\n",
               "a.yaml:8:26: rules[0].senders.states.new.events.spam_scored: no rule publishes the event "
               "'spam_scored'"),
    "b.yaml": ("domains: [b.example]\nrules:\n  - senders:\n      states:\n        new:\n          events:\n"
               "            rejected: [{to: bad, count: 2, within: 1h}, {to: bad, count: 0}]\n        bad: {}\n",
               "b.yaml:7:74: rules[0].senders.states.new.events.rejected[1].count: expected a whole number "
               "1-1000, got 0"),
    "c.yaml": ("domains: [c.example]\nrules:\n  - senders:\n      states:\n        new: {}\n        lost:\n"
               "          reject: true\n",
               "c.yaml:7:11: rules[0].senders.states.lost: unreachable"),
    "d.yaml": ("domains: [d.example]\nrules:\n  - senders:\n      states:\n        new:\n          ttl: 1d\n"
               "          decay_to: nowhere\n",
               "d.yaml:7:21: rules[0].senders.states.new.decay_to: unknown state 'nowhere'"),
    "e.yaml": ("domains: [e.example]\nrules:\n  - senders:\n      states:\n        new:\n"
               "          events: {rejected: {to: x, count: 2, within: 0s}}\n        x: {}\n",
               "e.yaml:6:56: rules[0].senders.states.new.events.rejected.within: must be longer than zero"),
}


def test_check_config_names_file_and_line_of_each_problem(tmp_path, capsys):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("domains: [example.com]\nrules: []\n")
    for name, (text, _) in BAD_POLICIES.items():
        (tmp_path / "policies" / name).write_text(text)
    (tmp_path / "gate.yaml").write_text(f"state: sqlite://{tmp_path / 's.db'}\npolicies: policies\n")
    # A fresh process, as a user runs it: which events are known depends on the rule classes
    # a process has imported, and this test process imports many.
    done = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c",
                           str(tmp_path / "gate.yaml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == len(BAD_POLICIES)
    for (_, want), line in zip(sorted(BAD_POLICIES.values(), key=lambda v: v[1]), sorted(out)):
        assert line.startswith(str(tmp_path / "policies" / want.split(":")[0])), line
        assert line.split("/")[-1].startswith(want), (line, want)
