"""The SQLite greylist's indexes hold nothing a refresh changes (schema step 4): a decision on
a passed triplet writes its row alone; the sweep finds rows by ``sweep_at``, a lower bound of
``expires``; the auto-whitelist count by (client, passed), reading ``expires`` on the row.
What every reader sees stays exact, and a file of the older schema migrates with its rows.

Times are explicit (``now=``): no test sleeps.
"""
from __future__ import annotations

import random
import sqlite3

from smtpgate.stores import Params, Selector
from smtpgate.stores.greylist import GRACE
from smtpgate.stores.sqlite_store import GREYLIST_SCHEMA, SqliteDatabase, SqliteGreylistStore, greylist_live_counts
from tests.support.constants import T0
from tests.support.sqlite_plans import btrees_written, plan, traced

P = Params(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400, auto_whitelist_after=0)
C, S, R = "192.0.2.0/24", "alice@sender.example", "bob@example.com"
NEVER = 1e9  # tallies written at close only


def open_store(path) -> SqliteGreylistStore:
    return SqliteGreylistStore(f"sqlite://{path}", SqliteDatabase(str(path), NEVER))


async def passed(store, key, now, params=P):
    """A triplet passed at ``now``: first seen ``delay`` before."""
    await store.attempt(*key, now=now - params.delay, params=params)
    assert (await store.attempt(*key, now=now, params=params)).outcome == "passed_now"


async def test_a_refresh_of_a_passed_triplet_writes_its_row_alone(tmp_path):
    path = tmp_path / "state.db"
    store = open_store(path)
    try:
        await passed(store, (C, S, R), T0)
        statements = traced(store)
        a = await store.attempt(C, S, R, now=T0 + 600, params=P)
        assert a.outcome == "passed_before"
        writes = [s for s in statements if s.startswith(("UPDATE greylist ", "INSERT OR REPLACE INTO greylist "))]
        assert len(writes) == 1 and writes[0].startswith("UPDATE greylist SET last_seen = ")
        assert btrees_written(path, writes[0]) == {"greylist"}  # no index: only the row's own b-tree
        assert await store.get(C, S, R) == a.entry
    finally:
        await store.close()


async def test_the_auto_whitelist_count_sweep_and_purge_use_their_indexes(tmp_path):
    path = tmp_path / "state.db"
    store = open_store(path)
    awl = Params(300, 2 * 86400, 35 * 86400, auto_whitelist_after=3)
    try:
        await passed(store, (C, S, R), T0)
        statements = traced(store)
        await store.attempt(C, "other@sender.example", R, now=T0 + 10, params=awl)  # counts C's passes
        count = [s for s in statements if "count(*)" in s]
        assert len(count) == 1 and "SEARCH greylist USING INDEX greylist_passed (client=? AND passed=?)" \
            in plan(path, count[0])
        store._sweep(store.db._loop_conn, T0)  # as attempt's periodic sweep, on this connection
        # purge runs on the database thread: trace that connection too (set on its thread)
        await store.db.run(lambda conn: conn.set_trace_callback(statements.append))
        await store.purge(T0 + 10 * 86400, dry_run=True)
        await store.purge(T0 + 10 * 86400)
    finally:
        await store.close()
    swept = [s for s in statements if s.startswith(("UPDATE greylist SET sweep_at", "DELETE FROM greylist "))]
    assert len(swept) == 4  # the sweep's two, purge's two
    counted = [s for s in statements if "greylist INDEXED BY greylist_sweep" in s and "count(*)" in s]
    assert len(counted) == 1  # purge's dry run
    for sql in swept + counted:
        assert "SEARCH greylist USING INDEX greylist_sweep (sweep_at<?)" in plan(path, sql)
    conn = sqlite3.connect(path)
    statements = []
    conn.set_trace_callback(statements.append)
    greylist_live_counts(conn, T0)
    conn.close()
    plans = [plan(path, s) for s in statements if "count(*)" in s]
    assert len(plans) == 1  # one statement: one snapshot
    assert "SCAN greylist USING COVERING INDEX greylist_passed" in plans[0]
    assert "SEARCH greylist USING INDEX greylist_sweep (sweep_at<?)" in plans[0]


async def test_sweep_and_purge_drop_exactly_the_expired_rows(tmp_path):
    """Refreshes move expires up (sweep_at stays behind), a shorter pass_ttl or retry_window
    moves it down (sweep_at follows): whatever the history, exactly the rows expired at the
    sweep's or purge's time go, and every reader sees the same rows and counts."""
    rng = random.Random(13)
    store = open_store(tmp_path / "state.db")
    keys = [(f"10.0.{i % 7}.0/24", f"s{i}@x.example", f"r{i % 5}@y.example") for i in range(120)]
    try:
        now = T0
        for _ in range(900):
            now += rng.uniform(0, 3 * 3600)
            params = Params(rng.choice([60, 300]), rng.choice([86400.0, 2 * 86400]),
                            rng.choice([3 * 86400.0, 10 * 86400, 35 * 86400]), rng.choice([0, 2]))
            await store.attempt(*rng.choice(keys), now=now, params=params)
        everything = {e.key: e for e in await store.entries(Selector(), now)}
        for at in (now - 20 * 86400, now - 5 * 86400, now + 2 * 86400, now + 20 * 86400):
            expired = {k for k, e in everything.items() if e.expires < at}
            assert (await store.purge(at, dry_run=True))[0] == len(expired)
            assert greylist_live_counts(store.db._loop_conn, at) == {
                "passed": sum(e.passed and e.expires >= at for e in everything.values()),
                "pending": sum(not e.passed and e.expires >= at for e in everything.values())}
        before = now - GRACE / 2  # attempt's periodic sweeps took those expired a GRACE ago
        store._sweep(store.db._loop_conn, before)
        left = {e.key for e in await store.entries(Selector(), now)}
        assert left == {k for k, e in everything.items() if e.expires >= before}
        assert 0 < len(everything) - len(left) < len(everything)
        assert (await store.purge(now))[0] == sum(e.expires < now for e in everything.values() if e.key in left)
        assert {e.key for e in await store.entries(Selector(), now)} == \
            {k for k, e in everything.items() if e.expires >= now}
        # every row's sweep_at is at most its expires (the index may put a row early, never late),
        # and purge moved up every row it put before its time, so the next sweep walks over none
        conn = store.db._loop_conn
        assert conn.execute("SELECT count(*) FROM greylist WHERE sweep_at > expires").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM greylist WHERE sweep_at < ?", (now,)).fetchone() == (0,)
    finally:
        await store.close()


async def test_a_shorter_ttl_brings_the_row_into_the_sweep(tmp_path):
    store = open_store(tmp_path / "state.db")
    try:
        await passed(store, (C, S, R), T0)  # expires T0 + 35 days
        short = Params(300, 2 * 86400, pass_ttl=86400)
        a = await store.attempt(C, S, R, now=T0 + 60, params=short)
        assert (a.outcome, a.entry.expires) == ("passed_before", T0 + 60 + 86400)
        # sweep_at was T0 + 2 days - 300 (the pending row's expires, kept by the pass): now below it
        assert await store.purge(T0 + 1.5 * 86400, dry_run=True) == (1, 0)
        assert await store.purge(T0 + 1.5 * 86400) == (1, 0)
    finally:
        await store.close()


async def test_the_auto_whitelist_counts_live_passes_only_with_expired_ones_unswept(tmp_path):
    store = open_store(tmp_path / "state.db")
    short = Params(300, 2 * 86400, 3 * 86400)
    awl = Params(300, 2 * 86400, 3 * 86400, auto_whitelist_after=3)
    try:
        # five passes of C that run out at T0 + 3 days + 300 (in the index till swept), two live
        for i in range(5):
            await passed(store, (C, f"old{i}@x.example", R), T0 + 300, short)
        now = T0 + 3 * 86400 + 301 + 3600
        for i in range(2):
            await passed(store, (C, f"new{i}@x.example", R), now - 600, short)
        assert await store.passed_count(C, now) == 2
        a = await store.attempt(C, "first@x.example", R, now=now, params=awl)
        assert (a.outcome, a.passed_count) == ("new", 2)
        await passed(store, (C, "new2@x.example", R), now, short)
        a = await store.attempt(C, "second@x.example", R, now=now + 1, params=awl)
        assert (a.outcome, a.passed_count) == ("auto", 3)
        assert (await store.stats(now + 1, 3)).auto_whitelisted == 1
        assert (await store.stats(now + 1, 5)).auto_whitelisted == 0
    finally:
        await store.close()


def _v3_database(path) -> None:
    """A file as the previous version wrote it: the first three schema steps, with rows."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    for step in GREYLIST_SCHEMA[:3]:
        for statement in step:
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('greylist', 3)")
    rows = [(C, S, R, T0, T0 + 10, 2, 0, None, None, T0 + 2 * 86400),  # pending
            (C, "live@x.example", R, T0 - 900, T0 - 100, 3, 1, T0 - 100, 800.0, T0 + 30 * 86400),  # passed
            (C, "gone@x.example", R, T0 - 90 * 86400, T0 - 60 * 86400, 2, 1, T0 - 60 * 86400, 600.0,
             T0 - 3600)]  # passed, expired within GRACE (the sweep keeps it)
    conn.executemany("INSERT INTO greylist (client, sender, recipient, first_seen, last_seen, attempts, passed,"
                     " passed_at, retry_delay, expires) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()


async def test_a_file_of_the_previous_schema_migrates_with_its_rows(tmp_path):
    path = tmp_path / "state.db"
    _v3_database(path)
    conn = sqlite3.connect(path)
    counts_before = greylist_live_counts(conn, T0)  # a scrape before the gate migrates the file
    conn.close()
    assert counts_before == {"pending": 1, "passed": 1}
    store = open_store(path)
    try:
        listed = await store.entries(Selector(), T0)
        assert [(e.sender, e.passed, e.expires) for e in listed] == [
            (S, False, T0 + 2 * 86400), ("live@x.example", True, T0 + 30 * 86400),
            ("gone@x.example", True, T0 - 3600)]
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT version FROM meta WHERE component = 'greylist'").fetchone() == (
            len(GREYLIST_SCHEMA),)
        assert conn.execute("SELECT count(*) FROM greylist WHERE sweep_at != expires").fetchone() == (0,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                              "AND tbl_name = 'greylist' AND sql IS NOT NULL")}
        assert indexes == {"greylist_sweep", "greylist_passed"}
        assert greylist_live_counts(conn, T0) == counts_before
        conn.close()
        assert await store.passed_count(C, T0) == 1
        assert (await store.attempt(C, S, R, now=T0 + 300, params=P)).outcome == "passed_now"
        assert (await store.attempt(C, "live@x.example", R, now=T0, params=P)).outcome == "passed_before"
        assert await store.purge(T0, dry_run=True) == (1, 0)
        assert await store.purge(T0) == (1, 0)
        assert [e.sender for e in await store.entries(Selector(), T0)] == [S, "live@x.example"]
    finally:
        await store.close()

