"""`smtpgate limits list|show|reset` on a gate.yaml in tmp_path, on both backends, and the
`smtpgate.commands` entry points that bring the command in. The counters are filled through
the store at the real time (the CLI's clock). Most calls run `main(argv)` in this process;
one runs as a subprocess, as a user does."""
from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

from smtpgate.cli import main as cli_main
from smtpgate.stores import open_limits_store

from tests.support.cligate import CliGate

POLICY = """domains: [example.com]
rules:
  - limits:
      connections: 3
      rates:
        - {per: client, max: 5, within: 1h}
        - {per: client_net, max: 50, within: 1d}
        - {per: sender, max: 1, within: 10m}
"""


class Gate(CliGate):
    def __init__(self, folder, state):
        super().__init__(folder, state, {"default": POLICY})

    def cli(self, *args, expect=0, subprocess_=False):
        return self.run_cli(["limits", *args, "-c", str(self.config)], expect, subprocess_)

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def fill(self):
        """What a gate would have counted: 2 messages from one client, one sender each."""
        async def go():
            store = open_limits_store(self.state)
            now = time.time()
            try:
                for sender in ("alice@sender.test", "bob@sender.test"):
                    await store.hit([("client", "192.0.2.1", 3600.0, 5, True),
                                     ("client_net", "192.0.2.0/24", 86400.0, 50, True),
                                     ("sender", sender, 600.0, 1, True)], now)
                for n in range(2):
                    await store.connect("192.0.2.1", f"gate:{n}", 3, now, 3600)
            finally:
                await store.close()
        asyncio.run(go())


@pytest.fixture
def gate(state_url, tmp_path):
    return Gate(tmp_path, state_url)


def test_list_shows_every_counter_with_its_limit(gate):
    gate.fill()
    text = gate.cli("list").stdout
    assert text.splitlines()[0].split() == ["KIND", "VALUE", "WINDOW", "NOW", "LIMIT"]
    assert ["client", "192.0.2.1", "1h", "2", "5"] in [line.split() for line in text.splitlines()]
    assert ["connections", "192.0.2.1", "-", "2", "3"] in [line.split() for line in text.splitlines()]
    doc = gate.json("list")
    assert sorted((c["kind"], c["value"], c["estimate"], c["limit"]) for c in doc["counters"]) == [
        ("client", "192.0.2.1", 2, 5), ("client_net", "192.0.2.0/24", 2, 50),
        ("sender", "alice@sender.test", 1, 1), ("sender", "bob@sender.test", 1, 1)]
    assert doc["connections"] == [{"client": "192.0.2.1", "count": 2}]
    only = gate.json("list", "--key", "sender", "--limit", "1")
    assert [c["kind"] for c in only["counters"]] == ["sender"] and only["connections"] == []
    assert gate.json("list", "--key", "connections")["counters"] == []


def test_show_normalises_the_key_and_says_whether_the_next_one_passes(gate):
    gate.fill()
    doc = gate.json("show", "client_net:192.0.2.77")
    assert doc["key"] == "client_net:192.0.2.0/24"
    [c] = doc["counters"]
    assert (c["estimate"], c["limit"], c["passes"], c["window"]) == (2, 50, True, 86400.0)
    doc = gate.json("show", "sender:Alice+list@Sender.TEST")
    assert doc["key"] == "sender:alice@sender.test" and doc["counters"][0]["passes"] is False
    assert "limit 1: refused" in gate.cli("show", "sender:alice@sender.test").stdout
    assert gate.json("show", "connections:192.0.2.1") == {"key": "connections:192.0.2.1", "connections": 2,
                                                          "limit": 3}
    assert gate.cli("show", "recipient:nobody@example.com").stdout.strip() == \
        "recipient:nobody@example.com: no counters"


def test_reset_forgets_one_key_in_every_window(gate):
    gate.fill()
    assert gate.json("reset", "sender:alice@sender.test") == {"key": "sender:alice@sender.test", "dropped": 1}
    assert gate.cli("reset", "connections:192.0.2.1").stdout.strip() == \
        "connections:192.0.2.1: 2 connections dropped"
    doc = gate.json("list")
    assert sorted(c["value"] for c in doc["counters"]) == ["192.0.2.0/24", "192.0.2.1", "bob@sender.test"]
    assert doc["connections"] == []


@pytest.mark.parametrize("key", ["alice@sender.test", "helo:x", "sender:", "sender:<>"])
def test_a_bad_key_is_a_usage_error(gate, key):
    err = gate.cli("show", key, expect=2).stderr
    assert err.startswith("smtpgate limits show: ")


def test_as_a_user_runs_it_the_installed_entry_point(tmp_path):
    gate = Gate(tmp_path, f"sqlite://{tmp_path / 'state.db'}")
    gate.fill()
    done = gate.cli("show", "client:192.0.2.1", "--json", subprocess_=True)
    assert json.loads(done.stdout)["counters"][0]["estimate"] == 2
    assert "limits" in [ep.name for ep in importlib.metadata.entry_points(group="smtpgate.commands")]


# --- the smtpgate.commands mechanism, as a third-party package uses it -----------------------

def hello_add_parser(sub, common):
    p = sub.add_parser("hello", parents=[common], help="say hello")
    p.add_argument("name")

    def handler(args, context):
        print(f"hello {args.name}; rules in the default policy: "
              f"{[r.name for r in context.runtime().policies.session_policy.rules]}")
        return 3
    return handler


def broken_add_parser(sub, common):
    raise RuntimeError("oops")


def test_a_third_party_command_is_added_and_a_broken_one_reported(gate, monkeypatch):
    eps = [importlib.metadata.EntryPoint("hello", f"{__name__}:hello_add_parser", "smtpgate.commands"),
           importlib.metadata.EntryPoint("broken", f"{__name__}:broken_add_parser", "smtpgate.commands")]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(cli_main.importlib.metadata, "entry_points",
                        lambda group: eps if group == "smtpgate.commands" else real(group=group))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main.main(["hello", "world", "-c", str(gate.config)])
    assert code == 3, err.getvalue()
    assert out.getvalue() == "hello world; rules in the default policy: ['limits']\n"
    assert "command 'broken' (" in err.getvalue() and "RuntimeError: oops" in err.getvalue()
