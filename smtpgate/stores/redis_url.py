"""Redis state URLs, read and checked without redis-py (``check-config`` reports a bad one with
its file and line, before any gate runs):

- ``redis://[USER:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]``: one server (port 6379, DB 0 by default);
- ``rediss://…``: the same over TLS (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
  ``ssl_keyfile``, ``ssl_ca_path``, ``ssl_password``, ``ssl_check_hostname``);
- ``redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/SERVICE[/DB][?OPTIONS]``:
  the primary that the Sentinels (port 26379 by default) name for SERVICE; the user and
  password are the primary's, ``sentinel_username`` / ``sentinel_password`` the Sentinels';
- ``unix://[[USER]:PASSWORD@]/PATH/TO/redis.sock[?db=N&OPTIONS]``: a server on this host, at
  its Unix socket (redis.conf ``unixsocket``), as redis-py spells it; ``unix:///./PATH`` and
  ``unix:///../PATH`` are relative (to gate.yaml's folder, as ``sqlite:///./PATH``).

OPTIONS: ours (``prefix``, ``max_connections``, ``pool_timeout``) and the redis-py
connection settings below (on a Unix socket, not ``socket_keepalive``: a TCP setting); anything
else is an error rather than a surprise at first use.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

SCHEMES = ("redis", "rediss", "redis+sentinel", "unix")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_PREFIX = "smtpgate:"
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_POOL_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 2.0


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError("expected 1 or more")
    return n


def _db(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # not "²", which int() refuses
        raise ValueError("expected a database number")
    return int(text)


def _positive_float(text: str) -> float:
    x = float(text)
    if not x > 0 or x == float("inf"):
        raise ValueError("expected a number of seconds above 0")
    return x


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _cert_reqs(text: str) -> str:
    if text.lower() not in ("none", "optional", "required"):
        raise ValueError("expected none, optional or required")
    return text.lower()


def _text(text: str) -> str:
    return text


#: our own parameters
OURS = {"prefix": _text, "max_connections": _positive_int, "pool_timeout": _positive_float}
#: redis-py's connection settings, on every scheme
CONNECTION = {"socket_timeout": _positive_float, "socket_connect_timeout": _positive_float,
              "socket_keepalive": _bool, "health_check_interval": _positive_int,
              "client_name": _text}
#: TLS settings (rediss:// only); the paths are files or, for ssl_ca_path, a folder
TLS = {"ssl_cert_reqs": _cert_reqs, "ssl_ca_certs": _text, "ssl_certfile": _text,
       "ssl_keyfile": _text, "ssl_ca_path": _text, "ssl_password": _text,
       "ssl_check_hostname": _bool}
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
#: how to log in to the Sentinels themselves (redis+sentinel:// only)
SENTINEL = {"sentinel_username": _text, "sentinel_password": _text}
#: the database of a unix:// URL (its path is the socket's), and the connection settings a
#: Unix socket takes (redis-py's Unix connections refuse socket_keepalive)
UNIX = {"db": _db, **{k: v for k, v in CONNECTION.items() if k != "socket_keepalive"}}
#: the longest Unix socket path (sun_path: 108 bytes with its NUL)
UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class RedisTarget:
    """A checked Redis state URL (its repr shows no password)."""

    url: str = field(repr=False)
    scheme: str
    hosts: tuple[tuple[str, int], ...]  # the server, or the Sentinels (none for unix://)
    db: int = 0
    service: str | None = None  # the Sentinel service name
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    #: redis-py's settings, as written (strings), timeouts defaulted
    connection: dict[str, str] = field(default_factory=dict, repr=False)
    sentinel_auth: dict[str, str] = field(default_factory=dict, repr=False)
    path: str | None = None  # the Unix socket (unix:// only)

    @property
    def sentinel(self) -> bool:
        return self.scheme == "redis+sentinel"

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def unix(self) -> bool:
        return self.scheme == "unix"

    def client_url(self) -> str:
        """A ``redis://`` / ``rediss://`` / ``unix://`` URL for redis-py's own parser: the
        connection settings and credentials, without our parameters. For Sentinel, the host
        part is a placeholder: the Sentinels name the primary."""
        if self.unix:
            netloc, path = "", quote(self.path)
            query = urlencode({"db": self.db, **self.connection})
        else:
            scheme = "redis" if self.sentinel else self.scheme
            host, port = ("sentinel-managed", DEFAULT_PORT) if self.sentinel else self.hosts[0]
            netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            path, query = f"/{self.db}", urlencode(self.connection)
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            netloc = auth + "@" + netloc
        return _unsplit(("unix" if self.unix else scheme, netloc, path, query, ""))

    def server_name(self) -> str:
        """How logs and the circuit breaker name it: the URL without password or options."""
        if self.unix:
            return f"unix://{self.path}?db={self.db}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        path = f"/{self.service}/{self.db}" if self.sentinel else f"/{self.db}"
        return f"{self.scheme}://{hosts}{path}"


def _unsplit(parts) -> str:
    """urlunsplit, keeping the ``//`` of an empty host: urlunsplit writes ``unix:///PATH`` as
    ``unix:/PATH``, which redis-py does not take, and ``sqlite:////abs`` as ``sqlite://abs``."""
    scheme, netloc, path, query, fragment = parts
    if netloc or not scheme:
        return urlunsplit(parts)
    return f"{scheme}://{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _misplaced_at(url: str, netloc: str) -> bool:
    """An ``@`` after the host part: a user name or password with a bare ``/``, ``?`` or
    ``#``, which ends the host part early (the password would be read as the host)."""
    return "@" not in netloc and "@" in url.partition("://")[2]


def is_redis_url(url: str) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in SCHEMES and "://" in url


def redact(url: str) -> str:
    """The URL with its password (and a Sentinel password option) starred out."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unreadable ("[::1" unclosed): where a password would be is unknown
        return f"{url.partition('://')[0]}://…"
    netloc = parts.netloc
    if _misplaced_at(url, netloc):  # the whole login, whatever it holds, starred out
        return redact(f"{parts.scheme}://***@{url.rpartition('@')[2]}")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + hosts
    query = parts.query
    if "password" in query:
        query = urlencode([(k, "***" if k.endswith("password") else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
    return _unsplit(parts._replace(netloc=netloc, query=query))


def parse_redis_url(url: str, base: str | None = None) -> RedisTarget:
    """The checked target; ValueError saying what is wrong. ``base``: the folder relative
    TLS file paths resolve against (they are checked to exist when given)."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"{shown}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f'{shown}: expected "redis://", "rediss://", "redis+sentinel://" or "unix://"')
    if _misplaced_at(url, parts.netloc):
        raise ValueError(f"{shown}: an '@' after the host: percent-encode '/', '?', '#' and '@' "
                         "in a user name or password (%2F, %3F, %23, %40)")
    if parts.fragment:
        raise ValueError(f"{shown}: a Redis URL has no #fragment")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    if scheme == "unix":
        return _unix_target(url, parts, hostlist, username, password, base, shown)
    sentinel = scheme == "redis+sentinel"
    default_port = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT
    items = hostlist.split(",") if sentinel else [hostlist]
    hosts = tuple(_host_port(item, default_port, shown) for item in items)

    segments = [unquote(s) for s in parts.path.split("/")[1:]] if parts.path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    service = None
    if sentinel:
        if not segments or not segments[0]:
            raise ValueError(f"{shown}: expected redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE/DB "
                             "(the service name is missing)")
        service, segments = segments[0], segments[1:]
    if len(segments) > 1:
        raise ValueError(f"{shown}: expected one database number after the "
                         f"{'service' if sentinel else 'host'}, got /{'/'.join(segments)}")
    try:
        db = _db(segments[0]) if segments else 0
    except ValueError:
        raise ValueError(f"{shown}: the database must be a number, got {segments[0]!r}") from None

    allowed = {**OURS, **CONNECTION, **(TLS if scheme == "rediss" else {}),
               **(SENTINEL if sentinel else {})}
    values, connection, sentinel_auth = _options(parts.query, allowed, base, shown)
    if values.get("ssl_cert_reqs") == "none":
        # no certificate check means no name check either (Python refuses the pair at
        # connect time, which would be a crash in the first rule, not a config error)
        if values.get("ssl_check_hostname") is True:
            raise ValueError(f"{shown}: ssl_check_hostname=true needs ssl_cert_reqs=optional or required")
        connection["ssl_check_hostname"] = "false"
    return RedisTarget(url, scheme, hosts, db, service, username, password,
                       connection=connection, sentinel_auth=sentinel_auth, **_ours(values))


def _unix_target(url: str, parts, host: str, username: str | None, password: str | None,
                 base: str | None, shown: str) -> RedisTarget:
    if host:
        raise ValueError(f"{shown}: a unix:// URL names no host, got {host!r}; expected "
                         "unix:///PATH/TO/redis.sock (three slashes) or unix:///./RELATIVE/PATH")
    path = unquote(parts.path)
    if path.startswith("//"):  # unix:////PATH, as sqlite:////PATH: one slash, as the kernel reads it
        path = "/" + path.lstrip("/")
    if path in ("", "/") or path.endswith("/"):
        raise ValueError(f"{shown}: expected the socket's path: unix:///PATH/TO/redis.sock")
    if path.startswith(("/./", "/../")):  # relative, as sqlite:///./PATH
        path = os.path.normpath(os.path.join(base, path[1:])) if base is not None else path[1:]
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ValueError(f"{shown}: the socket's path is longer than a Unix socket's "
                         f"{UNIX_PATH_MAX} bytes: {path}")
    if base is not None and os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
        # a missing one is fine: Redis may start after the gate (an outage until then)
        raise ValueError(f"{shown}: not a Unix socket: {path}")
    allowed = {**OURS, **UNIX}
    values, connection, _ = _options(parts.query, allowed, base, shown)
    return RedisTarget(url, "unix", (), values.pop("db", 0), None, username, password,
                       connection=connection, path=path, **_ours(values))


def _options(query: str, allowed: dict, base: str | None,
             shown: str) -> tuple[dict[str, object], dict[str, str], dict[str, str]]:
    """(the options' values, redis-py's connection settings as it reads them, the
    Sentinels' login) from the URL's query; ValueError for one not ``allowed`` or bad."""
    values: dict[str, object] = {}
    connection: dict[str, str] = {}
    sentinel_auth: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            hint = " (TLS settings need rediss://)" if key in TLS else ""
            hint = hint or (" (only with redis+sentinel://)" if key in SENTINEL else "")
            hint = hint or (" (a TCP setting: not on a unix:// socket)" if key in CONNECTION else "")
            hint = hint or (" (only with unix://; redis://HOST:PORT/DB)" if key in UNIX else "")
            raise ValueError(f"{shown}: unknown option {key!r}{hint}; expected one of "
                             f"{', '.join(sorted(allowed))}")
        if key in values:
            raise ValueError(f"{shown}: option {key!r} given twice")
        try:
            values[key] = allowed[key](value)
        except ValueError as e:
            raise ValueError(f"{shown}: option {key}={value!r}: {e}") from None
        if key in TLS_FILES or key == "ssl_ca_path":
            value = _tls_path(key, value, base, shown)
        if allowed[key] is _bool:
            value = "true" if values[key] else "false"  # in words redis-py reads the same way
        if key in SENTINEL:
            sentinel_auth[key] = value
        elif key not in OURS and key != "db":
            connection[key] = value
    for key in ("socket_timeout", "socket_connect_timeout"):
        connection.setdefault(key, repr(DEFAULT_TIMEOUT))
    return values, connection, sentinel_auth


def _ours(values: dict[str, object]) -> dict:
    return {"prefix": str(values.get("prefix", DEFAULT_PREFIX)),
            "max_connections": int(values.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
            "pool_timeout": float(values.get("pool_timeout", DEFAULT_POOL_TIMEOUT))}


def _host_port(item: str, default_port: int, shown: str) -> tuple[str, int]:
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{shown}: bad address {item!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = item.partition(":")
        if colon and not port_text:
            raise ValueError(f"{shown}: bad address {item!r}: the port is missing")
    if not host or any(c in host for c in " /?#@"):
        raise ValueError(f"{shown}: bad address {item!r}: expected HOST[:PORT]")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{shown}: bad port in {item!r}")
    return host, int(port_text)


def _tls_path(key: str, value: str, base: str | None, shown: str) -> str:
    if base is None:
        return value
    path = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    exists = os.path.isdir(path) if key == "ssl_ca_path" else os.path.isfile(path)
    if not exists:
        raise ValueError(f"{shown}: {key}: no such {'folder' if key == 'ssl_ca_path' else 'file'}: {path}")
    return path


def with_absolute_paths(target: RedisTarget) -> str:
    """The URL as written, with a relative socket path or relative TLS paths made absolute
    (as parsed with a base)."""
    parts = urlsplit(target.url)
    if target.unix:
        if unquote(parts.path) == target.path or not os.path.isabs(target.path):
            return target.url
        return _unsplit(parts._replace(path=quote(target.path)))
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k in TLS_FILES or k == "ssl_ca_path" for k, _ in query):
        return target.url
    fixed = [(k, target.connection.get(k, v) if (k in TLS_FILES or k == "ssl_ca_path") else v)
             for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(fixed, safe="/:")))
