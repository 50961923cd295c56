"""Non-ASCII addresses through the real gate (RFC 6531): without the SMTPUTF8 parameter on
MAIL they get `553 5.6.7` at MAIL (sender) and at RCPT (recipient), one log line each and no
traceback, and the session goes on; with it, they are relayed as sent."""
from __future__ import annotations

import json

import pytest

from tests.support.rawsmtp import RawSMTP

MSG = "From: j\u00fcrgen@sender.test\r\nTo: user@example.com\r\nSubject: hi\r\n\r\nhello\r\n".encode()


def session(gate) -> RawSMTP:
    c = RawSMTP(gate.address)
    assert c.reply().startswith(b"220 ")
    ehlo = c.cmd("EHLO client.test")
    assert b"250-SMTPUTF8" in ehlo or b"250 SMTPUTF8" in ehlo, ehlo
    return c


def refusals(gate) -> list[str]:
    return [line for line in gate.log_text().splitlines() if "refused non-ASCII address" in line]


def test_non_ascii_sender_without_smtputf8_is_553_at_mail(gate, downstream):
    with session(gate) as c:
        r = c.cmd("MAIL FROM:<j\u00fcrgen@sender.test>")
        assert r == b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"503")  # no transaction began
        # the session goes on
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250")
        assert c.data(MSG).startswith(b"250")
        assert c.cmd("QUIT").startswith(b"221")
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == "a@sender.test"
    gate.wait_for_log("transaction tx=")
    [line] = refusals(gate)
    assert "command=MAIL" in line and "553 5.6.7" in line
    assert "Traceback" not in gate.log_text()


@pytest.mark.parametrize("rcpt", ["j\u00fcrgen@example.com", "user@ex\u00e4mple.com"])
def test_non_ascii_recipient_without_smtputf8_is_553_at_rcpt(gate, downstream, rcpt):
    with session(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
        assert c.cmd(f"RCPT TO:<{rcpt}>") == b"553 5.6.7 Non-ASCII recipient address requires SMTPUTF8\r\n"
        assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250")
        assert c.data(MSG).startswith(b"250")
        assert c.cmd("QUIT").startswith(b"221")
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == ["user@example.com"]
    assert not any(rcpt.encode() in line for line in downstream.transcript)
    gate.wait_for_log("transaction tx=")
    [line] = refusals(gate)
    assert "command=RCPT" in line and "553 5.6.7" in line
    log = gate.log_text()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log and "\"451 " not in log  # a reply, not a transaction id


def test_non_ascii_addresses_with_smtputf8_are_relayed_as_sent(gate, downstream):
    with session(gate) as c:
        assert c.cmd("MAIL FROM:<j\u00fcrgen@sender.test> SMTPUTF8").startswith(b"250")
        assert c.cmd("RCPT TO:<\u00e5sa@example.com>").startswith(b"250")
        assert c.data(MSG).startswith(b"250")
        assert c.cmd("QUIT").startswith(b"221")
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == "j\u00fcrgen@sender.test" and "SMTPUTF8" in msg.mail_params
    assert msg.rcpts == ["\u00e5sa@example.com"]
    assert msg.data == MSG
    assert refusals(gate) == [] and "Traceback" not in gate.log_text()


def test_non_ascii_size_digits_are_not_a_size(gate):
    with session(gate) as c:
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=\u0661\u0662").startswith(b"501 5.5.4")
        assert c.cmd("QUIT").startswith(b"221")
    assert "Traceback" not in gate.log_text()


def test_refusal_log_line_is_json_with_the_address_escaped(gate_factory, downstream):
    gate = gate_factory(config={"log": {"format": "json", "level": "info"}})
    with session(gate) as c:
        assert c.cmd("MAIL FROM:<j\u00fcrgen@sender.test>").startswith(b"553 5.6.7")
        assert c.cmd("QUIT").startswith(b"221")
    gate.wait_for_log("refused non-ASCII address")
    [line] = [json.loads(x) for x in gate.log_text().splitlines() if "refused non-ASCII" in x]
    assert line["command"] == "MAIL" and line["address"] == ascii("j\u00fcrgen@sender.test")
