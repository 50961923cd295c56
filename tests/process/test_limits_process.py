"""The limits rule in real gate processes (`smtpgate serve`) sharing one real Redis: two gates
limit together — what one counted, the other refuses past."""
from __future__ import annotations

import json
import smtplib

import pytest

from tests.support.gateproc import wait_until
from tests.support.rawsmtp import RawSMTP
from tests.unit.test_stores import delete_redis_keys, new_prefix, redis_state, require_redis

MESSAGE = b"From: alice@sender.test\r\nTo: bob@example.com\r\nSubject: limits\r\n\r\nhello\r\n"


def policies(options: str) -> dict:
    return {"default.yaml": f"domains: [example.com]\nrules:\n  - limits: {options}\n"}


@pytest.fixture
def shared_state():
    require_redis()
    prefix = new_prefix()
    yield redis_state(prefix)
    delete_redis_keys(prefix)


def send(gate, sender="alice@sender.test") -> tuple[int, str]:
    """(code, text) of the refusal, or (250, "") when the message went through."""
    with gate.smtp() as client:
        client.ehlo()
        try:
            client.sendmail(sender, ["bob@example.com"], MESSAGE)
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def test_two_gates_on_one_redis_share_a_clients_rate(gate_factory, downstream, shared_state):
    pol = policies("{rates: [{per: client, max: 3, within: 1h}]}")
    first = gate_factory(policies=pol, config={"state": shared_state})
    second = gate_factory(policies=pol, config={"state": shared_state})
    assert send(first) == (250, "")
    assert send(first) == (250, "")
    assert send(second) == (250, "")  # the third of three, counted on the other gate
    code, text = send(second)
    assert code == 451 and text.startswith("4.7.1 Too many messages from your address (at most 3 per 1h), "
                                           "try again in ")
    assert send(first)[0] == 451  # and the first gate sees the same count
    assert len(downstream.wait_for_messages(3)) == 3
    shown = json.loads(first.cli("limits", "show", "client:127.0.0.1", "--json").stdout)
    assert [(c["estimate"], c["limit"], c["passes"]) for c in shown["counters"]] == [(3, 3, False)]
    second.cli("limits", "reset", "client:127.0.0.1")
    assert send(second) == (250, "")  # reset by hand: the client starts again, on every gate


def test_two_gates_on_one_redis_share_a_clients_connection_cap(gate_factory, shared_state):
    pol = policies("{connections: 2}")
    first = gate_factory(policies=pol, config={"state": shared_state})
    second = gate_factory(policies=pol, config={"state": shared_state})
    one, two = RawSMTP(first.address), RawSMTP(second.address)
    try:
        assert one.reply().startswith(b"220 ") and two.reply().startswith(b"220 ")
        with RawSMTP(first.address) as third:
            assert third.reply() == b"421 4.7.0 Too many connections from 127.0.0.1, try again later\r\n"
            assert third.f.readline() == b""  # closed at once, not kept until MAIL
        two.cmd("QUIT")
        two.close()

        def a_slot_is_free() -> bool:  # the slot comes back when the session has ended
            with RawSMTP(first.address) as probe:
                if probe.reply().startswith(b"220 "):
                    probe.cmd("QUIT")
                    return True
            return False
        assert wait_until(a_slot_is_free, timeout=10, interval=0.1)
        assert wait_until(lambda: json.loads(first.cli("limits", "show", "connections:127.0.0.1", "--json")
                                             .stdout)["connections"] == 1, timeout=10, interval=0.2)
    finally:
        one.close()
        two.close()


def test_a_gate_stopped_with_open_connections_gives_their_slots_back(gate_factory, shared_state):
    pol = policies("{connections: 2}")
    first = gate_factory(policies=pol, config={"state": shared_state})
    second = gate_factory(policies=pol, config={"state": shared_state})
    clients = [RawSMTP(first.address) for _ in range(2)]
    try:
        assert all(c.reply().startswith(b"220 ") for c in clients)
        with RawSMTP(second.address) as refused:
            assert refused.reply().startswith(b"421 4.7.0")
        assert first.stop() == 0  # SIGTERM: it says 421 to its sessions and closes them
        assert json.loads(second.cli("limits", "show", "connections:127.0.0.1", "--json")
                          .stdout)["connections"] == 0
        with RawSMTP(second.address) as welcome:
            assert welcome.reply().startswith(b"220 ")
    finally:
        for c in clients:
            c.close()
