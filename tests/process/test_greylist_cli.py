"""`smtpgate greylist ...` on a gate.yaml in tmp_path, on both backends. The state is filled
through the store API with the real time (the CLI's clock).

`test_every_command_as_a_subprocess` and the exit-code test run `python -m smtpgate` as a
user does; the detailed tests call the same `main(argv)` in this process (a subprocess costs
~0.4 s of imports, and they make about a hundred calls).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from smtpgate.stores import Params, make_allow, open_greylist_store, triplet_value
from tests.support.cligate import CliGate
from tests.support.redisproc import UNREACHABLE_REDIS_URL

POLICY = """domains: [example.com]
rules:
  - greylist: {delay: 10m, auto_whitelist_after: 2, pooled_senders: [bigmail.example]}
"""
OTHER = "domains: [other.example]\nrules: []\n"
P = Params(600, 2 * 86400, 35 * 86400, 2)


class Gate(CliGate):
    """A gate.yaml, its policies and its store, for the CLI to work on."""

    def __init__(self, folder, state, subprocess_=False):
        super().__init__(folder, state, {"default": POLICY, "other": OTHER}, subprocess_)

    def cli(self, *args, config_first=False, expect=0):
        c = ["-c", str(self.config)]
        return self.run_cli([*(c if config_first else []), *args, *([] if config_first else c)], expect)

    def json(self, *args, **kw):
        return json.loads(self.cli(*args, "--json", **kw).stdout)

    def run(self, work):
        """``work(store)`` on a store of its own, in a loop of its own (the CLI runs its own)."""
        async def go():
            store = open_greylist_store(self.state)
            try:
                return await work(store)
            finally:
                await store.close()
        return asyncio.run(go())

    def attempt(self, client, sender, recipient, at):
        return self.run(lambda store: store.attempt(client, sender, recipient, now=at, params=P))

    def get(self, client, sender, recipient):
        return self.run(lambda store: store.get(client, sender, recipient))


@pytest.fixture
def gate(state_url, tmp_path):
    return Gate(tmp_path, state_url)


@pytest.fixture
def gate_subprocess(state_url, tmp_path):
    return Gate(tmp_path, state_url, subprocess_=True)


def fill(g: Gate, now: float):
    """pending: 2 (one of them a null sender); passed: 2 (one pooled); expired: 1."""
    g.attempt("192.0.2.0/24", "alice@sender.example", "bob@example.com", now - 60)
    g.attempt("192.0.2.0/24", "", "bob@example.com", now - 30)
    g.attempt("198.51.100.0/24", "news-#@list.example", "carol@example.com", now - 3600)
    g.attempt("198.51.100.0/24", "news-#@list.example", "carol@example.com", now - 1800)
    g.attempt("domain:bigmail.example", "dave@bigmail.example", "bob@example.com", now - 7200)
    g.attempt("domain:bigmail.example", "dave@bigmail.example", "bob@example.com", now - 5400)
    g.attempt("203.0.113.0/24", "old@x.example", "bob@example.com", now - 3 * 86400)


def test_list_table_json_and_filters(gate):
    assert gate.cli("greylist", "list").stdout.strip() == "no entries"
    assert gate.json("greylist", "list") == {"entries": [], "count": 0, "limit": None}
    fill(gate, time.time())
    out = gate.cli("greylist", "list").stdout
    header = out.splitlines()[0].split()
    assert header == ["CLIENT", "SENDER", "RECIPIENT", "FIRST", "SEEN", "LAST", "SEEN", "ATTEMPTS", "STATE",
                      "EXPIRES"]
    assert ["192.0.2.0/24", "<>", "bob@example.com"] in [line.split()[:3] for line in out.splitlines()]
    assert out.splitlines()[-1] == "5 entries"
    doc = gate.json("greylist", "list")
    assert doc["count"] == 5 and [e["state"] for e in doc["entries"]] == \
        ["pending", "pending", "passed", "passed", "expired"]  # most recently seen first
    first = doc["entries"][0]
    assert set(first) == {"client", "sender", "recipient", "state", "first_seen", "last_seen", "attempts",
                          "passed_at", "retry_delay", "expires"}
    assert first["sender"] == "<>" and first["first_seen"].endswith("Z") and first["attempts"] == 1
    passed = gate.json("greylist", "list", "--passed")["entries"]
    assert [e["client"] for e in passed] == ["198.51.100.0/24", "domain:bigmail.example"]
    assert passed[0]["retry_delay"] == 1800 and passed[0]["attempts"] == 2
    assert len(gate.json("greylist", "list", "--pending")["entries"]) == 2
    assert gate.json("greylist", "list", "--client", "192.0.2.77")["count"] == 2
    assert gate.json("greylist", "list", "--client", "domain:bigmail.example")["count"] == 1
    # the sender is normalised as the gate does: this VERP address is "news-#@list.example"
    assert gate.json("greylist", "list", "--sender", "News-20260101@List.Example")["count"] == 1
    assert gate.json("greylist", "list", "--sender", "<>")["count"] == 1
    assert gate.json("greylist", "list", "--sender", "@sender.example")["count"] == 1
    assert gate.json("greylist", "list", "--recipient", "bob@example.com", "--limit", "2")["count"] == 2
    gate.cli("greylist", "list", "--client", "not-an-ip", expect=2)
    gate.cli("greylist", "list", "--limit", "0", expect=2)
    gate.cli("greylist", "list", "--pending", "--passed", expect=2)


def test_show_explains_key_entry_answer_and_time(gate):
    now = float(int(time.time()))
    doc = gate.json("greylist", "show", "192.0.2.7", "Bounce-123-456@Lists.Example", "Bob@Example.com")
    assert doc["key"] == {"client": "192.0.2.0/24", "sender": "bounce-#-#@lists.example",
                          "recipient": "bob@example.com"}
    assert doc["policy"] == "default" and doc["entry"] is None and doc["outcome"] == "new"
    assert doc["answer"].startswith("451 4.7.1 Greylisted, please try again in 600 seconds (after ")
    assert doc["options"]["delay"] == 600
    assert gate.get("192.0.2.0/24", "bounce-#-#@lists.example", "bob@example.com") is None
    gate.attempt("192.0.2.0/24", "bounce-#-#@lists.example", "bob@example.com", now - 120)
    doc = gate.json("greylist", "show", "192.0.2.200", "bounce-7-8@lists.example", "bob@example.com")
    assert doc["outcome"] == "too_early" and doc["entry"]["attempts"] == 1 and doc["entry"]["state"] == "pending"
    assert doc["passes_from"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 120 + 600))
    text = gate.cli("greylist", "show", "192.0.2.200", "bounce-7-8@lists.example", "bob@example.com").stdout
    assert "key:                 192.0.2.0/24 bounce-#-#@lists.example bob@example.com" in text
    assert "decision now:        too_early" in text and "answer now:          451 4.7.1" in text
    assert "stored:              pending, 1 attempt(s)" in text
    # after the delay it passes, and `show` itself records nothing
    gate.attempt("192.0.2.0/24", "bounce-#-#@lists.example", "bob@example.com", now + 600)
    doc = gate.json("greylist", "show", "192.0.2.1", "bounce-9-9@lists.example", "bob@example.com")
    assert doc["outcome"] == "passed_before" and doc["answer"].startswith("pass")
    assert doc["entry"]["attempts"] == 2 and doc["entry"]["state"] == "passed"
    assert gate.json("greylist", "show", "192.0.2.1", "fresh@x.example", "bob@example.com")["outcome"] == "new"
    assert gate.get("192.0.2.0/24", "fresh@x.example", "bob@example.com") is None
    assert gate.get("192.0.2.0/24", "bounce-#-#@lists.example", "bob@example.com").attempts == 2
    # pooled senders are keyed by domain; role accounts are exempt
    assert gate.json("greylist", "show", "203.0.113.9", "x@bigmail.example", "bob@example.com")["key"]["client"] \
        == "domain:bigmail.example"
    doc = gate.json("greylist", "show", "203.0.113.9", "<>", "abuse@example.com")
    assert doc["outcome"] == "exempt" and doc["answer"].startswith("pass")


def test_show_outside_greylisting(gate):
    doc = gate.json("greylist", "show", "192.0.2.7", "a@b.example", "x@other.example")
    assert doc["policy"] == "other" and doc["greylisted"] is False and "no greylist rule" in doc["answer"]
    doc = gate.json("greylist", "show", "192.0.2.7", "a@b.example", "x@nowhere.example")
    assert doc["policy"] is None and doc["answer"].startswith("554 5.7.1")
    assert "554 5.7.1" in gate.cli("greylist", "show", "192.0.2.7", "a@b.example", "x@nowhere.example").stdout
    gate.cli("greylist", "show", "not-an-ip", "a@b.example", "x@example.com", expect=2)
    gate.cli("greylist", "show", "192.0.2.7", "a@b.example", expect=2)


def test_allow_list_and_delete(gate):
    out = gate.cli("greylist", "allow", "--client", "198.51.100.0/22", "--ttl", "1d", "--note", "ticket 7").stdout
    assert out.startswith("allowed client 198.51.100.0/22 until ")
    doc = gate.json("greylist", "allow", "--sender", "Alice+x@Partner.Example")
    assert doc == {"allowed": {"kind": "sender", "value": "alice@partner.example", "created": doc["allowed"]["created"],
                               "expires": None, "note": ""}}
    gate.json("greylist", "allow", "--sender", "@trusted.example")
    gate.json("greylist", "allow", "--triplet", "192.0.2.7", "<>", "bob@example.com", "--ttl", "2h")
    listed = gate.json("greylist", "list", "--allowed")
    assert listed["count"] == 4
    assert {(a["kind"], a["value"]) for a in listed["allowed"]} == {
        ("client", "198.51.100.0/22"), ("sender", "alice@partner.example"), ("sender", "@trusted.example"),
        ("triplet", "192.0.2.0/24 <> bob@example.com")}
    table = gate.cli("greylist", "list", "--allowed").stdout
    assert table.splitlines()[0].split() == ["KIND", "VALUE", "CREATED", "EXPIRES", "NOTE"] and "ticket 7" in table
    # the gate lets them through at once
    assert gate.json("greylist", "show", "198.51.101.5", "x@y.example", "bob@example.com")["outcome"] == "allowed"
    assert gate.json("greylist", "show", "192.0.2.99", "<>", "bob@example.com")["outcome"] == "allowed"
    assert gate.json("greylist", "show", "192.0.2.99", "z@trusted.example", "bob@example.com")["outcome"] == "allowed"
    # delete takes the same selectors, and forgets the triplets too
    now = time.time()
    gate.attempt("198.51.100.0/24", "q@r.example", "bob@example.com", now)
    assert gate.json("greylist", "delete", "--client", "198.51.100.9") == \
        {"deleted": {"triplets": 1, "allow_entries": 1}}
    assert gate.cli("greylist", "delete", "--triplet", "192.0.2.1", "<>", "bob@example.com").stdout.strip() == \
        "deleted 0 triplet(s) and 1 allow entry"
    assert gate.json("greylist", "delete", "--sender", "alice@partner.example")["deleted"]["allow_entries"] == 1
    assert gate.json("greylist", "list", "--allowed")["count"] == 1
    gate.cli("greylist", "allow", expect=2)
    gate.cli("greylist", "allow", "--client", "192.0.2.0/24", "--sender", "a@b.example", expect=2)
    gate.cli("greylist", "allow", "--client", "192.0.2.0/24", "--ttl", "soon", expect=2)
    gate.cli("greylist", "allow", "--sender", "nodomain", expect=2)
    gate.cli("greylist", "delete", expect=2)


def test_show_names_the_most_specific_allow_entry(gate):
    """Of the allow entries covering a triplet, `show` names the one the gate names: the
    triplet, the sender, its @domain, then the client's networks from the longest prefix."""
    show = ("greylist", "show", "192.0.2.7", "Alice@Partner.Example", "bob@example.com")
    steps = [("--client", "192.0.0.0/16"), ("--client", "192.0.2.0/24"), ("--client", "192.0.2.7"),
             ("--sender", "@partner.example"), ("--sender", "alice@partner.example"),
             ("--triplet", "192.0.2.7", "alice@partner.example", "bob@example.com")]
    for i, step in enumerate(steps):  # least specific first: each entry added is the one named
        gate.json("greylist", "allow", *step, "--note", f"step {i}")
        doc = gate.json(*show)
        assert (doc["outcome"], doc["allow"]["note"]) == ("allowed", f"step {i}")
    assert "allow entry:         triplet 192.0.2.0/24 alice@partner.example bob@example.com until deleted" \
        in gate.cli(*show).stdout
    gate.json("greylist", "delete", "--triplet", "192.0.2.7", "alice@partner.example", "bob@example.com")
    assert gate.json(*show)["allow"]["note"] == "step 4"


def test_purge_and_stats(gate):
    now = time.time()
    fill(gate, now)
    gate.run(lambda store: store.add_allow(make_allow("client", "10.0.0.0/8", now - 7200, 3600)))
    assert gate.json("greylist", "purge", "--dry-run") == \
        {"dry_run": True, "would_purge": {"triplets": 1, "allow_entries": 1}}
    doc = gate.json("greylist", "stats")
    assert (doc["pending"], doc["passed"], doc["expired"], doc["auto_whitelisted"]) == (2, 2, 1, 0)
    assert doc["auto_whitelist_after"] == 2 and doc["outcomes"]["new"] == 5 and doc["outcomes"]["passed_now"] == 2
    assert doc["pass_rate"] == pytest.approx(0.4)
    assert doc["retry_delays"]["30m-1h"] == 2 and sum(doc["retry_delays"].values()) == 2
    text = gate.cli("greylist", "stats").stdout
    assert "pass rate (passed / greylisted)" in text and "40.0%" in text and "30m-1h       2" in text
    assert gate.cli("greylist", "purge").stdout.strip() == \
        "purged 1 expired triplet(s) and 1 expired allow entry"
    assert gate.json("greylist", "stats")["expired"] == 0
    # a client with two live passes is auto-whitelisted
    gate.attempt("198.51.100.0/24", "b@c.example", "bob@example.com", now - 1000)
    gate.attempt("198.51.100.0/24", "b@c.example", "bob@example.com", now - 100)
    assert gate.json("greylist", "stats")["auto_whitelisted"] == 1
    assert gate.json("greylist", "show", "198.51.100.3", "new@d.example", "bob@example.com")["outcome"] == "auto"


def test_config_goes_before_or_after(gate):
    a = gate.cli("greylist", "stats", "--json", config_first=True)
    b = gate.cli("greylist", "stats", "--json")
    assert json.loads(a.stdout)["pending"] == json.loads(b.stdout)["pending"] == 0


def test_exit_codes_for_configuration_and_store_failures(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("state: nowhere://x\n")
    done = subprocess.run([sys.executable, "-m", "smtpgate", "greylist", "stats", "-c", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "state" in done.stderr
    down = tmp_path / "down.yaml"
    down.write_text(f"state: {UNREACHABLE_REDIS_URL}?socket_connect_timeout=0.5\n")
    done = subprocess.run([sys.executable, "-m", "smtpgate", "greylist", "list", "-c", str(down)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"Redis {UNREACHABLE_REDIS_URL}" in done.stderr
    assert done.stdout == ""


def test_the_cli_sees_what_a_gate_recorded(gate):
    """The rule and the CLI agree on keys: a triplet the rule greylisted is the one `show` finds."""
    from smtpgate.clock import Clock
    from smtpgate.testing import Harness

    async def through_the_rule():
        h = Harness.from_config(str(gate.config), clock=Clock())
        try:
            return await h.send(sender="SRS0=ab=cd=Sender.Example=alice@fwd.example",
                                recipients=["bob@example.com"], client_ip="192.0.2.44")
        finally:
            await h.aclose()
    assert asyncio.run(through_the_rule()).reply.code == 451
    doc = gate.json("greylist", "show", "192.0.2.45", "alice@sender.example", "bob@example.com")
    assert doc["outcome"] == "too_early" and doc["entry"]["attempts"] == 1
    assert gate.json("greylist", "list", "--pending")["entries"][0]["sender"] == "alice@sender.example"


def test_every_command_as_a_subprocess(gate_subprocess):
    g = gate_subprocess
    now = time.time()
    fill(g, now)
    out = g.cli("greylist", "list", "--pending").stdout
    assert out.splitlines()[0].startswith("CLIENT") and out.splitlines()[-1] == "2 entries"
    assert g.json("greylist", "list", "--passed", "--limit", "1")["count"] == 1
    doc = g.json("greylist", "show", "192.0.2.9", "alice+x@sender.example", "bob@example.com")
    assert doc["outcome"] == "too_early" and doc["answer"].startswith("451 4.7.1 Greylisted")
    assert g.cli("greylist", "allow", "--sender", "@partner.example", config_first=True).stdout.startswith(
        "allowed sender @partner.example")
    assert g.json("greylist", "delete", "--sender", "alice@sender.example")["deleted"]["triplets"] == 1
    assert g.json("greylist", "purge", "--dry-run")["would_purge"]["triplets"] == 1
    assert "purged 1 expired triplet(s)" in g.cli("greylist", "purge").stdout
    assert g.json("greylist", "stats")["pending"] == 1
    g.cli("greylist", "list", "--limit", "x", expect=2)
