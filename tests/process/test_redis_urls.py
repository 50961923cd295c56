"""Redis state URLs: ``redis://``, ``rediss://`` (TLS) and ``redis+sentinel://``, read by
``smtpgate/stores/redis_url.py``; a bad one is a ``check-config`` error with file and line;
a real TLS Redis (``redis-server --tls-port``, a certificate the test makes) serves a real gate,
and refuses one that does not trust its certificate."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateproc import free_port, require_tool, stop_pid, wait_listening
from smtpgate.stores.redis_url import parse_redis_url, redact


# ============================================================================ parsing
def test_a_plain_url_and_its_defaults():
    t = parse_redis_url("redis://10.0.0.5/3")
    assert (t.scheme, t.hosts, t.db, t.prefix, t.max_connections, t.pool_timeout) == (
        "redis", (("10.0.0.5", 6379),), 3, "smtpgate:", 32, 5.0)
    assert t.connection == {"socket_timeout": "2.0", "socket_connect_timeout": "2.0"}
    assert t.server_name() == "redis://10.0.0.5:6379/3"


def test_a_sentinel_url():
    t = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1:26380,10.0.0.2,[2001:db8::7]:5000/mymaster/2"
                        "?prefix=mx-eu:&sentinel_password=pw&socket_timeout=0.5")
    assert t.sentinel and t.service == "mymaster" and t.db == 2 and t.password == "s3cret"
    assert t.hosts == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("2001:db8::7", 5000))
    assert t.prefix == "mx-eu:" and t.sentinel_auth == {"sentinel_password": "pw"}
    assert t.connection["socket_timeout"] == "0.5"
    assert "s3cret" not in repr(t) and "s3cret" not in t.server_name()
    assert parse_redis_url("redis+sentinel://h/svc").db == 0


def test_a_tls_url_passes_its_options_through(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    t = parse_redis_url("rediss://u:p@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs=ca.pem"
                        "&ssl_check_hostname=false", str(tmp_path))
    assert t.tls and t.username == "u"
    assert t.connection["ssl_ca_certs"] == str(tmp_path / "ca.pem")  # relative to gate.yaml
    assert t.connection["ssl_check_hostname"] == "false"
    assert parse_redis_url("redis://h/0?socket_keepalive=off").connection["socket_keepalive"] == "false"
    assert t.client_url().startswith("rediss://u:p@redis.example:6380/0?")


@pytest.mark.parametrize("url, says", [
    ("redis://h/x", "the database must be a number"),
    ("redis://h/0/1", "expected one database number"),
    ("redis://h:0/0", "bad port"),
    ("redis://h:/0", "the port is missing"),
    ("redis:///0", "bad address"),
    ("redis://h/0?sockettimeout=1", "unknown option 'sockettimeout'"),
    ("redis://h/0?ssl_cert_reqs=none", "TLS settings need rediss://"),
    ("redis://h/0?sentinel_password=x", "only with redis+sentinel://"),
    ("redis://h/0?max_connections=0", "max_connections='0': expected 1 or more"),
    ("redis://h/0?socket_timeout=soon", "socket_timeout='soon'"),
    ("redis://h/0?prefix=a&prefix=b", "given twice"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "expected none, optional or required"),
    ("rediss://h/0?ssl_cert_reqs=none&ssl_check_hostname=true", "needs ssl_cert_reqs=optional or required"),
    ("redis+sentinel://h:26379", "the service name is missing"),
    ("redis+sentinel://h:26379,/svc/0", "bad address"),
    ("redis+sentinel://h/svc/0/1", "expected one database number"),
])
def test_bad_urls_say_what_is_wrong(url, says):
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert says in str(caught.value), str(caught.value)


def test_passwords_never_shown():
    assert redact("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert "pw" not in redact("redis+sentinel://h/svc/0?sentinel_password=pw")
    with pytest.raises(ValueError) as caught:
        parse_redis_url("redis://:hunter2@h/x")
    assert "hunter2" not in str(caught.value)


# ============================================================================ check-config
def write_config(folder: Path, state: str) -> Path:
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    (folder / "policies" / "default.yaml").write_text("domains: [example.com]\nrules:\n  - greylist: {}\n")
    path = folder / "gate.yaml"
    path.write_text(f"hostname: gate.test\npolicies: policies\nstate: {json.dumps(state)}\n")
    return path


def smtpgate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


@pytest.mark.timeout(60)
def test_check_config_reports_a_bad_url_at_its_line(tmp_path):
    cases = [("rediss://127.0.0.1:6380/0?ssl_ca_certs=missing.pem", "ssl_ca_certs: no such file"),
             ("redis+sentinel://127.0.0.1:26379/", "(the service name is missing)"),
             ("redis://:hunter2@127.0.0.1/0?ssl_certfile=x", "TLS settings need rediss://")]
    for n, (url, says) in enumerate(cases):
        path = write_config(tmp_path / str(n), url)
        done = smtpgate("check-config", "-c", str(path))
        assert done.returncode == 2, done
        assert f"{path}:3:" in done.stderr + done.stdout and says in done.stderr + done.stdout, done
        assert "hunter2" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    good = write_config(tmp_path / "good", "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/svc/0?prefix=x:")
    assert smtpgate("check-config", "-c", str(good)).returncode == 0


# ============================================================================ a real TLS Redis
@pytest.fixture
def tls_redis(tmp_path):
    """``redis-server`` serving TLS only, on a free loopback port, with a self-signed
    certificate for 127.0.0.1 (its own CA); killed by PID."""
    openssl, server = require_tool("openssl"), require_tool("redis-server")
    folder = tmp_path / "tls-redis"
    folder.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    log_path = folder / "redis.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                                 "--tls-cert-file", str(folder / "cert.pem"), "--tls-key-file", str(folder / "key.pem"),
                                 "--tls-ca-cert-file", str(folder / "cert.pem"), "--tls-auth-clients", "no",
                                 "--save", "", "--appendonly", "no", "--dir", str(folder)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_listening(proc, [("127.0.0.1", port)], 10.0, lambda: log_path.read_text(errors="replace"))
        yield port, folder / "cert.pem"
    finally:
        if proc.poll() is None:
            stop_pid(proc, signal.SIGTERM)


@pytest.mark.timeout(90)
def test_a_gate_on_a_tls_redis(gate_factory, downstream, tls_redis, tmp_path):
    port, ca = tls_redis
    gate = gate_factory(config={"state": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"},
                        policies={"default.yaml": "domains: [example.com]\nrules:\n  - greylist: {}\n"})
    assert gate.cli("check-config").returncode == 0
    allowed = gate.cli("greylist", "allow", "--client", "127.0.0.1")
    assert allowed.returncode == 0, allowed.stderr
    with gate.smtp() as c:
        c.ehlo()
        assert c.mail("alice@sender.test")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 250  # the allow entry, read over TLS
        assert c.data(b"Subject: tls state\r\n\r\nhi\r\n")[0] == 250
    downstream.wait_for_messages(1)

    # without verification (ssl_cert_reqs=none: no name check either) it talks to it
    lax = write_config(tmp_path / "lax", f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    done = smtpgate("greylist", "list", "--allowed", "--json", "-c", str(lax))
    assert done.returncode == 0 and json.loads(done.stdout)["count"] == 1, done

    # a client that does not trust the server's certificate never talks to it
    untrusting = write_config(tmp_path / "untrusting", f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required")
    assert smtpgate("check-config", "-c", str(untrusting)).returncode == 0
    done = smtpgate("greylist", "list", "-c", str(untrusting))
    assert done.returncode == 1 and "certificate verify failed" in done.stderr, done
    assert "Traceback" not in done.stderr
