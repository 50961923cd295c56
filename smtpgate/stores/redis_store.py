"""The Redis backend (``state: redis://HOST:PORT/DB``): a fleet of gates sharing one state.

- The URL (``redis_url.py``): ``redis://``, ``unix:///PATH/TO/redis.sock`` (a server on this
  host, at its Unix socket), ``rediss://`` (TLS, redis-py's ``ssl_*`` settings) or
  ``redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE/DB``: redis-py's Sentinel
  client asks the Sentinels for SERVICE's primary whenever it opens a connection, and drops
  idle ones when the answer changes, so after a failover the gate follows the new primary
  by itself (the breaker's probes come every 2 s at most there). Replicas are never read:
  every operation reads and writes the primary, as the atomic decisions need.
- redis-py's asyncio client, connected on first use (each worker process has its own pool),
  with connect and read timeouts (``socket_timeout`` / ``socket_connect_timeout`` in the URL
  override the 2 s defaults).
- At most ``?max_connections=`` (default 32) connections per process; past it an operation
  waits, first come first served, up to ``?pool_timeout=`` seconds (default 5) for a free
  one. Two redis-py behaviours made us queue the operations ourselves (a FIFO semaphore in
  front of a plain pool of the same size): its default pool raises "Too many connections"
  at the 101st concurrent command, and its blocking pool is not fair, so under sustained
  load a waiter can lose every race for a released connection until its timeout (the
  benchmark hit it).
- The calls the sessions of a process make in one turn of the event loop go together in
  one pipeline: one connection, one write, one read (``RedisLink.script`` / ``command``);
  the greylist script answers one text, since redis-py parses every reply element in
  Python (bench/store_bench.py).
  On a plain ``redis://`` or ``unix://`` server those pipelines go on connections of our own
  (``redis_wire.py``: hiredis packing and parsing, no task per call, no timer per batch), a
  quarter of redis-py's CPU per round trip; everything else uses redis-py. When a
  connection is idle, the server up and a slot free (the usual case), the pipeline is
  written by the loop callback that gathered it and its callers are answered in the turn
  the replies come in (``_send_now``): no task, two turns of the event loop fewer per
  round trip; otherwise it takes the long way (``_send``: a task that may wait for a slot,
  open a connection, probe a server marked down, load a lost script).
- ``?prefix=NAME`` in the URL puts every key under ``NAME`` (default ``smtpgate:``), so
  several gate fleets, or tests, can share one database.
- The decisive operation runs as one Lua script (EVALSHA, loaded again when the server
  lost it): read the allow list, the triplet and, when needed, the
  client's live passes, decide, write — atomically, so gates racing on one triplet never
  double-count or lose an attempt. The script mirrors ``greylist.decide`` line by line.
- Every key carries a TTL: a triplet lives until it expires plus ``GRACE``; the
  auto-whitelist set of a client as long as its longest-lived pass.
- A dead or frozen server is noticed once per process and then not retried on every call
  (``breaker.py``): calls fail at once with ``StoreError`` until a back-off passes.
- This is the only module that imports ``redis``; its errors leave as ``StoreError``.

Keys (``P`` = the prefix): ``Pgl:t:<client> <sender|<>> <recipient>`` (hash: one triplet),
``Pgl:awl:<client>`` (sorted set: the client's passed triplets scored by expiry),
``Pgl:allow`` (hash: allow key -> JSON), ``Pgl:allowlens`` (set: client prefix lengths in
use, ``4/24``), ``Pgl:stats`` (hash: outcome and retry-delay counters).
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import StoreError
from .breaker import SENTINEL_LONGEST_BACKOFF, breaker_for
from .greylist import (DELAY_BUCKETS, GRACE, AllowEntry, Attempt, Entry, GreylistStore, Params,
                       Selector, Stats, fixed_allow_keys, import_kind, ip_hex, triplet_value)
from .redis_url import RedisTarget, parse_redis_url, redact
from .redis_wire import WirePool

SCAN_COUNT = 1000
BATCH_MAX = 256  # calls per pipeline (more wait for the next one, sent at the same time)

_BUCKETS_LUA = "{" + ",".join(f"{{{'math.huge' if math.isinf(b) else int(b)},'{label}'}}"
                              for b, label in DELAY_BUCKETS) + "}"

# KEYS: 1 triplet, 2 client's awl set, 3 allow hash, 4 allow prefix lengths, 5 counters
# ARGV: 1 now, 2 delay, 3 retry_window, 4 pass_ttl, 5 auto_whitelist_after, 6 dry run (0/1),
#   7 grace, 8 triplet value, 9 client, 10 sender, 11 recipient, 12 ip family ('' none),
#   13 ip hex digits, 14.. fixed allow keys, most specific first (greylist.fixed_allow_keys)
# (separate arguments: hiredis packs them in C, and splitting one packed text in Lua cost
# the server more than the rest of an allowed decision together.)
# Returns one tab-separated text (outcome, exists, the entry's fields, the allow entry's
# key, the client's live passes or -1), then the allow entry's JSON.
ATTEMPT_LUA = """
local A = ARGV
local now, delay, window = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local pass_ttl, awl_after, dry = tonumber(A[4]), tonumber(A[5]), A[6] == '1'
local grace, member, fam, hex = tonumber(A[7]), A[8], A[12], A[13]
local HEX = '0123456789abcdef'

local function masked(h, plen)  -- greylist.masked_hex
  local full, rem = math.floor(plen / 4), plen % 4
  local out = string.sub(h, 1, full)
  if full < #h then
    if rem > 0 then
      local d = tonumber(string.sub(h, full + 1, full + 1), 16)
      local m = d - (d % (2 ^ (4 - rem)))
      out = out .. string.sub(HEX, m + 1, m + 1)
      full = full + 1
    end
    out = out .. string.rep('0', #h - full)
  end
  return out
end
local function fmt(x) if x == nil then return '' end return string.format('%.17g', x) end
local function live(v)  -- an allow entry's JSON; one naming no expiry needs no decoding
  if not string.find(v, '"expires"', 1, true) then return true end
  local x = cjson.decode(v).expires
  return type(x) ~= 'number' or now <= x
end

-- the allow list: the first live fixed key, else the client's live network of the longest prefix
local fields, plens = {}, {}
for i = 14, #A do fields[#fields + 1] = A[i] end
local fixed = #fields
if fam ~= '' then
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local f, n = string.match(m, '^(%d)/(%d+)$')
    if f == fam then
      local plen = tonumber(n)
      fields[#fields + 1] = 'client:' .. fam .. ':' .. masked(hex, plen) .. '/' .. n
      plens[#fields] = plen
    end
  end
end
local allow_key, allow_json, best = '', '', -1
local vals = redis.call('HMGET', KEYS[3], unpack(fields))
for i, v in ipairs(vals) do
  if v and (i > fixed and plens[i] or math.huge) > best and live(v) then
    allow_key, allow_json = fields[i], v
    if i <= fixed then break end
    best = plens[i]
  end
end

-- the triplet
local e = redis.call('HMGET', KEYS[1], 'first', 'last', 'attempts', 'passed', 'passed_at', 'retry_delay', 'expires')
local exists = e[1] ~= false and e[1] ~= nil
local first, last, attempts, passed, passed_at, retry_delay, expires
if exists then
  first, last, attempts = tonumber(e[1]), tonumber(e[2]), tonumber(e[3])
  passed, passed_at, retry_delay, expires = e[4] == '1', tonumber(e[5]), tonumber(e[6]), tonumber(e[7])
end

-- greylist.decide
local outcome, count = nil, -1
if allow_key ~= '' then
  outcome = 'allowed'
elseif exists and passed and now <= expires then
  outcome = 'passed_before'
  last, attempts, expires = now, attempts + 1, now + pass_ttl
else
  local auto = false
  if awl_after > 0 then
    count = redis.call('ZCOUNT', KEYS[2], now, '+inf')
    auto = count >= awl_after
  end
  if auto then
    outcome = 'auto'
    if exists and not passed and now <= first + window then
      attempts = attempts + 1
    else
      first, attempts = now, 1
    end
    last, passed, passed_at, retry_delay, expires = now, true, now, nil, now + pass_ttl
  elseif not exists or passed then
    outcome = 'new'
    first, last, attempts, passed, passed_at, retry_delay, expires = now, now, 1, false, nil, nil, now + window
  elseif now > first + window then
    outcome = 'restarted'
    first, last, attempts, expires = now, now, 1, now + window
  elseif now < first + delay then
    outcome = 'too_early'
    last, attempts, expires = now, attempts + 1, first + window
  else
    outcome = 'passed_now'
    last, attempts, passed, passed_at, retry_delay, expires = now, attempts + 1, true, now, now - first, now + pass_ttl
  end
end

if not dry then
  if outcome ~= 'allowed' then
    redis.call('HSET', KEYS[1], 'client', A[9], 'sender', A[10], 'recipient', A[11],
      'first', fmt(first), 'last', fmt(last), 'attempts', attempts, 'passed', passed and '1' or '0',
      'passed_at', fmt(passed_at), 'retry_delay', fmt(retry_delay), 'expires', fmt(expires))
    local ttl = math.ceil(expires - now + grace)
    redis.call('EXPIRE', KEYS[1], ttl)
    if passed then
      redis.call('ZADD', KEYS[2], expires, member)
      redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. fmt(now - grace))
      if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
    end
  end
  redis.call('HINCRBY', KEYS[5], outcome, 1)
  if outcome == 'passed_now' then
    for _, b in ipairs(""" + _BUCKETS_LUA + """) do
      if retry_delay < b[1] then
        redis.call('HINCRBY', KEYS[5], 'delay:' .. b[2], 1)
        break
      end
    end
  end
end
local out
if outcome == 'allowed' and not exists then
  out = {outcome, 0, '', '', 0, 0, '', '', '', allow_key, count}
else
  out = {outcome, 1, fmt(first), fmt(last), attempts, passed and 1 or 0, fmt(passed_at), fmt(retry_delay),
         fmt(expires), allow_key, count}
end
return table.concat(out, '\t') .. '\t' .. allow_json
"""

# KEYS: 1 allow hash, 2 allow prefix lengths. Rebuild the set from the hash.
REBUILD_LENS_LUA = """
redis.call('DEL', KEYS[2])
local keys = redis.call('HKEYS', KEYS[1])
for _, k in ipairs(keys) do
  local f, n = string.match(k, '^client:(%d):%x+/(%d+)$')
  if f then redis.call('SADD', KEYS[2], f .. '/' .. n) end
end
return 1
"""

# KEYS: 1 triplet, 2 client's awl set. ARGV: 1 now, 2 grace, 3 awl member, 4 client,
# 5 sender, 6 recipient, 7 first, 8 last, 9 attempts, 10 passed (0/1), 11 passed_at,
# 12 retry_delay, 13 expires. Store one copied triplet as ATTEMPT_LUA writes one.
IMPORT_LUA = """
local now, grace, expires = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[13])
redis.call('HSET', KEYS[1], 'client', ARGV[4], 'sender', ARGV[5], 'recipient', ARGV[6],
  'first', ARGV[7], 'last', ARGV[8], 'attempts', ARGV[9], 'passed', ARGV[10],
  'passed_at', ARGV[11], 'retry_delay', ARGV[12], 'expires', ARGV[13])
local ttl = math.ceil(expires - now + grace)
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[10] == '1' then
  redis.call('ZADD', KEYS[2], expires, ARGV[3])
  if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
else
  redis.call('ZREM', KEYS[2], ARGV[3])
end
return 1
"""

# KEYS: a page of triplet keys. Every hash as a flat field/value list, in one JSON text:
# one reply to parse instead of a thousand (redis-py's reply parser is the slow part).
EXPORT_LUA = """
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('HGETALL', k) end
return cjson.encode(out)
"""


_GRACE_ARG = repr(GRACE)


@functools.lru_cache(maxsize=64)  # one per policy's greylist timing: a handful
def _timing_args(params: Params) -> tuple[str, str, str, str]:
    """The greylist script's ARGV 2-5: delay, retry_window, pass_ttl, auto_whitelist_after."""
    return (repr(float(params.delay)), repr(float(params.retry_window)), repr(float(params.pass_ttl)),
            str(int(params.auto_whitelist_after)))


def _fmt(x: float | None) -> str:
    return "" if x is None else format(float(x), ".17g")  # as the scripts' fmt()


def _num(text) -> float | None:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    return float(text) if text != "" else None


def as_text(value) -> str:
    """A reply from redis-py (bytes or not) as text."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _allow_from_json(key: str, text) -> AllowEntry:
    d = json.loads(as_text(text))
    return AllowEntry(d["kind"], d["value"], key, d["created"], d.get("expires"), d.get("note", ""))


#: the allow entries decisions matched, by their key and JSON: a busy entry (a relay's
#: network, the bench triplet) is parsed once, not per message (entries are frozen: shared)
_matched_allow = functools.lru_cache(maxsize=256)(_allow_from_json)


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN MATCH pattern (every Redis store scans its own prefix)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _target(url: str) -> RedisTarget:
    """The checked URL (``redis_url.py``); StoreError for one it refuses."""
    try:
        return parse_redis_url(url)
    except ValueError as e:
        raise StoreError(f"Redis {e}") from None


class RedisLink:
    """What a process's Redis stores share (``Stores`` hands the first one's to the others;
    a store opened alone has its own): the connection pool (opened on first use), the FIFO
    queue in front of it, the stores' Lua scripts, the pipeline of the calls asked in one
    turn of the event loop (so a sender read, a greylist decision and a compare-and-set of
    three sessions go in one round trip), and the process's circuit breaker for the server
    (``breaker.py``: a dead server is noticed once, not waited for on every call)."""

    def __init__(self, url: str):
        self.url = url
        self.target = _target(url)
        self.options = {"prefix": self.target.prefix, "max_connections": self.target.max_connections,
                        "pool_timeout": self.target.pool_timeout}
        self._sources: dict[str, str] = {}  # the stores' scripts (``attach``)
        self.scripts: dict = {}
        self._client: aioredis.Redis | None = None
        self._sentinel: Sentinel | None = None
        self._slots: _Slots | None = None
        self._batch: list = []  # (command, script name or None, future) asked this turn
        self._sending: set[asyncio.Future] = set()  # batches out the long way (tasks)
        self._out_now = 0  # batches out the short way (_send_now)
        self._none_out: asyncio.Future | None = None  # what close() waits on for those: made then
        self._wire: WirePool | None = None  # the batched calls' own connections (redis_wire.py)
        self._outages_seen = 0
        self._users = 0  # stores attached; the last one to close closes the link
        # Behind Sentinel an outage is usually a failover, over in seconds: probe often so
        # the new primary is found soon after its promotion (breaker.py).
        self.breaker = breaker_for("Redis " + self.target.server_name(),
                                   longest=SENTINEL_LONGEST_BACKOFF if self.target.sentinel else None)

    def attach(self, scripts: dict[str, str]) -> "RedisLink":
        """One more store uses this link, with its scripts (names are unique across stores)."""
        for name, lua in scripts.items():
            if self._sources.setdefault(name, lua) != lua:
                raise ValueError(f"two Redis stores name different scripts {name!r}")
            if self._client is not None and name not in self.scripts:
                self.scripts[name] = self._client.register_script(lua)
        self._users += 1
        return self

    def client(self) -> aioredis.Redis:
        if self._client is None:
            try:
                self._client = self._open()
            except (ValueError, TypeError) as e:
                raise StoreError(f"Redis {redact(self.url)}: {e}") from None
            self._slots = _Slots(self.options["max_connections"])  # FIFO: fair
            self.scripts = {name: self._client.register_script(lua) for name, lua in self._sources.items()}
            self._wire = self._open_wire()
        return self._client

    def _open_wire(self) -> WirePool | None:
        """Connections of our own for the batched calls, to a plain ``redis://`` server or a
        ``unix://`` socket; TLS, Sentinel and health checks stay with redis-py (None)."""
        t, settings = self.target, self.target.connection
        if t.sentinel or t.tls or "health_check_interval" in settings:
            return None
        host, port = t.hosts[0] if t.hosts else (None, None)
        return WirePool(host, port, path=t.path, db=t.db, username=t.username, password=t.password,
                        client_name=settings.get("client_name"),
                        timeout=float(settings["socket_timeout"]),
                        connect_timeout=float(settings["socket_connect_timeout"]),
                        keepalive=settings.get("socket_keepalive", "").lower() in ("1", "true", "yes", "on"))

    def _open(self) -> aioredis.Redis:
        t = self.target
        if not t.sentinel:
            # A plain pool: the FIFO queue in run() already holds operations to
            # max_connections, so the pool never runs out (and a blocking pool's own
            # condition and timer per command would only cost time).
            pool = aioredis.ConnectionPool.from_url(t.client_url(), max_connections=t.max_connections)
            return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        # redis-py reads the primary's settings from a plain URL; the Sentinels get the
        # timeouts, their own credentials, and no retries: a dead Sentinel is skipped for
        # the next one at once, instead of being retried with back-off inside one call.
        settings = {k: v for k, v in parse_url(t.client_url()).items()
                    if k not in ("host", "port", "connection_class")}
        asked = {"socket_timeout": settings.get("socket_timeout"),
                 "socket_connect_timeout": settings.get("socket_connect_timeout"),
                 "username": t.sentinel_auth.get("sentinel_username"),
                 "password": t.sentinel_auth.get("sentinel_password"),
                 "retry": Retry(NoBackoff(), 0)}
        self._sentinel = Sentinel(list(t.hosts), sentinel_kwargs=asked, **settings)
        # The pool asks the Sentinels for the primary on every new connection and drops
        # idle ones when the answer changes; the FIFO queue in run() bounds it as for a
        # single server.
        return self._sentinel.master_for(t.service, max_connections=t.max_connections)

    async def run(self, coro_fn):
        """Run one operation (it uses one connection at a time) in its turn; redis-py's and
        the socket's errors become StoreError."""
        client = self.client()
        self.breaker.check()  # down: fail now rather than queue for a connection
        try:
            if self._slots.locked():  # all taken: wait in line, for pool_timeout at most
                async with asyncio.timeout(self.options["pool_timeout"]):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # free: taken at once, no timer to arm
        except TimeoutError:
            raise StoreError(f"Redis {redact(self.url)}: no connection free within "
                             f"{self.options['pool_timeout']:g}s (max_connections="
                             f"{self.options['max_connections']})") from None
        try:
            return await self.breaker.run(lambda: self._fresh_then(coro_fn, client), _is_outage)
        except (RedisError, OSError) as e:
            raise self._failure(e) from None
        finally:
            self._slots.release()

    def _failure(self, e: Exception) -> StoreError:
        return StoreError(f"Redis {redact(self.url)}: {type(e).__name__}: {e}")

    async def _fresh_then(self, coro_fn, client):
        # After an outage (noticed by this store or another one on the server), the idle
        # connections of the pool lead to the dead server process: drop them, or the first
        # call after the restart would fail on one and mark the store down again.
        if self._outages_seen != self.breaker.outages:
            self._outages_seen = self.breaker.outages
            try:
                await client.connection_pool.disconnect(inuse_connections=False)
            except (RedisError, OSError):
                pass  # closing a socket to a dead server: nothing to learn
            if self._wire is not None:
                self._wire.drop_idle()
        try:
            return await coro_fn(client)
        except MasterNotFoundError as e:
            raise self._no_primary(e) from None

    # -- calls made together: one pipeline (one round trip) per loop iteration -------------
    async def script(self, name: str, keys: Sequence, args: Sequence):
        """Run the registered script ``name``; the scripts and commands (``command``) that
        the other sessions of this process ask for in the same turn of the event loop go
        with it, in one pipeline: one connection, one write, one read for all of them."""
        return await self._queue(("EVALSHA", None, len(keys), *keys, *args), name)

    async def command(self, *args):
        """Run one command (``"HMGET", key, field, ...``), batched as ``script``."""
        return await self._queue(args, None)

    def _queue(self, args: tuple, script: str | None) -> asyncio.Future:
        self.client()
        self.breaker.check()  # down: fail now, as run() does
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._batch.append((args, script, future))
        if len(self._batch) == 1:
            loop.call_soon(self._send_batch)  # once this turn's sessions have asked
        return future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        for i in range(0, len(batch), BATCH_MAX):
            part = batch[i:i + BATCH_MAX]
            if not self._send_now(part):
                self._track(asyncio.ensure_future(self._send(part)))

    def _track(self, sending: asyncio.Future) -> None:
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    def _send_now(self, batch) -> bool:
        """Write ``batch`` at once on an idle connection of our own when nothing calls for a
        coroutine (the server up, no outage since the connections were opened, a slot
        free): no task, and the callers hear their replies in the turn they come in, two
        turns of the event loop sooner than through ``_send``. False: nothing sent."""
        breaker = self.breaker
        if (self._wire is None or breaker.is_down or self._outages_seen != breaker.outages
                or not self._slots.take_now()):
            return False
        try:
            went = self._wire.send(self._calls(batch), functools.partial(self._sent, batch))
        except Exception as e:  # a bad argument (nothing written): its callers hear it, as on _send
            self._slots.release()
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return True
        if not went:
            self._slots.release()  # no idle connection: _send opens one
            return False
        self._out_now += 1
        return True

    def _sent(self, batch, result) -> None:
        """The end of a ``_send_now`` batch, accounted as ``run`` accounts one."""
        self._slots.release()
        self._out_now -= 1
        none_out = self._none_out
        # guarded: raising here, inside data_received, would kill the connection
        if not self._out_now and none_out is not None and not none_out.done():
            none_out.set_result(None)
        if isinstance(result, Exception):  # a fault of the connection: an outage
            self.breaker.ended(False, result, _is_outage)
            error = self._failure(result)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.breaker.ended(False, None, _is_outage)
        replies = _wire_replies(result)
        lost = {i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)}
        if lost:  # the server lost a script: those calls go the long way, which loads it again
            self._track(asyncio.ensure_future(self._send([batch[i] for i in sorted(lost)])))
            batch, replies = ([b for i, b in enumerate(batch) if i not in lost],
                              [r for i, r in enumerate(replies) if i not in lost])
        self._deliver(batch, replies)

    async def _send(self, batch) -> None:
        try:
            replies = await self.run(lambda r: self._execute(r, batch))
        except BaseException as e:  # the whole batch failed: every caller hears it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e if isinstance(e, Exception) else StoreError(f"Redis: {e!r}"))
            if not isinstance(e, Exception):
                raise
            return
        self._deliver(batch, replies)

    def _deliver(self, batch, replies) -> None:
        for (_, _, future), reply in zip(batch, replies):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(reply, RedisError):
                future.set_exception(self._failure(reply))
            else:
                future.set_result(reply)

    def _calls(self, batch) -> list:
        """The batch's commands, its scripts called by their SHA."""
        return [args if script is None else (args[0], self.scripts[script].sha, *args[2:])
                for args, script, _ in batch]

    async def _execute(self, r, batch) -> list:
        """The batch's replies (a command's error as its reply); a script the server lost
        (a restart, SCRIPT FLUSH) is loaded again and its calls sent once more."""
        send = self._wire_call if self._wire is not None else lambda c: _redis_py_call(r, c)
        replies = await send(self._calls(batch))
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            for name in {batch[i][1] for i in lost}:
                self.scripts[name].sha = await r.script_load(self.scripts[name].script)
            for i, reply in zip(lost, await send(self._calls([batch[i] for i in lost]))):
                replies[i] = reply
        return replies

    async def _wire_call(self, calls: list) -> list:
        """``calls`` on our own connections; error replies as redis-py's exceptions."""
        return _wire_replies(await self._wire.call(calls))

    def _no_primary(self, exc: MasterNotFoundError) -> RedisConnectionError:
        """redis-py's text holds the repr of every Sentinel client it could not reach (a
        screenful per log line): keep their addresses only."""
        found = set(re.findall(r"host=([^,]+),port=(\d+)", str(exc)))
        unreachable = sorted(found, key=lambda hp: (hp[0], int(hp[1])))
        text = f"the Sentinels name no usable primary for {self.target.service!r}"
        if unreachable:
            text += " (unreachable: " + ", ".join(f"{h}:{p}" for h, p in unreachable) + ")"
        return RedisConnectionError(text)

    async def close(self) -> None:
        if self._users > 1:  # another store still uses it
            self._users -= 1
            return
        self._users = 0
        # Batches on their way: let them finish (their callers wait), including the ones
        # they start (a lost script's long way), so none reopens the link after close.
        # asyncio.wait, not gather: a cancelled close must not cancel them.
        while self._sending or self._out_now:
            waits = set(self._sending)
            if self._out_now:
                if self._none_out is None or self._none_out.done():
                    self._none_out = asyncio.get_running_loop().create_future()
                waits.add(self._none_out)
            await asyncio.wait(waits)
        if self._wire is not None:
            self._wire.drop_idle()
        client, self._client = self._client, None
        sentinel, self._sentinel = self._sentinel, None
        for closable in (client, sentinel):
            if closable is not None:
                try:
                    await closable.aclose()
                except (RedisError, OSError):
                    pass


async def _redis_py_call(r, calls: list) -> list:
    """``calls`` through redis-py, in one pipeline; an error the server answered is its reply."""
    if len(calls) == 1:
        try:
            return [await r.execute_command(*calls[0])]
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except RedisError as e:
            return [e]
    pipe = r.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*call)
    return await pipe.execute(raise_on_error=False)


def _wire_replies(replies: list) -> list:
    """Replies from our own connections, their errors as redis-py's exceptions."""
    return [_reply_error(reply) if isinstance(reply, hiredis.ReplyError) else reply for reply in replies]


def _reply_error(reply) -> RedisError:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class _Slots(asyncio.Semaphore):
    """The FIFO queue in front of the connections, which also hands a free slot over
    without a coroutine (``take_now``: what ``acquire`` does when it need not wait)."""

    def take_now(self) -> bool:
        # mirrors CPython 3.11+'s acquire fast path (no waiter, a free slot: _value -= 1);
        # locked() also says no while someone waits, so the line stays FIFO
        if self.locked():
            return False
        self._value -= 1
        return True


def _is_outage(exc: BaseException) -> bool:
    """A fault of the network or the server's availability, as opposed to an answer."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError))


class RedisComponentStore:
    """What every Redis store shares: a ``RedisLink`` (its own, or ``link``: the one of the
    process's other stores on the same URL) with its Lua ``scripts`` registered, its keys
    under the URL's prefix (or ``prefix``) plus ``key_prefix``, and its export a SCAN page
    at a time."""
    key_prefix: str
    scripts: dict[str, str] = {}

    def __init__(self, url: str, prefix: str | None = None, link: RedisLink | None = None):
        self.url = url
        self.link = (link if link is not None and link.url == url else RedisLink(url)).attach(self.scripts)
        self.prefix = (prefix if prefix is not None else self.link.options["prefix"]) + self.key_prefix

    async def _do(self, coro_fn):
        return await self.link.run(coro_fn)

    async def _scan_batches(self, pattern: str, read):
        """``await read(r, keys)`` for each SCAN page of the keys ``pattern`` matches, one call
        a page (the server never blocks, memory stays bounded); its non-empty lists."""
        cursor = 0
        while True:
            async def page(r, at=cursor):
                following, keys = await r.scan(cursor=at, match=pattern, count=SCAN_COUNT)
                return int(following), (await read(r, keys) if keys else [])
            cursor, found = await self._do(page)
            if found:
                yield found
            if cursor == 0:
                return

    async def close(self) -> None:
        await self.link.close()


async def scan_keys(r, pattern):
    """The keys ``pattern`` matches, a SCAN page (a list) at a time, on the connection ``r``."""
    cursor = 0
    while True:
        cursor, keys = await r.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
        if keys:
            yield keys
        if int(cursor) == 0:
            break


class RedisGreylistStore(RedisComponentStore, GreylistStore):
    key_prefix = "gl:"
    scripts = {"attempt": ATTEMPT_LUA, "lens": REBUILD_LENS_LUA, "import": IMPORT_LUA, "export": EXPORT_LUA}

    def __init__(self, url: str, prefix: str | None = None, link: RedisLink | None = None):
        super().__init__(url, prefix, link)
        self.k_allow, self.k_lens, self.k_stats = (self.prefix + "allow", self.prefix + "allowlens",
                                                   self.prefix + "stats")

    def triplet_key(self, client, sender, recipient) -> str:
        return self._triplet_key_of(triplet_value(client, sender, recipient))

    def _triplet_key_of(self, member: str) -> str:
        """A triplet's key, from its ``triplet_value`` (also its awl member)."""
        return f"{self.prefix}t:{member}"

    def awl_key(self, client) -> str:
        return f"{self.prefix}awl:{client}"

    # -- the decisive operation --------------------------------------------------------
    async def attempt(self, client, sender, recipient, *, now, params: Params, client_ip=None,
                      dry_run=False) -> Attempt:
        probe = ip_hex(client_ip) if client_ip else None
        fam, hexdigits = probe if probe else ("", "")
        member = triplet_value(client, sender, recipient)  # built once: the keys below start from it
        keys = (self._triplet_key_of(member), self.awl_key(client), self.k_allow, self.k_lens, self.k_stats)
        args = (repr(float(now)), *_timing_args(params), "1" if dry_run else "0", _GRACE_ARG, member,
                client, sender, recipient, fam, hexdigits, *fixed_allow_keys(member, sender))
        res = await self.link.script("attempt", keys, args)
        (outcome, exists, first, last, attempts, passed, passed_at, retry_delay, expires,
         allow_key, count, allow_json) = as_text(res).split("\t", 11)
        entry = None
        if int(exists):
            entry = Entry(client, sender, recipient, _num(first), _num(last), int(attempts), bool(int(passed)),
                          _num(passed_at), _num(retry_delay), _num(expires))
        allow = _matched_allow(allow_key, allow_json) if allow_key else None
        count = int(count)
        return Attempt(outcome, entry, allow, None if count < 0 else count)

    # -- reads -------------------------------------------------------------------------
    @staticmethod
    def _entry(data: dict) -> Entry | None:
        d = {as_text(k): as_text(v) for k, v in data.items()}
        if "first" not in d:
            return None
        return Entry(d["client"], d["sender"], d["recipient"], float(d["first"]), float(d["last"]),
                     int(d["attempts"]), d["passed"] == "1", _num(d.get("passed_at")),
                     _num(d.get("retry_delay")), float(d["expires"]))

    async def get(self, client, sender, recipient) -> Entry | None:
        data = await self._do(lambda r: r.hgetall(self.triplet_key(client, sender, recipient)))
        return self._entry(data)

    async def passed_count(self, client, now) -> int:
        return int(await self._do(lambda r: r.zcount(self.awl_key(client), repr(float(now)), "+inf")))

    async def allow_entries(self, now=None) -> list[AllowEntry]:
        data = await self._do(lambda r: r.hgetall(self.k_allow))
        out = [_allow_from_json(as_text(k), v) for k, v in data.items()]
        if now is not None:
            out = [a for a in out if a.live(now)]
        return sorted(out, key=lambda a: a.created)

    async def _scan(self):
        """Every stored triplet (SCAN in pages: the server never blocks on a big keyspace)."""
        out: list[Entry] = []

        async def run(r):
            pattern = glob_escape(self.prefix + "t:") + "*"
            async for page in scan_keys(r, pattern):
                pipe = r.pipeline(transaction=False)
                for k in page:
                    pipe.hgetall(k)
                for data in await pipe.execute():
                    e = self._entry(data)
                    if e is not None:
                        out.append(e)
        await self._do(run)
        return out

    async def entries(self, selector: Selector, now, limit=None) -> list[Entry]:
        found = [e for e in await self._scan() if selector.matches(e, now)]
        found.sort(key=lambda e: e.last_seen, reverse=True)
        return found[:limit] if limit is not None else found

    # -- writes from the CLI -----------------------------------------------------------
    async def add_allow(self, entry: AllowEntry) -> None:
        async def run(r):
            pipe = r.pipeline(transaction=True)
            self._queue_allow(pipe, entry)
            await pipe.execute()
        await self._do(run)

    def _queue_allow(self, pipe, entry: AllowEntry) -> None:
        doc = {k: v for k, v in entry.as_dict().items() if v is not None}
        pipe.hset(self.k_allow, entry.key, json.dumps(doc))
        if entry.kind == "client":
            fam, rest = entry.key.split(":", 2)[1:]
            pipe.sadd(self.k_lens, f"{fam}/{rest.rpartition('/')[2]}")

    async def _forget(self, entries: list[Entry], allow_keys: list[str]) -> None:
        async def run(r):
            for i in range(0, len(entries), SCAN_COUNT):
                pipe = r.pipeline(transaction=False)
                for e in entries[i:i + SCAN_COUNT]:
                    pipe.delete(self.triplet_key(*e.key))
                    pipe.zrem(self.awl_key(e.client), triplet_value(*e.key))
                await pipe.execute()
            if allow_keys:
                await r.hdel(self.k_allow, *allow_keys)
                await self.link.scripts["lens"](keys=[self.k_allow, self.k_lens], args=[])
        await self._do(run)

    async def delete(self, selector: Selector) -> tuple[int, int]:
        far = float("inf")
        gone = [e for e in await self._scan()
                if Selector(None, selector.client, selector.sender, selector.recipient).matches(e, far)]
        allows = [a.key for a in await self.allow_entries() if selector.matches_allow(a)]
        await self._forget(gone, allows)
        return len(gone), len(allows)

    async def purge(self, now, dry_run=False) -> tuple[int, int]:
        gone = [e for e in await self._scan() if e.expires < now]
        allows = [a.key for a in await self.allow_entries() if not a.live(now)]
        if not dry_run:
            await self._forget(gone, allows)
        return len(gone), len(allows)

    async def stats(self, now, auto_whitelist_after) -> Stats:
        st = Stats()
        per_client: dict[str, int] = {}
        for e in await self._scan():
            state = e.state(now)
            if state == "expired":
                st.expired += 1
            elif state == "passed":
                st.passed += 1
                per_client[e.client] = per_client.get(e.client, 0) + 1
            else:
                st.pending += 1
        if auto_whitelist_after > 0:
            st.auto_whitelisted = sum(1 for n in per_client.values() if n >= auto_whitelist_after)
        st.allow_entries = len(await self.allow_entries(now))
        for k, v in (await self._do(lambda r: r.hgetall(self.k_stats))).items():
            name, value = as_text(k), int(v)
            if name.startswith("delay:"):
                st.retry_delays[name[6:]] = value
            else:
                st.counters[name] = value
        return st

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        allows = await self.allow_entries()
        if allows:
            yield allows
        pattern = glob_escape(self.prefix + "t:") + "*"

        async def read(r, keys):
            found = []
            hashes = json.loads(as_text(await self.link.scripts["export"](keys=keys, args=[])))
            for flat in hashes:  # a key gone since the SCAN: an empty (JSON {}) list
                e = self._entry(dict(zip(flat[::2], flat[1::2]))) if flat else None
                if e is not None:
                    found.append(e)
            return found
        async for found in self._scan_batches(pattern, read):
            yield found

    async def import_batch(self, items, now) -> Counter:
        kinds = [import_kind(item, now) for item in items]
        kept = [item for item, kind in zip(items, kinds) if kind != "skipped"]

        async def run(r):
            pipe = r.pipeline(transaction=False)
            for item in kept:
                if isinstance(item, AllowEntry):
                    self._queue_allow(pipe, item)
                    continue
                e = item
                await self.link.scripts["import"](
                    keys=[self.triplet_key(*e.key), self.awl_key(e.client)],
                    args=[_fmt(now), _fmt(GRACE), triplet_value(*e.key), *e.key, _fmt(e.first_seen),
                          _fmt(e.last_seen), int(e.attempts), "1" if e.passed else "0", _fmt(e.passed_at),
                          _fmt(e.retry_delay), _fmt(e.expires)],
                    client=pipe)
            await pipe.execute()
        if kept:
            await self._do(run)
        return Counter(kinds)
