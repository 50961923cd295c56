"""Deployment artefacts checked against real tools: the example systemd unit
(``systemd-analyze``), the Dockerfile's health probe run against a real gate (its SMTP
greeting, or ``/healthz`` when ``metrics:`` is served).

Building and running the image is not part of the tests: it takes a container engine and the
base image from Docker Hub.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateproc import free_port, require_tool

REPO = Path(__file__).resolve().parent.parent.parent
UNIT = REPO / "examples" / "systemd" / "smtpgate.service"
DOCKERFILE = REPO / "Dockerfile"
INSTALLED_PATH = "/opt/smtpgate/bin/smtpgate"  # the unit's assumed install place


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# ---------------------------------------------------------------------------- systemd unit
def test_unit_is_a_notify_service_reloaded_by_sighup():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [f"{INSTALLED_PATH} serve -c /etc/smtpgate/gate.yaml"]
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert s["WatchdogSec"] and s["User"] == ["smtpgate"] and s["StateDirectory"] == ["smtpgate"]
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in s["SystemCallFilter"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]


@pytest.fixture
def systemd_analyze() -> str:
    # `make tools` installs it (Debian package systemd): missing under CI=true is a failure.
    return require_tool("systemd-analyze")


@pytest.fixture
def unit_copy(tmp_path) -> Path:
    """The example unit with ExecStart pointing at this checkout's smtpgate: verify checks
    that the command exists."""
    here = Path(sys.executable).parent / "smtpgate"
    assert here.exists(), here
    copy = tmp_path / "smtpgate.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_PATH, str(here)))
    return copy


def test_systemd_analyze_verify_finds_nothing(systemd_analyze, unit_copy):
    run = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys or bad values too: it only prints them.
    about_it = [line for line in (run.stdout + run.stderr).splitlines() if "smtpgate" in line]
    assert run.returncode == 0 and not about_it, run.stdout + run.stderr


def test_systemd_analyze_security_rates_it_ok(systemd_analyze, unit_copy):
    # Exposure 0 (locked down) .. 10 (unsafe); --threshold is the same times ten.
    run = subprocess.run([systemd_analyze, "security", "--offline=yes", "--no-pager",
                          "--threshold=25", str(unit_copy)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert level and float(level.group(1)) <= 2.5, run.stdout


# ---------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_a_user_with_state_and_quarantine_volumes():
    final = dockerfile_instructions()
    final = final[max(i for i, (w, _) in enumerate(final) if w == "FROM"):]  # the last stage
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = [json.loads(rest) for word, rest in final if word == "VOLUME"]
    assert {"/var/lib/smtpgate", "/var/lib/smtpgate/quarantine"} <= set(sum(volumes, []))
    assert any(word == "HEALTHCHECK" for word, _ in final)


def health_probe() -> list[str]:
    [rest] = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    command = json.loads(rest[rest.index("CMD") + 3:])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_dockerfile_health_probe_against_a_real_gate(gate, tmp_path):
    probe = health_probe()
    healthy = subprocess.run(probe, env={"SMTPGATE_HEALTH": f"{gate.host}:{gate.port}"},
                             capture_output=True, text=True, timeout=30)
    assert healthy.returncode == 0, healthy.stderr
    gate.stop()
    sick = subprocess.run(probe, env={"SMTPGATE_HEALTH": f"{gate.host}:{gate.port}"},
                          capture_output=True, text=True, timeout=30)
    assert sick.returncode == 1 and sick.stderr.startswith("unhealthy:"), sick.stderr


def test_dockerfile_health_probe_refuses_a_4xx_greeting(tmp_path):
    """A gate that greets 421 (draining, at its connection limit) is not healthy."""
    import socket
    import threading
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def greet_421() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"421 4.3.2 busy\r\n")
                conn.recv(64)

        t = threading.Thread(target=greet_421, daemon=True)
        t.start()
        sick = subprocess.run(health_probe(), env={"SMTPGATE_HEALTH": f"127.0.0.1:{port}"},
                              capture_output=True, text=True, timeout=30)
        t.join(10)
    assert sick.returncode == 1 and "421" in sick.stderr, sick.stderr


# ---------------------------------------------------------------------------- metrics
def test_dockerfile_health_probe_asks_healthz_when_metrics_are_set(gate_factory, downstream):
    """SMTPGATE_METRICS=HOST:PORT: the probe is GET /healthz (downstream included)."""
    port = free_port()
    gate = gate_factory(config={"workers": 2, "metrics": f"127.0.0.1:{port}"})
    env = {"SMTPGATE_HEALTH": "127.0.0.1:1", "SMTPGATE_METRICS": f"127.0.0.1:{port}"}

    def probe() -> subprocess.CompletedProcess:
        return subprocess.run(health_probe(), env=env, capture_output=True, text=True, timeout=30)

    from tests.support.gateproc import wait_until
    assert wait_until(lambda: probe().returncode == 0, 20), probe().stderr
    downstream.stop()
    assert wait_until(lambda: probe().returncode == 1, 20)
    sick = probe()
    assert sick.stderr.startswith("unhealthy: HTTP Error 503") and "downstream" in sick.stderr, sick.stderr
    assert gate.stop() == 0


def test_serve_says_nothing_about_metrics_when_not_configured(gate_factory):
    gate = gate_factory(config={"workers": 2})
    assert gate.stop() == 0
    assert "metrics" not in gate.log_text()


# ---------------------------------------------------------------------------- backups
GREYLIST_POLICY = "domains: [example.com]\nrules:\n  - greylist: {delay: 10m}\n"


def test_sqlite_backup_of_a_running_gate_as_the_doc_says(gate_factory):
    """docs/operations.md: `sqlite3 state.db ".backup COPY"` while the gate runs (WAL) gives
    a whole, consistent copy."""
    sqlite3 = require_tool("sqlite3")  # `make tools` installs it
    gate = gate_factory(policies={"default.yaml": GREYLIST_POLICY})
    senders = [f"s{n}@sender{n}.test" for n in range(3)]
    for sender in senders:
        with gate.smtp() as c:
            c.ehlo()
            c.mail(sender)
            assert c.rcpt("user@example.com")[0] == 451  # greylisted: a triplet written
    live = gate.folder / "state.db"
    assert Path(f"{live}-wal").exists()  # the gate runs in WAL mode
    copy = gate.folder / "backup.db"
    run = subprocess.run([sqlite3, str(live), f".backup {copy}"], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    check = subprocess.run([sqlite3, str(copy), "PRAGMA integrity_check"], capture_output=True,
                           text=True, timeout=30)
    assert check.stdout.strip() == "ok", check.stdout + check.stderr
    assert not Path(f"{copy}-wal").exists()  # one self-contained file

    def dump(path: Path) -> str:
        return subprocess.run([sqlite3, str(path), ".dump"], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    assert dump(copy) == dump(live)
    assert all(s in dump(copy) for s in senders)
