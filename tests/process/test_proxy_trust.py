"""PROXY protocol headers are honoured only from trusted peers (``proxy_protocol: {trusted:
[CIDR...]}``; ``true`` is loopback only). Real gate, real sockets from chosen loopback
source addresses."""
from __future__ import annotations

import socket
import subprocess
import sys

from tests.support.gateproc import write_gate_folder
from tests.support.rawsmtp import read_until_closed

HEADER = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25\r\n"
BODY = b"Subject: proxy\r\n\r\nhello\r\n"


def connect(gate, source: str) -> socket.socket:
    return socket.create_connection(gate.address, timeout=10, source_address=(source, 0))


def sent_before_closing(s: socket.socket, timeout: float = 5.0) -> bytes | None:
    """Everything the gate sent before closing, or None if it kept the connection open."""
    closed, got = read_until_closed(s, timeout)
    return got if closed else None


def send_message(s: socket.socket) -> list[bytes]:
    f = s.makefile("rb")
    s.sendall(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    out = []
    while len(out) < 4:
        line = f.readline()
        if line[3:4] != b"-":
            out.append(line)
    s.sendall(BODY + b".\r\nQUIT\r\n")
    out += [f.readline(), f.readline()]
    return out


def test_a_header_from_a_trusted_source_is_honoured(gate_factory, downstream):
    gate = gate_factory(config={"proxy_protocol": {"trusted": ["127.0.0.2", "192.0.2.0/24"]}})
    with connect(gate, "127.0.0.2") as s:
        s.sendall(HEADER)
        assert s.recv(512).startswith(b"220 ")
        codes = [r[:3] for r in send_message(s)]
        assert codes == [b"250", b"250", b"250", b"354", b"250", b"221"]
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == "203.0.113.7"


def test_an_untrusted_peer_is_closed_without_a_greeting_and_logged_once(gate_factory, downstream):
    gate = gate_factory(config={"proxy_protocol": {"trusted": ["127.0.0.2", "192.0.2.0/24"]}})
    with connect(gate, "127.0.0.1") as s:
        s.sendall(HEADER)  # a well-formed header, from the wrong peer
        assert sent_before_closing(s) == b""
    log = gate.wait_for_log("not a trusted PROXY protocol source")
    assert log.count("not a trusted PROXY") == 1 and "client=127.0.0.1" in log
    with connect(gate, "127.0.0.3") as s:  # silent: closed all the same, no greeting
        assert sent_before_closing(s) == b""
    assert downstream.messages == []
    with connect(gate, "127.0.0.2") as s:  # the trusted peer is still served
        s.sendall(HEADER)
        assert s.recv(512).startswith(b"220 ")


def test_true_means_loopback_and_false_reads_no_header(gate_factory):
    gate = gate_factory(config={"proxy_protocol": True})
    with connect(gate, "127.0.0.5") as s:
        s.sendall(HEADER)
        assert s.recv(512).startswith(b"220 ")
    gate = gate_factory(config={"proxy_protocol": False})
    with connect(gate, "127.0.0.1") as s:
        assert s.recv(512).startswith(b"220 ")  # greeted at once: no header expected
        s.sendall(HEADER)
        assert s.recv(512).startswith(b"5")  # a PROXY line is just an unknown command


def test_a_bad_cidr_refuses_to_start_with_file_and_line(tmp_path):
    path, _ = write_gate_folder(tmp_path, port=2, downstream_port=3,
                                config={"proxy_protocol": {"trusted": ["10.0.0.0/8", "10.0.0.0/33"]}})
    done = subprocess.run([sys.executable, "-m", "smtpgate", "serve", "-c", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert (f"{path}:") in done.stderr and "proxy_protocol.trusted[1]: expected an address or network" in done.stderr
    assert "Traceback" not in done.stderr
