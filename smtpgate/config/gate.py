"""gate.yaml (SPEC §2): found, read, checked and turned into frozen dataclasses.

A config file only overrides: every key it leaves out keeps the embedded default's value,
and the embedded default is itself read from ``smtpgate/defaults/gate.yaml`` so the two
cannot drift. Relative paths in a file resolve against that file's folder; in the embedded
default they resolve against the current directory (``./var/``), except ``policies``, which
names the bundled folder next to it.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import partial
from typing import Any, Callable

from ..errors import ConfigError, Problem
from ..pipeline.options import boolean, one_of
from ..units import parse_duration, parse_size
from ..stores import STATE_URLS
from ..stores.redis_url import is_redis_url, parse_redis_url, with_absolute_paths
from .yamlsrc import LocatedDict, LocatedList, empty_mapping, join_path, load_file, problem_at, unknown_key

ENV_VAR = "SMTPGATE_CONFIG"
LOCAL_CONFIG = "gate.yaml"
SYSTEM_CONFIG = "/etc/smtpgate/gate.yaml"
EMBEDDED_SOURCE = "<embedded default>"
DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "defaults")
DEFAULT_CONFIG_FILE = os.path.join(DEFAULTS_DIR, "gate.yaml")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class PoolConfig:
    """Idle downstream sessions each worker keeps for the next client (smtp/pool.py)."""

    size: int = 0  # idle sessions kept per worker; 0 (the default): a new connection per client
    idle: float = 30.0  # seconds an idle session is kept
    max_uses: int = 100  # clients one session serves before it is closed


@dataclass(frozen=True)
class DownstreamConfig:
    host: str
    port: int
    xclient: bool = True
    tls: str = "none"  # none | starttls | required
    tls_ca: str | None = None  # CA file that verifies the downstream (required); None: the system's
    timeout: float = 60.0
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str
    ciphers: str | None = None  # OpenSSL cipher list for TLS 1.2; None: Python's default


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 25_000_000
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_client: int = 20
    command_timeout: float = 300
    data_timeout: float = 600
    max_line_length: int = 998  # octets before CRLF in DATA (RFC 5321 §4.5.3.1.6); 0: no limit
    max_inflight_data: int = 1_000_000_000  # bytes of all messages being received; 0: no limit
    # Per session, counted since it began or since its last accepted message (as Postfix's
    # smtpd_hard_error_limit and smtpd_junk_command_limit); past one: 421 4.7.0 and close.
    max_greetings: int = 10  # HELO/EHLO
    max_rsets: int = 100
    max_junk_commands: int = 100  # NOOP, VRFY, EXPN, HELP and unrecognised commands together
    max_errors: int = 20  # 4xx/5xx replies to the client
    ipv6_client_prefix: int = 64  # max_connections_per_client counts an IPv6 client by this prefix


@dataclass(frozen=True)
class DnsConfig:
    nameservers: list[tuple[str, int]] = field(default_factory=list)  # empty: the system's
    timeout: float = 2.0
    attempts: int = 2
    budget: float = 10.0  # seconds of DNS waiting one session may cost in all
    max_queries_per_session: int = 200
    max_inflight_per_session: int = 16


@dataclass(frozen=True)
class ProxyProtocol:
    """PROXY v1/v2 headers are read from every connection and honoured only from peers in
    ``trusted``; anyone else is hung up on before the greeting."""

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def __post_init__(self):
        object.__setattr__(self, "trusted", tuple(self.trusted))

    def trusts(self, ip: str) -> bool:
        return in_networks(ip, self.trusted)


def in_networks(ip: str, networks) -> bool:
    """Whether ``ip`` (an IPv4-mapped IPv6 address as its IPv4 one) is in one of ``networks``."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks if net.version == addr.version)


LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text | json
    level: str = "info"


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """The whole gate.yaml. Paths are absolute; ``state`` is ``sqlite:///ABS/PATH`` or redis."""

    source: str
    hostname: str = field(default_factory=socket.getfqdn)
    # the Authentication-Results id the gate writes and removes as forged (RFC 8601 §2.5);
    # None: the hostname. One id for several MX hosts of an ADMD is common
    authserv_id: str | None = None
    listen: list[tuple[str, int]]
    workers: int
    downstream: DownstreamConfig
    tls: TLSConfig | None = None
    proxy_protocol: ProxyProtocol | None = None  # None: off
    # Peers whose XCLIENT/XFORWARD name the real client (a Postfix smtpd_proxy_filter); empty: none
    trusted_forwarders: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    state: str
    quarantine: str
    quarantine_keep: float = 30 * 86400.0  # seconds a held message is kept; 0: for ever
    quarantine_mode: int = 0o600  # held files; folders get the matching x bits (0700, 0750, 0770)
    limits: Limits = field(default_factory=Limits)
    policies: str
    plugins: list[str] = field(default_factory=list)
    dns: DnsConfig = field(default_factory=DnsConfig)
    metrics: tuple[str, int] | None = None
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def auth_id(self) -> str:
        """The authserv-id of the gate's Authentication-Results: ``authserv_id``, else ``hostname``."""
        return self.authserv_id or self.hostname


def find_config_path(cli_path: str | None) -> str | None:
    """``-c FILE``, else ``$SMTPGATE_CONFIG``, else ``./gate.yaml``, else the system file;
    None means the embedded default."""
    if cli_path:
        return cli_path
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    for candidate in (LOCAL_CONFIG, SYSTEM_CONFIG):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_gate_config(path: str | None, problems: list[Problem] | None = None) -> GateConfig:
    """Read ``path`` (None: the embedded default). Without ``problems``, any problem raises one
    ConfigError listing them all; with it, problems are appended and a best-effort config
    (defaults in place of bad values) is returned."""
    found: list[Problem] = []
    default = _read(load_file(DEFAULT_CONFIG_FILE), DEFAULT_CONFIG_FILE, os.getcwd(), DEFAULTS_DIR,
                    None, EMBEDDED_SOURCE, found)
    if found:  # a broken bundled file is our bug: never hide it behind a user's file
        raise ConfigError(found)
    if path is None:
        return default
    base = os.path.dirname(os.path.abspath(path))
    try:
        config = _read(load_file(path), path, base, base, default, path, found) or default
    except ConfigError as e:
        found.extend(e.problems)
        config = default
    if problems is None and found:
        raise ConfigError(found)
    if problems is not None:
        problems.extend(found)
    return config


def sqlite_path(state: str) -> str | None:
    """The database file of a ``sqlite://`` state URL as GateConfig holds it, else None."""
    return state[len("sqlite://"):] if state.startswith("sqlite://") else None


# Converters: raw YAML value -> typed value, or ValueError with a readable message.

def _hostname(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"expected a host name, got {value!r}")
    return value


def _authserv_id(value: Any) -> str:
    # RFC 8601 §2.2: a value (token or quoted string); a dot-atom domain name is what
    # everyone uses and what a downstream's filter can match
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?", value):
        raise ValueError(f"expected a domain name like example.net, got {value!r}")
    return value.rstrip(".")


def _host(value: Any) -> str:
    host = _hostname(value)
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _port(value: Any, lowest: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= 65535:
        raise ValueError(f"expected a port number {lowest}-65535, got {value!r}")
    return value


def _count(value: Any, lowest: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"expected a whole number of {lowest} or more, got {value!r}")
    return value


def _timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"expected a size above zero, got {value!r}")
    return size


def _line_length(value: Any) -> int:
    # Below 78 even RFC 5322's recommended line would be refused: surely a typo.
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < 78):
        raise ValueError(f"expected a number of octets of 78 or more, or 0 for no limit, got {value!r}")
    return value


def _inflight(value: Any) -> int:
    """``auto``: a quarter of the machine's memory, at most 1GB; ``0``: no limit."""
    if value == "auto":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 4 * 1000**3
        return min(1000**3, ram // 4)
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f'expected "auto", a size like "512MB", or 0 for no limit, got {value!r}') from None


def _workers(value: Any) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        return _count(value)
    except ValueError:
        raise ValueError(f'expected "auto" or a whole number of 1 or more, got {value!r}') from None


_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<host>[^:\[\]\s]+):(?P<port>\d+)")


def _address(value: Any, lowest_port: int = 0) -> tuple[str, int]:
    """``"0.0.0.0:25"`` / ``"[::]:25"`` / ``"localhost:2525"`` -> (host, port); port 0 lets the
    system choose (tests)."""
    m = _HOST_PORT.fullmatch(value) if isinstance(value, str) else None
    if not m:
        if isinstance(value, str) and value.count(":") > 1:
            raise ValueError(f'write IPv6 addresses in brackets, like "[::1]:25", got {value!r}')
        raise ValueError(f'expected "HOST:PORT", got {value!r}')
    if m["v6"]:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {value!r}") from None
    return m["v6"] or m["host"], _port(int(m["p6"] or m["port"]), lowest_port)


def _nameserver(value: Any) -> tuple[str, int]:
    """An IP address with an optional port (53)."""
    try:
        if isinstance(value, str) and not value.startswith("[") and value.count(":") != 1:
            return str(ipaddress.ip_address(value)), 53  # "192.0.2.1", "::1"
        if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
            return str(ipaddress.ip_address(value[1:-1])), 53
        host, port = _address(value, lowest_port=1)
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f'expected an IP address and an optional port, like "127.0.0.1:53", '
                         f"got {value!r}") from None


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
    except ValueError:
        pass
    raise ValueError(f'expected an address or network like "10.0.0.0/8" or "::1", got {value!r}')


def _proxy_switch(value: Any) -> ProxyProtocol | None:
    """``true``: trust loopback only; ``false``: off (a mapping is read as the section)."""
    if value is True:
        return ProxyProtocol(LOOPBACK_NETWORKS)
    if value is False:
        return None
    raise ValueError(f"expected true, false or {{trusted: [CIDR, ...]}}, got {value!r}")


def _ipv6_prefix(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise ValueError(f"expected a prefix length 1-128, got {value!r}")
    return value


def _keep(value: Any) -> float:
    """A retention: a duration, or 0 / ``forever`` / ``off`` to keep messages for ever."""
    if value in (0, "0", "forever", "off", False):
        return 0.0
    return _timeout(value)


FILE_MODES = (0o600, 0o640, 0o660)


def _file_mode(value: Any) -> int:
    """``0600`` (the default), ``0640`` or ``0660``: owner read-write, the group at most
    read-write, others nothing. YAML reads ``0640`` as octal already; ``"0640"`` is taken too."""
    mode = value
    if isinstance(value, str) and re.fullmatch(r"0o?[0-7]{3}", value.strip()):
        mode = int(value.strip().replace("o", ""), 8)
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in FILE_MODES:
        shown = f"{value:#o}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        raise ValueError(f"expected a file mode 0600, 0640 or 0660, got {shown}")
    return mode


def _ciphers(value: Any) -> str | None:
    """An OpenSSL cipher list, checked here by OpenSSL itself so that a typo is a config error
    and not a gate that fails to start (or to reload)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected an OpenSSL cipher list like "ECDHE+AESGCM:!aNULL", got {value!r}')
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
    except ssl.SSLError:
        raise ValueError(f"OpenSSL selects no cipher from {value!r}") from None
    return value


def _metrics(value: Any) -> tuple[str, int] | None:
    return None if value is None else _address(value)


def _path(value: Any, base: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _existing_dir(value: Any, base: str) -> str:
    path = _path(value, base)
    if not os.path.isdir(path):
        raise ValueError(f"no such folder: {path}")
    return path


def _existing_file(value: Any, base: str) -> str:
    path = _path(value, base)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    return path


def _ca_file(value: Any, base: str) -> str | None:
    """A CA file (PEM), loaded once here so that a file OpenSSL cannot read is a config
    error; null: the system's trust store."""
    if value is None:
        return None
    path = _existing_file(value, base)
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"not a CA file OpenSSL can load ({getattr(e, 'reason', None) or e}): {path}") from None
    return path


def _state(value: Any, base: str) -> str:
    """``sqlite:///var/lib/x.db`` (absolute, as SPEC writes it; ``sqlite:////abs`` too),
    ``sqlite:///./x.db`` or ``sqlite:///../x.db`` (relative), or a Redis URL (``redis://``,
    ``unix://``, ``rediss://``, ``redis+sentinel://``), checked whole, its relative socket
    or TLS file paths made absolute."""
    if is_redis_url(value):
        return with_absolute_paths(parse_redis_url(value, base))
    if isinstance(value, str) and value.startswith("sqlite://") and value.strip("/") != "sqlite:":
        rest = value[len("sqlite://"):]
        if rest.startswith(("/./", "/../")):
            rest = rest[1:]
        elif rest.startswith("/"):
            rest = "/" + rest.lstrip("/")  # POSIX keeps a leading "//"; SQLAlchemy writes "////"
        return "sqlite://" + _path(rest, base)
    raise ValueError(f"got {value!r}: {STATE_URLS}")


def state_url(value: Any, base: str) -> str:
    """A state URL as ``state:`` takes it (relative paths against ``base``); ValueError."""
    return _state(value, base)


@dataclass(frozen=True)
class _Each:
    """A list of values (a single value counts as a list of one), each checked at its place."""

    item: Callable[[Any], Any]
    min_items: int = 0


@dataclass(frozen=True)
class _Section:
    cls: type
    keys: dict[str, Any]
    nullable: bool = False  # null switches it off (None) instead of keeping the defaults
    scalar: Callable[[Any], Any] | None = None  # reads a value that is not a mapping (true/false)


def _schema(base: str, policies_base: str) -> _Section:
    return _Section(GateConfig, {
        "hostname": _hostname,
        "authserv_id": _authserv_id,
        "listen": _Each(_address, min_items=1),
        "workers": _workers,
        "downstream": _Section(DownstreamConfig, {
            "host": _host, "port": _port, "xclient": boolean,
            "tls": one_of("none", "starttls", "required"),
            "tls_ca": partial(_ca_file, base=base), "timeout": _timeout,
            "pool": _Section(PoolConfig, {"size": partial(_count, lowest=0), "idle": _timeout,
                                          "max_uses": _count})}),
        "tls": _Section(TLSConfig, {"cert": partial(_existing_file, base=base),
                                    "key": partial(_existing_file, base=base),
                                    "ciphers": _ciphers}, nullable=True),
        "proxy_protocol": _Section(ProxyProtocol, {"trusted": _Each(_cidr, min_items=1)},
                                   nullable=True, scalar=_proxy_switch),
        "trusted_forwarders": _Each(_cidr),
        "state": partial(_state, base=base),
        "quarantine": partial(_path, base=base),
        "quarantine_keep": _keep,
        "quarantine_mode": _file_mode,
        "limits": _Section(Limits, {
            "max_message_size": _size, "max_recipients": _count, "max_connections": _count,
            "max_connections_per_client": _count, "max_line_length": _line_length,
            "max_inflight_data": _inflight, "command_timeout": _timeout, "data_timeout": _timeout,
            "max_greetings": _count, "max_rsets": _count, "max_junk_commands": _count,
            "max_errors": _count, "ipv6_client_prefix": _ipv6_prefix}),
        "policies": partial(_existing_dir, base=policies_base),
        "plugins": _Each(partial(_existing_dir, base=base)),
        "dns": _Section(DnsConfig, {"nameservers": _Each(_nameserver), "timeout": _timeout, "attempts": _count,
                                    "budget": _timeout, "max_queries_per_session": _count,
                                    "max_inflight_per_session": _count}),
        "metrics": _metrics,
        "log": _Section(LogConfig, {"format": one_of("text", "json"), "level": one_of(*LOG_LEVELS)}),
    })


_BAD = object()  # a value that was reported; the default stays in its place


def _read(doc: Any, file: str, base: str, policies_base: str, fallback: GateConfig | None,
          source: str, problems: list[Problem]) -> GateConfig | None:
    schema = _schema(base, policies_base)
    if doc is None:
        doc = empty_mapping(file)
    if not isinstance(doc, LocatedDict):
        problems.append(Problem(file, 1, 1, "expected a mapping of settings (key: value) at the top"))
        return None
    config = _Reader(problems).section(doc, "", schema, fallback, source=source)
    return None if config is _BAD else config


class _Reader:
    def __init__(self, problems: list[Problem]):
        self.problems = problems

    def section(self, node: LocatedDict, path: str, spec: _Section, fallback: Any, **extra: Any) -> Any:
        values, written = dict(extra), set(node)
        for key in node:
            kpath = join_path(path, key)
            if key not in spec.keys:
                self.problems.append(unknown_key(node, key, kpath, spec.keys))
                continue
            value = self.value(node, key, kpath, spec.keys[key], getattr(fallback, key, None))
            if value is not _BAD:
                values[key] = value
        if fallback is not None:
            return replace(fallback, **values)
        unset = [f.name for f in fields(spec.cls) if f.name not in values
                 and f.default is MISSING and f.default_factory is MISSING]
        for name in unset:
            if name not in written:  # a written but bad value is reported already
                self.problems.append(problem_at(node, None, join_path(path, name), "is required"))
        return _BAD if unset else spec.cls(**values)

    def value(self, parent: LocatedDict, key: str, path: str, conv: Any, fallback: Any) -> Any:
        raw = parent[key]
        if isinstance(conv, _Section):
            if raw is None and (conv.nullable or fallback is not None):
                return None if conv.nullable else fallback
            if conv.scalar is not None and not isinstance(raw, LocatedDict):
                return self.convert(parent, key, path, conv.scalar)
            if not isinstance(raw, LocatedDict):
                self.problems.append(problem_at(parent, key, path, f"expected a mapping, got {raw!r}"))
                return _BAD
            return self.section(raw, path, conv, fallback)
        if isinstance(conv, _Each):
            return self.each(parent, key, path, conv)
        return self.convert(parent, key, path, conv)

    def each(self, parent: LocatedDict, key: str, path: str, conv: _Each) -> Any:
        raw = parent[key]
        if isinstance(raw, LocatedList):
            out = [self.convert(raw, i, join_path(path, i), conv.item) for i in range(len(raw))]
        else:
            out = [] if raw is None else [self.convert(parent, key, path, conv.item)]
        if _BAD in out:
            return _BAD
        if len(out) < conv.min_items:
            self.problems.append(problem_at(parent, key, path, f"needs at least {conv.min_items} item(s)"))
            return _BAD
        return out

    def convert(self, container: Any, key: Any, path: str, conv: Callable[[Any], Any]) -> Any:
        try:
            return conv(container[key])
        except ValueError as e:
            self.problems.append(problem_at(container, key, path, str(e)))
            return _BAD
