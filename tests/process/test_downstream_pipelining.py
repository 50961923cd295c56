"""The real gate pipelines the downstream's XFORWARD IDENT, MAIL and first RCPT (RFC 2920)
when it offers PIPELINING, with the same replies as one command at a time.

The CapturingDownstream's ``hold_at`` answers a command only once the next one has
arrived: a gate that waits for MAIL's reply before sending RCPT times out there (the
downstream timeout is short, so the old behaviour fails fast)."""
from __future__ import annotations

import pytest

from tests.support.rawsmtp import RawSMTP

pytestmark = pytest.mark.timeout(60)

MSG = b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nhello world\r\n"
SHORT = {"downstream": {"timeout": "2s"}}


class Client(RawSMTP):
    def __init__(self, gate) -> None:
        super().__init__((gate.host, gate.port))
        assert self.reply().startswith(b"220 ")
        assert self.cmd("EHLO client.test").startswith(b"250")

    def start(self, rcpt: str = "user@example.com") -> bytes:
        """MAIL (answered by the gate) then RCPT: the reply the downstream's group gave."""
        assert self.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        return self.cmd(f"RCPT TO:<{rcpt}>")


def verbs(lines: list[bytes]) -> list[str]:
    return [line.split(b" ", 1)[0].decode().upper() for line in lines]


def test_xforward_mail_and_first_rcpt_go_in_one_round_trip(gate_factory, downstream_factory):
    ds = downstream_factory(hold_at=["XFORWARD", "MAIL"])
    gate = gate_factory(config=SHORT, downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start().startswith(b"250 2.1.5 "), "the downstream held MAIL: not pipelined"
        assert c.cmd("RCPT TO:<other@example.com>").startswith(b"250 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    [msg] = ds.wait_for_messages(1)
    assert msg.rcpts == ["user@example.com", "other@example.com"]
    assert verbs(ds.ahead) == ["XFORWARD", "MAIL"]  # the second RCPT went alone


def test_refused_mail_is_the_clients_reply_and_the_rcpt_reply_is_dropped(gate_factory,
                                                                          downstream_factory):
    ds = downstream_factory(replies={"MAIL": ["550 5.7.1 sender refused"]})
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start() == b"550 5.7.1 sender refused\r\n"
        assert c.cmd("RSET").startswith(b"250 ")
        assert c.start().startswith(b"250 2.1.5 ")  # the same downstream session goes on
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    ds.wait_for_messages(1)
    [session] = [s for s in ds.sessions if b"DATA" in s.transcript]
    # RCPT went with the refused MAIL (503 need MAIL, dropped); no RSET was needed after it
    tail = verbs(session.transcript)[verbs(session.transcript).index("MAIL") - 1:]
    assert tail[:7] == ["XFORWARD", "MAIL", "RCPT", "XFORWARD", "MAIL", "RCPT", "DATA"]
    assert ds.connections == 2  # the start-up probe, then one session for both transactions


def test_after_a_refused_mail_the_session_goes_one_at_a_time(gate_factory,
                                                               downstream_factory):
    """The RCPT sent ahead of a refused MAIL draws a 503 (need MAIL), which Postfix counts
    as a second error toward its limits on the long-lived session (smtpd_soft_error_limit,
    smtpd_hard_error_limit: then 421): later transactions on it are not pipelined."""
    ds = downstream_factory(replies={"MAIL": ["550 5.7.1 sender refused"]})
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start() == b"550 5.7.1 sender refused\r\n"
        assert c.cmd("RSET").startswith(b"250 ")
        for _ in range(2):
            assert c.start().startswith(b"250 2.1.5 ")
            assert c.data(MSG).startswith(b"250 2.0.0 ")
    assert len(ds.wait_for_messages(2)) == 2
    assert verbs(ds.ahead) == ["XFORWARD", "MAIL"]  # the refused MAIL's group alone
    assert ds.connections == 2  # the start-up probe, then one session for all three


def test_refused_first_rcpt_is_the_clients_reply(gate_factory, downstream_factory):
    ds = downstream_factory(replies={"RCPT:user@example.com": "550 5.1.1 no such user"})
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start() == b"550 5.1.1 no such user\r\n"
        assert c.cmd("RCPT TO:<other@example.com>").startswith(b"250 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    [msg] = ds.wait_for_messages(1)
    assert msg.rcpts == ["other@example.com"]
    assert "MAIL" in verbs(ds.ahead)


def test_without_pipelining_the_commands_go_one_at_a_time(gate_factory, downstream_factory):
    ds = downstream_factory(pipelining=False)
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start().startswith(b"250 2.1.5 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    ds.wait_for_messages(1)
    assert verbs(ds.transcript).count("MAIL") == 1 and ds.ahead == []


def test_after_a_helo_clients_xclient_and_helo_the_commands_go_one_at_a_time(gate_factory,
                                                                              downstream_factory):
    """The session's greeting is then a HELO, whose answer offered no PIPELINING (aiosmtplib
    still holds the gate's first EHLO's keywords)."""
    ds = downstream_factory()
    gate = gate_factory(downstream_port=ds.port)
    c = RawSMTP((gate.host, gate.port))
    with c:
        assert c.reply().startswith(b"220 ")
        assert c.cmd("HELO client.test").startswith(b"250 ")
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250 ")
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    ds.wait_for_messages(1)
    assert "HELO" in verbs(ds.transcript) and ds.ahead == []


@pytest.mark.parametrize("where", ["XFORWARD", "MAIL", "RCPT"])
def test_a_downstream_gone_mid_group_is_451_442_and_the_session_recovers(gate_factory,
                                                                         downstream_factory,
                                                                         where):
    ds = downstream_factory(drop_at=where)
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start().startswith(b"451 4.4.2 ")
        assert c.cmd("RSET").startswith(b"250 ")
        ds.drop_at = None
        assert c.start().startswith(b"250 2.1.5 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    assert len(ds.wait_for_messages(1)) == 1 and ds.dropped == 1


def test_a_downstream_silent_mid_group_times_out_with_451_442(gate_factory, downstream_factory):
    ds = downstream_factory(stall_at="RCPT")
    gate = gate_factory(config={"downstream": {"timeout": "1s"}}, downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start().startswith(b"451 4.4.2 ")
    assert ds.messages == [] and ds.stalled == 1


def test_refused_mail_then_gone_is_still_the_mail_refusal(gate_factory, downstream_factory):
    """One at a time, RCPT never went: the client got MAIL's refusal. Pipelined, the
    downstream may close before RCPT's reply: the client still gets the refusal, and the
    next transaction opens a new session."""
    ds = downstream_factory(replies={"MAIL": ["550 5.7.1 sender refused"]}, drop_at="RCPT")
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start() == b"550 5.7.1 sender refused\r\n"
        assert c.cmd("RSET").startswith(b"250 ")
        ds.drop_at = None
        assert c.start().startswith(b"250 2.1.5 ")
        assert c.data(MSG).startswith(b"250 2.0.0 ")
    assert len(ds.wait_for_messages(1)) == 1


@pytest.mark.parametrize("reply,outcome", [("550 5.7.0 not for you", b"250 2.1.5 "),
                                           ("421 4.3.2 closing", b"451 4.4.2 ")])
def test_xforward_refused_is_ignored_unless_the_downstream_closes(gate_factory,
                                                                   downstream_factory,
                                                                   reply, outcome):
    ds = downstream_factory(replies={"XFORWARD": [reply]})
    gate = gate_factory(downstream_port=ds.port)
    with Client(gate) as c:
        assert c.start().startswith(outcome)


def test_many_pipelined_groups_lose_no_reply(gate_factory, downstream_factory):
    """The capturing downstream writes each reply on its own: the second reply of a group
    often arrives while the first waits to be picked up, which aiosmtplib's own reader
    drops (bench/README.md: the first try at pipelining hung 1 to 3 times in 300)."""
    ds = downstream_factory()
    gate = gate_factory(config=SHORT, downstream_port=ds.port)
    with Client(gate) as c:
        for n in range(300):
            assert c.start().startswith(b"250 2.1.5 "), n
            assert c.data(MSG).startswith(b"250 2.0.0 "), n
    assert len(ds.wait_for_messages(300)) == 300
    assert verbs(ds.ahead).count("MAIL") == 300
