"""The Redis sender-state store (``state: redis://HOST:PORT/DB[?prefix=NAME]``): one hash per
record, ``P sm:<machine>:<key>`` with fields ``v`` (its version) and ``doc`` (the record as
JSON), expiring with the record.

``update`` is optimistic: read the record, compute the change in Python, then write it with
a Lua compare-and-set that succeeds only if the version is still the one read. When another
gate wrote in between, the change is computed again on the fresh record (at once the first
time, after a short random pause when the key stays contended), so no event is lost and no
guard is decided on a stale record. A key
that stays contended for ``CONTENTION_TIMEOUT`` seconds is a StoreError. The first try uses
the record as this process last read or wrote it (``get`` at MAIL, moments before the
transaction's events): then an event costs one round trip, the compare-and-set, and a stale
copy only costs the read it would have made anyway: a lost compare-and-set answers with the
record as it is now, so the next try goes at once, without a read. Reads and compare-and-sets of
concurrent sessions share pipelines (``RedisLink.script``), and the updates this process
has for one key at the same time are applied together, in order, with one compare-and-set
(the version still goes up by one per update).

Connections come from the pool the process's Redis stores share (``redis_store.RedisLink``:
a sender read and a greylist decision asked in one turn go in one pipeline), opened on
first use, with the same URL parameters as the greylist store (``prefix``,
``max_connections``, ``pool_timeout``, redis-py's timeouts); operations wait their turn for
it first come, first served, and both stores share the process's circuit breaker for the
server.
redis-py itself is imported by ``redis_store`` only.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from typing import Any

from ..errors import StoreError
from .redis_store import RedisComponentStore, as_text, glob_escape, redact, scan_keys
from .senders import ChangeFn, Seen, SenderRecord, SenderStore, copy_of

CONTENTION_TIMEOUT = 10.0
FREE_RETRIES = 3  # compare-and-sets lost in a row before an update backs off

# KEYS[1] the record; ARGV: 1 the version read ('' = absent), 2 the new doc ('' = delete),
# 3 the new version, 4 seconds to live (>= 1). Answers 1, or, when another writer came in
# between, the record as it is now: {0, version, doc} ('' for absent), for the next try.
CAS_LUA = """
local v = redis.call('HGET', KEYS[1], 'v')
if (v or '') ~= ARGV[1] then
  local now = redis.call('HMGET', KEYS[1], 'v', 'doc')
  return {0, now[1] or '', now[2] or ''}
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[3], 'doc', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
end
return 1
"""


class RedisSenderStore(RedisComponentStore, SenderStore):
    key_prefix = "sm:"
    scripts = {"cas": CAS_LUA}

    def __init__(self, url: str, prefix: str | None = None, link=None):
        super().__init__(url, prefix, link)
        #: compare-and-sets lost to another writer (and retried), since this store was made
        self.retries = 0
        self._seen = Seen()  # (version, doc) as last read or written; an absent key not kept
        self._queued: dict[tuple[str, str], list] = {}  # (machine, key) -> [(change, future)] to apply
        self._draining: dict[tuple[str, str], asyncio.Future] = {}  # (machine, key) -> its _drain task

    def record_key(self, machine: str, key: str) -> str:
        return f"{self.prefix}{machine}:{key}"

    async def _read(self, machine, key) -> tuple[str, str | None]:
        """(version, the record's JSON) as stored, ("", None) when absent."""
        version, doc = await self.link.command("HMGET", self.record_key(machine, key), "v", "doc")
        if version is None or doc is None:
            return "", None
        return as_text(version), as_text(doc)

    def _remember(self, machine, key, version: str, doc: str | None) -> None:
        if doc is None:
            self._seen.forget(machine, key)
        else:
            self._seen.remember(machine, key, (version, doc))

    async def get(self, machine, key) -> SenderRecord | None:
        return await self.read(machine, key, copy_of)

    async def read(self, machine, key, look, *args) -> Any:
        version, doc = await self._read(machine, key)
        self._remember(machine, key, version, doc)
        return SenderRecord.look(doc, look, *args) if doc is not None else look(None, *args)

    async def update(self, machine, key, change: ChangeFn, now: float | None = None) -> Any:
        # The updates of one key that this process's sessions ask for meanwhile are applied
        # together, in order, in one read-change-write (one compare-and-set): sessions of
        # one busy sender would otherwise each lose the race to the others and retry.
        slot = (machine, key)
        future = asyncio.get_running_loop().create_future()
        self._queued.setdefault(slot, []).append((change, future))
        if slot not in self._draining:
            self._draining[slot] = asyncio.ensure_future(self._drain(machine, key))
        return await future

    async def _drain(self, machine, key) -> None:
        """Apply the key's queued updates, a group at a time, until none is left."""
        slot = (machine, key)
        try:
            while self._queued.get(slot):
                group = [g for g in self._queued.pop(slot) if not g[1].done()]  # not the cancelled
                if not group:
                    continue
                try:
                    results = await self._apply(machine, key, [change for change, _ in group])
                except Exception as e:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), result in zip(group, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            del self._draining[slot]
            for _, future in self._queued.pop(slot, ()):  # only when cancelled (closing)
                if not future.done():
                    future.set_exception(StoreError(f"Redis {redact(self.url)}: store closed"))

    async def _apply(self, machine, key, changes: list[ChangeFn]) -> list[Any]:
        """Read, apply ``changes`` in order, compare-and-set; again on a fresh record when
        another writer came in between. The version goes up by one per change."""
        rkey = self.record_key(machine, key)
        deadline = time.monotonic() + CONTENTION_TIMEOUT
        pause = 0.001
        # First try on the record as this process last saw it (the MAIL stage read it
        # moments ago): if nobody wrote since, the compare-and-set alone is the one round
        # trip; if somebody did, it fails and the record is read afresh.
        known = self._seen.forget(machine, key)
        lost = 0  # compare-and-sets lost so far
        while True:
            version, doc = known if known is not None else await self._read(machine, key)
            known = None
            current = SenderRecord.from_json(doc, take=True) if doc is not None else None
            base = current.version if current is not None else 0
            new, results = current, []
            for change in changes:
                new, result = change(new)
                results.append(result)
            if new is None and current is None:
                return results
            if new is None:
                args = [version, "", "", 1]
            else:
                new.version = base + len(changes)
                ttl = max(1, math.ceil(new.expires - new.seen))
                args = [version, new.to_json(handed_over=True), str(new.version), ttl]
            answer = await self.link.script("cas", [rkey], args)
            if not isinstance(answer, list):  # 1: written
                self._remember(machine, key, args[2], args[1] or None)
                return results
            self.retries += 1
            if time.monotonic() > deadline:
                raise StoreError(f"Redis {redact(self.url)}: {machine} {key}: still contended after "
                                 f"{CONTENTION_TIMEOUT:g}s of retries")
            # Another gate wrote: its record came back with the answer, so the next try needs
            # no read. The first FREE_RETRIES go at once; only a key that stays contended
            # backs off. Two workers writing one busy key lose to each other often (each loss
            # means the other one won): backing off from the second loss left the gate
            # waiting, 25% fewer messages with bench/'s one sender on two workers.
            version, doc = as_text(answer[1]), as_text(answer[2])
            known = (version, doc) if version and doc else ("", None)
            lost += 1
            if lost > FREE_RETRIES:
                await asyncio.sleep(random.uniform(0, pause))
                pause = min(pause * 2, 0.05)

    async def records(self, machine=None, state=None, limit=None) -> list[SenderRecord]:
        out: list[SenderRecord] = []
        pattern = glob_escape(self.prefix + (f"{machine}:" if machine is not None else "")) + "*"

        async def run(r):
            seen = set()  # SCAN may return a key twice (the keyspace rehashing meanwhile)
            async for keys in scan_keys(r, pattern):
                keys = [k for k in keys if k not in seen]
                seen.update(keys)
                for rec in await _read_records(r, keys):
                    if (machine is None or rec.machine == machine) and (state is None or rec.state == state):
                        out.append(rec)
        await self._do(run)
        out.sort(key=lambda rec: rec.seen, reverse=True)
        return out[:limit] if limit is not None else out

    async def close(self) -> None:
        if self._draining:  # updates on their way: let them finish (their callers wait)
            await asyncio.gather(*self._draining.values(), return_exceptions=True)
        await super().close()

    async def delete(self, machine, key) -> bool:
        self._seen.forget(machine, key)
        return bool(await self._do(lambda r: r.delete(self.record_key(machine, key))))

    async def purge(self, now) -> int:
        """Redis drops expired records by itself; this only counts what is left over."""
        gone = [rec for rec in await self.records() if rec.expires < now]
        for rec in gone:
            await self.delete(rec.machine, rec.key)
        return len(gone)

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        pattern = glob_escape(self.prefix) + "*"
        async for found in self._scan_batches(pattern, _read_records):
            yield found

    async def import_batch(self, items, now) -> Counter:
        kept = [rec for rec in items if rec.expires > now]

        async def run(r):
            pipe = r.pipeline(transaction=False)
            for rec in kept:
                rkey = self.record_key(rec.machine, rec.key)
                pipe.hset(rkey, mapping={"v": str(rec.version), "doc": rec.to_json()})
                pipe.expire(rkey, max(1, math.ceil(rec.expires - now)))
            await pipe.execute()
        if kept:
            await self._do(run)
        return Counter(records=len(kept), skipped=len(items) - len(kept))


async def _read_records(r, keys) -> list[SenderRecord]:
    """The records at ``keys``, in one pipeline; a key gone since the SCAN left out."""
    if not keys:
        return []
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hget(k, "doc")
    return [SenderRecord.from_json(doc) for doc in await pipe.execute() if doc is not None]

