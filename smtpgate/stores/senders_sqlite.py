"""The SQLite sender-state store (``state: sqlite:///PATH``), in the same database file as the
greylist (its own tables, its own schema version in the ``meta`` table).

``update`` runs read, change and write inside one ``BEGIN IMMEDIATE`` transaction on the
event loop (``SqliteDatabase.call``; on the database thread when another process holds the
lock): the write lock is taken before the read, so two workers (or a worker and the CLI)
updating one key queue up instead of deciding on the same old record.
Records past their ``expires`` are dropped a batch at a time as updates go by, and by
``purge``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .senders import ChangeFn, SenderRecord, SenderStore
from .sqlite_store import BATCH, SqliteComponentStore, write_transaction

COMPONENT = "senders"
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

    async def get(self, machine, key) -> SenderRecord | None:
        def read(conn):
            row = conn.execute("SELECT doc FROM senders WHERE machine = ? AND key = ?", (machine, key)).fetchone()
            return SenderRecord.from_json(row[0]) if row else None
        return await self._call(read)

    async def update(self, machine, key, change: ChangeFn, now: float | None = None) -> Any:
        def run(conn):
            with write_transaction(conn):
                row = conn.execute("SELECT doc FROM senders WHERE machine = ? AND key = ?",
                                   (machine, key)).fetchone()
                current = SenderRecord.from_json(row[0]) if row else None
                # what was stored, noted first: change may edit the record it is given in place
                stored = (current.state, current.version) if current is not None else None
                new, result = change(current)
                if new is None:
                    if current is not None:
                        conn.execute("DELETE FROM senders WHERE machine = ? AND key = ?", (machine, key))
                elif current is None:
                    new.version = 1
                    conn.execute("INSERT INTO senders (machine, key, state, seen, expires, doc) VALUES (?, ?, ?, ?, ?, ?) "
                                 "ON CONFLICT (machine, key) DO UPDATE SET state = excluded.state, "
                                 "seen = excluded.seen, expires = excluded.expires, doc = excluded.doc",
                                 (machine, key, new.state, new.seen, new.expires, new.to_json()))
                else:
                    # The row exists (read above, under the write lock): a plain UPDATE does what
                    # the upsert would, cheaper; and most events leave the state as it was, so
                    # the state column (and its index) is only set when it changed.
                    new.version = stored[1] + 1
                    if new.state == stored[0]:
                        conn.execute(_UPDATE_SAME_STATE, (new.seen, new.expires, new.to_json(), machine, key))
                    else:
                        conn.execute(_UPDATE, (new.state, new.seen, new.expires, new.to_json(), machine, key))
            return result
        result = await self._write(run)
        if now is not None and self._sweep_due(now):
            await self._run(self._sweep, now)
        return result

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
