"""A raw-socket SMTP client for tests that need exact bytes on the wire."""
from __future__ import annotations

import socket
import time


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes (EOF or reset) or ``timeout`` runs out: (closed, the bytes read)."""
    got, deadline = b"", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def connect(gate, source: str):
    """A plain socket to ``gate`` from the loopback address ``source``, and its read file."""
    s = socket.create_connection(gate.address, timeout=10, source_address=(source, 0))
    return s, s.makefile("rb")


def reply(f) -> bytes:
    """One whole reply from ``f`` (its last line)."""
    while True:
        line = f.readline()
        if line[3:4] != b"-":
            return line


class RawSMTP:
    """Send exact bytes; read whole (multi-line) replies back as bytes."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0,
                 source: str | None = None) -> None:
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.port = self.sock.getsockname()[1]
        self.f = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.f.readline()
            assert line, f"connection closed by the gate after {b''.join(lines)!r}"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> bytes:
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def data(self, body: bytes) -> bytes:
        """DATA, then ``body`` (CRLF-terminated, already dot-stuffed), the final dot; the reply."""
        r = self.cmd(b"DATA")
        assert r.startswith(b"354"), r
        self.send(body + b".\r\n")
        return self.reply()

    def closed_within(self, timeout: float) -> bool:
        """True when the gate closes the connection within ``timeout`` (anything it sends first is dropped)."""
        return read_until_closed(self.sock, timeout)[0]

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
