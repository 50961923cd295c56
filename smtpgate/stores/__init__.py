"""State kept between transactions: the greylist and sender stores, the quarantine Maildir.

The greylist and sender stores sit behind small async interfaces: SQLite (one host, several
workers) and Redis (a fleet of gates). Rules receive them through ``self.gate.stores``; they
never open a database themselves. One Stores object per process, kept across reloads while
``state:`` names the same place.

``state:`` picks the backend: ``sqlite:///ABS/PATH`` (``sqlite://:memory:`` for tests: one
connection, nothing on disk), ``redis://HOST:PORT/DB[?prefix=NAME]``, ``unix:///PATH/TO/redis.sock``
(a Unix socket), ``rediss://`` (TLS) or ``redis+sentinel://HOST:PORT[,HOST:PORT]/SERVICE/DB``
(``redis_url.py``). Opening costs no I/O:
each store connects on first use, so worker processes forked after loading the
configuration each get their own connection.
"""
from __future__ import annotations

from ..errors import StoreError
from .redis_url import is_redis_url
from .greylist import (AllowEntry, Attempt, Entry, GreylistStore, Params, Selector, Stats,
                       make_allow, triplet_value)
from .limits import LimitsStore
from .senders import SenderRecord, SenderStore

__all__ = ["AllowEntry", "Attempt", "Entry", "GreylistStore", "Params", "Selector", "Stats",
           "Stores", "make_allow", "open_greylist_store", "open_stores", "triplet_value",
           "SenderRecord", "SenderStore", "open_sender_store", "LimitsStore", "open_limits_store"]


#: what a state URL may be, for the messages that refuse one
STATE_URLS = ('expected "sqlite:///PATH", "redis://HOST:PORT/DB", "unix:///PATH/TO/redis.sock", '
              '"rediss://…" or "redis+sentinel://HOST:PORT/SERVICE/DB"')


def _unknown(url: str) -> StoreError:
    return StoreError(f"unknown state URL {url!r}: {STATE_URLS}")


def open_greylist_store(url: str) -> GreylistStore:
    """The greylist store ``url`` names (no I/O yet). StoreError for an unknown scheme."""
    if is_redis_url(url):
        from .redis_store import RedisGreylistStore  # only gates on Redis import redis-py
        return RedisGreylistStore(url)
    if url.startswith("sqlite://"):
        from .sqlite_store import SqliteGreylistStore
        return SqliteGreylistStore(url)
    raise _unknown(url)


def open_sender_store(url: str, db=None, link=None) -> SenderStore:
    """The sender-state store ``url`` names (no I/O yet); ``db``: a SQLite database to share
    (one file, one connection per process for every store); ``link``: a Redis link to share
    (one pool, one pipeline per turn of the event loop for every store)."""
    if is_redis_url(url):
        from .senders_redis import RedisSenderStore
        return RedisSenderStore(url, link=link)
    if url.startswith("sqlite://"):
        from .senders_sqlite import SqliteSenderStore
        return SqliteSenderStore(url, db)
    raise _unknown(url)


def open_limits_store(url: str, db=None, link=None) -> LimitsStore:
    """The limits store ``url`` names (no I/O yet); ``db`` / ``link``: as open_sender_store."""
    if is_redis_url(url):
        from .limits_redis import RedisLimitsStore
        return RedisLimitsStore(url, link=link)
    if url.startswith("sqlite://"):
        from .limits_sqlite import SqliteLimitsStore
        return SqliteLimitsStore(url, db)
    raise _unknown(url)


class Stores:
    def __init__(self, url: str, clock=None, greylist: GreylistStore | None = None,
                 senders: SenderStore | None = None, limits: LimitsStore | None = None):
        self.url = url
        self.clock = clock
        #: the greylist store (``smtpgate.stores.greylist.GreylistStore``)
        self.greylist = greylist if greylist is not None else open_greylist_store(url)
        # On SQLite the stores share the greylist's database (``sqlite://:memory:`` included),
        # on Redis its link: one pool, and one pipeline per turn of the event loop for all
        shared = {"db": getattr(self.greylist, "db", None), "link": getattr(self.greylist, "link", None)}
        #: the sender-state store (``smtpgate.stores.senders.SenderStore``)
        self.senders = senders if senders is not None else open_sender_store(url, **shared)
        #: the limits rule's counters (``smtpgate.stores.limits.LimitsStore``)
        self.limits = limits if limits is not None else open_limits_store(url, **shared)

    async def close(self) -> None:
        await self.greylist.close()
        await self.senders.close()
        await self.limits.close()


def open_stores(url: str, clock=None) -> Stores:
    """Open (lazily: no I/O until first use) the stores ``state:`` names."""
    return Stores(url, clock)
