"""Connection limits across all workers of one gate (smtpgate/smtp/connections.py).

Unit tests for the client key (IPv6 by /64) and the shared table across a real fork; process
tests with a real gate running ``workers: 2`` over IPv4 loopback."""
from __future__ import annotations

import os
import socket

from tests.support.procinfo import children_of
from tests.support.waiting import wait_until
from smtpgate.smtp.connections import ConnectionTable, client_key


def test_ipv6_clients_are_counted_by_their_network():
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == client_key("2001:db8:1:2::1")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("2001:db8:1:2aa::1", 56) == client_key("2001:db8:1:2ff::9", 56) == "2001:db8:1:200::/56"
    assert client_key("2001:db8::1", 128) == "2001:db8::1/128"
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"  # IPv4-mapped: the IPv4 client
    assert client_key("/run/smtpgate.sock") == "/run/smtpgate.sock"


def test_rotating_ipv6_addresses_within_a_64_share_one_count():
    table = ConnectionTable(1)
    for i in range(5):
        table.add(0, client_key(f"2001:db8:0:1::{i + 1:x}"), +1)
    assert table.count(client_key("2001:db8:0:1::ffff")) == 5
    assert table.count(client_key("2001:db8:0:2::1")) == 0


def test_the_table_is_shared_by_forked_workers_and_a_dead_one_is_cleared():
    table = ConnectionTable(3)
    table.add(0, "192.0.2.1", +1)
    pid = os.fork()
    if pid == 0:  # a worker in slot 1
        table.add(1, "192.0.2.1", +1)
        table.add(1, "192.0.2.2", +1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.count("192.0.2.1") == 2 and table.count("192.0.2.2") == 1 and table.total() == 3
    table.clear(1)  # what the supervisor does when that worker died
    assert table.count("192.0.2.1") == 1 and table.count("192.0.2.2") == 0 and table.total() == 1
    table.add(0, "192.0.2.1", -1)
    table.add(0, "192.0.2.1", -1)  # never below zero
    assert table.count("192.0.2.1") == 0 and table.total() == 0


def test_many_clients_are_counted_apart():
    table = ConnectionTable(1)
    for i in range(5000):
        table.add(0, f"10.{i // 256}.{i % 256}.1", +1)
    assert table.total() == 5000
    over = sum(table.count(f"10.{i // 256}.{i % 256}.1") > 1 for i in range(5000))
    assert over < 10  # a collision in all sketch rows only over-counts, and rarely


# --------------------------------------------------------------------------- real gate
def greeted(address) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(address, timeout=10)
    return s, s.recv(512)


def workers_of(pid: int) -> list[int]:
    return sorted(children_of(pid))


def test_per_client_limit_holds_across_two_workers(gate_factory):
    gate = gate_factory(config={"workers": 2, "limits": {"max_connections_per_client": 3}})
    assert wait_until(lambda: len(workers_of(gate.pid)) == 2, 10)
    socks, banners = zip(*(greeted(gate.address) for _ in range(12)))
    try:
        codes = [b[:3] for b in banners]
        assert codes.count(b"220") == 3, codes  # not 3 per worker
        assert all(c == b"421" for c in codes if c != b"220")
        assert b"421 4.7.0 gate.test Too many connections" in banners[-1]
    finally:
        for s in socks:
            s.close()
    # closed connections are released in every worker: three fit again
    def three_fit() -> bool:
        socks2, banners2 = zip(*(greeted(gate.address) for _ in range(3)))
        for s in socks2:
            s.close()
        return all(b.startswith(b"220") for b in banners2)
    assert wait_until(three_fit, 10, interval=0.2)


def test_total_limit_holds_across_two_workers(gate_factory):
    gate = gate_factory(config={"workers": 2, "limits": {"max_connections": 4}})
    assert wait_until(lambda: len(workers_of(gate.pid)) == 2, 10)
    socks, banners = zip(*(greeted(gate.address) for _ in range(10)))
    try:
        assert [b[:3] for b in banners].count(b"220") == 4
    finally:
        for s in socks:
            s.close()


def test_a_killed_workers_connections_are_released(gate_factory):
    gate = gate_factory(config={"workers": 2, "limits": {"max_connections_per_client": 2}})
    assert wait_until(lambda: len(workers_of(gate.pid)) == 2, 10)
    held = [greeted(gate.address) for _ in range(2)]
    assert all(b.startswith(b"220") for _, b in held)
    s, banner = greeted(gate.address)
    s.close()
    assert banner.startswith(b"421")
    old = workers_of(gate.pid)
    for pid in old:
        os.kill(pid, 9)  # SIGKILL: no connection_lost, no chance to count down
    for s, _ in held:
        s.close()
    assert wait_until(lambda: len(set(workers_of(gate.pid)) - set(old)) == 2, 15)

    def two_fit() -> bool:
        try:
            pair = [greeted(gate.address) for _ in range(2)]
        except OSError:
            return False
        for s, _ in pair:
            s.close()
        return all(b.startswith(b"220") for _, b in pair)
    assert wait_until(two_fit, 15, interval=0.2)
    assert gate.is_running()
