"""The real gate process with the DNS rules, asking the test DNS server on loopback.

Clients connect from different loopback addresses (127.0.0.1, .2, .3), so one gate sees a
listed client, an unlisted one and one whose lookups time out."""
import smtplib
import time

import pytest

from tests.support.dnsserver import DnsServer

ZONES = {
    "bl.test": {"2.0.0.127": {"A": "127.0.0.2"}},
    "dbl.test": {"spam.test": {"A": "127.0.1.2"}},
    "0.0.127.in-addr.arpa": {"1": {"PTR": "client1.test."}, "2": {"PTR": "client2.test."}},
    "client1.test": {"@": {"A": "127.0.0.1"}},
    "client2.test": {"@": {"A": "127.0.0.2"}},
    "good.test": {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}},
    "bad.test": {"@": {"TXT": "v=spf1 -all"}},
    "spam.test": {},
}

POLICY = """\
domains: [example.com]
rules:
  - fcrdns: {}
  - spf: {header: true}
  - dnsbl:
      check_private: true
      lists:
        - {zone: bl.test, answers: [127.0.0.2-127.0.0.11]}
        - {zone: dbl.test, type: domain}
"""

MESSAGE = b"Subject: dns test\r\nFrom: a@good.test\r\n\r\nhello\r\n"


@pytest.fixture
def ns():
    server = DnsServer(ZONES).start()
    server.timeout_names.add("3.0.0.127.bl.test")
    yield server
    server.stop()


@pytest.fixture
def dns_gate(gate_factory, ns):
    return gate_factory(policies={"default.yaml": POLICY},
                        config={"dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s"}})


def client(gate, source: str, helo: str = "client1.test") -> smtplib.SMTP:
    return smtplib.SMTP(gate.host, gate.port, local_hostname=helo, timeout=15,
                        source_address=(source, 0))


def test_unlisted_client_is_delivered_with_its_verified_name(dns_gate, downstream, ns):
    with client(dns_gate, "127.0.0.1") as c:
        c.ehlo()
        assert c.mail("a@good.test")[0] == 250
        assert c.rcpt("user@example.com")[0] == 250
        assert c.data(MESSAGE)[0] == 250
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient.get("NAME") == "client1.test"  # the FCrDNS name, not [UNAVAILABLE]
    first, _, rest = msg.data.partition(b"\r\n")
    # the gate's one header: fcrdns's iprev rides along with what spf's `header: true` asked for
    assert first == (b"Authentication-Results: gate.test; iprev=pass (client1.test) policy.iprev=127.0.0.1; "
                     b"spf=pass smtp.mailfrom=a@good.test; spf=none smtp.helo=client1.test")
    assert rest == MESSAGE
    assert ns.count("1.0.0.127.bl.test") == 1


def test_listed_client_gets_554_naming_the_list(dns_gate, downstream):
    with client(dns_gate, "127.0.0.2", helo="client2.test") as c:
        c.ehlo()
        assert c.mail("a@good.test")[0] == 250
        code, text = c.rcpt("user@example.com")
        assert code == 554
        assert text.decode() == "5.7.1 Service unavailable; client host [127.0.0.2] blocked using bl.test"
        assert c.rcpt("postmaster@example.com")[0] == 250  # postmaster still reachable
    assert downstream.messages == []


def test_listed_sender_domain_and_spf_fail(dns_gate, downstream):
    with client(dns_gate, "127.0.0.1") as c:
        c.ehlo()
        assert c.mail("x@spam.test")[0] == 250
        code, text = c.rcpt("user@example.com")
        assert (code, text.decode()) == (554, "5.7.1 Service unavailable; sender domain spam.test "
                                              "blocked using dbl.test")
        c.rset()
        assert c.mail("x@bad.test")[0] == 250
        code, text = c.rcpt("user@example.com")
        assert code == 550 and text.decode().startswith("5.7.23 SPF of bad.test")


def test_dns_timeouts_do_not_stall_the_client(dns_gate, downstream, ns):
    started = time.monotonic()
    with client(dns_gate, "127.0.0.3") as c:  # its block-list lookup is never answered
        c.ehlo()
        assert c.mail("a@good.test")[0] == 250
        assert c.rcpt("user@example.com")[0] == 250  # on_dns_error: accept (the default)
        assert c.data(MESSAGE)[0] == 250
    elapsed = time.monotonic() - started
    assert elapsed < 6  # timeout 1s x 2 attempts, well inside the session budget
    assert ns.count("3.0.0.127.bl.test") >= 1
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient.get("NAME") == "[UNAVAILABLE]"  # no PTR for 127.0.0.3


def test_check_config_reports_bad_dnsbl_options(gate_factory, ns):
    gate = gate_factory(policies={"default.yaml": POLICY})
    bad = POLICY.replace("answers: [127.0.0.2-127.0.0.11]", "answers: [127.0.0.9-127.0.0.2]")
    (gate.folder / "policies" / "default.yaml").write_text(bad)
    out = gate.cli("check-config")
    assert out.returncode == 2
    text = out.stdout.decode() + out.stderr.decode()
    assert "default.yaml:" in text and "lists" in text and "127.0.0.9-127.0.0.2" in text
