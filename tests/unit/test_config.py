"""gate.yaml: lookup, the embedded default, every key, and located errors; the YAML layer."""
from __future__ import annotations

import os
import textwrap

import pytest

from smtpgate.config import (DnsConfig, DownstreamConfig, Limits, LogConfig, TLSConfig, check_config,
                             find_config_path, load_all, load_gate_config, load_policy_specs, sqlite_path)
from smtpgate.config import gate as gate_module
from smtpgate.config.yamlsrc import LocatedDict, LocatedList, load_string, problem_at, to_plain
from smtpgate.errors import ConfigError
from smtpgate.config.gate import LOOPBACK_NETWORKS, ProxyProtocol


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch, tmp_path):
    """No test may see the machine's /etc/smtpgate or the caller's environment."""
    monkeypatch.delenv("SMTPGATE_CONFIG", raising=False)
    monkeypatch.setattr(gate_module, "SYSTEM_CONFIG", str(tmp_path / "etc" / "gate.yaml"))
    monkeypatch.chdir(tmp_path)


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return os.path.relpath(path)  # as a user would name it from the cwd


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_gate_config(path)
    return [str(p) for p in e.value.problems]


# lookup (SPEC §1)

def test_lookup_order(monkeypatch, tmp_path):
    write(tmp_path / "etc" / "gate.yaml", "{}")
    assert find_config_path(None) == str(tmp_path / "etc" / "gate.yaml")
    write(tmp_path / "gate.yaml", "{}")
    assert find_config_path(None) == "gate.yaml"
    monkeypatch.setenv("SMTPGATE_CONFIG", "/from/env.yaml")
    assert find_config_path(None) == "/from/env.yaml"
    assert find_config_path("cli.yaml") == "cli.yaml"


def test_lookup_finds_nothing():
    assert find_config_path(None) is None


def test_empty_env_var_is_ignored(monkeypatch):
    monkeypatch.setenv("SMTPGATE_CONFIG", "")
    assert find_config_path(None) is None


# the embedded default

def test_embedded_default(tmp_path):
    config = load_gate_config(None)
    assert config.source == "<embedded default>"
    assert config.listen == [("127.0.0.1", 2525)]
    assert (config.downstream.host, config.downstream.port) == ("127.0.0.1", 10025)
    assert config.state == f"sqlite://{tmp_path}/var/state.db"
    assert sqlite_path(config.state) == f"{tmp_path}/var/state.db"
    assert config.quarantine == f"{tmp_path}/var/quarantine"
    assert config.policies == os.path.join(gate_module.DEFAULTS_DIR, "policies")
    assert config.tls is None and config.metrics is None and config.plugins == []
    assert config.proxy_protocol is None and config.workers >= 1 and config.hostname


def test_embedded_default_file_matches_the_dataclass_defaults():
    config = load_gate_config(None)
    assert config.limits == Limits()
    assert config.dns == DnsConfig()
    assert config.log == LogConfig()
    assert config.downstream == DownstreamConfig(host="127.0.0.1", port=10025)


def test_bundled_default_policy_accepts_localhost():
    (spec,) = load_policy_specs(load_gate_config(None).policies)
    assert (spec.name, spec.domains, spec.entries) == ("default", ("localhost",), [])


def test_load_all_on_the_embedded_default():
    config, registry, policies = load_all(None)
    assert config.source == "<embedded default>"
    assert policies.for_domain("LOCALHOST") is policies.session_policy
    assert policies.for_domain("example.com") is None
    assert check_config(None) == []


# every key

def test_every_key(tmp_path):
    write(tmp_path / "conf" / "tls.pem", "cert")
    write(tmp_path / "conf" / "tls.key", "key")
    (tmp_path / "conf" / "policies").mkdir()
    (tmp_path / "conf" / "rules").mkdir()
    (tmp_path / "more-rules").mkdir()
    path = write(tmp_path / "conf" / "gate.yaml", """
        hostname: mx1.example.net
        listen: ["0.0.0.0:25", "[::]:25", "127.0.0.1:2525"]
        workers: 3
        downstream:
          host: 10.0.0.5
          port: 10026
          xclient: false
          tls: starttls
          timeout: 2m
        tls:
          cert: tls.pem
          key: ./tls.key
        proxy_protocol: true
        state: sqlite:///var/lib/smtpgate/state.db
        quarantine: q
        limits:
          max_message_size: 10MB
          max_recipients: 50
          max_connections: 500
          max_connections_per_client: 5
          command_timeout: 90
          data_timeout: 1h
        policies: policies
        plugins: [rules, ../more-rules]
        dns: {nameservers: ["127.0.0.1:53", "::1", "[2001:db8::1]:5353", 192.0.2.1], timeout: 500ms, attempts: 3}
        metrics: 127.0.0.1:9425
        log: {format: json, level: debug}
        """)
    conf = str(tmp_path / "conf")
    c = load_gate_config(path)
    assert c.source == path
    assert c.hostname == "mx1.example.net"
    assert c.listen == [("0.0.0.0", 25), ("::", 25), ("127.0.0.1", 2525)]
    assert c.workers == 3
    assert c.downstream == DownstreamConfig("10.0.0.5", 10026, xclient=False, tls="starttls", timeout=120.0)
    assert c.tls == TLSConfig(f"{conf}/tls.pem", f"{conf}/tls.key")
    assert c.proxy_protocol == ProxyProtocol(LOOPBACK_NETWORKS)
    assert c.state == "sqlite:///var/lib/smtpgate/state.db"
    assert c.quarantine == f"{conf}/q"
    assert c.limits == Limits(10_000_000, 50, 500, 5, 90.0, 3600.0)
    assert c.policies == f"{conf}/policies"
    assert c.plugins == [f"{conf}/rules", f"{tmp_path}/more-rules"]
    assert c.dns == DnsConfig([("127.0.0.1", 53), ("::1", 53), ("2001:db8::1", 5353), ("192.0.2.1", 53)], 0.5, 3)
    assert c.metrics == ("127.0.0.1", 9425)
    assert c.log == LogConfig("json", "debug")


def test_left_out_keys_keep_the_embedded_default(tmp_path):
    path = write(tmp_path / "conf" / "gate.yaml", """
        downstream: {host: mx.internal}
        limits: {max_recipients: 10}
        """)
    c = load_gate_config(path)
    assert c.downstream == DownstreamConfig("mx.internal", 10025)
    assert c.limits == Limits(max_recipients=10)
    assert c.listen == [("127.0.0.1", 2525)]
    # the default's paths stay where the default puts them: the cwd and the bundled policies
    assert c.state == f"sqlite://{tmp_path}/var/state.db"
    assert c.policies == os.path.join(gate_module.DEFAULTS_DIR, "policies")


def test_an_empty_file_is_the_embedded_default(tmp_path):
    c = load_gate_config(write(tmp_path / "gate.yaml", "# nothing\n"))
    assert c.listen == [("127.0.0.1", 2525)] and c.source == "gate.yaml"


@pytest.mark.parametrize("written, expected", [
    ("sqlite:///var/lib/x.db", "sqlite:///var/lib/x.db"),
    ("sqlite:////var/lib/x.db", "sqlite:///var/lib/x.db"),
    ("sqlite:///./x.db", "sqlite://{conf}/x.db"),
    ("sqlite:///../x.db", "sqlite://{tmp}/x.db"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://cache.example:6380/1", "rediss://cache.example:6380/1"),
])
def test_state_urls(tmp_path, written, expected):
    path = write(tmp_path / "conf" / "gate.yaml", f"state: {written}\n")
    conf = tmp_path / "conf"
    assert load_gate_config(path).state == expected.format(conf=conf, tmp=tmp_path)


def test_workers_auto_and_tls_off(tmp_path):
    c = load_gate_config(write(tmp_path / "gate.yaml", "workers: auto\ntls:\nmetrics:\n"))
    assert c.workers >= 1 and c.tls is None and c.metrics is None


def test_single_values_for_lists(tmp_path):
    (tmp_path / "rules").mkdir()
    c = load_gate_config(write(tmp_path / "gate.yaml", "listen: 0.0.0.0:25\nplugins: rules\n"))
    assert c.listen == [("0.0.0.0", 25)] and c.plugins == [f"{tmp_path}/rules"]


# located errors

def test_unknown_keys_with_their_lines(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        listen: ["127.0.0.1:2525"]
        downstream:
          host: 127.0.0.1
          prot: 10025
        lgo: {format: text}
        """)
    assert problems_of(path) == [
        'gate.yaml:4:3: downstream.prot: unknown key (did you mean "port"?)',
        'gate.yaml:5:1: lgo: unknown key (did you mean "log"?)',
    ]


def test_bad_durations_and_sizes(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        limits:
          max_message_size: big
          data_timeout: soon
          command_timeout: 0
        downstream: {timeout: -5}
        """)
    assert problems_of(path) == [
        """gate.yaml:2:21: limits.max_message_size: expected a size like "25MB", got 'big'""",
        """gate.yaml:3:17: limits.data_timeout: expected a duration like "5m", got 'soon'""",
        "gate.yaml:4:20: limits.command_timeout: expected a duration above zero, got 0",
        "gate.yaml:5:23: downstream.timeout: expected a duration of zero or more, got -5",
    ]


def test_bad_values_everywhere_are_all_reported(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        listen: ["0.0.0.0:25", "::1:25", "127.0.0.1:70000"]
        workers: 0
        downstream: {tls: maybe, xclient: "yes", port: 0}
        tls: {cert: missing.pem}
        proxy_protocol: 1
        state: mysql://x
        policies: nowhere
        dns: {nameservers: [dns.example]}
        metrics: 9425
        log: {format: xml, level: loud}
        """)
    assert problems_of(path) == [
        """gate.yaml:1:24: listen[1]: write IPv6 addresses in brackets, like "[::1]:25", got '::1:25'""",
        "gate.yaml:1:34: listen[2]: expected a port number 0-65535, got 70000",
        """gate.yaml:2:10: workers: expected "auto" or a whole number of 1 or more, got 0""",
        "gate.yaml:3:19: downstream.tls: expected one of none, starttls, required, got 'maybe'",
        "gate.yaml:3:35: downstream.xclient: expected true or false, got 'yes'",
        "gate.yaml:3:48: downstream.port: expected a port number 1-65535, got 0",
        f"gate.yaml:4:13: tls.cert: no such file: {tmp_path}/missing.pem",
        "gate.yaml:4:6: tls.key: is required",
        "gate.yaml:5:17: proxy_protocol: expected true, false or {trusted: [CIDR, ...]}, got 1",
        """gate.yaml:6:8: state: got 'mysql://x': expected "sqlite:///PATH", "redis://HOST:PORT/DB", "unix:///PATH/TO/redis.sock", "rediss://…" or "redis+sentinel://HOST:PORT/SERVICE/DB\"""",
        f"gate.yaml:7:11: policies: no such folder: {tmp_path}/nowhere",
        "gate.yaml:8:21: dns.nameservers[0]: expected an IP address and an optional port, "
        "like \"127.0.0.1:53\", got 'dns.example'",
        "gate.yaml:9:10: metrics: expected \"HOST:PORT\", got 9425",
        "gate.yaml:10:15: log.format: expected one of text, json, got 'xml'",
        "gate.yaml:10:27: log.level: expected one of debug, info, warning, error, critical, got 'loud'",
    ]


def test_empty_listen_and_wrong_section_type(tmp_path):
    path = write(tmp_path / "gate.yaml", "listen: []\nlimits: 5\n")
    assert problems_of(path) == [
        "gate.yaml:1:9: listen: needs at least 1 item(s)",
        "gate.yaml:2:9: limits: expected a mapping, got 5",
    ]


def test_yaml_syntax_error_location(tmp_path):
    path = write(tmp_path / "gate.yaml", 'listen: ["0.0.0.0:25"\nworkers: 2\n')
    (problem,) = problems_of(path)
    assert problem == ("gate.yaml:2:1: expected ',' or ']', but got '<scalar>' "
                       "(while parsing a flow sequence at line 1)")


def test_bad_indentation_location(tmp_path):
    path = write(tmp_path / "gate.yaml", "downstream:\n  host: a\n port: 25\n")
    (problem,) = problems_of(path)
    assert problem.startswith("gate.yaml:3:2: ")


def test_duplicate_key(tmp_path):
    path = write(tmp_path / "gate.yaml", "downstream:\n  host: a\n  host: b\n")
    assert problems_of(path) == ["gate.yaml:3:3: duplicate key 'host'"]


def test_top_level_must_be_a_mapping(tmp_path):
    assert problems_of(write(tmp_path / "gate.yaml", "- a\n")) == [
        "gate.yaml:1:1: expected a mapping of settings (key: value) at the top"]


def test_unreadable_file():
    (problem,) = problems_of("missing.yaml")
    assert problem.startswith("missing.yaml: cannot read: ")


def test_problems_list_instead_of_raising(tmp_path):
    problems = []
    config = load_gate_config(write(tmp_path / "gate.yaml", "workers: 2\nlimits: {max_recipients: no}\n"), problems)
    assert config.workers == 2 and config.limits.max_recipients == 100
    assert [str(p) for p in problems] == [
        "gate.yaml:2:26: limits.max_recipients: expected a whole number of 1 or more, got False"]


def test_check_config_collects_gate_and_policy_problems(tmp_path):
    write(tmp_path / "policies" / "default.yaml", "domains: [example.com]\nrules: [{nosuchrule: {}}]\n")
    path = write(tmp_path / "gate.yaml", "policies: policies\nworkers: many\n")
    gate_problem, policy_problem = map(str, check_config(path))
    assert gate_problem == """gate.yaml:2:10: workers: expected "auto" or a whole number of 1 or more, got 'many'"""
    assert policy_problem.startswith(f"{tmp_path}/policies/default.yaml:2:10: rules[0].nosuchrule: unknown rule")


# the YAML layer

def test_marks_of_keys_values_and_items():
    doc = load_string("a: 1\nb:\n  - x\n  - {c: 2}\n", "t.yaml")
    assert isinstance(doc, LocatedDict) and isinstance(doc["b"], LocatedList)
    assert doc.where("a") == (1, 4) and doc.where("a", at_key=True) == (1, 1)
    assert doc["b"].where(1) == (4, 5) and doc["b"].source == "t.yaml"
    assert str(problem_at(doc["b"][1], "c", "b[1].c", "nope")) == "t.yaml:4:9: b[1].c: nope"
    assert type(to_plain(doc)["b"][1]) is dict


def test_anchors_and_merge_keys():
    doc = load_string("base: &b {x: 1, y: 2}\nchild:\n  <<: *b\n  y: 3\n", "t.yaml")
    assert doc["child"] == {"x": 1, "y": 3}
    assert doc["child"].where("y") == (4, 6)


@pytest.mark.parametrize("text, message", [
    ("a: &a [*a]\n", "t.yaml:1:4: an alias refers to the node that contains it"),
    ("a: !!set {x}\n", "t.yaml:1:4: unsupported YAML tag tag:yaml.org,2002:set"),
    ("? [a]\n: 1\n", "t.yaml:1:3: a key must be a plain value, not a list or mapping"),
    ("a: !!python/name:os.system x\n", "t.yaml:1:4: could not determine a constructor for the tag "
                                       "'tag:yaml.org,2002:python/name:os.system'"),
    ("a: 1\n---\nb: 2\n", "t.yaml:2:1: expected a single document in the stream, but found another document"),
])
def test_yaml_refusals(text, message):
    with pytest.raises(ConfigError) as e:
        load_string(text, "t.yaml")
    assert str(e.value) == message


def test_proxy_protocol_trusted_sources(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        proxy_protocol: {trusted: [192.0.2.0/24, "2001:db8::/32", 198.51.100.7]}
        """)
    proxy = load_gate_config(path).proxy_protocol
    assert proxy.trusts("192.0.2.9") and proxy.trusts("::ffff:192.0.2.9") and proxy.trusts("2001:db8::1")
    assert proxy.trusts("198.51.100.7") and not proxy.trusts("198.51.100.8")
    assert not proxy.trusts("127.0.0.1")
    path = write(tmp_path / "gate.yaml", "proxy_protocol: false\n")
    assert load_gate_config(path).proxy_protocol is None


def test_proxy_protocol_bad_cidrs_are_located(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        proxy_protocol:
          trusted:
            - 10.0.0.0/8
            - 10.0.0.300/8
            - lan
        """)
    assert problems_of(path) == [
        """gate.yaml:4:7: proxy_protocol.trusted[1]: expected an address or network like "10.0.0.0/8" or "::1", got '10.0.0.300/8'""",
        """gate.yaml:5:7: proxy_protocol.trusted[2]: expected an address or network like "10.0.0.0/8" or "::1", got 'lan'""",
    ]
    path = write(tmp_path / "gate.yaml", "proxy_protocol: {trusted: []}\n")
    assert problems_of(path) == ["gate.yaml:1:27: proxy_protocol.trusted: needs at least 1 item(s)"]


def test_session_caps_and_dns_limits_are_read(tmp_path):
    path = write(tmp_path / "gate.yaml", """
        limits: {max_greetings: 3, max_rsets: 4, max_junk_commands: 5, max_errors: 6, ipv6_client_prefix: 56}
        dns: {budget: 3s, max_queries_per_session: 7, max_inflight_per_session: 2}
        """)
    c = load_gate_config(path)
    assert (c.limits.max_greetings, c.limits.max_rsets, c.limits.max_junk_commands,
            c.limits.max_errors, c.limits.ipv6_client_prefix) == (3, 4, 5, 6, 56)
    assert (c.dns.budget, c.dns.max_queries_per_session, c.dns.max_inflight_per_session) == (3.0, 7, 2)
    path = write(tmp_path / "gate.yaml", "limits: {max_errors: 0, ipv6_client_prefix: 129}\n")
    assert problems_of(path) == [
        "gate.yaml:1:22: limits.max_errors: expected a whole number of 1 or more, got 0",
        "gate.yaml:1:45: limits.ipv6_client_prefix: expected a prefix length 1-128, got 129",
    ]


def test_trusted_forwarders(tmp_path):
    import ipaddress
    assert load_gate_config(None).trusted_forwarders == []  # empty by default: nobody
    path = write(tmp_path / "gate.yaml", """
        trusted_forwarders: [127.0.0.1/32, "::1", 10.1.0.0/16]
        """)
    assert list(load_gate_config(path).trusted_forwarders) == [
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16")]
    bad = write(tmp_path / "bad.yaml", """
        trusted_forwarders:
          - 127.0.0.1/32
          - 10.0.0.0/33
        """)
    assert problems_of(bad) == [
        "bad.yaml:3:5: trusted_forwarders[1]: expected an address or network like "
        "\"10.0.0.0/8\" or \"::1\", got '10.0.0.0/33'"]


def test_downstream_pool(tmp_path):
    from smtpgate.config.gate import PoolConfig
    assert load_gate_config(None).downstream.pool == PoolConfig(size=0, idle=30.0, max_uses=100)
    path = write(tmp_path / "gate.yaml", "downstream: {pool: {size: 4, idle: 2m}}\n")
    assert load_gate_config(path).downstream.pool == PoolConfig(size=4, idle=120.0, max_uses=100)
    bad = write(tmp_path / "bad.yaml", "downstream: {pool: {size: -1, idle: 0, max_uses: 0, ttl: 1}}\n")
    assert problems_of(bad) == [
        "bad.yaml:1:27: downstream.pool.size: expected a whole number of 0 or more, got -1",
        "bad.yaml:1:37: downstream.pool.idle: expected a duration above zero, got 0",
        "bad.yaml:1:50: downstream.pool.max_uses: expected a whole number of 1 or more, got 0",
        "bad.yaml:1:53: downstream.pool.ttl: unknown key (known: size, idle, max_uses)",
    ]


def test_authserv_id_defaults_to_the_hostname(tmp_path):
    plain = load_gate_config(write(tmp_path / "a.yaml", "hostname: mx1.example.net\n"))
    assert (plain.authserv_id, plain.auth_id) == (None, "mx1.example.net")
    shared = load_gate_config(write(tmp_path / "b.yaml", "hostname: mx1.example.net\nauthserv_id: example.net.\n"))
    assert shared.auth_id == "example.net"
    path = write(tmp_path / "c.yaml", "authserv_id: 'example.net; dkim=pass'\n")
    assert problems_of(path) == [f"{path}:1:14: authserv_id: expected a domain name like example.net, "
                                 "got 'example.net; dkim=pass'"]
