"""Redis state URLs: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://`` and ``unix://``
(a Unix socket), read by ``smtpgate/stores/redis_url.py``; a bad one is a ``check-config``
error with file and line; a real TLS Redis (``redis-server --tls-port``, a certificate the test
makes) serves a real gate, and refuses one that does not trust its certificate; a real Redis on
a Unix socket only (``--port 0``) serves a real gate, its CLIs and ``state copy``."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateproc import free_port, require_tool, stop_pid, wait_listening
from tests.support.redisproc import UnixRedis
from tests.support.waiting import wait_until
from smtpgate.stores.redis_url import parse_redis_url, redact, with_absolute_paths


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


def test_a_unix_socket_url_as_redis_py_spells_it(tmp_path):
    t = parse_redis_url("unix://:s3cret@/run/redis/redis.sock?db=3&prefix=mx:&client_name=gate&socket_timeout=0.5")
    assert (t.scheme, t.path, t.hosts, t.db, t.prefix, t.password) == (
        "unix", "/run/redis/redis.sock", (), 3, "mx:", "s3cret")
    assert t.connection == {"client_name": "gate", "socket_timeout": "0.5", "socket_connect_timeout": "2.0"}
    assert t.server_name() == "unix:///run/redis/redis.sock?db=3"
    assert "s3cret" not in repr(t) and redact(t.url).startswith("unix://:***@/run/redis/redis.sock?")
    # for redis-py: the socket, the database and the login, none of our own options
    assert t.client_url() == ("unix://:s3cret@/run/redis/redis.sock?db=3&client_name=gate"
                              "&socket_timeout=0.5&socket_connect_timeout=2.0")
    assert parse_redis_url("unix:///tmp/r%20s.sock").path == "/tmp/r s.sock"
    assert parse_redis_url("unix:///tmp/r.sock").db == 0
    # relative to gate.yaml's folder, as sqlite:///./PATH; written absolute for the workers
    rel = parse_redis_url("unix:///./run/redis.sock?db=1", str(tmp_path))
    assert rel.path == str(tmp_path / "run" / "redis.sock")
    assert with_absolute_paths(rel) == f"unix://{tmp_path}/run/redis.sock?db=1"
    assert parse_redis_url("unix:///../redis.sock", str(tmp_path)).path == str(tmp_path.parent / "redis.sock")
    assert with_absolute_paths(parse_redis_url("unix:///abs/redis.sock", str(tmp_path))) == "unix:///abs/redis.sock"
    # four slashes, as sqlite:////PATH: one path for the wire and redis-py alike
    four = parse_redis_url("unix:////run/redis/redis.sock?db=2")
    assert four.path == "/run/redis/redis.sock"
    assert four.client_url().startswith("unix:///run/redis/redis.sock?db=2")


@pytest.mark.parametrize("url, says", [
    ("redis://h/x", "the database must be a number"),
    ("redis://h/\u00b2", "the database must be a number"),
    ("unix:///run/redis.sock?db=\u00b2", "expected a database number"),
    ("redis://:pa/ss@h/0", "percent-encode '/', '?', '#' and '@'"),
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
    ("unix://localhost/run/redis.sock", "a unix:// URL names no host, got 'localhost'"),
    ("unix://", "expected the socket's path"),
    ("unix:///run/redis/", "expected the socket's path"),
    ("unix:///" + "s" * 120, "longer than a Unix socket's 107 bytes"),
    ("unix:///r.sock?db=x", "option db='x': expected a database number"),
    ("unix:///r.sock?socket_keepalive=true", "a TCP setting: not on a unix:// socket"),
    ("unix:///r.sock?ssl_ca_certs=ca.pem", "TLS settings need rediss://"),
    ("unix:///r.sock?sentinel_password=x", "only with redis+sentinel://"),
    ("unix:///r.sock?db=1&db=2", "given twice"),
    ("redis://h/0?db=1", "only with unix://"),
])
def test_bad_urls_say_what_is_wrong(url, says):
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert says in str(caught.value), str(caught.value)


def test_passwords_never_shown():
    assert redact("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redact("unix://u:pw@/run/redis.sock?db=1") == "unix://u:***@/run/redis.sock?db=1"
    assert redact("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"  # the // kept
    assert "pw" not in redact("redis+sentinel://h/svc/0?sentinel_password=pw")
    with pytest.raises(ValueError) as caught:
        parse_redis_url("redis://:hunter2@h/x")
    assert "hunter2" not in str(caught.value)
    # a bare / ? or # in the password ends the host part early: the whole login is starred
    for url in ("unix://:hunter/2@/run/redis.sock", "redis://:hun?ter2@h/0", "redis://u:hun#ter2@h/0"):
        assert "hunter" not in redact(url) and "ter2" not in redact(url), url
        with pytest.raises(ValueError) as caught:
            parse_redis_url(url)
        assert "ter2" not in str(caught.value) and "percent-encode" in str(caught.value), url
    assert redact("unix://:hunter/2@/run/redis.sock") == "unix://***@/run/redis.sock"
    with pytest.raises(ValueError) as caught:  # unreadable: said, with no part of the login
        parse_redis_url("redis://:hunter2@[::1/0")
    assert str(caught.value) == "redis://…: Invalid IPv6 URL"
    assert redact("sqlite:////var/lib/state.db") == "sqlite:////var/lib/state.db"  # the //// kept


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
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "redis.sock").write_text("not a socket")
    cases = [("tls", "rediss://127.0.0.1:6380/0?ssl_ca_certs=missing.pem", "ssl_ca_certs: no such file"),
             ("sentinel", "redis+sentinel://127.0.0.1:26379/", "(the service name is missing)"),
             ("plain", "redis://:hunter2@127.0.0.1/0?ssl_certfile=x", "TLS settings need rediss://"),
             ("host", "unix://:hunter2@localhost/run/redis.sock", "names no host"),
             ("keepalive", "unix:///./redis.sock?socket_keepalive=1", "a TCP setting"),
             ("file", "unix:///./redis.sock", f"not a Unix socket: {tmp_path / 'file' / 'redis.sock'}")]
    for folder, url, says in cases:
        path = write_config(tmp_path / folder, url)
        done = smtpgate("check-config", "-c", str(path))
        assert done.returncode == 2, done
        assert f"{path}:3:" in done.stderr + done.stdout and says in done.stderr + done.stdout, done
        assert "hunter2" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    good = write_config(tmp_path / "good", "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/svc/0?prefix=x:")
    assert smtpgate("check-config", "-c", str(good)).returncode == 0
    # a socket not there yet is fine (Redis may start after the gate: an outage until then)
    later = write_config(tmp_path / "later", "unix:///./run/redis.sock?db=2&prefix=x:")
    assert smtpgate("check-config", "-c", str(later)).returncode == 0


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


# ============================================================================ a real Redis on a Unix socket
POLICY = "domains: [example.com]\nrules:\n  - senders: {}\n  - greylist: {}\n"


@pytest.fixture
def unix_redis(tmp_path):
    server = UnixRedis(tmp_path / "unix-redis").start()
    yield server
    server.stop()


def keys(server: UnixRedis, pattern: str) -> list[str]:
    return sorted(k.decode() for k in server.client().scan_iter(match=pattern))


@pytest.mark.timeout(90)
def test_a_gate_on_a_unix_socket_redis(gate_factory, downstream, unix_redis):
    """The server has no TCP port: whatever state lands in it came over the socket."""
    state = f"{unix_redis.url}&prefix=mx:"
    gate = gate_factory(config={"state": state}, policies={"default.yaml": POLICY})
    assert gate.cli("check-config").returncode == 0
    with gate.smtp() as c:
        c.ehlo()
        assert c.mail("alice@sender.test")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 451  # greylisted: the triplet is written
    assert keys(unix_redis, "mx:gl:t:*") == ["mx:gl:t:127.0.0.0/24 alice@sender.test bob@example.com"]

    allowed = gate.cli("greylist", "allow", "--client", "127.0.0.1")
    assert allowed.returncode == 0, allowed.stderr
    with gate.smtp() as c:
        c.ehlo()
        assert c.mail("alice@sender.test")[0] == 250
        assert c.rcpt("bob@example.com")[0] == 250  # the allow entry, read over the socket
        assert c.data(b"Subject: unix state\r\n\r\nhi\r\n")[0] == 250
    downstream.wait_for_messages(1)
    assert "mx:gl:allow" in keys(unix_redis, "mx:gl:*")
    wait_until(lambda: keys(unix_redis, "mx:sm:*alice@sender.test"), what="the sender's record in Redis")
    shown = gate.cli("senders", "show", "alice@sender.test", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["key"] == "alice@sender.test", shown


@pytest.mark.timeout(90)
def test_state_copy_from_sqlite_to_a_unix_socket(unix_redis, tmp_path):
    sqlite = write_config(tmp_path / "sqlite", f"sqlite:///{tmp_path / 'state.db'}")
    done = smtpgate("greylist", "allow", "--client", "192.0.2.7", "-c", str(sqlite))
    assert done.returncode == 0, done.stderr
    # the socket's path relative to the current folder, as state copy takes a SQLite path
    copy = smtpgate("state", "copy", f"sqlite:///{tmp_path / 'state.db'}", "unix:///./redis.sock?prefix=cp:",
                    "--json", cwd=unix_redis.socket_folder)
    assert copy.returncode == 0, copy.stderr
    doc = json.loads(copy.stdout)
    assert doc["to"] == f"unix://{unix_redis.socket}?prefix=cp:" and doc["copied"]["greylist"]["allow"] == 1
    assert keys(unix_redis, "cp:*") == ["cp:gl:allow", "cp:gl:allowlens"]
    listed = smtpgate("greylist", "list", "--allowed", "--json",
                      "-c", str(write_config(tmp_path / "unix", f"unix://{unix_redis.socket}?prefix=cp:")))
    assert listed.returncode == 0 and json.loads(listed.stdout)["count"] == 1, listed
