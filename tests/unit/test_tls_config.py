"""gate.yaml's TLS keys: tls.ciphers and downstream.tls_ca, checked by OpenSSL when read."""
from __future__ import annotations

import pytest

from smtpgate.config import load_gate_config
from smtpgate.config import gate as gate_module
from smtpgate.errors import ConfigError


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch, tmp_path):
    monkeypatch.delenv("SMTPGATE_CONFIG", raising=False)
    monkeypatch.setattr(gate_module, "SYSTEM_CONFIG", str(tmp_path / "etc" / "gate.yaml"))
    monkeypatch.chdir(tmp_path)


def write(tmp_path, text: str) -> str:
    (tmp_path / "tls.pem").write_text("not read when the configuration is\n")
    (tmp_path / "tls.key").write_text("not read when the configuration is\n")
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return str(path)


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_gate_config(path)
    return [str(p) for p in e.value.problems]


def test_defaults():
    cfg = load_gate_config(None)
    assert cfg.tls is None and cfg.downstream.tls == "none" and cfg.downstream.tls_ca is None


def test_ciphers_taken_and_checked_by_openssl(tmp_path):
    path = write(tmp_path, "tls:\n  cert: tls.pem\n  key: tls.key\n  ciphers: ECDHE+AESGCM:!aNULL\n")
    assert load_gate_config(path).tls.ciphers == "ECDHE+AESGCM:!aNULL"
    path = write(tmp_path, "tls:\n  cert: tls.pem\n  key: tls.key\n  ciphers: NOPE-CIPHER\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:4:") and "tls.ciphers: OpenSSL selects no cipher" in problem


def test_tls_ca_must_be_a_loadable_ca_file(tmp_path):
    assert load_gate_config(write(tmp_path, "downstream: {tls: required, tls_ca: null}\n")).downstream.tls_ca is None
    path = write(tmp_path, "downstream:\n  tls: required\n  tls_ca: tls.pem\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:3:") and "downstream.tls_ca: not a CA file" in problem
    path = write(tmp_path, "downstream:\n  tls_ca: missing.pem\n")
    [problem] = problems_of(path)
    assert "no such file" in problem
