"""Operating the gate: PROXY protocol, signals (SIGTERM drain, SIGHUP reload), the CLI
(check-config, try, version, serve's exit codes) and worker processes.

The gate runs as a real subprocess (``gate_factory``) relaying to the capturing downstream;
CLI commands run as ``python -m smtpgate`` subprocesses on config folders written here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import smtpgate
from tests.support.constants import EXAMPLE_PLUGIN, PLUGINS
from tests.support.procinfo import children_of, listening_inodes, proc_stat, socket_inodes
from tests.support.rawsmtp import read_until_closed
from tests.support.gateproc import Plugins, free_port, is_listening, plugin_files
from tests.support.waiting import wait_until

BODY = b"Subject: operations\r\n\r\nhello\r\n"
FROM = "a@sender.test"
RCPT = "user@example.com"
LOCATED = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$")


class Raw:
    """A byte-exact SMTP client on a raw socket."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def reply(self) -> tuple[int, bytes]:
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed mid-reply; got {lines}, pending {self.buf!r}")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return int(lines[0][:3]), b"\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> tuple[int, bytes]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> bytes:
        got, text = self.cmd(line)
        assert got == code, (line, text)
        return text

    def closed_within(self, timeout: float) -> bool:
        """True when the peer closes within timeout (whatever it sends before that is kept in buf)."""
        closed, got = read_until_closed(self.sock, timeout)
        self.buf += got
        return closed

    def close(self) -> None:
        self.sock.close()


def send_one(c: Raw, rcpt: str = RCPT, body: bytes = BODY) -> tuple[int, bytes]:
    c.expect(f"MAIL FROM:<{FROM}>", 250)
    c.expect(f"RCPT TO:<{rcpt}>", 250)
    c.expect("DATA", 354)
    c.send(body + b".\r\n")
    return c.reply()


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SMTPGATE_CONFIG"}


def smtpgate_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------------------- PROXY protocol
def proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
            + socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport))


@pytest.mark.parametrize("header, ip, port, xclient_addr", [
    (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25\r\n", "203.0.113.7", "40000", "203.0.113.7"),
    (proxy_v2("203.0.113.8", "127.0.0.1", 40001, 25), "203.0.113.8", "40001", "203.0.113.8"),
    (b"PROXY TCP6 2001:db8::7 ::1 40002 25\r\n", "2001:db8::7", "40002", "IPV6:2001:db8::7"),
], ids=["v1", "v2", "v1-tcp6"])
def test_proxy_header_sets_the_client_address(gate_factory, downstream, header, ip, port, xclient_addr):
    gate = gate_factory(config={"proxy_protocol": True})
    c = Raw(gate.address)
    c.send(header)
    code, text = c.reply()
    assert code == 220, text
    c.expect("EHLO client.test", 250)
    code, text = send_one(c)
    assert code == 250, text
    c.expect("QUIT", 221)
    c.close()
    [msg] = downstream.wait_for_messages(1)
    assert msg.xclient["ADDR"] == xclient_addr
    assert msg.xclient["PORT"] == port
    log = gate.wait_for_log(f"client={ip} ")
    assert "client=127.0.0.1" not in log


@pytest.mark.parametrize("first", [b"EHLO client.test\r\n", b"PROXY garbage\r\n"], ids=["no-header", "bad-header"])
def test_proxy_protocol_on_refuses_connections_without_a_valid_header(gate_factory, downstream, first):
    gate = gate_factory(config={"proxy_protocol": True})
    c = Raw(gate.address)
    c.send(first)
    assert c.closed_within(5), "the gate kept a connection without a PROXY header open"
    assert b"220" not in c.buf and b"250" not in c.buf, c.buf
    c.close()
    assert gate.is_running()
    c2 = Raw(gate.address)  # a proper one still works
    c2.send(b"PROXY TCP4 203.0.113.9 127.0.0.1 40003 25\r\n")
    assert c2.reply()[0] == 220
    c2.expect("QUIT", 221)
    c2.close()


# ---------------------------------------------------------------------------- SIGTERM
def test_sigterm_finishes_the_transaction_in_flight_and_exits_0(gate_factory, downstream):
    gate = gate_factory()
    first, second = b"Subject: in flight\r\n\r\nfirst half\r\n", b"second half\r\n"
    c = Raw(gate.address, timeout=15)
    assert c.reply()[0] == 220
    c.expect("EHLO client.test", 250)
    c.expect(f"MAIL FROM:<{FROM}>", 250)
    c.expect(f"RCPT TO:<{RCPT}>", 250)
    c.expect("DATA", 354)
    c.send(first)
    gate.send_signal(signal.SIGTERM)
    gate.wait_for_log("stopping")
    assert wait_until(lambda: not is_listening(*gate.address), 5), "still listening after SIGTERM"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(gate.address, timeout=2).close()
    assert gate.is_running()  # waiting for us
    c.send(second + b".\r\n")
    code, text = c.reply()
    [msg] = downstream.wait_for_messages(1)
    assert text.decode() == msg.reply  # the client's 250 is the downstream's 250
    assert code == 250
    assert msg.data == first + second
    assert c.closed_within(10)  # the gate hangs up once nothing is in flight
    c.close()
    assert gate.wait(15) == 0


# ---------------------------------------------------------------------------- SIGHUP
def test_sighup_reloads_policies_and_refuses_a_broken_config(gate_factory, downstream):
    gate = gate_factory()
    c = Raw(gate.address, timeout=10)  # established before both reloads, used after each
    assert c.reply()[0] == 220
    c.expect("EHLO client.test", 250)
    c.expect(f"MAIL FROM:<{FROM}>", 250)
    code, text = c.cmd("RCPT TO:<user@new.test>")
    assert text.startswith(b"554 5.7.1"), text
    c.expect("RSET", 250)

    (gate.folder / "policies" / "default.yaml").write_text("domains: [example.com, new.test]\nrules: []\n")
    mark = len(gate.log_text())
    gate.send_signal(signal.SIGHUP)
    gate.wait_for_log("configuration reloaded", start=mark)
    code, text = send_one(c, "user@new.test")
    assert code == 250, text

    good_config = gate.config_path.read_text()
    gate.config_path.write_text(good_config + "no_such_key: 1\n")
    mark = len(gate.log_text())
    gate.send_signal(signal.SIGHUP)
    log = gate.wait_for_log("reload refused", start=mark)
    assert "no_such_key" in log[mark:] and "configuration reloaded" not in log[mark:]
    assert gate.is_running()
    code, text = send_one(c, "user@new.test")  # the old (reloaded) config still governs
    assert code == 250, text
    c.expect("QUIT", 221)
    c.close()

    with smtplib.SMTP(*gate.address, local_hostname="client.test", timeout=10) as s:  # a new connection too
        s.sendmail(FROM, ["other@new.test"], BODY)
        s.sendmail(FROM, ["other@example.com"], BODY)
    msgs = downstream.wait_for_messages(4)
    assert [m.rcpts for m in msgs] == [["user@new.test"], ["user@new.test"], ["other@new.test"],
                                      ["other@example.com"]]


# ---------------------------------------------------------------------------- check-config
def write_config(folder: Path, *, extra: str = "", policy: str = "domains: [example.com]\nrules: []\n",
                 plugins: Plugins | None = None) -> Path:
    """A gate.yaml whose line numbers the tests know: `extra` starts at line 9."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policies").mkdir(exist_ok=True)
    (folder / "plugins").mkdir(exist_ok=True)
    (folder / "policies" / "default.yaml").write_text(policy)
    for name, text in plugin_files(plugins or {}).items():
        (folder / "plugins" / name).write_text(text)
    q = json.dumps  # a JSON string is a YAML string, whatever the path holds
    lines = [
        "hostname: gate.test",                                                  # 1
        f"listen: [{q(f'127.0.0.1:{free_port()}')}]",                           # 2
        "workers: 1",                                                           # 3
        f"downstream: {{host: 127.0.0.1, port: {free_port()}}}",                # 4
        f"state: {q('sqlite://' + str(folder / 'state.db'))}",                  # 5
        f"quarantine: {q(str(folder / 'quarantine'))}",                         # 6
        f"policies: {q(str(folder / 'policies'))}",                             # 7
        f"plugins: [{q(str(folder / 'plugins'))}]",                             # 8
    ]
    path = folder / "gate.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def located(stderr: str) -> list[tuple[str, int, int, str]]:
    return [(m["file"], int(m["line"]), int(m["col"]), m["msg"])
            for m in map(LOCATED.match, stderr.splitlines()) if m]


BAD_POLICY = """\
domains: [example.com]
rules:
  - subject_words: {action: maybe}
  - no_such_rule: {}
"""
MISSPELT_HOOK = PLUGINS / "misspelt.py"  # a hook name check-config must catch


def test_check_config_accepts_a_fine_config(tmp_path):
    write_config(tmp_path, plugins={"subject_words.py": EXAMPLE_PLUGIN},
                 policy="domains: [example.com]\nrules:\n  - subject_words: {words: [invoice], action: tag}\n")
    r = smtpgate_cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and r.stderr == ""


def test_check_config_reports_every_problem_with_its_place(tmp_path):
    write_config(tmp_path, extra="limits: {command_timeout: soon}\nno_such_key: 1\n", policy=BAD_POLICY,
                 plugins={"subject_words.py": EXAMPLE_PLUGIN, "misspelt.py": MISSPELT_HOOK})
    r = smtpgate_cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    out = r.stdout + r.stderr  # the problems may go to either stream
    where = {(Path(f).name, line, col): msg for f, line, col, msg in located(out)}
    assert "no_such_key" in where[("gate.yaml", 10, 1)]
    [timeout] = [msg for (f, line, _), msg in where.items() if (f, line) == ("gate.yaml", 9)]
    assert "command_timeout" in timeout and "soon" in timeout
    [action] = [msg for (f, line, _), msg in where.items() if (f, line) == ("default.yaml", 3)]
    assert "subject_words" in action and "maybe" in action
    assert "no_such_rule" in where[("default.yaml", 4, 5)]
    [hook] = [line for line in out.splitlines() if "on_rcpt_to" in line]
    assert str(tmp_path / "plugins" / "misspelt.py") in hook


@pytest.mark.parametrize("kind", ["unknown key", "bad option", "unknown rule", "misspelt hook"])
def test_check_config_each_problem_alone_exits_2(tmp_path, kind):
    extra, policy, plugins = "", "domains: [example.com]\nrules: []\n", {"subject_words.py": EXAMPLE_PLUGIN}
    if kind == "unknown key":
        extra = "no_such_key: 1\n"
    elif kind == "bad option":
        policy = "domains: [example.com]\nrules:\n  - subject_words: {action: maybe}\n"
    elif kind == "unknown rule":
        policy = "domains: [example.com]\nrules:\n  - no_such_rule: {}\n"
    else:
        plugins["misspelt.py"] = MISSPELT_HOOK
    write_config(tmp_path, extra=extra, policy=policy, plugins=plugins)
    r = smtpgate_cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    problems = [line for line in out.splitlines() if line and not line.endswith("problem(s)")]
    assert len(problems) == 1, out
    if kind == "misspelt hook":
        assert "misspelt.py" in problems[0] and "on_rcpt_to" in problems[0]
    else:
        [(file, line, _, _)] = located(problems[0])
        assert (Path(file).name, line) == {"unknown key": ("gate.yaml", 9), "bad option": ("default.yaml", 3),
                                           "unknown rule": ("default.yaml", 3)}[kind]


# ---------------------------------------------------------------------------- try
TAGGING = "domains: [example.com]\nrules:\n  - subject_words: {words: [invoice], action: tag}\n"
EML = b"From: a@sender.test\nTo: user@example.com\nSubject: Your invoice\n\nPlease pay.\n"


@pytest.fixture
def try_folder(tmp_path) -> Path:
    write_config(tmp_path, policy=TAGGING, plugins={"subject_words.py": EXAMPLE_PLUGIN})
    (tmp_path / "message.eml").write_bytes(EML)
    return tmp_path


def run_try(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return smtpgate_cli("try", "message.eml", "--from", FROM, *args, "-c", "gate.yaml", cwd=folder)


def test_try_prints_a_readable_table(try_folder):
    r = run_try(try_folder, "--to", RCPT)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0][:3] == ["STAGE", "RULE", "VERDICT"]
    assert ["data", "subject_words"] == rows[1][:2]
    assert "policy: default" in r.stdout
    assert re.search(r"client would get: 250 2\.0\.0", r.stdout)
    assert "--- message as relayed ---" not in r.stdout  # the message only with --show-message
    assert "add X-Subject-Words" in r.stdout  # but every change is named
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.stdout)


def test_try_json(try_folder):
    r = run_try(try_folder, "--to", RCPT, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["reply"].startswith("250 2.0.0")
    assert doc["policy"] == "default"
    assert doc["trace"] and all({"stage", "rule", "action"} <= set(e) for e in doc["trace"])
    assert {"stage": "data", "rule": "subject_words"}.items() <= doc["trace"][0].items()
    assert "message" not in doc


def test_try_relay_denied(try_folder):
    r = run_try(try_folder, "--to", "x@evil.test")
    assert r.returncode == 0, r.stderr
    assert "554 5.7.1" in r.stdout
    assert re.search(r"client would get: 554 5\.7\.1", r.stdout)
    doc = json.loads(run_try(try_folder, "--to", "x@evil.test", "--json").stdout)
    assert doc["reply"].startswith("554 5.7.1")
    assert any(e["stage"] == "rcpt" and e["action"] == "reject" for e in doc["trace"])


def test_try_show_message_has_the_tag_header(try_folder):
    r = run_try(try_folder, "--to", RCPT, "--show-message")
    assert r.returncode == 0, r.stderr
    shown = r.stdout.split("--- message as relayed ---", 1)[1].lstrip("\n")
    assert shown.startswith("X-Subject-Words: invoice\n")  # prepended, the rest as it was
    assert "From: a@sender.test\nTo: user@example.com\nSubject: Your invoice\n\nPlease pay.\n" in shown
    doc = json.loads(run_try(try_folder, "--to", RCPT, "--json", "--show-message").stdout)
    assert doc["message"] == "X-Subject-Words: invoice\r\n" + EML.decode().replace("\n", "\r\n")


# ---------------------------------------------------------------------------- version and exit codes
def test_version(tmp_path):
    r = smtpgate_cli("version", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.strip() == f"smtpgate {smtpgate.__version__}"
    script = Path(sys.executable).with_name("smtpgate")  # the console script, where installed
    if script.exists():
        r2 = subprocess.run([str(script), "version"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=30, check=False)
        assert (r2.returncode, r2.stdout) == (0, r.stdout)


def test_serve_with_a_broken_config_exits_2_naming_the_place(tmp_path):
    write_config(tmp_path, extra="no_such_key: 1\n")
    r = smtpgate_cli("serve", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "gate.yaml:9:" in r.stderr and "no_such_key" in r.stderr


def test_no_command_exits_2(tmp_path):
    r = smtpgate_cli(cwd=tmp_path)
    assert r.returncode == 2
    assert "usage" in r.stderr.lower()


# ---------------------------------------------------------------------------- workers
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_two_workers_share_the_port_and_stop_together(gate_factory, downstream):
    gate = gate_factory(config={"workers": 2})

    def both_listening() -> bool:
        kids = children_of(gate.pid)
        listening = listening_inodes(gate.port)
        return len(kids) == 2 and all(socket_inodes(k) & listening for k in kids)

    assert wait_until(both_listening, 20), f"children: {children_of(gate.pid)}\n{gate.log_text()}"
    workers = children_of(gate.pid)
    assert len(listening_inodes(gate.port)) >= 2  # one SO_REUSEPORT socket per worker
    for i in range(20):
        with smtplib.SMTP(*gate.address, local_hostname="client.test", timeout=10) as s:
            s.sendmail(FROM, [RCPT], b"Subject: n%d\r\n\r\nbody %d\r\n" % (i, i))
    msgs = downstream.wait_for_messages(20, timeout=20)
    assert sorted(m.message()["Subject"] for m in msgs) == sorted(f"n{i}" for i in range(20))
    assert gate.stop() == 0
    for pid, started in workers.items():
        fields = proc_stat(pid)
        assert fields is None or fields[19] != started, f"worker {pid} outlived the supervisor"
