"""The greylist in the real gate process (`smtpgate serve`), relaying to the capturing
downstream. The delay (2 s) passes on the gates' own clock (`gate_clock`), not in real time."""
from __future__ import annotations

import json
import smtplib

POLICIES = {"default.yaml": "domains: [example.com]\nrules:\n  - greylist: {delay: 2s}\n"}
MESSAGE = b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: greylist\r\n\r\nhello\r\n"


def send(gate, sender="alice@sender.test", rcpt="bob@example.com"):
    """(code, text) of the RCPT reply; the message is sent when the recipient is accepted."""
    with gate.smtp() as client:
        client.ehlo()
        try:
            client.sendmail(sender, [rcpt], MESSAGE)
        except smtplib.SMTPRecipientsRefused as e:
            code, text = e.recipients[rcpt]
            return code, text.decode()
    return 250, ""


def test_first_attempt_deferred_retry_after_the_delay_delivered(gate_factory, downstream, gate_clock):
    gate = gate_factory(policies=POLICIES, env=gate_clock.env)
    code, text = send(gate)
    assert code == 451 and text.startswith("4.7.1 Greylisted, please try again in 2 seconds (after ")
    assert downstream.messages == []
    pending = json.loads(gate.cli("greylist", "list", "--pending", "--json").stdout)  # while it runs
    assert [(e["client"], e["sender"], e["recipient"]) for e in pending["entries"]] == \
        [("127.0.0.0/24", "alice@sender.test", "bob@example.com")]
    gate_clock.advance(3)
    assert send(gate) == (250, "")
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["bob@example.com"] and b"Subject: greylist" in msg.data
    stats = json.loads(gate.cli("greylist", "stats", "--json").stdout)
    assert (stats["passed"], stats["outcomes"]["passed_now"]) == (1, 1)
    assert sum(stats["retry_delays"].values()) == 1


def test_a_triplet_greylisted_before_a_restart_passes_after_it(state_url, gate_factory, downstream, gate_clock):
    first = gate_factory(policies=POLICIES, config={"state": state_url}, env=gate_clock.env)
    assert send(first)[0] == 451
    assert first.stop() == 0
    second = gate_factory(policies=POLICIES, config={"state": state_url}, env=gate_clock.env)
    gate_clock.advance(3)
    assert send(second) == (250, "")
    assert len(downstream.wait_for_messages(1)) == 1


def test_allowed_counts_reach_the_file_by_the_gates_stop(gate_factory, downstream):
    # An allow-listed decision on SQLite writes nothing; its count is written later, at the
    # latest when the gate stops (SIGTERM: it drains and closes its stores).
    gate = gate_factory(policies=POLICIES, config={"log": {"format": "json"}})
    done = gate.cli("greylist", "allow", "--triplet", "127.0.0.1", "alice@sender.test", "bob@example.com")
    assert done.returncode == 0, done.stderr
    assert send(gate) == (250, "")
    assert send(gate) == (250, "")
    assert len(downstream.wait_for_messages(2)) == 2
    # the transaction's log line names the allow entry that let it through
    gate.wait_for_log("bob@example.com: allowed (triplet ")
    assert gate.stop() == 0
    stats = json.loads(gate.cli("greylist", "stats", "--json").stdout)
    assert stats["outcomes"]["allowed"] == 2
