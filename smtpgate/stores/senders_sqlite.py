"""The SQLite sender-state store (``state: sqlite:///PATH``), in the same database file as the
greylist (its own tables, its own schema version in the ``meta`` table).

``update`` runs read, change and write inside one ``BEGIN IMMEDIATE`` transaction on the
event loop (``SqliteDatabase.write``; on the database thread when another process holds the
lock): the write lock is taken before the read, so two workers (or a worker and the CLI)
updating one key queue up instead of deciding on the same old record. Its first try is
cheaper, a compare-and-set as the Redis store does: the change is applied to the record as
this process last read or wrote it (``get`` at MAIL, moments before the transaction's
events) and written by one ``UPDATE ... WHERE doc = <the text read> AND expires = <the
column read>``. That is exact because it compares the values themselves: a row still
holding the text and column read is the record the locked path would read, whatever was
written in between (the version in the text does not tell it: it starts again at 1 after a
delete). Otherwise nothing is written and the locked read-change-write runs as above.
Records past their ``expires`` are dropped a batch at a time as updates go by, and by
``purge`` (see ``_sweep``).

The ``expires`` column (indexed, for those sweeps) is not the record's expiry but an upper
bound of it, at most ``EXPIRES_SLACK`` later: an event moves a record's expiry on, and
rewriting the column (and its index) each time made an update's statement a third dearer
(about 15 µs instead of 10, raw sqlite3 on a WAL file), so it is only moved,
``EXPIRES_SLACK`` ahead, when the expiry leaves that window. ``purge`` and the metrics'
counts look up ``expires < now + EXPIRES_SLACK`` in the index and keep those whose own
``expires`` (in ``doc``) is past: the same records as an exact column gives. The sweep as
updates go by takes the column alone (``_sweep``).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .senders import ChangeFn, Seen, SenderRecord, SenderStore, copy_of
from .sqlite_store import BATCH, SqliteComponentStore, write_transaction

COMPONENT = "senders"
ABSENT = ("", None)  # (text, expires column) remembered for a key read as absent
LOST = object()  # what _write_change answers when its compare-and-set finds another row stored
#: seconds the ``expires`` column may run ahead of the record's own expiry (see above)
EXPIRES_SLACK = 3600.0
#: a compare-and-set's condition: the row is still the (doc, expires) it was read as
CAS_GUARD = " AND doc = ? AND expires = ?"
# (the state changed?, the expires column moves?, compare-and-set?) -> the statement, built
# once (not joined per event); its arguments in the order of its placeholders: [state], seen,
# [expires], doc, machine, key (then a compare-and-set's guard)
_UPDATES = {(state, column, cas): "UPDATE senders SET " + ", ".join(
    (["state = ?"] if state else []) + ["seen = ?"] + (["expires = ?"] if column else []) + ["doc = ?"])
    + " WHERE machine = ? AND key = ?" + (CAS_GUARD if cas else "")
    for state in (False, True) for column in (False, True) for cas in (False, True)}
#: the records past their expiry at ``?1`` (now), by the index range of the column
EXPIRED = f"expires < ?1 + {EXPIRES_SLACK!r} AND json_extract(doc, '$.expires') < ?1"

# Version N is SENDERS_SCHEMA[:N]. Never edit a step that has shipped: append a new one.
SENDERS_SCHEMA: tuple[tuple[str, ...], ...] = (
    # 1: one row per (machine, key); the record itself as JSON, the columns lists filter on
    ("CREATE TABLE senders (machine TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,"
     " seen REAL NOT NULL, expires REAL NOT NULL, doc TEXT NOT NULL,"
     " PRIMARY KEY (machine, key)) WITHOUT ROWID",
     "CREATE INDEX senders_state ON senders (machine, state)",
     "CREATE INDEX senders_expires ON senders (expires)"),
)


class SqliteSenderStore(SqliteComponentStore, SenderStore):
    component = COMPONENT
    schema = SENDERS_SCHEMA

    def __init__(self, url: str, db=None):
        super().__init__(url, db)
        self._seen = Seen()  # (its text, its expires column), or ABSENT: as last read or written
        # built once and handed to the database directly: a message's two calls, without a
        # wrapper made per call and the _call/_write coroutine around each
        self._read_migrated = self._migrated(self._read_row)
        self._update_migrated = self._migrated(self._update_row)

    async def get(self, machine, key) -> SenderRecord | None:
        return await self.read(machine, key, copy_of)

    async def read(self, machine, key, look, *args) -> Any:
        row = await self.db.call(self._read_migrated, machine, key)
        self._seen.remember(machine, key, row)
        return SenderRecord.look(row[0], look, *args) if row[0] else look(None, *args)

    @staticmethod
    def _read_row(conn, machine, key) -> tuple[str, float | None]:
        row = conn.execute("SELECT doc, expires FROM senders WHERE machine = ? AND key = ?", (machine, key)).fetchone()
        return row or ABSENT

    async def update(self, machine, key, change: ChangeFn, now: float | None = None) -> Any:
        result = await self.db.write(self._update_migrated, machine, key, change)
        if now is not None and self._sweep_due(now):
            await self._run(self._sweep, now)
        return result

    def _update_row(self, conn, machine, key, change: ChangeFn) -> Any:
        """What ``change`` returned: by compare-and-set on the row this store last read or
        wrote of the key if that is still what is stored, else read and written under the
        lock. The row is looked up and noted as the write runs, not when it was asked: a
        group's earlier write of the same key is then the next one's base (the benchmark's
        50 sessions of one sender lost 9 compare-and-sets in 10 otherwise). A row noted by a
        write whose group was rolled back only costs a lost compare-and-set. Database work
        only (it may run again on the thread)."""
        known = self._seen.get(machine, key)
        done = LOST if known is None else self._write_change(conn, machine, key, change, known, True)
        if done is LOST:
            with write_transaction(conn):
                done = self._write_change(conn, machine, key, change, self._read_row(conn, machine, key), False)
                if done is LOST:  # cannot be: under the lock, the row read is the row stored
                    raise RuntimeError(f"senders {machine} {key}: a write under the lock changed no row")
        result, row = done
        self._seen.remember(machine, key, row)
        return result

    @staticmethod
    def _write_change(conn, machine, key, change: ChangeFn, row, cas: bool):
        """Apply ``change`` to the record of ``row`` (its text and expires column; ABSENT:
        none) and write what it returns, in one statement (its own transaction, or the
        group's). Its modes:

        ======  ======================================  ====================================
        cas     ``row``                                 answers
        ======  ======================================  ====================================
        True    as last read or written, no lock held   (result, row now stored); LOST, with
                                                        nothing written, when ``row`` is no
                                                        longer what is stored
        False   read under the write lock, which the    (result, row now stored); never LOST
                caller holds
        ======  ======================================  ====================================
        """
        doc, column = row
        current = SenderRecord.from_json(doc, take=True) if doc else None
        # what was stored, noted first: change may edit the record it is given in place
        stored = (current.state, current.version) if current is not None else None
        new, result = change(current)
        guard, guard_args = (CAS_GUARD, row) if cas else ("", ())
        if new is None:
            if current is None:  # nothing to write, if there is still nothing stored
                gone = not cas or conn.execute("SELECT 1 FROM senders WHERE machine = ? AND key = ?",
                                               (machine, key)).fetchone() is None
                return (result, ABSENT) if gone else LOST
            n = conn.execute("DELETE FROM senders WHERE machine = ? AND key = ?" + guard,
                             (machine, key, *guard_args)).rowcount
            return (result, ABSENT) if n else LOST
        if current is None:
            new.version = 1
            written = new.to_json(handed_over=True), new.expires + EXPIRES_SLACK
            # under the lock the row is known absent; by compare-and-set, one written since
            # makes the insert do nothing (its rowcount 0)
            n = conn.execute("INSERT INTO senders (machine, key, state, seen, expires, doc) VALUES (?, ?, ?, ?, ?, ?) "
                             "ON CONFLICT (machine, key) DO NOTHING",
                             (machine, key, new.state, new.seen, written[1], written[0])).rowcount
            return (result, written) if n else LOST
        # The row exists (read above, under the write lock, or as the compare-and-set
        # checks): a plain UPDATE, which sets the state column (and its index) only when the
        # state changed, and the expires column only when the expiry left its window.
        new.version = stored[1] + 1
        moved = new.state != stored[0]
        keep = new.expires <= column <= new.expires + EXPIRES_SLACK
        written = new.to_json(handed_over=True), column if keep else new.expires + EXPIRES_SLACK
        args = ((new.state,) if moved else ()) + (new.seen,) + (() if keep else (written[1],))
        n = conn.execute(_UPDATES[moved, not keep, cas], (*args, written[0], machine, key, *guard_args)).rowcount
        return (result, written) if n else LOST

    @staticmethod
    def _sweep(conn, now, exact: bool = False) -> int:
        """Drop up to BATCH expired records: ``exact`` (purge) those past their own expiry;
        else (the sweep as updates go by) those whose column is past, the index range alone:
        the column is never earlier than the expiry, so only expired records go, at most
        EXPIRES_SLACK late, and the write lock is not held while the JSON of every record
        expiring within the slack is read. Until then every read settles such a record as
        forgotten (``Machine.settle``), as it does one the sweep has not reached yet."""
        where = EXPIRED if exact else "expires < ?1"
        with write_transaction(conn):
            return conn.execute("DELETE FROM senders WHERE (machine, key) IN (SELECT machine, key FROM senders "
                                f"WHERE {where} LIMIT ?2)", (now, BATCH)).rowcount

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
        self._seen.forget(machine, key)  # gone: the next update reads it under the lock, no lost try first

        def run(conn):
            with write_transaction(conn):
                return conn.execute("DELETE FROM senders WHERE machine = ? AND key = ?", (machine, key)).rowcount > 0
        return await self._run(run)

    async def purge(self, now) -> int:
        def run(conn):
            total = 0
            while True:
                n = self._sweep(conn, now, True)
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
