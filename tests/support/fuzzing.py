"""What the property-based tests (test_fuzz_*.py) share: one gate per module, raw sessions
that must end, and the checks every example makes on the gate afterwards.

Hypothesis runs many examples in one test function; starting a process per example would
cost seconds each, so a module-scoped fixture starts one gate (two workers, so a dying
worker shows) and one capturing downstream, and every example talks to them over a fresh
connection. Examples are told apart downstream by XCLIENT PORT (the client's source port):
``ds.mark()`` before an example, ``ds.messages_from(port, since)`` after it.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from hypothesis import HealthCheck, settings

from tests.support.downstream import CapturingDownstream, Mark
from tests.support.gateproc import GateProcess
from tests.support.procinfo import children_of
from tests.support.waiting import wait_until

SESSION_DEADLINE = 10.0  # seconds for one fuzzed session to be answered and closed
TRACEBACK = "Traceback (most recent call last)"
WORKER_DIED = re.compile(r"worker \d+ exited")
REPLY_LINE = re.compile(rb"^[2-5]\d\d(?:[ -].*)?$", re.S)
CRASH = re.compile(rb"^451[ -]4\.3\.0", re.M)  # "local error": a crash behind the reply
BARE_CR = re.compile(rb"\r(?!\n)")
BARE_LF = re.compile(rb"(?<!\r)\n")


class GateBroken(BaseException):
    """The gate hung, died or lost a worker. A BaseException on purpose: hypothesis treats an
    Exception (and pytest's Failed, which pytest-timeout raises) as a failing example and goes
    on shrinking, which against a gate that no longer answers means minutes of timeouts and a
    meaningless "minimal" example. This ends the test at once, with the example in the message.
    """


# Bounded so that a whole file runs in well under a minute on two busy cores; the seed is
# random per run (a failure prints the example and a reproduce blob).
# SMTPGATE_FUZZ_SCALE=20 multiplies every count, for a long hunt by hand.
FUZZ_SCALE = float(os.environ.get("SMTPGATE_FUZZ_SCALE") or 1)


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max(1, round(max_examples * FUZZ_SCALE)), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class FuzzGate:
    """One gate child process plus its downstream, and what was seen of them so far."""

    def __init__(self, gate: GateProcess, ds: CapturingDownstream) -> None:
        self.gate, self.ds = gate, ds
        self.workers = worker_pids(gate.pid)

    def log_mark(self) -> int:
        return len(self.gate.log_text())

    def check_healthy(self, mark: int = 0, example: object = None) -> None:
        """The gate and its workers still run and answer new sessions (else GateBroken), and
        logged no traceback since `mark` (an AssertionError: an ordinary failing example)."""
        log = self.gate.log_text()
        broken = None
        if not self.gate.is_running():
            broken = "the gate exited"
        elif worker_pids(self.gate.pid) != self.workers or WORKER_DIED.search(log[mark:]):
            broken = "a worker died and was replaced"
        else:
            broken = probe(self.gate.address)
        if broken:
            raise GateBroken(f"{broken} after example {example!r}\n--- gate log ---\n{log[mark:][-6000:]}")
        assert TRACEBACK not in log[mark:], f"traceback in the gate's log:\n{log[mark:][-6000:]}"

    def describe_session(self, client_port: int, mark: int, since: Mark) -> str:
        """For a failing example: whether a worker died, the gate's log since ``mark``, and
        what the downstream got for the client with this source port on the sessions opened
        since ``since``."""
        log = self.gate.log_text()
        workers = worker_pids(self.gate.pid) if self.gate.is_running() else set()
        lines = [f"--- gate running: {self.gate.is_running()}; workers then {sorted(self.workers)},"
                 f" now {sorted(workers)} ---", "--- gate log since the session began ---",
                 log[mark:][-6000:] or "(nothing)"]
        ours = self.ds.sessions_from(client_port, since)
        lines.append(f"--- downstream: {len(ours)} session(s) for client port {client_port} ---")
        for sess in ours:
            lines.append(f"session {sess.index} closed={sess.closed} helo={sess.helo!r}")
            lines += [f"  > {line[:200]!r}" for line in sess.transcript[-40:]]
        return "\n".join(lines)

    def settle(self) -> None:
        """Wait until the gate closed every downstream connection (each client's session is
        over), so the messages counted after this are all there will be."""
        self.ds.wait_for(lambda: all(s.closed for s in self.ds.sessions), SESSION_DEADLINE,
                         "the gate to close its downstream connections")


def probe(address: tuple[str, int]) -> str | None:
    """None when a new session gets its greeting, NOOP and QUIT answered; else what failed."""
    try:
        with socket.create_connection(address, timeout=SESSION_DEADLINE) as s:
            f = s.makefile("rb")
            if not f.readline().startswith(b"220 "):
                return "no greeting from a new session"
            s.sendall(b"NOOP\r\nQUIT\r\n")
            if not (f.readline().startswith(b"250 ") and f.readline().startswith(b"221 ")):
                return "NOOP and QUIT not answered"
    except OSError as e:
        return f"a new session failed ({e!r})"
    return None


def worker_pids(pid: int) -> set[int]:
    """The direct children of pid (the gate's workers), from /proc."""
    return set(children_of(pid))


def start_fuzz_gate(start_gate, folder: Path, **kwargs) -> FuzzGate:
    """A started downstream and a two-worker gate relaying to it (stop both with stop_fuzz_gate)."""
    ds = CapturingDownstream().start()
    config = {"workers": 2, **kwargs.pop("config", {})}
    gate = start_gate(folder, downstream_port=ds.port, config=config, **kwargs)
    fg = FuzzGate(gate, ds)
    # the master forks its workers after it listens: wait until both are there
    assert wait_until(lambda: len(worker_pids(gate.pid)) == 2, 20), gate.describe()
    fg.workers = worker_pids(gate.pid)
    return fg


def stop_fuzz_gate(fg: FuzzGate) -> None:
    code = fg.gate.stop()
    print(f"--- fuzz gate pid {fg.gate.pid} exited {code} ---\n{fg.gate.log_text()[-6000:]}")
    fg.ds.stop()


class Session:
    """One raw client connection whose every reply byte is kept."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=SESSION_DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.transcript: list[bytes] = []  # the replies read_reply returned
        self.sent = bytearray()
        self.reset = False  # the connection ended in a reset: replies may have been lost
        self.send_refused: OSError | None = None  # a send met the close (a reset: reads end as at EOF)
        self.deadline = time.monotonic() + SESSION_DEADLINE

    def send(self, data: bytes) -> bool:
        """False when the gate has already closed (after a 221 or 421)."""
        self.sent += data
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError) as e:
            self.send_refused = e
            return False

    def _recv(self) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise GateBroken(self.hung())
        self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:  # the gate closed with our bytes unread (after QUIT)
            self.reset = True
            return b""
        except TimeoutError:
            raise GateBroken(self.hung()) from None

    def hung(self) -> str:
        return (f"the gate neither answered nor closed within {SESSION_DEADLINE}s; "
                f"replies so far: {b''.join(self.transcript) + bytes(self.received)!r}; "
                f"sent: {bytes(self.sent)[-3000:]!r}")

    def read_reply(self) -> bytes:
        """The next complete reply (multi-line joined); b"" if the connection closed first."""
        while True:
            lines = self.received.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] != b"-":
                    end = sum(len(x) + 2 for x in lines[: i + 1])
                    reply = bytes(self.received[:end])
                    del self.received[:end]
                    self.transcript.append(reply)
                    return reply
            chunk = self._recv()
            if not chunk:
                return b""
            self.received += chunk

    def read_until_closed(self) -> bytes:
        """Everything the gate sends until it closes the connection."""
        while True:
            chunk = self._recv()
            if not chunk:
                return bytes(self.received)
            self.received += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reply_lines(data: bytes) -> list[bytes]:
    """Split what the gate sent into lines; every one must be CRLF-terminated."""
    assert data == b"" or data.endswith(b"\r\n"), f"a reply is not CRLF-terminated: {data[-200:]!r}"
    return data.split(b"\r\n")[:-1]


def assert_replies_well_formed(data: bytes) -> None:
    for line in reply_lines(data):
        assert REPLY_LINE.match(line), f"not an SMTP reply line: {line!r} in {data!r}"
    assert not CRASH.search(data), f"a local error (crash) reached the client: {data!r}"


def stuff(data: bytes) -> bytes:
    """SMTP dot stuffing of CRLF-only data."""
    return re.sub(rb"(?m)^\.", b"..", data)


def assert_clean_wire(raw: bytes) -> None:
    """What the downstream got in DATA: CRLF only, dot-stuffed, no early end of data."""
    assert not BARE_CR.search(raw), f"bare CR reached the downstream: {raw!r}"
    assert not BARE_LF.search(raw), f"bare LF reached the downstream: {raw!r}"
    assert raw == b"" or raw.endswith(b"\r\n"), raw
    assert b"." not in raw.split(b"\r\n")[:-1], f"an unstuffed '.' line reached the downstream: {raw!r}"
