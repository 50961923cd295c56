"""Not an open relay: every address spelling, against the real gate and downstream.

Policies: ``default`` governs ``example.com`` and the subdomains of ``sub.example.com``
(``.sub.example.com``, not ``sub.example.com`` itself); ``other`` governs ``other.test``.
Exact spellings go over a raw socket. What the downstream saw is read per connection: the
gate passes the client's port in XCLIENT PORT=, which ties a downstream session to the
client connection that caused it.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.support.rawsmtp import RawSMTP
from tests.support.downstream import CapturingDownstream
from tests.support.constants import PLUGINS
from tests.support.gateproc import start_gate

POLICIES = {
    "default.yaml": "domains: [example.com, .sub.example.com]\nrules: []\n",
    "other.yaml": "domains: [other.test]\nrules: []\n",
}
MESSAGE = b"From: a@sender.test\r\nSubject: relay test\r\n\r\nhello\r\n"
RELAY_DENIED = re.compile(rb"^55[04] 5\.7\.1 ")

REFUSED = [
    "user%evil.test@example.com",
    "evil.test!user@example.com",
    "user!evil.test@example.com",
    "<@example.com:user@evil.test>",
    "<@evil.test:user@example.com>",
    '"user@evil.test"@example.com',
    '"user%evil.test"@example.com',
    '"evil.test!user"@example.com',
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    "user@127.0.0.1",
    "user@example.com.",
    "user@evil.test",
    "user@EVIL.TEST",
    "user@sub.example.com",          # only subdomains of sub.example.com are governed
    "user@example.com.evil.test",
    "user@evilexample.com",
]
ACCEPTED = [
    "USER@EXAMPLE.COM",
    "MixedCase@Example.Com",
    "a@x.sub.example.com",
    '"john doe"@example.com',
]
POSTMASTER = ["<postmaster>", "<Postmaster>", "postmaster@example.com"]


# ---------------------------------------------------------------------------- helpers
def path(spelling: str) -> bytes:
    """The RCPT argument: spellings already in angle brackets are sent as they are."""
    return (spelling if spelling.startswith("<") else f"<{spelling}>").encode()


class Client(RawSMTP):
    """A raw client that knows its own port (XCLIENT PORT= downstream), past EHLO."""

    def __init__(self, gate, ds: CapturingDownstream | None = None, timeout: float = 10.0) -> None:
        # Loopback reuses a client port still in TIME_WAIT (tcp_tw_reuse): an earlier
        # client's downstream session may carry this port too, so look only at the sessions
        # opened after this connection began (the gate opens one per client: no pool here).
        self.since = ds.mark() if ds is not None else None
        super().__init__(gate.address, timeout)
        assert self.reply().startswith(b"220")
        assert self.cmd(b"EHLO client.test").startswith(b"250")

    def mail(self, sender: bytes = b"<a@sender.test>") -> None:
        r = self.cmd(b"MAIL FROM:" + sender)
        assert r.startswith(b"250 2.1.0"), r

    def rcpt(self, spelling: str) -> bytes:
        return self.cmd(b"RCPT TO:" + path(spelling))

    def data(self, message: bytes = MESSAGE) -> bytes:
        return super().data(message)

    def quit(self) -> None:
        assert self.cmd(b"QUIT").startswith(b"221")
        self.f.close()
        self.sock.close()


def downstream_session(ds: CapturingDownstream, client: Client):
    """The downstream connection the gate opened for this client, once it is closed."""
    found = []

    def done() -> bool:
        found[:] = ds.sessions_from(client.port, client.since)
        return bool(found) and all(s.closed for s in found)

    ds.wait_for(done, 10, f"the downstream session for client port {client.port} to close")
    assert len(found) == 1, [s.xclient for s in found]
    return found[0]


def rcpt_lines(session) -> list[bytes]:
    return [line for line in session.transcript if line[:4].upper() == b"RCPT"]


def messages_of(ds: CapturingDownstream, session):
    return [m for m in ds.messages if m.session == session.index]


@pytest.fixture(scope="module")
def relay_gate(tmp_path_factory):
    """One gate and one downstream for the module (tests tell their sessions apart by port)."""
    ds = CapturingDownstream().start()
    gate = start_gate(tmp_path_factory.mktemp("open-relay") / "gate", downstream_port=ds.port,
                      policies=POLICIES)
    yield gate, ds
    code = gate.stop()
    print(f"--- gate pid {gate.pid} exited {code} ---\n{gate.log_text()[-6000:]}")
    ds.stop()


# ---------------------------------------------------------------------------- refused
@pytest.mark.parametrize("spelling", REFUSED)
def test_relay_spelling_is_refused_and_never_reaches_the_downstream(relay_gate, spelling):
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    refused = c.rcpt(spelling)
    assert RELAY_DENIED.match(refused), f"RCPT TO:{path(spelling)!r} got {refused!r}"
    # The transaction goes on for a governed recipient; only that one reaches the downstream.
    assert c.rcpt("ok@example.com").startswith(b"250"), "a governed recipient after the refusal"
    assert c.data().startswith(b"250 2.0.0")
    c.quit()

    sess = downstream_session(ds, c)
    assert rcpt_lines(sess) == [b"RCPT TO:<ok@example.com>"], sess.transcript
    [msg] = messages_of(ds, sess)
    assert msg.rcpts == ["ok@example.com"]
    assert not [line for line in ds.transcript if line.upper().startswith(b"RCPT TO:" + path(spelling).upper())]


@pytest.mark.parametrize("spelling", REFUSED)
def test_relay_spelling_alone_opens_no_downstream_transaction(relay_gate, spelling):
    """With nothing else accepted, the downstream sees neither MAIL nor RCPT nor DATA."""
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    assert RELAY_DENIED.match(c.rcpt(spelling))
    assert c.cmd(b"DATA")[:1] == b"5"  # no valid recipients: no data phase
    c.quit()
    sess = downstream_session(ds, c)
    verbs = [line.split(b" ")[0].split(b":")[0].upper() for line in sess.transcript]
    assert not {b"MAIL", b"RCPT", b"DATA"} & set(verbs), sess.transcript
    assert messages_of(ds, sess) == []


# ---------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("spelling", ACCEPTED)
def test_governed_spelling_is_accepted_with_local_part_case_kept(relay_gate, spelling):
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    r = c.rcpt(spelling)
    assert r.startswith(b"250 2.1.5"), r
    assert c.data().startswith(b"250 2.0.0")
    c.quit()

    sess = downstream_session(ds, c)
    [msg] = messages_of(ds, sess)
    [arrived] = msg.rcpts
    local, _, domain = spelling.rpartition("@")
    got_local, _, got_domain = arrived.rpartition("@")
    assert got_local == local, f"local part changed: sent {spelling!r}, downstream got {arrived!r}"
    assert got_domain.lower() == domain.lower()
    assert msg.data == MESSAGE


@pytest.mark.parametrize("spelling", POSTMASTER)
def test_postmaster_is_always_accepted(relay_gate, spelling):
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    r = c.rcpt(spelling)
    assert r.startswith(b"250"), r
    assert c.data().startswith(b"250 2.0.0")
    c.quit()
    sess = downstream_session(ds, c)
    [msg] = messages_of(ds, sess)
    assert msg.rcpts == [spelling.strip("<>")]


@pytest.mark.parametrize("spelling", POSTMASTER)
def test_postmaster_skips_rcpt_rules(gate_factory, downstream, spelling):
    """RCPT rules are not run for postmaster: a rule refusing every recipient cannot stop it."""
    gate = gate_factory(policies={"default.yaml": "domains: [example.com]\nrules:\n  - refuse_everyone: {}\n"},
                        plugins=[PLUGINS / "refuse_everyone.py"])
    c = Client(gate)
    c.mail()
    refused = c.rcpt("user@example.com")
    assert refused.startswith(b"5"), refused  # the rule does run for everyone else
    assert c.rcpt(spelling).startswith(b"250")
    assert c.data().startswith(b"250 2.0.0")
    c.quit()
    [msg] = downstream.wait_for_messages(1)
    assert msg.rcpts == [spelling.strip("<>")]


# ---------------------------------------------------------------------------- policy split
def test_policy_split_defers_the_other_policys_recipient(relay_gate):
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    assert c.rcpt("first@example.com").startswith(b"250")
    assert c.rcpt("b@x.sub.example.com").startswith(b"250"), "same policy: same transaction"
    split = c.rcpt("second@other.test")
    assert split.startswith(b"452 4.5.3"), split
    assert c.data().startswith(b"250 2.0.0")
    # The deferred recipient in a transaction of its own.
    c.mail()
    assert c.rcpt("second@other.test").startswith(b"250")
    assert c.data().startswith(b"250 2.0.0")
    c.quit()

    sess = downstream_session(ds, c)
    one, two = messages_of(ds, sess)
    assert one.rcpts == ["first@example.com", "b@x.sub.example.com"]
    assert two.rcpts == ["second@other.test"]
    assert one.data == two.data == MESSAGE
    assert rcpt_lines(sess) == [b"RCPT TO:<first@example.com>", b"RCPT TO:<b@x.sub.example.com>",
                                b"RCPT TO:<second@other.test>"]
    data_at = sess.transcript.index(b"DATA")
    assert sess.transcript.index(b"RCPT TO:<second@other.test>") > data_at


def test_policy_split_the_other_way_round(relay_gate):
    gate, ds = relay_gate
    c = Client(gate, ds)
    c.mail()
    assert c.rcpt("first@other.test").startswith(b"250")
    assert c.rcpt("second@example.com").startswith(b"452 4.5.3")
    assert c.rcpt("postmaster@example.com").startswith(b"452 4.5.3")
    assert c.data().startswith(b"250 2.0.0")
    c.quit()
    sess = downstream_session(ds, c)
    [msg] = messages_of(ds, sess)
    assert msg.rcpts == ["first@other.test"]
