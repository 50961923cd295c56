"""How the SQLite stores run their statements (smtpgate/stores/sqlite_store.py): decisions on
the event loop, the writes of one loop turn committed together, and the thread taking over
while another process holds the write lock. Real SQLite files in tmp_path; no test sleeps.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import pytest

from smtpgate import Event, Machine, StoreError
from smtpgate.stores import open_stores
from smtpgate.stores.sqlite_store import write_transaction
from tests.support.constants import T0

ONE_WAY = Machine("oneway", {"a": {"hit": "b"}, "b": {}}, initial="a")


def commits(db) -> list[str]:
    """Record the loop connection's COMMITs from now on (its trace callback)."""
    seen: list[str] = []
    db._loop_conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def put(conn, v):
    with write_transaction(conn):
        conn.execute("INSERT INTO t VALUES (?)", (v,))
    return v


@pytest.fixture
async def db_t(tmp_path):
    """A database with a table t (v INTEGER), its loop's connection open."""
    stores = open_stores(f"sqlite://{tmp_path}/state.db")
    db = stores.senders.db
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE t (v INTEGER)"))
        await db.call(lambda conn: None)
        yield db
    finally:
        await stores.close()


async def test_the_writes_of_one_turn_share_one_commit_and_lose_nothing(tmp_path):
    stores = open_stores(f"sqlite://{tmp_path}/state.db")
    try:
        await stores.senders.get("oneway", "warm")  # opens the connection
        seen = commits(stores.senders.db)
        keys = [f"s{i}@example.org" for i in range(20)] + ["same@example.org"] * 30
        await asyncio.gather(*(ONE_WAY.feed(stores.senders, k, [Event("hit", "t")], T0) for k in keys))
        assert len(seen) == 1  # 50 decisions, one transaction
        same = await stores.senders.get("oneway", "same@example.org")
        assert (same.counts, same.version, same.state) == ({"hit": 30}, 30, "b")  # each saw the one before
        assert len(await stores.senders.records("oneway")) == 21
    finally:
        await stores.close()


async def test_a_failing_write_leaves_the_others_of_its_group(tmp_path):
    stores = open_stores(f"sqlite://{tmp_path}/state.db")
    try:
        def fails(record):
            raise ValueError("this change is refused")

        def counts(record):
            rec = ONE_WAY.settle(record, T0) or ONE_WAY.new_record("ok@example.org", T0)
            rec.counts["n"] = rec.counts.get("n", 0) + 1
            return rec, rec.counts["n"]
        results = await asyncio.gather(stores.senders.update("oneway", "ok@example.org", counts),
                                       stores.senders.update("oneway", "bad@example.org", fails),
                                       stores.senders.update("oneway", "ok@example.org", counts),
                                       return_exceptions=True)
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], ValueError)
        assert await stores.senders.get("oneway", "bad@example.org") is None
    finally:
        await stores.close()


async def test_a_locked_file_moves_the_decision_to_the_thread_without_stopping_the_loop(tmp_path):
    path = tmp_path / "state.db"
    stores = open_stores(f"sqlite://{path}")
    try:
        checks = [("client", "192.0.2.1", 3600.0, 10, True)]
        await stores.limits.hit(checks, T0)
        other = sqlite3.connect(path, isolation_level=None)  # another process, say the CLI
        other.execute("BEGIN IMMEDIATE")
        decision = asyncio.ensure_future(stores.limits.hit(checks, T0))
        while stores.limits.db.waited == 0:  # the loop goes on meanwhile: this test runs
            await asyncio.sleep(0)
        assert not decision.done()
        other.execute("COMMIT")
        other.close()
        assert (await decision).allowed
        assert (await stores.limits.counters("client"))[0].current == 2
    finally:
        await stores.close()


async def test_a_broken_database_is_a_store_error(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"not a database" * 100)
    stores = open_stores(f"sqlite://{path}")
    try:
        with pytest.raises(StoreError):
            await stores.limits.hit([("client", "192.0.2.1", 3600.0, 10, True)], T0)
    finally:
        await stores.close()


async def test_closing_commits_the_writes_already_asked(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    stores = open_stores(url)
    checks = [("client", "192.0.2.1", 3600.0, 10, True)]
    await stores.limits.hit(checks, T0)
    pending = [asyncio.ensure_future(stores.limits.hit(checks, T0)) for _ in range(3)]
    await asyncio.sleep(0)  # they have asked; their group is not committed yet
    await stores.close()
    assert all(p.result().allowed for p in pending)
    again = open_stores(url)
    try:
        assert (await again.limits.counters("client"))[0].current == 4
    finally:
        await again.close()


async def test_close_leaves_no_checkpoint_behind(db_t, monkeypatch):
    # close's own last commit (the writes asked just before) counts as a write too: a
    # checkpoint it started would run after close returned, on a new thread and connection
    # that nothing closes (one more per reload)
    from smtpgate.stores import sqlite_store
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 1)
    db = db_t
    await db.write(put, 1)
    await db._checkpoint  # the one that write started
    pending = asyncio.ensure_future(db.write(put, 2))
    await asyncio.sleep(0)  # asked: its group waits for the turn's end, close commits it
    await db.close()
    assert pending.result() == 2
    assert db._checkpoint is None and db._executor is None and db._conn is None
    conn = sqlite3.connect(db.path)
    assert conn.execute("SELECT v FROM t ORDER BY v").fetchall() == [(1,), (2,)]
    conn.close()


async def test_a_forked_process_writes_without_its_parents_pending_group(db_t):
    # a worker forked while its parent's group waited for its commit: the first write of the
    # child leads a group of its own (with the parent's, it would wait for a leader forever)
    db = db_t
    parent = db._loop_conn, db._conn, db._executor
    db._group.append((put, (0,), asyncio.get_running_loop().create_future()))  # the parent's
    db._pid = -1  # as seen from the child: opened by another process
    assert await asyncio.wait_for(db.write(put, 1), 30) == 1
    assert await db.call(lambda conn: [v for (v,) in conn.execute("SELECT v FROM t")]) == [1]
    parent[0].close()
    await asyncio.get_running_loop().run_in_executor(parent[2], parent[1].close)
    parent[2].shutdown()


async def test_a_really_forked_child_sees_its_parents_connections_as_not_its_own(db_t):
    # the loop's calls check the process by an id a fork hook keeps, not os.getpid(): a child
    # of a real fork must still find the handles its parent opened not its own
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer and leave at once (no loop, no cleanup of the parent's)
        try:
            os.write(write_end, b"y" if db_t._forked() and db_t._loop_conn is None else b"n")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"y"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert not db_t._forked() and db_t._loop_conn is not None  # the parent's: still its own


async def test_a_forked_process_flushes_without_its_parents_tallies_in_flight(tmp_path):
    # the parent's tallies being written when it forked are not the child's to wait for
    stores = open_stores(f"sqlite://{tmp_path}/state.db")
    db = stores.senders.db
    try:
        await db.call(lambda conn: None)  # the loop's connection open
        parent = db._loop_conn, db._executor
        db._riding.add(asyncio.get_running_loop().create_future())  # the parent's, never done here
        db._pid = -1  # as seen from the child: opened by another process
        await asyncio.wait_for(db.flush(), 30)
        assert not db._riding
        parent[0].close()
        parent[1].shutdown()
    finally:
        await stores.close()

async def test_a_write_failing_half_way_leaves_nothing_and_the_others_everything(tmp_path):
    # No savepoint per write: the group is rolled back whole and the others run again.
    stores = open_stores(f"sqlite://{tmp_path}/state.db")
    try:
        db = stores.senders.db
        await db.write(lambda conn: conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        seen = commits(db)

        def put(conn, key, fail=False):
            with write_transaction(conn):
                conn.execute("INSERT INTO t VALUES (?)", (key,))
                if fail:
                    raise ValueError("refused after its insert")
            return key
        results = await asyncio.gather(db.write(put, "a"), db.write(put, "bad", True), db.write(put, "c"),
                                       return_exceptions=True)
        assert results[0] == "a" and results[2] == "c" and isinstance(results[1], ValueError)
        rows = await db.call(lambda conn: [r[0] for r in conn.execute("SELECT k FROM t ORDER BY k")])
        assert rows == ["a", "c"] and len(seen) == 1  # the two others: committed together, once
    finally:
        await stores.close()


async def test_a_first_writer_cancelled_before_the_commit_leaves_the_others_of_its_turn(db_t):
    # the first write of a turn leads the group (it yields once, then commits): cancelled
    # meanwhile, it is not written and the writes that joined it still are
    db = db_t
    first = asyncio.ensure_future(db.write(put, 1))
    others = [asyncio.ensure_future(db.write(put, v)) for v in (2, 3)]
    await asyncio.sleep(0)  # all three asked: the first waits for the turn's end
    first.cancel()
    assert await asyncio.gather(*others) == [2, 3]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await db.call(lambda conn: [v for (v,) in conn.execute("SELECT v FROM t ORDER BY v")]) == [2, 3]


def wal_restarts(path) -> int:
    """The checkpoint sequence number in the WAL file's header: how often the WAL started over."""
    try:
        with open(f"{path}-wal", "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")
    except FileNotFoundError:  # no write yet
        return 0


async def test_the_wal_starts_over_under_a_steady_stream_of_writes(tmp_path, monkeypatch):
    # A checkpoint beside writes that never pause never copies back every frame, so the WAL
    # would never restart and grow without end: past RESTART_FRAMES the writes wait for it.
    from smtpgate.stores import sqlite_store
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 20)
    monkeypatch.setattr(sqlite_store, "RESTART_FRAMES", 50)
    path = tmp_path / "state.db"
    stores = open_stores(f"sqlite://{path}")
    hits = 0
    try:
        async def writer(i):
            nonlocal hits
            # never idle: the next write asked as one is done. The WAL may also start over
            # by itself when a passive checkpoint happens to catch up: count the file's restarts
            # (a cap, not a clock: it ends at the second restart; once in a full CI run 20,000
            # hits saw only one, so the cap leaves room for checkpoints skipped under load)
            while wal_restarts(path) < 2 and hits < 200_000:
                await stores.limits.hit([("client", f"192.0.2.{i}", 3600.0, 10**9, True)], T0)
                hits += 1
        await asyncio.gather(*(writer(i) for i in range(16)))
        db = stores.senders.db
        assert wal_restarts(path) >= 2, (  # the file itself started over
            f"{hits} hits: the WAL file started over {wal_restarts(path)} time(s), "
            f"the database's RESTART checkpoints {db.restarts}")
        assert sum(c.current for c in await stores.limits.counters("client")) == hits  # none lost
    finally:
        await stores.close()


def blocking_step(monkeypatch, loop, number: int):
    """Have the ``number``th checkpoint step (sqlite_store._checkpoint, on the thread) wait:
    returns (started: set when it begins, go: lets it run on)."""
    from smtpgate.stores import sqlite_store
    real, steps = sqlite_store._checkpoint, []
    started, go = asyncio.Event(), threading.Event()

    def step(conn, mode):
        steps.append(mode)
        if len(steps) == number:
            loop.call_soon_threadsafe(started.set)
            go.wait(30)
        return real(conn, mode)
    monkeypatch.setattr(sqlite_store, "_checkpoint", step)
    return started, go, steps


@pytest.fixture
async def past_restart(db_t, monkeypatch):
    """``db_t``, with writes enough for the next checkpoint to restart the
    WAL (none of its own)."""
    from smtpgate.stores import sqlite_store
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(sqlite_store, "RESTART_FRAMES", 20)
    for v in range(30):  # a commit each: a WAL frame or more each
        await db_t.write(put, v)
    return db_t


async def test_the_restart_waits_for_no_other_work_of_the_thread(past_restart, monkeypatch):
    # a job queued on the thread while the checkpoint runs (a sweep, a write waiting for a
    # lock) would run before the RESTART, and the writes would be held as long: it is skipped
    db = past_restart
    started, go, steps = blocking_step(monkeypatch, asyncio.get_running_loop(), 2)
    checkpoint = asyncio.ensure_future(db._checkpoint_now())
    await asyncio.wait_for(started.wait(), 30)  # its second PASSIVE runs
    release = threading.Event()
    job = asyncio.ensure_future(db.run(lambda conn: release.wait(30)))
    await asyncio.sleep(0)  # queued behind it
    go.set()

    async def decided():  # skipped, or the writes held (the RESTART queued behind the job)
        while not checkpoint.done() and not db._held:
            await asyncio.sleep(0)
    await asyncio.wait_for(decided(), 30)
    release.set()
    assert await asyncio.wait_for(job, 30) is True
    await asyncio.wait_for(checkpoint, 30)
    assert steps == ["PASSIVE", "PASSIVE"] and db.restarts == 0
    await asyncio.wait_for(db._checkpoint_now(), 30)  # the next one, the thread idle
    assert steps[-1] == "RESTART" and db.restarts == 1


async def test_a_checkpoint_past_restart_frames_restarts_the_wal(past_restart):
    db = past_restart
    before = wal_restarts(db.path)
    await asyncio.wait_for(db._checkpoint_now(), 30)
    assert db.restarts == 1
    await db.write(put, 30)  # the WAL starts over at the next write: a new header
    assert wal_restarts(db.path) == before + 1


async def test_a_write_and_a_flush_asked_during_the_hold_go_once_it_ends(past_restart, monkeypatch):
    db = past_restart
    await db.run(lambda conn: conn.execute("CREATE TABLE n (name TEXT PRIMARY KEY, n INTEGER)"))

    def add(conn, counts):
        conn.executemany("INSERT INTO n VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET n = n + excluded.n",
                         counts.items())
    started, go, steps = blocking_step(monkeypatch, asyncio.get_running_loop(), 3)
    checkpoint = db._checkpoint = asyncio.ensure_future(db._checkpoint_now())  # as a write starts it
    await asyncio.wait_for(started.wait(), 30)  # the RESTART runs: the writes are held
    assert db._held
    write = asyncio.ensure_future(db.write(put, 100))
    db.tally(add, "x", 3)
    flush = asyncio.ensure_future(db.flush())
    for _ in range(5):  # turns of the loop: neither goes meanwhile
        await asyncio.sleep(0)
    assert not write.done() and not flush.done() and db._group
    go.set()
    assert await asyncio.wait_for(write, 30) == 100
    await asyncio.wait_for(flush, 30)
    await asyncio.wait_for(checkpoint, 30)
    assert steps == ["PASSIVE", "PASSIVE", "RESTART"] and db.restarts == 1
    rows = await db.call(lambda conn: (conn.execute("SELECT count(*), max(v) FROM t").fetchone(),
                                       conn.execute("SELECT name, n FROM n").fetchall()))
    assert rows == ((31, 100), [("x", 3)])  # none lost


@pytest.mark.parametrize("asked_while_waiting", [0, 1])
async def test_close_waits_for_the_writes_the_lock_moved_to_the_thread(tmp_path, asked_while_waiting):
    # close commits the writes asked just before; one that meets another process's lock
    # moves to the database thread. close waits for it there: a move that started after
    # the thread was shut opened a new thread and connection that nothing closed. A write
    # asked while close waits (a session finishing) is committed too, before the thread
    # closes (this case is a guard: the code before passed it as well).
    path = tmp_path / "state.db"
    stores = open_stores(f"sqlite://{path}")
    db = stores.limits.db
    checks = [("client", "192.0.2.1", 3600.0, 10, True)]
    try:
        await stores.limits.hit(checks, T0)
        await db.run(lambda conn: None)  # the thread is up, as in a gate that ran a while
        other = sqlite3.connect(path, isolation_level=None)  # another process, say the CLI
        other.execute("BEGIN IMMEDIATE")
        pending = [asyncio.ensure_future(stores.limits.hit(checks, T0))]
        await asyncio.sleep(0)  # asked: its group waits for the turn's end, close commits it
        closing = asyncio.ensure_future(db.close())
        for _ in range(1 + asked_while_waiting):
            moved = db.waited
            while db.waited == moved:  # its commit met the lock: the write goes to the thread
                await asyncio.sleep(0)
            if len(pending) <= asked_while_waiting:
                pending.append(asyncio.ensure_future(stores.limits.hit(checks, T0)))
        other.execute("COMMIT")
        other.close()
        await closing
        assert all([(await p).allowed for p in pending])
        assert db._executor is None and db._conn is None  # no thread nor connection opened after close
    finally:
        await stores.close()
    again = open_stores(f"sqlite://{path}")
    try:
        assert (await again.limits.counters("client"))[0].current == 2 + asked_while_waiting
    finally:
        await again.close()
