"""An allow-listed greylist decision on SQLite is a read: no write transaction; its outcome
counter is tallied in memory (SqliteDatabase.tally) and reaches the file within the tally
interval, with `stats` in this process, or at close. Real SQLite files in tmp_path (the
equality property: in-memory databases, the same code); no test sleeps.
"""
from __future__ import annotations

import asyncio
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.stores import Params, Selector, make_allow, triplet_value
from smtpgate.stores import sqlite_store
from smtpgate.stores.sqlite_store import SqliteDatabase, SqliteGreylistStore
from tests.support.constants import T0

P = Params(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400, auto_whitelist_after=2)
C, S, R = "192.0.2.0/24", "alice@sender.example", "bob@example.com"
NEVER = 3600.0  # a tally interval no test reaches: the tallies wait for flush or close


def open_store(path, tally_every=NEVER) -> SqliteGreylistStore:
    return SqliteGreylistStore(f"sqlite://{path}", SqliteDatabase(str(path), tally_every))


def counters(path) -> dict[str, int]:
    """The outcome counters in the file, read by a connection of its own (another process's view)."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, value FROM greylist_counters"))
    finally:
        conn.close()


def commit_seen(db: SqliteDatabase) -> asyncio.Event:
    """Set when the loop's connection commits (its trace callback)."""
    seen = asyncio.Event()
    db._loop_conn.set_trace_callback(lambda sql: seen.set() if sql.strip().upper() == "COMMIT" else None)
    return seen


async def allowed_store(path, **kw) -> SqliteGreylistStore:
    store = open_store(path, **kw)
    await store.add_allow(make_allow("triplet", triplet_value(C, S, R), T0, None))
    await store.attempt(C, "other@sender.example", R, now=T0, params=P)  # a write: opens and counts "new"
    await store.attempt(C, S, R, now=T0, params=P)  # the first allowed one: on the write path
    await store.db.flush()
    return store


async def test_an_allowed_decision_writes_nothing(tmp_path):
    path = tmp_path / "state.db"
    store = await allowed_store(path)
    try:
        conn = store.db._loop_conn
        changes, wal = conn.total_changes, (tmp_path / "state.db-wal").stat().st_size
        other = sqlite3.connect(path)  # its data_version moves when another connection commits
        version = other.execute("PRAGMA data_version").fetchone()[0]
        for i in range(20):
            a = await store.attempt(C, S, R, now=T0 + i, params=P)
            assert (a.outcome, a.allow.kind, a.entry, a.passed_count) == ("allowed", "triplet", None, None)
        assert conn.total_changes == changes
        assert (tmp_path / "state.db-wal").stat().st_size == wal
        assert other.execute("PRAGMA data_version").fetchone()[0] == version
        other.close()
        assert counters(path) == {"new": 1, "allowed": 1}  # these 20: pending in this process
        assert (await store.stats(T0, 0)).counters == {"new": 1, "allowed": 21}  # stats flushes first
        assert counters(path) == {"new": 1, "allowed": 21}
    finally:
        await store.close()


async def test_only_a_triplet_allowed_last_time_is_read_before_its_write(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "ALLOWED_HINTS", 2)
    store = await allowed_store(tmp_path / "state.db")
    try:
        statements = []
        store.db._loop_conn.set_trace_callback(statements.append)
        await store.attempt(C, "fourth@sender.example", R, now=T0, params=P)  # never allowed: the write path
        assert statements[0] == "BEGIN IMMEDIATE"
        del statements[:]
        await store.attempt(C, S, R, now=T0, params=P)  # allowed last time: the read, alone
        assert statements[0].startswith("SELECT") and not any(t.startswith(("BEGIN", "ROLLBACK")) for t in statements)
        await store.delete(Selector(None, C, S, R))  # its allow entry goes
        assert (await store.attempt(C, S, R, now=T0, params=P)).outcome == "new"  # read, then write
        assert (*(C, S, R), None) not in store._allowed_before
        await store.add_allow(make_allow("sender", "@sender.example", T0, None))
        for sender in ("a@sender.example", "b@sender.example", "c@sender.example"):
            assert (await store.attempt(C, sender, R, now=T0, params=P)).outcome == "allowed"
        assert list(store._allowed_before) == [(C, "b@sender.example", R, None), (C, "c@sender.example", R, None)]
    finally:
        await store.close()


async def test_an_allow_entry_replaced_elsewhere_is_reported_as_it_now_stands(tmp_path):
    # the read path builds a matched entry once per row: a row changed under the same key
    # (another process's `greylist allow` with a new note or expiry) is a new entry
    path = tmp_path / "state.db"
    store = await allowed_store(path)
    other = open_store(path)
    try:
        for note, ttl in (("first", None), ("second", None), ("second", 3600.0), ("first", None)):
            await other.add_allow(make_allow("triplet", triplet_value(C, S, R), T0, ttl, note))
            a = await store.attempt(C, S, R, now=T0, params=P)
            assert (a.outcome, a.allow.note, a.allow.expires) == ("allowed", note, None if ttl is None else T0 + ttl)
    finally:
        await other.close()
        await store.close()


async def test_tallies_reach_the_file_after_the_interval_on_their_own(tmp_path):
    path = tmp_path / "state.db"
    store = await allowed_store(path, tally_every=0.05)
    try:
        # allowed_store's flush wrote its tally and stopped the timer: none fires during the
        # attempts below (they would be written before the check that they are not yet)
        assert store.db._tally_timer is None
        committed = commit_seen(store.db)
        for i in range(3):
            assert (await store.attempt(C, S, R, now=T0 + i, params=P)).outcome == "allowed"
        assert not committed.is_set() and counters(path) == {"new": 1, "allowed": 1}
        await asyncio.wait_for(committed.wait(), 30)  # the interval's timer, no other write
        assert counters(path) == {"new": 1, "allowed": 4}
    finally:
        await store.close()


async def test_tallies_are_written_at_close(tmp_path):
    path = tmp_path / "state.db"
    store = await allowed_store(path)
    for i in range(5):
        await store.attempt(C, S, R, now=T0 + i, params=P)
    assert counters(path) == {"new": 1, "allowed": 1}
    await store.close()
    assert counters(path) == {"new": 1, "allowed": 6}


async def test_tallies_ride_on_the_writes_asked_in_their_turn(tmp_path):
    path = tmp_path / "state.db"
    store = await allowed_store(path)
    try:
        await store.attempt(C, S, R, now=T0, params=P)
        commits = []
        store.db._loop_conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip() == "COMMIT" else None)
        new = asyncio.ensure_future(store.attempt(C, "third@sender.example", R, now=T0, params=P))
        while not store.db._group:  # the write has been asked; its group commits next turn
            await asyncio.sleep(0)
        await store.db.flush()
        assert (await new).outcome == "new"
        assert len(commits) == 1 and counters(path) == {"new": 2, "allowed": 2}
    finally:
        await store.close()


async def test_tallies_wait_for_a_file_another_process_holds(tmp_path):
    path = tmp_path / "state.db"
    store = await allowed_store(path)
    try:
        await store.attempt(C, S, R, now=T0, params=P)
        other = sqlite3.connect(path, isolation_level=None)  # say the CLI, writing
        other.execute("BEGIN IMMEDIATE")
        flushing = asyncio.ensure_future(store.db.flush())
        while store.db.waited == 0:  # the tallies' write went to the thread, which waits
            await asyncio.sleep(0)
        assert not flushing.done()
        other.execute("COMMIT")
        other.close()
        await flushing
        assert counters(path) == {"new": 1, "allowed": 2}
    finally:
        await store.close()


async def test_a_failed_tally_write_keeps_its_counts_for_the_next(tmp_path):
    db = SqliteDatabase(str(tmp_path / "state.db"), NEVER)
    await db.call(lambda conn: conn.execute("CREATE TABLE n (name TEXT PRIMARY KEY, value INTEGER)"))
    failing = [False, True]

    def writer(conn, counts):
        if failing.pop():
            raise sqlite3.OperationalError("disk I/O error")
        conn.executemany("INSERT INTO n VALUES (?, ?)", counts.items())
    try:
        db.tally(writer, "x", 2)
        await db.flush()  # fails: the counts go back to the pending ones
        db.tally(writer, "x")
        await db.flush()
        assert await db.call(lambda conn: conn.execute("SELECT name, value FROM n").fetchall()) == [("x", 3)]
    finally:
        await db.close()


# --- the read path answers what the write path answers ---------------------------------------

IPS = ["192.0.2.7", "192.0.2.200", "198.51.100.9", "2001:db8::5", "::ffff:192.0.2.9", None]
NETWORKS = ["192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/25", "198.51.100.9/32", "192.0.0.0/8",
            "0.0.0.0/0", "2001:db8::/32", "2001:db8::5/128"]
SENDERS = ["", "a@x.example", "b@x.example", "c@y.example"]
SENDER_ALLOWS = ["<>", "a@x.example", "@x.example", "@y.example"]
CLIENTS = ["192.0.2.0/24", "198.51.100.0/24", "domain:y.example"]
TRIPLETS = [(c, s, R) for c in CLIENTS for s in SENDERS]
TTLS = st.one_of(st.none(), st.integers(0, 2000).map(float))

ALLOWS = st.lists(st.one_of(
    st.tuples(st.just("client"), st.sampled_from(NETWORKS), TTLS),
    st.tuples(st.just("sender"), st.sampled_from(SENDER_ALLOWS), TTLS),
    st.tuples(st.just("triplet"), st.sampled_from(TRIPLETS).map(lambda t: triplet_value(*t)), TTLS)), max_size=6)
ATTEMPTS = st.lists(st.tuples(st.sampled_from(TRIPLETS), st.sampled_from(IPS), st.integers(0, 500)),
                    min_size=1, max_size=12)


class ReadFirst(SqliteGreylistStore):
    """Tries the read path for every decision (the store tries it where the last was allowed)."""

    def _read_first(self, hint):
        return True


class WriteOnly(SqliteGreylistStore):
    """Never the read path: every decision a write transaction, as before."""

    def _read_first(self, hint):
        return False


async def _three_ways(allows, attempts):
    stores = [cls(f"sqlite://:memory:", SqliteDatabase(":memory:", NEVER))
              for cls in (SqliteGreylistStore, ReadFirst, WriteOnly)]
    try:
        for store in stores:
            for kind, value, ttl in allows:
                await store.add_allow(make_allow(kind, value, T0, ttl))
        now = T0
        for key, ip, step in attempts:
            now += step
            hinted, read, write = [await s.attempt(*key, now=now, params=P, client_ip=ip) for s in stores]
            assert hinted == read == write
        hinted, read, write = [await s.stats(now, 2) for s in stores]
        assert hinted == read == write
        assert sum(hinted.counters.values()) == len(attempts)
    finally:
        for store in stores:
            await store.close()


@settings(max_examples=150, deadline=None)
@given(ALLOWS, ATTEMPTS)
def test_the_read_path_answers_what_the_write_path_answers(allows, attempts):
    asyncio.run(_three_ways(allows, attempts))
