"""The SQLite limits store (``state: sqlite:///PATH``), in the same database file as the
greylist and sender stores (its own tables, its own schema version in ``meta``).

A check is one short ``BEGIN IMMEDIATE`` transaction on the event loop (the pattern of the
other SQLite stores: ``SqliteDatabase.call``): read the counters by primary key, ``limits.decide``, write — so
workers and the CLI sharing the file never count on a stale counter. Expired rows are
dropped a batch at a time as checks go by.
"""
from __future__ import annotations

from collections import Counter as TallyCounter

from .limits import CONNECTIONS, Counter, LimitsStore, RateCheck, RateOutcome, decide
from .sqlite_store import BATCH, SqliteComponentStore, write_transaction

COMPONENT = "limits"
# Version N is LIMITS_SCHEMA[:N]. Never edit a step that has shipped: append a new one.
LIMITS_SCHEMA: tuple[tuple[str, ...], ...] = (
    # 1: rate counters (two buckets each) and open connections (one row per session)
    ("CREATE TABLE limits_rates (kind TEXT NOT NULL, value TEXT NOT NULL, span REAL NOT NULL,"
     " bucket INTEGER NOT NULL, previous INTEGER NOT NULL, current INTEGER NOT NULL,"
     " expires REAL NOT NULL, PRIMARY KEY (kind, value, span)) WITHOUT ROWID",
     "CREATE INDEX limits_rates_expires ON limits_rates (expires)",
     "CREATE TABLE limits_connections (client TEXT NOT NULL, member TEXT NOT NULL,"
     " expires REAL NOT NULL, PRIMARY KEY (client, member)) WITHOUT ROWID"),
)
_RATE_COLUMNS = "kind, value, span, bucket, previous, current"  # span: the window


_INSERT = ("INSERT OR REPLACE INTO limits_rates (kind, value, span, bucket, previous, current, expires) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")
_COUNT = "UPDATE limits_rates SET current = ? WHERE kind = ? AND value = ? AND span = ?"
_MOVE = ("UPDATE limits_rates SET bucket = ?, previous = ?, current = ?, expires = ? "
         "WHERE kind = ? AND value = ? AND span = ?")


def _write_counter(conn, old: Counter | None, new: Counter) -> None:
    """Store ``new`` over ``old`` (the row as read in this transaction, None: no row).
    Within one bucket only ``current`` is set: SQLite then leaves the expires index alone
    (INSERT OR REPLACE deleted and re-inserted the row and its index entry: at 1M rows one
    more scattered page per counter and hit, copied back by the checkpoint); ``expires``
    moves only with the bucket."""
    key = (new.kind, new.value, new.window)
    if old is None:
        conn.execute(_INSERT, (*key, new.bucket, new.previous, new.current, new.expires))
    elif old.bucket == new.bucket:
        conn.execute(_COUNT, (new.current, *key))
    else:
        conn.execute(_MOVE, (new.bucket, new.previous, new.current, new.expires, *key))


class SqliteLimitsStore(SqliteComponentStore, LimitsStore):
    component = COMPONENT
    schema = LIMITS_SCHEMA

    async def hit(self, checks: list[RateCheck], now: float) -> RateOutcome:
        checks = [RateCheck(*c) for c in checks]

        def run(conn):
            with write_transaction(conn):
                stored = []
                for check in checks:
                    row = conn.execute(f"SELECT {_RATE_COLUMNS} FROM limits_rates WHERE kind = ? AND value = ? "
                                       "AND span = ?", (check.kind, check.value, check.window)).fetchone()
                    stored.append(Counter(*row) if row else None)
                outcome, writes = decide(stored, checks, now)
                was = {(c.kind, c.value, c.window): c for c in stored if c is not None}
                for c in writes:
                    _write_counter(conn, was.get((c.kind, c.value, c.window)), c)
            return outcome
        outcome = await self._write(run)
        if self._sweep_due(now):
            await self._run(self._sweep, now)
        return outcome

    @staticmethod
    def _sweep(conn, now) -> int:
        with write_transaction(conn):
            n = conn.execute("DELETE FROM limits_rates WHERE (kind, value, span) IN (SELECT kind, value, span "
                             "FROM limits_rates WHERE expires < ? LIMIT ?)", (now, BATCH)).rowcount
            n += conn.execute("DELETE FROM limits_connections WHERE (client, member) IN (SELECT client, member "
                              "FROM limits_connections WHERE expires < ? LIMIT ?)", (now, BATCH)).rowcount
        return n

    async def counters(self, kind=None, value=None, limit=None) -> list[Counter]:
        def read(conn):
            clauses, args = [], []
            for column, wanted in (("kind", kind), ("value", value)):
                if wanted is not None:
                    clauses.append(f"{column} = ?")
                    args.append(wanted)
            sql = f"SELECT {_RATE_COLUMNS} FROM limits_rates"
            sql += (" WHERE " + " AND ".join(clauses) if clauses else "")
            sql += " ORDER BY bucket * span DESC, current DESC"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(int(limit))
            return [Counter(*row) for row in conn.execute(sql, args)]
        return await self._run(read)

    async def reset(self, kind, value) -> int:
        def run(conn):
            with write_transaction(conn):
                if kind == CONNECTIONS:
                    return conn.execute("DELETE FROM limits_connections WHERE client = ?", (value,)).rowcount
                return conn.execute("DELETE FROM limits_rates WHERE kind = ? AND value = ?", (kind, value)).rowcount
        return await self._run(run)

    async def connect(self, client, member, cap, now, ttl) -> tuple[bool, int]:
        def run(conn):
            with write_transaction(conn):
                conn.execute("DELETE FROM limits_connections WHERE client = ? AND expires < ?", (client, now))
                live = conn.execute("SELECT count(*) FROM limits_connections WHERE client = ?",
                                    (client,)).fetchone()[0]
                if live >= cap:
                    return False, live
                conn.execute("INSERT OR REPLACE INTO limits_connections (client, member, expires) VALUES (?, ?, ?)",
                             (client, member, now + ttl))
                return True, live
        return await self._write(run)

    async def touch(self, client, member, now, ttl) -> None:
        def run(conn):
            with write_transaction(conn):
                conn.execute("UPDATE limits_connections SET expires = ? WHERE client = ? AND member = ?",
                             (now + ttl, client, member))
        await self._write(run)

    async def disconnect(self, client, member) -> None:
        def run(conn):
            with write_transaction(conn):
                conn.execute("DELETE FROM limits_connections WHERE client = ? AND member = ?", (client, member))
        await self._write(run)

    async def connections(self, client=None, now=0.0, limit=None) -> dict[str, int]:
        def read(conn):
            sql = "SELECT client, count(*) FROM limits_connections WHERE expires >= ?"
            args: list = [now]
            if client is not None:
                sql += " AND client = ?"
                args.append(client)
            sql += " GROUP BY client ORDER BY 2 DESC"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(int(limit))
            return dict(conn.execute(sql, args).fetchall())
        return await self._run(read)

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        async for rows in self._pages(self._run, self._page, 3):
            yield [Counter(*row) for row in rows]

    @staticmethod
    def _page(conn, after):
        sql = f"SELECT {_RATE_COLUMNS} FROM limits_rates"
        if after is None:
            return conn.execute(sql + " ORDER BY kind, value, span LIMIT ?", (BATCH,)).fetchall()
        return conn.execute(sql + " WHERE (kind, value, span) > (?, ?, ?) ORDER BY kind, value, span LIMIT ?",
                            (*after, BATCH)).fetchall()

    async def import_batch(self, items, now) -> TallyCounter:
        kept = [c for c in items if c.expires > now]

        def write(conn):
            with write_transaction(conn):
                conn.executemany(_INSERT, [(c.kind, c.value, c.window, c.bucket, c.previous, c.current, c.expires)
                                           for c in kept])
        if kept:
            await self._run(write)
        return TallyCounter(counters=len(kept), skipped=len(items) - len(kept))
