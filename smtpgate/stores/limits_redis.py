"""The Redis limits store (``state: redis://HOST:PORT/DB[?prefix=NAME]``): the counters a fleet
of gates shares.

Keys (``P`` = the prefix): ``Plim:r:<kind>:<window>:<value>`` (hash: ``b`` the current bucket
number, ``p`` and ``c`` the previous and current counts), expiring when both buckets have
passed; ``Plim:c:<client>`` (sorted set: one member per open session, scored by its expiry).

A check is one round trip (shared with the other sessions' calls of the same turn of the
event loop: ``RedisLink.script``): a Lua script that reads every counter of the transaction,
decides (``limits.decide``, mirrored line for line) and counts — atomically, so two gates
racing on one counter can never both take its last place. Connections likewise: one script
drops expired members, counts and adds. Connections come from this store's own
``RedisLink`` (first use opens it; the process's circuit breaker for the server is shared
with the other stores).
"""
from __future__ import annotations

import math
from collections import Counter as TallyCounter

from .limits import CONNECTIONS, Counter, LimitsStore, RateCheck, RateOutcome
from .redis_store import RedisComponentStore, as_text, glob_escape, scan_keys

# KEYS: the counters. ARGV[1]: one tab-separated text: now, then per key: window, max,
# count (1/0). One argument, unlike the greylist script: for three checks, ten separate
# ones measured ~1 µs more of hiredis packing in the gate (more still in redis-py's, for
# TLS/Sentinel) against 0-4 µs less splitting in the server, within its noise.
# Returns one tab-separated text: allowed (1/0), retry_at ('' if allowed), estimate per key...
HIT_LUA = """
local A = {}
for field in string.gmatch(ARGV[1] .. '\\t', '([^\\t]*)\\t') do A[#A + 1] = field end
local now = tonumber(A[1])
local function fmt(x) return string.format('%.17g', x) end
local ok, retry, est_out, slid = 1, nil, {}, {}
for i = 1, #KEYS do
  local w, mx = tonumber(A[i * 3 - 1]), tonumber(A[i * 3])
  local k = math.floor(now / w)
  local h = redis.call('HMGET', KEYS[i], 'b', 'p', 'c')
  local b, p, c = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if b == nil then p, c = 0, 0
  elseif b == k - 1 then p, c = c, 0
  elseif b ~= k then p, c = 0, 0 end
  local est = p * (1 - (now - k * w) / w) + c
  est_out[i] = fmt(est)
  local need = (A[i * 3 + 1] == '1') and 1 or 0
  if est + need > mx then
    ok = 0
    local room, at = mx - need, 0
    if c <= room then at = k * w + w * (1 - (room - c) / p)
    else at = k * w + w + w * (1 - room / c) end
    if retry == nil or at > retry then retry = at end
  end
  slid[i] = {k, p, c, w}
end
if ok == 1 then
  for i = 1, #KEYS do
    if A[i * 3 + 1] == '1' then
      local s = slid[i]
      redis.call('HSET', KEYS[i], 'b', s[1], 'p', s[2], 'c', s[3] + 1)
      redis.call('EXPIRE', KEYS[i], math.max(1, math.ceil((s[1] + 2) * s[4] - now)))
    end
  end
end
return ok .. '\\t' .. (retry and fmt(retry) or '') .. '\\t' .. table.concat(est_out, '\\t')
"""

# KEYS: 1 the client's set. ARGV: 1 member, 2 cap, 3 now, 4 ttl. Returns {added, live before}.
CONNECT_LUA = """
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local live = redis.call('ZCARD', KEYS[1])
if live >= tonumber(ARGV[2]) then return {0, live} end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], math.ceil(ttl)) end
return {1, live}
"""

# KEYS: 1 the client's set. ARGV: 1 member, 2 expiry, 3 ttl. Only a member still there.
TOUCH_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
  if redis.call('TTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]))) end
end
return 1
"""


class RedisLimitsStore(RedisComponentStore, LimitsStore):
    key_prefix = "lim:"
    scripts = {"hit": HIT_LUA, "connect": CONNECT_LUA, "touch": TOUCH_LUA}

    def rate_key(self, kind: str, window: float, value: str) -> str:
        return f"{self.prefix}r:{kind}:{window:g}:{value}"

    def connections_key(self, client: str) -> str:
        return f"{self.prefix}c:{client}"

    async def hit(self, checks: list[RateCheck], now: float) -> RateOutcome:
        checks = [RateCheck(*c) for c in checks]
        if not checks:
            return RateOutcome(True)
        keys = [self.rate_key(c.kind, c.window, c.value) for c in checks]
        fields = [repr(float(now))]
        for c in checks:
            fields += [repr(float(c.window)), str(int(c.max)), "1" if c.count else "0"]
        reply = await self.link.script("hit", keys, ["\t".join(fields)])
        ok, retry, *estimates = as_text(reply).split("\t")
        outcome = RateOutcome(ok == "1", [float(e) for e in estimates])
        if not outcome.allowed:
            outcome.retry_at = float(retry)
            outcome.refused = [i for i, (e, c) in enumerate(zip(outcome.estimates, checks))
                               if e + (1 if c.count else 0) > c.max]
        return outcome

    def _parse(self, key: str) -> tuple[str, float, str] | None:
        kind, _, rest = key[len(self.prefix) + 2:].partition(":")
        window, _, value = rest.partition(":")
        try:
            return kind, float(window), value
        except ValueError:
            return None

    async def _read_counters(self, r, names: list[tuple[str, float, str]]) -> list[Counter]:
        """The counters ``names`` (kind, window, value) name, in one pipeline; gone ones left out."""
        if not names:
            return []
        pipe = r.pipeline(transaction=False)
        for k, w, v in names:
            pipe.hmget(self.rate_key(k, w, v), "b", "p", "c")
        return [Counter(k, v, w, int(b), int(p or 0), int(c or 0))
                for (k, w, v), (b, p, c) in zip(names, await pipe.execute()) if b is not None]

    async def counters(self, kind=None, value=None, limit=None) -> list[Counter]:
        pattern = glob_escape(f"{self.prefix}r:" + (f"{kind}:" if kind else "")) + "*"
        out: list[Counter] = []

        async def run(r):
            async for keys in scan_keys(r, pattern):
                names = [p for p in (self._parse(as_text(k)) for k in keys) if p and (value is None or p[2] == value)]
                out.extend(await self._read_counters(r, names))
        await self.link.run(run)
        out.sort(key=lambda c: (c.bucket * c.window, c.current), reverse=True)
        return out[:limit] if limit is not None else out

    async def reset(self, kind, value) -> int:
        if kind == CONNECTIONS:
            key = self.connections_key(value)

            async def drop(r):
                n = await r.zcard(key)
                await r.delete(key)
                return n
            return int(await self.link.run(drop))
        keys = [self.rate_key(c.kind, c.window, c.value) for c in await self.counters(kind, value)]
        if not keys:
            return 0
        return int(await self.link.run(lambda r: r.delete(*keys)))

    async def connect(self, client, member, cap, now, ttl) -> tuple[bool, int]:
        key = self.connections_key(client)
        args = [member, int(cap), repr(float(now)), repr(float(ttl))]
        added, live = await self.link.script("connect", [key], args)
        return int(added) == 1, int(live)

    async def touch(self, client, member, now, ttl) -> None:
        key = self.connections_key(client)
        await self.link.script("touch", [key], [member, repr(float(now + ttl)), repr(float(ttl))])

    async def disconnect(self, client, member) -> None:
        key = self.connections_key(client)
        await self.link.command("ZREM", key, member)

    async def connections(self, client=None, now=0.0, limit=None) -> dict[str, int]:
        pattern = glob_escape(self.connections_key(client) if client is not None else f"{self.prefix}c:")
        pattern += "" if client is not None else "*"
        found: dict[str, int] = {}

        async def run(r):
            async for keys in scan_keys(r, pattern):
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.zcount(k, repr(float(now)), "+inf")
                for k, n in zip(keys, await pipe.execute()):
                    if int(n):
                        found[as_text(k)[len(self.prefix) + 2:]] = int(n)
        await self.link.run(run)
        ranked = sorted(found.items(), key=lambda kv: kv[1], reverse=True)
        return dict(ranked[:limit] if limit is not None else ranked)

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        pattern = glob_escape(f"{self.prefix}r:") + "*"

        async def read(r, keys):
            return await self._read_counters(r, [p for p in (self._parse(as_text(k)) for k in keys) if p])
        async for found in self._scan_batches(pattern, read):
            yield found

    async def import_batch(self, items, now) -> TallyCounter:
        kept = [c for c in items if c.expires > now]

        async def run(r):
            pipe = r.pipeline(transaction=False)
            for c in kept:
                key = self.rate_key(c.kind, c.window, c.value)
                pipe.hset(key, mapping={"b": c.bucket, "p": c.previous, "c": c.current})
                pipe.expire(key, max(1, math.ceil(c.expires - now)))
            await pipe.execute()
        if kept:
            await self.link.run(run)
        return TallyCounter(counters=len(kept), skipped=len(items) - len(kept))

