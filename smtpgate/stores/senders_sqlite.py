"""The SQLite sender-state store (``state: sqlite:///PATH``), in the same database file as the
greylist (its own tables, its own schema version in the ``meta`` table).

``update`` runs read, change and write inside one ``BEGIN IMMEDIATE`` transaction on the
event loop (``SqliteDatabase.write``; on the database thread when another process holds the
lock): the write lock is taken before the read, so two workers (or a worker and the CLI)
updating one key queue up instead of deciding on the same old record. Its first try is
cheaper, a compare-and-set as the Redis store does: the change is applied to the record as
this process last read or wrote it (``get`` at MAIL, moments before the transaction's
events) and written by one ``UPDATE ... WHERE doc = <the text read>``. The text holds the
record's version, which every write bumps, so an unchanged text is an unchanged record and
the update is exact; when another writer came in between, nothing is written and the
locked read-change-write runs as above.
Records past their ``expires`` are dropped a batch at a time as updates go by, and by
``purge``.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from .senders import ChangeFn, SenderRecord, SenderStore
from .sqlite_store import BATCH, SqliteComponentStore, write_transaction

COMPONENT = "senders"
SEEN_MAX = 4096  # records remembered per process (what update tries its compare-and-set on)
ABSENT = ""  # remembered for a key read as absent (a record's text is never empty)
# Version N is SENDERS_SCHEMA[:N]. Never edit a step that has shipped: append a new one.
SENDERS_SCHEMA: tuple[tuple[str, ...], ...] = (
    # 1: one row per (machine, key); the record itself as JSON, the columns lists filter on
    ("CREATE TABLE senders (machine TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,"
     " seen REAL NOT NULL, expires REAL NOT NULL, doc TEXT NOT NULL,"
     " PRIMARY KEY (machine, key)) WITHOUT ROWID",
     "CREATE INDEX senders_state ON senders (machine, state)",
     "CREATE INDEX senders_expires ON senders (expires)"),
)
_UPDATE = "UPDATE senders SET state = ?, seen = ?, expires = ?, doc = ? WHERE machine = ? AND key = ?"
_UPDATE_SAME_STATE = "UPDATE senders SET seen = ?, expires = ?, doc = ? WHERE machine = ? AND key = ?"


class SqliteSenderStore(SqliteComponentStore, SenderStore):
    component = COMPONENT
    schema = SENDERS_SCHEMA

    def __init__(self, url: str, db=None):
        super().__init__(url, db)
        self._seen: OrderedDict[tuple[str, str], str] = OrderedDict()  # (machine, key) -> its text or ABSENT

    def _remember(self, machine, key, doc: str) -> None:
        """Keep what this process last read or wrote of a key (bounded: oldest out first)."""
        seen = self._seen
        seen.pop((machine, key), None)
        seen[(machine, key)] = doc
        if len(seen) > SEEN_MAX:
            seen.popitem(last=False)

    async def get(self, machine, key) -> SenderRecord | None:
        def read(conn):
            row = conn.execute("SELECT doc FROM senders WHERE machine = ? AND key = ?", (machine, key)).fetchone()
            return row[0] if row else ABSENT
        doc = await self._call(read)
        self._remember(machine, key, doc)
        return SenderRecord.from_json(doc) if doc else None

    async def update(self, machine, key, change: ChangeFn, now: float | None = None) -> Any:
        known = self._seen.get((machine, key))
        result, doc = await self._write(self._update_row, machine, key, change, known)
        self._remember(machine, key, doc)
        if now is not None and self._sweep_due(now):
            await self._run(self._sweep, now)
        return result

    @classmethod
    def _update_row(cls, conn, machine, key, change: ChangeFn, known: str | None) -> tuple[Any, str]:
        """(what ``change`` returned, the text now stored or ABSENT): by compare-and-set on
        ``known`` if that is still what is stored, else read and written under the lock.
        Database work only (it may run again on the thread)."""
        if known is not None:
            done = cls._write_change(conn, machine, key, change, known, True)
            if done is not None:
                return done
        with write_transaction(conn):
            row = conn.execute("SELECT doc FROM senders WHERE machine = ? AND key = ?",
                               (machine, key)).fetchone()
            return cls._write_change(conn, machine, key, change, row[0] if row else ABSENT, False)

    @staticmethod
    def _write_change(conn, machine, key, change: ChangeFn, doc: str, cas: bool) -> tuple[Any, str] | None:
        """Apply ``change`` to the record ``doc`` (ABSENT: none) and write what it returns.
        ``cas`` (compare-and-set): only if ``doc`` is still what is stored, in one statement
        (its own transaction, or the group's), else nothing is done: None. Without it the
        caller holds the write lock and read ``doc`` under it."""
        current = SenderRecord.from_json(doc) if doc else None
        # what was stored, noted first: change may edit the record it is given in place
        stored = (current.state, current.version) if current is not None else None
        new, result = change(current)
        guard, guard_args = (" AND doc = ?", (doc,)) if cas else ("", ())
        if new is None:
            if current is None:  # nothing to write, if there is still nothing stored
                gone = not cas or conn.execute("SELECT 1 FROM senders WHERE machine = ? AND key = ?",
                                               (machine, key)).fetchone() is None
                return (result, ABSENT) if gone else None
            n = conn.execute("DELETE FROM senders WHERE machine = ? AND key = ?" + guard,
                             (machine, key, *guard_args)).rowcount
            return (result, ABSENT) if n else None
        if current is None:
            new.version = 1
            text = new.to_json()
            # under the lock the row is known absent; by compare-and-set, one written since
            # makes the insert do nothing (its rowcount 0)
            n = conn.execute("INSERT INTO senders (machine, key, state, seen, expires, doc) VALUES (?, ?, ?, ?, ?, ?) "
                             "ON CONFLICT (machine, key) DO NOTHING",
                             (machine, key, new.state, new.seen, new.expires, text)).rowcount
            return (result, text) if n else None
        # The row exists (read above, under the write lock, or as the compare-and-set
        # checks): a plain UPDATE; and most events leave the state as it was, so the state
        # column (and its index) is only set when it changed.
        new.version = stored[1] + 1
        text = new.to_json()
        if new.state == stored[0]:
            n = conn.execute(_UPDATE_SAME_STATE + guard, (new.seen, new.expires, text, machine, key, *guard_args)).rowcount
        else:
            n = conn.execute(_UPDATE + guard, (new.state, new.seen, new.expires, text, machine, key, *guard_args)).rowcount
        return (result, text) if n else None

    @staticmethod
    def _sweep(conn, now) -> int:
        with write_transaction(conn):
            return conn.execute("DELETE FROM senders WHERE (machine, key) IN (SELECT machine, key FROM senders "
                                "WHERE expires < ? LIMIT ?)", (now, BATCH)).rowcount

    async def records(self, machine=None, state=None, limit=None) -> list[SenderRecord]:
        def read(conn):
            clauses, args = [], []
            if machine is not None:
                clauses.append("machine = ?")
                args.append(machine)
            if state is not None:
                clauses.append("state = ?")
                args.append(state)
            sql = "SELECT doc FROM senders" + (" WHERE " + " AND ".join(clauses) if clauses else "")
            sql += " ORDER BY seen DESC"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(int(limit))
            return [SenderRecord.from_json(r[0]) for r in conn.execute(sql, args)]
        return await self._run(read)

    async def delete(self, machine, key) -> bool:
        def run(conn):
            with write_transaction(conn):
                return conn.execute("DELETE FROM senders WHERE machine = ? AND key = ?", (machine, key)).rowcount > 0
        return await self._run(run)

    async def purge(self, now) -> int:
        def run(conn):
            total = 0
            while True:
                n = self._sweep(conn, now)
                total += n
                if n < BATCH:
                    return total
        return await self._run(run)

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        async for rows in self._pages(self._run, self._page, 2):
            yield [SenderRecord.from_json(doc) for _, _, doc in rows]

    @staticmethod
    def _page(conn, after):
        if after is None:
            return conn.execute("SELECT machine, key, doc FROM senders ORDER BY machine, key LIMIT ?",
                                (BATCH,)).fetchall()
        return conn.execute("SELECT machine, key, doc FROM senders WHERE (machine, key) > (?, ?) "
                            "ORDER BY machine, key LIMIT ?", (*after, BATCH)).fetchall()

    async def import_batch(self, items, now) -> Counter:
        kept = [rec for rec in items if rec.expires > now]

        def write(conn):
            with write_transaction(conn):
                conn.executemany("INSERT OR REPLACE INTO senders (machine, key, state, seen, expires, doc) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 [(r.machine, r.key, r.state, r.seen, r.expires, r.to_json()) for r in kept])
        if kept:
            await self._run(write)
        return Counter(records=len(kept), skipped=len(items) - len(kept))
