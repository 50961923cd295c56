"""Open connections counted across all worker processes of one gate.

``max_connections`` and ``max_connections_per_client`` are limits of the gate, not of a worker,
so the counts live in one anonymous shared memory map (``mmap(-1)``, ``MAP_SHARED``) made
before the workers fork. Why this design:

- Each worker writes only its own row (its total and a per-client sketch), so no lock is
  needed: a worker's event loop is single-threaded, and nobody else writes there. A reader
  adds the rows up; with a handful of workers that costs a few memory reads per connection.
- A worker that dies (even SIGKILLed) cannot release its counts itself: the supervisor zeroes
  the dead worker's row before it starts the replacement in the same slot, so nothing leaks.
- Clients are counted in a count-min sketch (four rows of hashed buckets, keyed with a random
  salt made at start-up so nobody can aim collisions at someone else): fixed memory whatever
  the number of clients, and a count is never under-estimated, so a limit can't be evaded;
  it can only be over-estimated when other clients collide with it in all four rows: with
  1,000 clients connected, about one client in a million.
- Two workers accepting the same client in the same instant may each see the other's count
  a moment late, admitting at most one connection too many per worker; nothing stays wrong.

An IPv6 client is counted by its network (``limits.ipv6_client_prefix``, default /64), since
one subscriber usually holds a whole /64 and could rotate addresses within it.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os

from ..mail import keys

WIDTH = 32_768  # buckets per sketch row
DEPTH = 4  # sketch rows: 512 KiB per worker in all
_SLOT_WORDS = 1 + DEPTH * WIDTH  # [total, sketch...], 32-bit counters
_RECENT_KEYS = 4096  # keys whose buckets a process keeps (forgotten all at once when full)


@functools.lru_cache(maxsize=_RECENT_KEYS)  # parsing an address costs more than the rest of the count
def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """What one client is for the per-client limit: an IPv4 address (IPv4-mapped IPv6 too),
    or the IPv6 network of ``ipv6_prefix`` bits (``smtpgate.client_key``, as the limits rule
    counts ``connections``); anything else (a Unix socket) as it is."""
    return keys.client_key(ip, None, ipv6_prefix) or ip


class ConnectionTable:
    """Counts for ``slots`` workers in shared memory; make it before forking."""

    def __init__(self, slots: int = 1):
        self.slots = slots
        self._map = mmap.mmap(-1, slots * _SLOT_WORDS * 4)  # anonymous, MAP_SHARED
        self._words = memoryview(self._map).cast("I")
        self._salt = os.urandom(16)
        self._recent: dict[str, list[int]] = {}  # this process's key -> buckets

    def _buckets(self, key: str) -> list[int]:
        # A connection looks its key up three times (open, count, close); clients come back.
        buckets = self._recent.get(key)
        if buckets is None:
            if len(self._recent) >= _RECENT_KEYS:
                self._recent.clear()
            buckets = self._recent[key] = self._hash(key)
        return buckets

    def _hash(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=4 * DEPTH,
                                 key=self._salt).digest()
        return [1 + row * WIDTH + int.from_bytes(digest[4 * row:4 * row + 4], "little") % WIDTH
                for row in range(DEPTH)]

    def add(self, slot: int, key: str, delta: int) -> None:
        base = slot * _SLOT_WORDS
        words = self._words
        words[base] = max(words[base] + delta, 0)
        for i in self._buckets(key):
            words[base + i] = max(words[base + i] + delta, 0)

    def total(self) -> int:
        return sum(self._words[s * _SLOT_WORDS] for s in range(self.slots))

    def count(self, key: str) -> int:
        """Connections of ``key`` in all workers (never fewer than there are)."""
        words = self._words
        return min(sum(words[s * _SLOT_WORDS + i] for s in range(self.slots))
                   for i in self._buckets(key))

    def clear(self, slot: int) -> None:
        """Forget a dead worker's connections (the supervisor, before replacing it)."""
        start = slot * _SLOT_WORDS
        self._map[start * 4:(start + _SLOT_WORDS) * 4] = bytes(_SLOT_WORDS * 4)


class ConnectionTracker:
    """One worker's view: its slot in the shared table, and its own open sessions."""

    def __init__(self, table: ConnectionTable | None = None, slot: int = 0):
        self.table = table if table is not None else ConnectionTable(1)
        self.slot = slot
        self.protocols: set = set()  # this worker's GateSMTP instances, for shutdown

    def open(self, key: str) -> None:
        self.table.add(self.slot, key, +1)

    def close(self, key: str) -> None:
        self.table.add(self.slot, key, -1)

    @property
    def total(self) -> int:
        return self.table.total()

    def per_client(self, key: str) -> int:
        return self.table.count(key)
