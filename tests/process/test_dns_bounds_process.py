"""DNS a hostile session can cause on the real gate: bounded by the greeting cap and, past
it, by the session's DNS budget. The lookups are counted at the test DNS server."""
from __future__ import annotations

import socket

import pytest

from tests.support.dnsserver import DnsServer

POLICY = """\
domains: [example.com]
rules:
  - dnsbl:
      lists:
        - {zone: dbl.test, type: domain}
"""


@pytest.fixture
def ns():
    with DnsServer({"dbl.test": {"listed.test": {"A": "127.0.1.2"}}}) as server:
        yield server


def dns_gate(gate_factory, ns, limits=None, dns=None):
    return gate_factory(policies={"default.yaml": POLICY}, config={
        "limits": limits or {},
        "dns": {"nameservers": [f"127.0.0.1:{ns.port}"], "timeout": "1s", **(dns or {})}})


def helo_lookups(ns) -> int:
    return sum(1 for name, _, _ in ns.queries if name.endswith(".dbl.test"))


def replies(f, n: int) -> list[bytes]:
    """Up to n final reply lines; fewer if the gate closes (or resets) the connection."""
    out = []
    while len(out) < n:
        try:
            line = f.readline()
        except ConnectionResetError:
            break
        if not line:
            break
        if line[3:4] != b"-":
            out.append(line)
    return out


def test_the_greeting_cap_ends_an_ehlo_flood_before_its_lookups(gate_factory, ns):
    gate = dns_gate(gate_factory, ns)  # the default cap: 10 greetings
    with socket.create_connection(gate.address, timeout=15) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"220 ")
        try:
            s.sendall(b"".join(b"EHLO h%d.test\r\n" % i for i in range(5000)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = replies(f, 5000)
    codes = [r[:3] for r in got]
    # closing with unread commands makes the kernel send RST, which may cut our reading short
    assert codes == ([b"250"] * 10 + [b"421"])[:len(codes)], codes
    gate.wait_for_log("too many greetings")
    assert helo_lookups(ns) <= 10


def test_with_a_high_greeting_cap_the_session_budget_bounds_the_lookups(gate_factory, ns):
    gate = dns_gate(gate_factory, ns, limits={"max_greetings": 100_000},
                    dns={"max_queries_per_session": 50, "max_inflight_per_session": 4})
    with socket.create_connection(gate.address, timeout=30) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"220 ")
        for batch in range(50):
            s.sendall(b"".join(b"EHLO h%d.test\r\n" % i for i in range(batch * 100, batch * 100 + 100)))
            assert [r[:3] for r in replies(f, 100)] == [b"250"] * 100
        s.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nQUIT\r\n")
        mail, rcpt, quit_ = replies(f, 3)
    assert mail.startswith(b"250") and rcpt.startswith(b"250") and quit_.startswith(b"221")
    assert 0 < helo_lookups(ns) <= 50, helo_lookups(ns)  # 5,000 HELO names, at most 50 lookups
    with socket.create_connection(gate.address, timeout=15) as s, s.makefile("rb") as f:
        assert f.readline().startswith(b"220 ")  # the next session has a budget of its own
        s.sendall(b"EHLO listed.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n")
        *_, rcpt = replies(f, 3)
    assert rcpt.startswith(b"554 5.7.1"), rcpt
