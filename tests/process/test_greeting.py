"""EHLO/HELO arguments (RFC 5321 §4.1.1.1) and what reaches the downstream's XCLIENT.

The real gate relays to the CapturingDownstream. A hostile greeting gets `501 5.5.2` with a
reason and one log line; one the gate accepts reaches the downstream as exactly one
xtext-encoded XCLIENT attribute, so no client can add `LOGIN=`, `DESTADDR=` or any other.
A held message's stored greeting (`quarantine release`) goes through the same encoding.
"""
from __future__ import annotations

import json

import pytest

from tests.support.rawsmtp import RawSMTP
from tests.support.quarantine import cli, hold, write_config

MSG = b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
LONG = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63  # 255 octets

# (what the client sends after "EHLO ", the XCLIENT HELO value the downstream gets or None
# for a 501 5.5.2, the reason in the reply)
GREETINGS = [
    # accepted: domains, sloppy but harmless names, address literals (encoded)
    (b"client.test", "client.test", None),
    (b"localhost", "localhost", None),
    (b"my_host.example", "my_host.example", None),
    (b"192.0.2.1", "192.0.2.1", None),
    (b"host.example.", "host.example.", None),
    (b"[192.0.2.1]", "+5B192.0.2.1+5D", None),
    (b"[IPv6:2001:db8::1]", "+5BIPv6:2001:db8::1+5D", None),
    (LONG.encode(), LONG, None),
    (b"client.test\t", "client.test", None),  # trailing white space is not part of the argument
    # refused: anything that could carry structure downstream, or is no name at all
    (b"[x LOGIN=admin", None, "spaces or control characters"),
    (b"client.test LOGIN=admin", None, "spaces or control characters"),
    (b"x DESTADDR=192.0.2.9 DESTPORT=587", None, "spaces or control characters"),
    (b"[x", None, "not a valid address literal"),
    (b"[x]", None, "not a valid address literal"),
    (b"[UNAVAILABLE]", None, "not a valid address literal"),
    (b"[192.0.2.1]LOGIN=admin", None, "not a valid address literal"),
    (b"[x-tag:LOGIN=admin]", None, "not a valid address literal"),  # only IPv6 is a registered tag
    (b"[1.2.3]", None, "not a valid address literal"),
    (b"LOGIN=admin", None, "not a domain name or address literal"),
    (b"x=y", None, "not a domain name or address literal"),
    (b"a+5Bb", None, "not a domain name or address literal"),
    (b"a]b", None, "not a domain name or address literal"),
    (b"tab\there", None, "spaces or control characters"),
    (b"nul\x00here", None, "spaces or control characters"),
    (b"cr\rhere", None, "spaces or control characters"),
    (b"del\x7fhere", None, "spaces or control characters"),
    ("h\u00e9llo.example".encode(), None, "non-ASCII name"),
    (b"bad\xff\xfeutf8", None, "non-ASCII name"),
    (b"a" * 256, None, "longer than 255 octets"),
    (b"a" * 300, None, "longer than 255 octets"),
    (b"a..b", None, "empty label"),
]


def _xclient_line(downstream, port: int) -> bytes:
    [sess] = [s for s in downstream.sessions
              if any(line.startswith(b"XCLIENT PORT=%d " % port) for line in s.transcript)]
    [line] = [line for line in sess.transcript if line.startswith(b"XCLIENT ")]
    return line


def _relay_one(c: RawSMTP) -> None:
    assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"250")
    assert c.cmd("RCPT TO:<user@example.com>").startswith(b"250")
    assert c.data(MSG).startswith(b"250")


# HELO goes through the same check: a few rows are enough to show it.
CASES = ([("EHLO", *g) for g in GREETINGS]
         + [("HELO", *g) for g in GREETINGS if g[0] in (b"[192.0.2.1]", b"[x LOGIN=admin", b"x=y", b"localhost")])


@pytest.mark.parametrize("verb, name, helo_attr, reason", CASES,
                         ids=[f"{c[0]}-{repr(c[1][:24])[2:-1]}" for c in CASES])
def test_hostile_greeting_is_refused_or_one_encoded_attribute(gate, downstream, verb, name, helo_attr, reason):
    proto = "ESMTP" if verb == "EHLO" else "SMTP"
    with RawSMTP(gate.address) as c:
        assert c.reply().startswith(b"220 ")
        r = c.cmd(verb.encode() + b" " + name)
        if helo_attr is None:
            assert r.startswith(b"501 5.5.2 "), r
            assert reason.encode() in r and b"\r\n" == r[-2:] and r.count(b"\r\n") == 1
            # No greeting took effect: MAIL still needs one, then a good one works.
            assert c.cmd("MAIL FROM:<a@sender.test>").startswith(b"503"), "greeting state changed"
            assert c.cmd(f"{verb} fine.client.test").startswith(b"250")
            helo_attr = "fine.client.test"
        else:
            assert r.startswith(b"250"), r
        _relay_one(c)
        assert c.cmd("QUIT").startswith(b"221")
        port = c.port
    downstream.wait_for_messages(1)
    assert _xclient_line(downstream, port) == (
        f"XCLIENT PORT={port} PROTO={proto} HELO={helo_attr} NAME=[UNAVAILABLE] ADDR=127.0.0.1".encode())
    log = gate.log_text()
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "refused greeting" in line]
    if reason is None:
        assert refusals == []
    else:
        assert len(refusals) == 1 and f"command={verb}" in refusals[0] and reason in refusals[0], refusals


def test_refused_greeting_log_line_is_one_line_in_json(gate_factory, downstream):
    gate = gate_factory(config={"log": {"format": "json", "level": "info"}})
    with RawSMTP(gate.address) as c:
        assert c.reply().startswith(b"220 ")
        assert c.cmd(b"EHLO [x\x00\r LOGIN=admin").startswith(b"501 5.5.2 ")
        assert c.cmd("QUIT").startswith(b"221")
    gate.wait_for_log("refused greeting")
    [line] = [json.loads(x) for x in gate.log_text().splitlines() if "refused greeting" in x]
    assert line["command"] == "EHLO" and line["reason"].startswith("spaces or control")
    assert "\\x00" in line["name"] and "\x00" not in line["name"]


def test_quarantine_release_encodes_a_stored_hostile_helo(tmp_path, capsys, downstream):
    """A message held with a greeting from before the check (or however it got stored) is
    released with that greeting as one encoded attribute, and greeted with the gate's name."""
    config = write_config(tmp_path, downstream.port)
    _, qid, _ = hold(tmp_path / "q", helo="[x LOGIN=admin DESTADDR=1.2.3.4", recipients=["a@example.com"])
    code, out, err = cli(capsys, "quarantine", "release", qid, "--json", "-c", config)
    assert code == 0, err
    [msg] = downstream.wait_for_messages(1)
    sess = downstream.sessions[msg.session]
    [line] = [x for x in sess.transcript if x.startswith(b"XCLIENT ")]
    assert b" HELO=+5Bx+20LOGIN+3Dadmin+20DESTADDR+3D1.2.3.4 " in line, line
    assert b"LOGIN=" not in line and b"DESTADDR=" not in line
    assert msg.xclient["HELO"] == "[x LOGIN=admin DESTADDR=1.2.3.4"
    assert msg.helo == "gate.test"  # the EHLO after XCLIENT: not a name to repeat


def test_a_stored_helo_too_long_once_encoded_is_sent_as_unavailable(tmp_path, capsys, downstream):
    """Postfix refuses an XCLIENT value over 255 characters (and so the whole command): a
    value that only grows past that by its encoding is sent as the gate's [UNAVAILABLE]."""
    config = write_config(tmp_path, downstream.port)
    helo = "[" + "=" * 200 + "]"
    _, qid, _ = hold(tmp_path / "q", helo=helo, recipients=["a@example.com"])
    code, _, err = cli(capsys, "quarantine", "release", qid, "-c", config)
    assert code == 0, err
    [msg] = downstream.wait_for_messages(1)
    [line] = [x for x in downstream.sessions[msg.session].transcript if x.startswith(b"XCLIENT ")]
    assert b" HELO=[UNAVAILABLE] " in line, line


# --- the pieces, without sockets ---------------------------------------------------------------
@pytest.mark.parametrize("value", ["[x LOGIN=admin", "a=b+c", "\x00\t\r\n ", "h\u00e9", "[UNAVAILABLE]",
                                   "\udcff", "plain.name", ""])
def test_xtext_is_one_token_and_decodes_back(value):
    from tests.support.downstream import decode_xtext
    from smtpgate.smtp.relay import xtext
    encoded = xtext(value)
    assert all(33 <= ord(c) <= 126 for c in encoded) and not set(encoded) & set("=[] ")
    decoded = decode_xtext(encoded).encode("latin-1")  # decode_xtext gives one char per octet
    assert decoded == value.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("name", [g[0] for g in GREETINGS])
def test_helo_refusal_agrees_with_the_table(name):
    from smtpgate.mail.addresses import helo_refusal
    [(helo_attr, reason)] = [(g[1], g[2]) for g in GREETINGS if g[0] == name]
    text = name.decode("utf-8", "surrogateescape").strip()
    why = helo_refusal(text)
    assert (why is None) == (helo_attr is not None) and (reason is None or reason in why)


@pytest.mark.parametrize("again", ["ehlo", "helo"])
def test_a_new_greeting_after_a_transaction_reaches_the_downstream_before_the_next_mail(gate, downstream, again):
    # the downstream session stays open between transactions; a second greeting must not
    # leave the next transaction under the first greeting's name and protocol
    with gate.smtp() as c:
        c.ehlo("before.client.test")
        assert c.sendmail("a@sender.test", ["user@example.com"], MSG) == {}
        assert getattr(c, again)("after.client.test")[0] == 250
        if again == "helo":  # smtplib would still send EHLO's parameters
            c.does_esmtp, c.esmtp_features = False, {}
        assert c.sendmail("b@sender.test", ["user@example.com"], MSG) == {}
    first, second = downstream.wait_for_messages(2)
    assert first.xclient["HELO"] == "before.client.test"
    assert second.xclient["HELO"] == "after.client.test" and second.helo == "after.client.test"
    assert second.xclient["PROTO"] == ("ESMTP" if again == "ehlo" else "SMTP")
