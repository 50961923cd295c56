"""spf + dkim + dmarc through the real gate, with real DNS (tests/support/dnsserver.py) and a
real downstream: a signed message arrives with the gate's one Authentication-Results header
on top and otherwise byte for byte; a p=reject failure gets 550 5.7.1 at end of DATA and the
downstream never even sees DATA."""
import smtplib

import authres
import pytest

from tests.support.dkimkeys import ed25519_key, rsa_key, sign
from tests.support.dnsserver import DnsServer

POLICY = """\
domains: [example.com]
rules:
  - fcrdns: {}
  - spf: {on_fail: accept, check_helo: false}
  - dkim: {}
  - dmarc: {}
"""

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: user@example.com\r\nSubject: signed\r\n"
           b"Message-ID: <1@example.org>\r\n\r\nhello\r\n")


@pytest.fixture
def keys(require_tool):
    return {"rsa": rsa_key(require_tool("openssl")), "ed": ed25519_key()}


@pytest.fixture
def ns(keys):
    zones = {"example.org": {"@": {"TXT": "v=spf1 -all"},
                             "_dmarc": {"TXT": "v=DMARC1; p=reject"},
                             "rsa._domainkey": {"TXT": keys["rsa"].record},
                             "ed._domainkey": {"TXT": keys["ed"].record}},
             "0.0.127.in-addr.arpa": {"1": {"PTR": "client1.test."}},
             "client1.test": {"@": {"A": "127.0.0.1"}}}
    with DnsServer(zones) as server:
        yield server


@pytest.fixture
def auth_gate(gate_factory, ns):
    return gate_factory(policies={"default.yaml": POLICY},
                        config={"dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}})


def test_signed_message_gets_one_header_and_is_otherwise_unchanged(auth_gate, downstream, keys):
    signed = sign(sign(MESSAGE, keys["rsa"], "example.org", "rsa"), keys["ed"], "example.org", "ed")
    with smtplib.SMTP(auth_gate.host, auth_gate.port, timeout=15) as c:
        assert c.sendmail("bounce@example.org", ["user@example.com"], signed) == {}
    [got] = downstream.wait_for_messages(1)
    field, _, rest = got.data.partition(b"\r\n")
    assert rest == signed
    header = authres.all_features().parse(field.decode())
    assert header.authserv_id == "gate.test"
    assert [(r.method, r.result) for r in header.results] == [
        ("iprev", "pass"), ("spf", "fail"), ("dkim", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert [r.header_s for r in header.results if r.method == "dkim"] == ["ed", "rsa"]
    assert header.results[-1].header_from == "example.org"


def test_p_reject_refuses_at_end_of_data_and_downstream_never_gets_it(auth_gate, downstream, keys):
    forged = sign(MESSAGE, keys["rsa"], "example.org", "rsa").replace(b"hello", b"pay me")
    with smtplib.SMTP(auth_gate.host, auth_gate.port, timeout=15) as c:
        c.ehlo()
        assert c.mail("bounce@example.org")[0] == 250
        assert c.rcpt("user@example.com")[0] == 250
        code, text = c.data(forged)
        assert (code, text.split()[0]) == (550, b"5.7.1")
        assert b"DMARC" in text
        assert c.noop()[0] == 250  # the session goes on
    downstream.wait_for_command("RSET")
    assert downstream.messages == []
    assert not any(line.upper().startswith(b"DATA") for line in downstream.transcript)


def test_forged_header_with_the_gates_id_is_replaced_by_the_gates_own(auth_gate, downstream, keys):
    forged = b"Authentication-Results: gate.test; dmarc=pass header.from=example.org\r\n" + MESSAGE
    signed = sign(forged, keys["ed"], "example.org", "ed", headers=("From", "Subject"))
    with smtplib.SMTP(auth_gate.host, auth_gate.port, timeout=15) as c:
        assert c.sendmail("bounce@example.org", ["user@example.com"], signed) == {}
    [got] = downstream.wait_for_messages(1)
    fields = [f for f in got.data.split(b"\r\n\r\n")[0].split(b"\r\n") if f.startswith(b"Authentication-Results")]
    assert len(fields) == 1
    assert authres.all_features().parse(fields[0].decode()).results[-1].result == "pass"


def test_authserv_id_names_the_header_and_the_forgeries_removed(gate_factory, ns, downstream, keys):
    # gate.yaml authserv_id: one id for all the ADMD's MX hosts; fields claiming it are
    # forged, while the hostname is a name like any other
    gate = gate_factory(policies={"default.yaml": POLICY},
                        config={"authserv_id": "example.com",
                                "dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}})
    forged = (b"Authentication-Results: EXAMPLE.com; dmarc=pass header.from=example.org\r\n"
              b"Authentication-Results: gate.test; spf=pass\r\n" + MESSAGE)
    signed = sign(forged, keys["ed"], "example.org", "ed", headers=("From", "Subject"))
    with smtplib.SMTP(gate.host, gate.port, timeout=15) as c:
        assert c.sendmail("bounce@example.org", ["user@example.com"], signed) == {}
    [got] = downstream.wait_for_messages(1)
    fields = [f for f in got.data.split(b"\r\n\r\n")[0].split(b"\r\n") if f.startswith(b"Authentication-Results")]
    assert [authres.all_features().parse(f.decode()).authserv_id for f in fields] == ["example.com", "gate.test"]
    assert authres.all_features().parse(fields[0].decode()).results[-1].result == "pass"
