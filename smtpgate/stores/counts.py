"""Entry counts for ``/metrics``: live greylist triplets (pending, passed) and sender records
by machine and state, read from the thread that serves a scrape.

A scrape must stay cheap and never hang on a dead store:
- SQLite: a short read-only connection per scrape (``sqlite_store.read_only``; WAL: it never
  waits for a writer), COUNTs over the existing indexes, cut off after ``SQLITE_DEADLINE``.
- Redis: counting needs a SCAN of the key space, so it is never done by a scrape. A scrape
  answers the last count and, when that is older than ``REDIS_REFRESH`` seconds, starts one
  recount in a background thread (bounded by ``REDIS_DEADLINE``).
``read()`` gives None when the store could not be counted: the gauges are then left out.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from ..clock import Clock
from ..errors import StoreError
from .redis_url import is_redis_url

log = logging.getLogger("smtpgate.metrics")

SQLITE_DEADLINE = 2.0   # seconds one scrape may spend counting in SQLite
REDIS_REFRESH = 60.0    # seconds a Redis count is answered before a recount starts
REDIS_DEADLINE = 20.0   # seconds a Redis recount may take


@dataclass
class Counts:
    greylist: dict[str, int] = field(default_factory=dict)            # pending|passed -> n
    senders: dict[tuple[str, str], int] = field(default_factory=dict)  # (machine, state) -> n


def counter_for(url: str, on_error=lambda: None):
    """What counts the entries of ``state: url``: a SqliteCounts, a RedisCounts or None.
    ``on_error`` is called once for each failed count (the store-error counter)."""
    if is_redis_url(url):
        return RedisCounts(url, on_error)
    if url.startswith("sqlite://") and url != "sqlite://:memory:":
        return SqliteCounts(url[len("sqlite://"):], on_error)
    return None


class SqliteCounts:
    def __init__(self, path: str, on_error) -> None:
        self.path = path
        self.on_error = on_error

    def read(self) -> Counts | None:
        from .sqlite_store import read_only
        now = Clock().now()
        try:
            counts = read_only(self.path, lambda conn: _count_sqlite(conn, now), SQLITE_DEADLINE)
        except StoreError as e:
            log.warning("metrics: cannot count the entries: %s", e)
            self.on_error()
            return None
        return counts if counts is not None else Counts({"pending": 0, "passed": 0})  # no file yet


def _count_sqlite(conn, now: float) -> Counts:
    # here, as read_only above: a gate on Redis never loads the SQLite stores
    from .senders_sqlite import EXPIRED
    from .sqlite_store import greylist_live_counts
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    counts = Counts({"pending": 0, "passed": 0})
    if "greylist" in tables:
        counts.greylist = greylist_live_counts(conn, now)
    if "senders" in tables:
        # every record by the senders_state index, less the few expired ones not yet purged
        for machine, state, n in conn.execute(
                "SELECT machine, state, count(*) FROM senders GROUP BY machine, state"):
            counts.senders[(machine, state)] = n
        # (the expires column may run ahead of a record's own expiry: senders_sqlite.EXPIRED)
        for machine, state, n in conn.execute(
                "SELECT machine, state, count(*) FROM senders INDEXED BY senders_expires "
                f"WHERE {EXPIRED} GROUP BY machine, state", (now,)):
            counts.senders[(machine, state)] -= n
    return counts


class RedisCounts:
    def __init__(self, url: str, on_error) -> None:
        self.url = url
        self.on_error = on_error
        self._last: Counts | None = None
        self._counted_at = -float("inf")  # monotonic time of the last recount's start
        self._running = False
        self._lock = threading.Lock()

    def read(self) -> Counts | None:
        with self._lock:
            if not self._running and time.monotonic() - self._counted_at >= REDIS_REFRESH:
                self._running, self._counted_at = True, time.monotonic()
                threading.Thread(target=self._recount, name="metrics-counts", daemon=True).start()
            return self._last

    def _recount(self) -> None:
        try:
            counts = asyncio.run(asyncio.wait_for(self._count(Clock().now()), REDIS_DEADLINE))
        except BaseException as e:  # a dead or slow server: leave the gauges out until it answers
            log.warning("metrics: cannot count the entries in Redis: %s", type(e).__name__)
            counts = None
            self.on_error()
        with self._lock:
            self._last, self._running = counts, False

    async def _count(self, now: float) -> Counts:
        from . import open_greylist_store, open_sender_store
        greylist, senders = open_greylist_store(self.url), open_sender_store(self.url)
        try:
            st = await greylist.stats(now, 0)
            counts = Counts({"pending": st.pending, "passed": st.passed})
            for rec in await senders.records():
                if rec.expires >= now:
                    key = (rec.machine, rec.state)
                    counts.senders[key] = counts.senders.get(key, 0) + 1
            return counts
        finally:
            await greylist.close()
            await senders.close()
