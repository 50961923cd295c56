"""The senders rule in the real gate (`smtpgate serve`), relaying to the capturing downstream:
a sender walked from new to trusted and from trusted to blocked (the greylist's delay, the
min_time in probation and the block's ttl pass on the gate's own clock, `gate_clock`; the
windows are wide enough that real time spent meanwhile does not count), and concurrent
transactions of one sender through two gate processes on one state."""
from __future__ import annotations

import json
import smtplib
import threading

from tests.support.constants import PLUGINS

SENDER = "Alice@Sender.Test"
KEY = "alice@sender.test"
MESSAGE = b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: senders\r\n\r\nhello\r\n"

POLICIES = {"default.yaml": """
domains: [example.com]
rules:
  - senders:
      states:
        new:
          events:
            delivered: probation
        probation:
          events:
            delivered: {to: trusted, count: 2, within: 1h, min_time: 1s}
        trusted:
          skip: [greylist]
          events:
            rejected: {to: suspect, count: 2, within: 1h}
        suspect:
          events:
            rejected: {to: blocked, count: 2, within: 1h}
        blocked:
          reject: "554 5.7.1 Sender {key} is blocked"
          ttl: 1h
          decay_to: suspect
  - refuse_traps: {}
  - greylist: {delay: 1s}
"""}


def send(gate, rcpt="bob@example.com", sender=SENDER):
    """(code, text) of the reply that decided: MAIL's or RCPT's refusal, else DATA's."""
    with gate.smtp() as client:
        client.ehlo()
        try:
            client.sendmail(sender, [rcpt], MESSAGE)
        except smtplib.SMTPRecipientsRefused as e:
            code, text = e.recipients[rcpt]
            return code, text.decode()
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def show(gate) -> dict:
    done = gate.cli("senders", "show", SENDER, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_sender_walks_from_new_to_trusted_and_from_trusted_to_blocked(gate_factory, downstream, gate_clock):
    gate = gate_factory(policies=POLICIES, plugins=[PLUGINS / "refuse_traps.py"], env=gate_clock.env)
    assert send(gate)[0] == 451  # new: greylisted like anyone
    assert show(gate)["state"] == "new"
    gate_clock.advance(1.1)  # the greylist's delay
    assert send(gate) == (250, "")  # the retry passes: delivered -> probation
    assert show(gate)["state"] == "probation"
    assert send(gate) == (250, "")
    gate_clock.advance(1.1)  # min_time in probation
    assert send(gate) == (250, "")  # 2 deliveries after a second in probation -> trusted
    assert show(gate)["state"] == "trusted"

    assert send(gate, "carol@example.com") == (250, "")  # a new triplet, not greylisted: trusted
    assert send(gate, "trap1@example.com") == (550, "5.1.1 No such user here")
    assert send(gate, "trap2@example.com")[0] == 550  # -> suspect
    assert show(gate)["state"] == "suspect"
    assert send(gate, "dave@example.com")[0] == 451  # suspect: greylisted again
    assert send(gate, "trap1@example.com")[0] == 550
    assert send(gate, "trap2@example.com")[0] == 550  # -> blocked
    assert send(gate) == (554, f"5.7.1 Sender {KEY} is blocked")
    assert send(gate, "postmaster@example.com")[0] == 554  # refused at MAIL: every recipient

    doc = show(gate)
    assert [(h["event"], h["from"], h["to"], h["rule"]) for h in doc["history"]] == [
        ("delivered", "new", "probation", "downstream"),
        ("delivered", "probation", "trusted", "downstream"),
        ("rejected", "trusted", "suspect", "refuse_traps"),
        ("rejected", "suspect", "blocked", "refuse_traps"),
    ]
    assert doc["counts"] == {"greylisted": 2, "greylist_passed": 1, "delivered": 4, "rejected": 4}
    assert [m.rcpts for m in downstream.wait_for_messages(4)] == [["bob@example.com"]] * 3 + [["carol@example.com"]]

    listed = json.loads(gate.cli("senders", "list", "--state", "blocked", "--json").stdout)
    assert [k["key"] for k in listed["keys"]] == [KEY]
    gate_clock.advance(3600 + 60)  # the block's ttl
    assert show(gate)["state"] == "suspect"  # the block decayed (read lazily)
    assert send(gate, "erin@example.com")[0] == 451  # suspect again: greylisted, not refused
    assert "rules=senders:mail:reject,senders:end:continue" in gate.log_text()


CONCURRENT = {"default.yaml": """
domains: [example.com]
rules:
  - senders:
      states:
        new: {events: {delivered: {to: busy, count: 20}}}
        busy: {}
"""}


def test_concurrent_transactions_of_one_sender_through_two_gates_lose_no_event(state_url, gate_factory, downstream):
    gates = [gate_factory(policies=CONCURRENT, config={"state": state_url}) for _ in range(2)]
    results, errors = [], []

    def client(gate, n):
        try:
            for _ in range(n):
                results.append(send(gate))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(gates[i % 2], 5)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [(250, "")] * 40
    downstream.wait_for_messages(40)
    doc = show(gates[0])
    assert doc["counts"] == {"delivered": 40}  # not one lost
    assert doc["state"] == "busy"
    assert [(h["from"], h["to"]) for h in doc["history"]] == [("new", "busy")]  # the guard held once
