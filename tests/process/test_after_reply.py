"""The work after the client's reply, in the real gate: on_end hooks (here the senders
rule's store write, behind a hook the test holds, tests/data/plugins/hold_end.py) and the
transaction's log line run once the reply is written. The reply and QUIT's 221 do not wait
for them; the session's next command, the connection's close and a graceful stop do."""
from __future__ import annotations

import json
import signal
import smtplib
import socket
from contextlib import closing

import pytest

from tests.support.constants import LOOPBACK, PLUGINS
from tests.support.rawsmtp import read_until_closed

SENDER = "alice@sender.test"
HOLD = b"Subject: hold\r\n\r\nhello\r\n"
POLICIES = {"default.yaml": """
domains: [example.com]
rules:
  - hold_end: {}
  - senders:
      states:
        new: {events: {delivered: seen}}
        seen: {reject: "554 5.7.1 Sender {key} seen before"}
"""}
WAIT = 10.0  # seconds for any one event


@pytest.fixture
def hold():
    """The listener hold_end connects to: accept() returns when a held on_end started."""
    with closing(socket.create_server((LOOPBACK, 0))) as server:
        server.settimeout(WAIT)
        yield server


def held_gate(gate_factory, hold):
    return gate_factory(policies=POLICIES, plugins=[PLUGINS / "hold_end.py"],
                        env={"HOLD_END_PORT": str(hold.getsockname()[1])})


def sent_while_held(gate, hold) -> tuple[smtplib.SMTP, socket.socket]:
    """A message delivered (250) while its on_end is held: the client, the held hook."""
    client = smtplib.SMTP(gate.host, gate.port, local_hostname="client.test", timeout=WAIT)
    client.ehlo()
    assert client.sendmail(SENDER, ["bob@example.com"], HOLD) == {}  # the 250 came first
    hooked, _ = hold.accept()
    return client, hooked


def senders_show(gate) -> dict:
    done = gate.cli("senders", "show", SENDER, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(60)
def test_quit_is_answered_at_once_and_the_close_waits_for_the_end_hooks(gate_factory, downstream, hold):
    gate = held_gate(gate_factory, hold)
    client, hooked = sent_while_held(gate, hold)
    with closing(client), closing(hooked):
        client.putcmd("quit")
        assert client.getreply()[0] == 221  # while the hook is still held
        hooked.sendall(b"x")
        closed, _ = read_until_closed(client.sock, WAIT)  # the gate closes once the hooks ran
        assert closed
    [line] = [x for x in gate.log_text().splitlines() if "transaction tx=" in x]
    assert "hold_end:end:continue" in line and "senders:end:continue" in line, line
    assert senders_show(gate)["state"] == "seen"


@pytest.mark.timeout(60)
def test_the_next_mail_on_the_connection_sees_the_previous_event(gate_factory, downstream, hold):
    gate = held_gate(gate_factory, hold)
    client, hooked = sent_while_held(gate, hold)
    with closing(client), closing(hooked):
        client.putcmd("mail", f"FROM:<{SENDER}>")  # sent while the hook (before senders') is held
        hooked.sendall(b"x")
        code, text = client.getreply()
        assert (code, text) == (554, f"5.7.1 Sender {SENDER} seen before".encode())
        client.quit()
    assert [m.rcpts for m in downstream.messages] == [["bob@example.com"]]


@pytest.mark.timeout(60)
def test_a_graceful_stop_right_after_a_message_waits_for_its_end_hooks(gate_factory, downstream, hold):
    gate = held_gate(gate_factory, hold)
    client, hooked = sent_while_held(gate, hold)
    with closing(client), closing(hooked):
        gate.send_signal(signal.SIGTERM)
        gate.wait_for_log("stopping: no new connections", timeout=WAIT)
        hooked.sendall(b"x")
        assert gate.wait() == 0
    assert senders_show(gate)["counts"] == {"delivered": 1}  # the event reached the store
    assert "senders:end:continue" in gate.log_text()
