"""The SQLite backend (``state: sqlite:///PATH``): one host, several worker processes, one file.

- WAL journal (readers never wait for the writer), ``synchronous=NORMAL`` (a commit writes
  the WAL without syncing it; a checkpoint syncs), ``busy_timeout``; every write is one
  short ``BEGIN IMMEDIATE`` transaction on indexed rows, so workers and the CLI share the
  file safely.
- A decision (a few indexed statements: µs) runs right on the event loop (``call``), on a
  connection that never waits: its busy timeout is 0, so when another process holds the
  write lock the call moves to the database thread, which waits for it (``run``). A thread
  hop costs more than the statements (bench/store_bench.py: 3-5x fewer decisions per
  second), so only that rare case and the long work (the CLI's lists and purges, exports,
  sweeps, checkpoints) pay it. The loop's connection never checkpoints (a checkpoint syncs
  the disk): every ``CHECKPOINT_EVERY`` writes it asks the thread for one, beside the
  writes; the one that finds the WAL past ``RESTART_FRAMES`` also has it start over from its
  beginning (``_checkpoint_now``).
- A decision that changes nothing but a counter (an allow-listed greylist triplet) takes no
  write lock: its counter is tallied in memory and written about once a second (``tally``).
- The schema is versioned per component in a ``meta`` table and migrates itself, in one
  transaction, the first time a newer smtpgate opens the file.
- This is the only module that imports ``sqlite3``; its errors leave as ``StoreError``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import sqlite3
import time
from collections import Counter
from typing import Any, Callable, Sequence
from urllib.parse import quote

from ..config import sqlite_path
from ..errors import StoreError
from .greylist import (ALLOWED, GRACE, PASSED_NOW, AllowEntry, Attempt, Entry, GreylistStore,
                       Params, Selector, Stats, client_candidates, decide, delay_bucket,
                       fixed_allow_keys, import_kind, triplet_value)

BUSY_TIMEOUT_MS = 10_000
# Pages the WAL may grow to before a commit checkpoints it (SQLite's default: 1000). A
# checkpoint syncs the file; doing it 4x less often took a decision from ~90 to ~60 µs in
# bench/greylist_bench.py, for a WAL of up to 16 MB.
WAL_AUTOCHECKPOINT = 4000
GC_EVERY = 300.0  # seconds of store time between two sweeps of long-expired rows
BATCH = 1000  # rows per write transaction in purge and delete: the gate never waits long
# Writes on the loop's connection between two checkpoints (on the thread); a write adds a
# few pages to the WAL.
CHECKPOINT_EVERY = 1000
# WAL frames (pages) past which a checkpoint makes the WAL start over, holding this process's
# writes for as long (``_checkpoint_now``): 16,000 frames, about 64 MB on disk.
RESTART_FRAMES = 16_000
# Bytes a restarted WAL file is cut back to (SQLite keeps the file at its largest size): one
# that grew before RESTART_FRAMES existed (GBs under steady load) shrinks at its first restart.
WAL_SIZE_LIMIT = 128 * 2**20
# How long that restart waits for another process's locks before it leaves the WAL's
# restart to the next checkpoint.
RESTART_WAIT_MS = 50
# Seconds the tallies (``SqliteDatabase.tally``: the outcome counters of decisions that
# write nothing) wait in memory before they are written.
TALLY_EVERY = 1.0
# Rounds of commits close makes for writes asked while it waited for the previous round
CLOSE_ROUNDS = 3
# (triplet, client address) pairs a greylist store remembers as last found allowed
ALLOWED_HINTS = 4096
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another connection holds the lock
_BARE: set[int] = set()  # ids of connections running a group commit's writes (write_transaction)
# This process's id, set again in a forked child: every call on the loop checks that its
# connection is this process's, and os.getpid() is a system call each time (bench/README.md).
_PID = os.getpid()


def _forked_child() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_forked_child)


class SqliteDatabase:
    """Two connections, opened on first use (so a worker process forked after loading the
    configuration opens its own): one used from the event loop for decisions (``call``),
    one from a dedicated thread for what may wait or take long (``run``). An in-memory
    database (tests) has one connection, used on the loop."""

    def __init__(self, path: str, tally_every: float = TALLY_EVERY):
        self.path = path
        self.tally_every = tally_every
        self._conn: sqlite3.Connection | None = None  # the thread's
        self._loop_conn: sqlite3.Connection | None = None
        self._opening: asyncio.Future | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: set[concurrent.futures.Future] = set()  # run()'s, queued or running on the thread
        self._pid: int | None = None
        self._writes = 0  # on the loop's connection since the last checkpoint
        self._group: list = []  # (fn, args, future): writes asked this turn (``write``)
        self._checkpoint: asyncio.Future | None = None
        self._held = False  # a checkpoint's last step runs: the writes asked wait in _group
        self._closing = False  # close() runs: its last commits start no checkpoint (it would outlive close)
        self._tallies: dict[Callable, Counter] = {}  # writer -> counts not written yet (``tally``)
        self._tally_timer: asyncio.TimerHandle | None = None
        self._riding: set[asyncio.Future] = set()  # tallies being written
        self._moved: set[asyncio.Future] = set()  # writes the lock moved to the thread (_failed_on_loop)
        #: calls moved from the loop to the thread because another connection held the lock
        self.waited = 0
        #: times a checkpoint had the WAL start over (RESTART_FRAMES)
        self.restarts = 0
        self.migrations: dict[str, Sequence[Sequence[str]]] = {}

    def _forked(self) -> bool:
        """True (and every handle forgotten) in a process other than the one that opened them."""
        if self._pid == _PID:
            return False
        self._conn = self._loop_conn = self._opening = self._checkpoint = None
        self._held = self._closing = False
        self._executor = self._tally_timer = None
        self._jobs = set()
        self._tallies, self._riding, self._moved = {}, set(), set()  # the parent's, not this process's
        self._group = []  # the parent's writes: with them, a write here would never lead
        self._pid = _PID
        return True

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(connection, *args)`` on the database thread (it may wait for a lock)."""
        if self.path == ":memory:":
            return await self.call(fn, *args)
        self._forked()
        job = self._thread().submit(self._on_thread, fn, args)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)  # on the thread (or here if cancelled)
        try:
            return await asyncio.wrap_future(job)
        except sqlite3.Error as e:
            raise StoreError(f"SQLite {self.path}: {e}") from None

    def _thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """The database thread (started on first use)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smtpgate-sqlite")
        return self._executor

    def _on_thread(self, fn, args):
        if self._conn is None:
            self._conn = self._connect()
        return fn(self._conn, *args)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(connection, *args)`` right on the event loop: for a few indexed statements.
        If the file is locked by another connection, ``fn`` runs again on the thread (so it
        must do nothing but database work, in transactions that roll back on error)."""
        conn = self._loop_conn  # _loop_connection's test inline: no coroutine per decision
        if conn is None or self._pid != _PID:
            conn = await self._open_loop_connection()
        try:
            return self._wrote(conn, conn.total_changes, fn(conn, *args))
        except sqlite3.OperationalError as e:
            if not self._busy(e):
                raise StoreError(f"SQLite {self.path}: {e}") from None
        except sqlite3.Error as e:
            raise StoreError(f"SQLite {self.path}: {e}") from None
        self.waited += 1
        return await self.run(fn, *args)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``call`` for a write (``fn`` opens its transaction with ``write_transaction``),
        committed together with the other writes asked in the same turn of the event loop:
        one transaction for them all (one commit instead of one each); one that fails gets
        its error and the others run again without it, so it leaves them unharmed. Every
        caller gets its answer once the whole group is committed.

        The first write of a turn leads: it yields once (the turn's other writes join the
        group meanwhile), commits the group and, unless it had to wait on the thread, goes
        on with its answer at once; the others wake up with theirs."""
        if self._loop_conn is None or self._pid != _PID:  # _loop_connection's test inline, as in call
            await self._open_loop_connection()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._group.append((fn, args, future))
        if len(self._group) > 1:
            return await future
        try:
            await asyncio.sleep(0)
        except BaseException:  # cancelled: the others' writes still go, without this one
            future.cancel()
            loop.call_soon(self._commit_group)
            raise
        self._commit_group()
        return future.result() if future.done() else await future

    def tally(self, writer: Callable[[sqlite3.Connection, Counter], None], name: str, by: int = 1) -> None:
        """Count ``by`` more under ``name`` without a transaction of its own: ``writer(conn,
        counts)`` adds the pending counts ``tally_every`` seconds from now (with the writes
        asked in that turn, if any, else alone), on ``flush`` and at ``close``. Not with every
        write: that dirties one more page per commit (~20 µs of CPU each); once a second costs
        nothing. A process killed meanwhile loses them: counters, never a decision."""
        counts = self._tallies.get(writer)
        if counts is None:  # not setdefault: it would build a Counter on every call
            counts = self._tallies[writer] = Counter()
        counts[name] += by
        self._tally_later()

    def _tally_later(self) -> None:
        if self._tally_timer is None:
            self._tally_timer = asyncio.get_running_loop().call_later(self.tally_every, self._tally_due)

    def _tally_due(self) -> None:
        self._tally_timer = None
        self._commit_group(tallies=True)
        if self._tallies and self._loop_conn is not None:  # held by a checkpoint: next time
            self._tally_later()

    async def flush(self) -> None:
        """Write the pending tallies now, and wait for them (a reader in this process sees them)."""
        self._forked()  # not the parent's tallies, checkpoint nor riders: they are not this process's
        if self._tallies:
            if self._held:  # a checkpoint holds the writes: the tallies go once it lets go
                await asyncio.gather(self._checkpoint, return_exceptions=True)
            await self._loop_connection()
            self._commit_group(tallies=True)
            if self._tally_timer is not None and not self._tallies:  # nothing left for it to write
                self._tally_timer.cancel()
                self._tally_timer = None
        if self._riding:
            await asyncio.gather(*self._riding, return_exceptions=True)

    def _tally_rider(self) -> tuple:
        """The pending tallies as one more write of a group: they leave the pending ones now,
        and come back to them if that write fails (so none is written twice or lost)."""
        taken, self._tallies = self._tallies, {}
        future = asyncio.get_running_loop().create_future()
        self._riding.add(future)

        def written(f: asyncio.Future) -> None:
            self._riding.discard(f)
            if f.cancelled() or f.exception() is not None:
                # Cancelled: a rider moved to the thread (the file was locked) whose task is
                # cancelled, at the loop's teardown, may still commit there: written again
                # later, its counts are then counted twice (rare; counters, not decisions).
                for writer, counts in taken.items():
                    self._tallies.setdefault(writer, Counter()).update(counts)
                if self._loop_conn is not None:  # not closed: try again later
                    self._tally_later()
        future.add_done_callback(written)
        return _write_tallies, (taken,), future

    def _commit_group(self, tallies: bool = False) -> None:
        """Commit the writes asked this turn (``write``), and the pending tallies with them
        when ``tallies``."""
        if self._held:
            return  # committed when the checkpoint lets go (_checkpoint_now)
        group, self._group = [g for g in self._group if not g[2].done()], []  # a cancelled caller: not written
        conn = self._loop_conn
        if tallies and self._tallies and conn is not None:
            group.append(self._tally_rider())
        if not group:
            return
        if conn is None:
            for _, _, future in group:
                future.set_exception(StoreError(f"SQLite {self.path}: closed"))
            return
        if len(group) == 1:  # alone: its own transaction, as call() runs it
            fn, args, future = group[0]
            before = conn.total_changes
            try:
                future.set_result(self._wrote(conn, before, fn(conn, *args)))
            except sqlite3.Error as e:
                self._failed_on_loop(future, fn, args, e)
            except Exception as e:
                future.set_exception(e)
            return
        before = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            for fn, args, future in group:  # another process writes: each waits on the thread
                self._failed_on_loop(future, fn, args, e)
            return
        answers = []
        failed = None  # (its index in the group, its error): the group is rolled back
        _BARE.add(id(conn))  # each write's write_transaction: no savepoint of its own
        try:
            for i, (fn, args, future) in enumerate(group):
                try:
                    answers.append((future, fn(conn, *args)))
                except sqlite3.Error as e:
                    failed = i, StoreError(f"SQLite {self.path}: {e}")
                    break
                except Exception as e:
                    failed = i, e
                    break
            if failed is None:
                conn.execute("COMMIT")
            else:
                conn.execute("ROLLBACK")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"SQLite {self.path}: {e}") if isinstance(e, sqlite3.Error) else e
            for fn, args, future in group:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            _BARE.discard(id(conn))
        if failed is not None:
            # A write failed: the group was rolled back whole (cheaper, when none fails, than
            # a savepoint around each write). It gets its error; the others run again, in
            # their order, as a group of their own (their functions only do database work).
            i, error = failed
            group[i][2].set_exception(error)
            self._group = group[:i] + group[i + 1:] + self._group
            self._commit_group()
            return
        self._wrote(conn, before, None, len(group))
        for future, result in answers:
            if not future.done():
                future.set_result(result)

    def _failed_on_loop(self, future: asyncio.Future, fn, args, e: sqlite3.Error) -> None:
        """``fn`` met ``e`` on the loop's connection: if another connection holds the lock,
        ``fn`` runs on the thread, which waits for it, and its outcome goes to ``future``;
        otherwise ``future`` gets the error."""
        if self._busy(e):
            self.waited += 1
            task = asyncio.ensure_future(self.run(fn, *args))
            self._moved.add(task)
            task.add_done_callback(self._moved.discard)
            _settle(future, task)
        else:
            future.set_exception(StoreError(f"SQLite {self.path}: {e}"))

    def _busy(self, e: sqlite3.Error) -> bool:
        """Another connection holds the lock (never so for an in-memory database)."""
        return getattr(e, "sqlite_errorcode", 0) & 0xFF in _BUSY and self.path != ":memory:"

    def _wrote(self, conn: sqlite3.Connection, before: int, result: Any, writes: int = 1) -> Any:
        """``result``, after counting ``writes`` on the loop's connection if it changed
        anything (``before``: its total_changes before): every CHECKPOINT_EVERY writes, a
        checkpoint on the thread."""
        if conn.total_changes != before and self.path != ":memory:":
            self._writes += writes
            if self._writes >= CHECKPOINT_EVERY and self._checkpoint is None and not self._closing:
                self._writes = 0
                self._checkpoint = asyncio.ensure_future(self._checkpoint_now())
        return result

    async def _loop_connection(self) -> sqlite3.Connection:
        conn = self._loop_conn
        if conn is None or self._pid != _PID:
            conn = await self._open_loop_connection()
        return conn

    async def _checkpoint_now(self) -> None:
        """Copy the WAL back into the file on the thread (PASSIVE: beside the loop's writes).
        The WAL starts over from its beginning only if every frame is copied back when a
        write begins, which a checkpoint beside a steady stream of writes never sees: the
        WAL then grows without end (60 MB a second under bench/store_bench.py, 550 MB after
        40,000 decisions). So past RESTART_FRAMES a second step, RESTART, copies what was
        written meanwhile and restarts the WAL while this process's writes wait in their
        group (tens of ms, most of it the disk syncs) and other processes' on their threads;
        skipped, till the next checkpoint, while the thread has other work."""
        try:
            _, frames, _ = await self.run(_checkpoint, "PASSIVE")
            if frames < RESTART_FRAMES:
                return
            await self.run(_checkpoint, "PASSIVE")  # what was written meanwhile: less to copy while held
            if self._jobs:  # queued behind them (a sweep, a write waiting up to BUSY_TIMEOUT_MS
                return  # for a lock), the RESTART would hold the writes as long: next time
            self._held = True
            try:
                busy, _, _ = await self.run(_checkpoint, "RESTART")
                self.restarts += not busy
            finally:
                self._held = False
                if self._group:
                    asyncio.get_running_loop().call_soon(self._commit_group)
        except StoreError:
            pass  # the next one will do it; the WAL only grows meanwhile
        finally:
            self._checkpoint = None

    async def _open_loop_connection(self) -> sqlite3.Connection:
        """The loop's connection, opened on the thread (switching to WAL and migrating may
        wait for other processes), then told never to wait nor checkpoint."""
        self._forked()
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open_loop())
        try:
            return await asyncio.shield(self._opening)
        except BaseException:
            if self._opening is not None and self._opening.done():
                self._opening = None  # failed: the next call tries again
            raise

    async def _open_loop(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            conn = self._connect()
        else:
            try:
                conn = await asyncio.get_running_loop().run_in_executor(
                    self._thread(), lambda: self._connect(check_same_thread=False))
            except sqlite3.Error as e:
                raise StoreError(f"SQLite {self.path}: {e}") from None
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._loop_conn = conn
        self._closing = False  # opened again after a close
        return conn

    def _connect(self, check_same_thread: bool = True) -> sqlite3.Connection:
        if self.path != ":memory:":
            folder = os.path.dirname(self.path)
            if folder:
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"SQLite {self.path}: cannot create {folder}: {e.strerror}") from None
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=check_same_thread)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.path != ":memory:":
                _use_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            for component, steps in self.migrations.items():
                migrate(conn, component, steps)
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._forked():
            return
        # From now on no checkpoint starts: one started by the commits below would run after
        # close returned, on a new thread and connection that nothing closes.
        self._closing = True
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        # The writes asked just before and the tallies: not dropped. Those the lock moved to
        # the thread are waited for before it closes (else they would open a new one); writes
        # asked meanwhile go in the next round. Bounded: a file that keeps failing (a rider's
        # tallies come back each time) does not hold close.
        for _ in range(CLOSE_ROUNDS):
            if (self._group or self._tallies) and self._loop_conn is not None:
                self._commit_group(tallies=True)
            waiting = self._riding | self._moved
            if not waiting:
                break
            await asyncio.gather(*waiting, return_exceptions=True)
        if self._tally_timer is not None:  # armed, or armed again by a rider that failed
            self._tally_timer.cancel()
            self._tally_timer = None
        conn, self._loop_conn, self._opening = self._loop_conn, None, None
        if conn is not None:
            conn.close()
        if self._executor is None:
            return
        executor, self._executor = self._executor, None

        def shut(_conn=None):
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=False)


def _write_tallies(conn: sqlite3.Connection, taken: dict[Callable, Counter]) -> None:
    with write_transaction(conn):
        for writer, counts in taken.items():
            writer(conn, counts)


def _checkpoint(conn: sqlite3.Connection, mode: str) -> tuple:
    """``PRAGMA wal_checkpoint(mode)`` (busy, WAL frames, frames copied back); RESTART waits
    at most RESTART_WAIT_MS for the locks."""
    if mode != "RESTART":
        return conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
    try:
        return conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _settle(future: asyncio.Future, task: asyncio.Future) -> None:
    """When ``task`` is done, give its outcome to ``future`` (unless its caller left)."""
    def done(t):
        if future.done():
            return
        if t.cancelled():
            future.cancel()
        elif t.exception() is not None:
            future.set_exception(t.exception())
        else:
            future.set_result(t.result())
    task.add_done_callback(done)


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection):
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any error): the write lock is taken
    at once, so a transaction never fails half-way on a lock another process holds. Inside
    a group commit (``SqliteDatabase.write``) nothing: the group's transaction is rolled
    back whole when one write fails, and the others run again. Inside another transaction
    already open, a savepoint instead, released, or rolled back alone on an error."""
    if id(conn) in _BARE:
        yield conn
        return
    if conn.in_transaction:
        conn.execute("SAVEPOINT one_write")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO one_write")
            conn.execute("RELEASE one_write")
            raise
        conn.execute("RELEASE one_write")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def read_only(path: str, fn: Callable[[sqlite3.Connection], Any], deadline: float) -> Any:
    """``fn(connection)`` on a short read-only connection of its own, cut off after
    ``deadline`` seconds (for a reader that must not wait: a metrics scrape). None when the
    database does not exist yet; StoreError when it cannot be read."""
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=0.5,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"SQLite {path}: {e}") from None
    stop_at = time.monotonic() + deadline
    conn.set_progress_handler(lambda: time.monotonic() > stop_at, 10_000)  # interrupts the query
    try:
        return fn(conn)
    except sqlite3.Error as e:
        raise StoreError(f"SQLite {path}: {e}") from None
    finally:
        conn.close()


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (it stays so). Switching needs a moment alone with the file
    and SQLite answers "locked" at once, without its busy handler, when another process
    opens it just then (two workers starting together): retry until BUSY_TIMEOUT_MS."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # on the database thread, never on the event loop
        pause = min(pause * 2, 0.1)


def schema_version(conn: sqlite3.Connection, component: str) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM meta WHERE component = ?", (component,)).fetchone()
    return row[0] if row else 0


def migrate(conn: sqlite3.Connection, component: str, steps: Sequence[Sequence[str]]) -> int:
    """Bring ``component``'s tables to version ``len(steps)``; step N (1-based) holds the
    statements from version N-1 to N. Several processes may race here: the version is read
    again inside the write transaction, so each step runs once."""
    target = len(steps)
    if schema_version(conn, component) == target:
        return target
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn, component)
        if version > target:
            raise StoreError(f"the {component} tables are at schema version {version}, newer than "
                             f"this smtpgate knows ({target}): upgrade smtpgate")
        for step in steps[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO meta (component, version) VALUES (?, ?)", (component, target))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return target


class SqliteComponentStore:
    """What every SQLite store shares: its tables (``component``, migrated by ``schema``) in a
    database file it may share with the other stores (``db``), the calls on its thread, the
    pace of its sweeps and its paged export."""
    component: str
    schema: Sequence[Sequence[str]]

    def __init__(self, url: str, db: SqliteDatabase | None = None):
        path = sqlite_path(url)
        if path is None:
            raise StoreError(f"not a sqlite:// state URL: {url!r}")
        self.url = url
        self.db = db or SqliteDatabase(path)
        self.db.migrations[self.component] = self.schema
        self._ready: set[int] = set()  # ids of connections known to be migrated
        self._last_gc = -float("inf")

    def _migrated(self, fn):
        """``fn``, migrating first a connection another store opened before this one."""
        def call(conn, *a):
            if id(conn) not in self._ready:
                migrate(conn, self.component, self.schema)
                self._ready.add(id(conn))
            return fn(conn, *a)
        return call

    async def _run(self, fn, *args) -> Any:
        """``db.run`` (on the thread: long work) of ``fn``, on migrated tables."""
        return await self.db.run(self._migrated(fn), *args)

    async def _call(self, fn, *args) -> Any:
        """``db.call`` (on the event loop: a decision) of ``fn``, on migrated tables."""
        return await self.db.call(self._migrated(fn), *args)

    async def _write(self, fn, *args) -> Any:
        """``db.write`` (on the event loop, committed with this turn's other writes) of ``fn``."""
        return await self.db.write(self._migrated(fn), *args)

    def _sweep_due(self, now: float) -> bool:
        """True (and the clock restarted) once GC_EVERY seconds of store time have passed."""
        if now - self._last_gc < GC_EVERY:
            return False
        self._last_gc = now
        return True

    async def _pages(self, run, page, key_length: int):
        """The rows ``run(page, after)`` returns, in key order, BATCH at a time (``after``: the
        last row's first ``key_length`` columns): no long read transaction."""
        after = None
        while True:
            rows = await run(page, after)
            if rows:
                yield rows
            if len(rows) < BATCH:
                return
            after = rows[-1][:key_length]

    async def close(self) -> None:
        await self.db.close()


# Version N is GREYLIST_SCHEMA[:N]. Never edit a step that has shipped: append a new one.
GREYLIST_SCHEMA: tuple[tuple[str, ...], ...] = (
    # 1: the triplets
    ("CREATE TABLE greylist (client TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,"
     " first_seen REAL NOT NULL, last_seen REAL NOT NULL, attempts INTEGER NOT NULL,"
     " passed INTEGER NOT NULL DEFAULT 0, expires REAL NOT NULL,"
     " PRIMARY KEY (client, sender, recipient)) WITHOUT ROWID",
     "CREATE INDEX greylist_expires ON greylist (expires)"),
    # 2: retry delays, the auto-whitelist index, the allow list, outcome counters
    ("ALTER TABLE greylist ADD COLUMN passed_at REAL",
     "ALTER TABLE greylist ADD COLUMN retry_delay REAL",
     "CREATE INDEX greylist_client_passed ON greylist (client, passed, expires)",
     "CREATE TABLE greylist_allow (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL,"
     " family TEXT, plen INTEGER, created REAL NOT NULL, expires REAL, note TEXT NOT NULL DEFAULT '')"
     " WITHOUT ROWID",
     "CREATE TABLE greylist_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"),
    # 3: the client prefix lengths in use, read by every decision, from an index
    ("CREATE INDEX greylist_allow_lengths ON greylist_allow (kind, family, plen)",),
    # 4: no index holds expires, which every decision sets (each held one more scattered page
    # per decision at 1M rows): the sweep finds rows by sweep_at, a lower bound of expires
    # (_update, _EXPIRED), the auto-whitelist count by (client, passed), checking expires on the row
    ("ALTER TABLE greylist ADD COLUMN sweep_at REAL NOT NULL DEFAULT 0",
     "UPDATE greylist SET sweep_at = expires",
     "DROP INDEX greylist_expires",
     "DROP INDEX greylist_client_passed",
     "CREATE INDEX greylist_sweep ON greylist (sweep_at)",
     "CREATE INDEX greylist_passed ON greylist (client, passed)"),
)

_COLUMNS = "client, sender, recipient, first_seen, last_seen, attempts, passed, passed_at, retry_delay, expires"
# A new or imported row's sweep_at is its expires
_INSERT = f"INSERT OR REPLACE INTO greylist ({_COLUMNS}, sweep_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
# sweep_at is never after expires (0, the column's default, is always right), so these rows
# are exactly those with expires < ?, found by the greylist_sweep index
_EXPIRED = "sweep_at < ? AND expires < ?"
# Rows the index puts before ``?`` though they are live then: the sweep moves them up (_advance)
_EARLY = "sweep_at < ? AND expires >= ?"
_PK = "client, sender, recipient"
_ALLOW_COLUMNS = "kind, value, key, created, expires, note"


def _entry(row) -> Entry:
    c, s, r, first, last, attempts, passed, passed_at, retry_delay, expires = row
    return Entry(c, s, r, first, last, attempts, bool(passed), passed_at, retry_delay, expires)


def _allow(row) -> AllowEntry:
    return AllowEntry(*row)


# The entry a decision matched, built once per row (entries are frozen; the columns' REAL and
# TEXT affinities give one type per column, so equal rows are equal entries): ~0.8 -> 0.15 µs
_matched_allow = functools.lru_cache(maxsize=256)(_allow)


# The client prefix lengths in use as one text ("4/24 6/64"), read by every decision (_lookup)
_LENGTHS_IN_USE = ("SELECT group_concat(family || '/' || plen, ' ') FROM (SELECT DISTINCT family, plen "
                   "FROM greylist_allow INDEXED BY greylist_allow_lengths WHERE kind = 'client')")


@functools.lru_cache(maxsize=None)  # one per number of allow keys: a handful
def _lookup_sql(keys: int) -> str:
    """A decision's reads in one statement (one snapshot): the prefix lengths in use, each
    live allow entry among ``keys`` keys (one row each; _lookup names the most specific),
    the stored triplet (NULLs where none)."""
    allow = ", ".join("a." + c for c in _ALLOW_COLUMNS.split(", "))
    stored = ", ".join("g." + c for c in _COLUMNS.split(", "))
    # joined, not a subquery with its own LIMIT: that one is materialised (~1.7 µs more)
    return (f"SELECT ({_LENGTHS_IN_USE}), {allow}, {stored} FROM (SELECT 1) "
            f"LEFT JOIN greylist_allow AS a ON a.key IN ({','.join('?' * keys)}) "
            "AND (a.expires IS NULL OR a.expires >= ?) "
            "LEFT JOIN greylist AS g ON g.client = ? AND g.sender = ? AND g.recipient = ?")


def _lengths(text: str | None) -> tuple[tuple[str, int], ...]:
    """The prefix lengths in use, from their text (_LENGTHS_IN_USE)."""
    if not text:
        return ()
    return tuple((family, int(plen)) for family, _, plen in (x.partition("/") for x in text.split(" ")))


@functools.lru_cache(maxsize=4096)  # the same few triplets, clients and lengths, mostly
def _allow_keys(key: tuple[str, str, str], client_ip: str | None, lengths: tuple) -> tuple[str, ...]:
    """The allow keys that would cover the triplet ``key`` from ``client_ip``, most specific first."""
    return (*fixed_allow_keys(triplet_value(*key), key[1]), *client_candidates(client_ip, lengths))


def _allow_row(entry: AllowEntry) -> tuple:
    """The greylist_allow row: the entry, then the family and prefix length of a client one."""
    family = plen = None
    if entry.kind == "client":
        family, rest = entry.key.split(":", 2)[1:]
        plen = int(rest.rpartition("/")[2])
    return (entry.kind, entry.value, entry.key, entry.created, entry.expires, entry.note, family, plen)


def _entry_row(e: Entry) -> tuple:
    """The row _INSERT writes."""
    return (*e.key, e.first_seen, e.last_seen, e.attempts, int(e.passed), e.passed_at, e.retry_delay, e.expires,
            e.expires)


_FIELDS = ("first_seen", "last_seen", "attempts", "passed", "passed_at", "retry_delay", "expires")


@functools.lru_cache(maxsize=None)  # one per set of changed columns: a handful
def _update_sql(columns: tuple[str, ...]) -> str:
    sets = ", ".join(f"{c} = ?" for c in columns)
    return f"UPDATE greylist SET {sets} WHERE client = ? AND sender = ? AND recipient = ?"


def _update(conn, old: Entry, new: Entry) -> None:
    """Write ``new`` over the stored ``old`` (same key), setting only the columns that
    changed: SQLite then leaves alone every index whose columns are not set (INSERT OR
    REPLACE deleted and re-inserted the row and its entry in every index: at 1M rows, a
    scattered page each, copied back by the checkpoint). sweep_at stays a lower bound of
    expires as long as expires does not fall (a passed triplet's refresh): set only if it does."""
    changed = tuple(f for f in _FIELDS if getattr(new, f) != getattr(old, f))
    values = [int(new.passed) if f == "passed" else getattr(new, f) for f in changed]
    if new.expires < old.expires:
        changed += ("sweep_at",)
        values.append(new.expires)
    if changed:
        conn.execute(_update_sql(changed), (*values, *new.key))


_ADD_COUNT = ("INSERT INTO greylist_counters (name, value) VALUES (?, ?) "
              "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value")


def _advance(conn, before: float) -> int:
    """Up to BATCH rows whose sweep_at is before ``before`` though they are live then (their
    expires grew since it was set): sweep_at set to expires, past it. How many."""
    return conn.execute(f"UPDATE greylist SET sweep_at = expires WHERE ({_PK}) IN (SELECT {_PK} FROM greylist "
                        f"INDEXED BY greylist_sweep WHERE {_EARLY} LIMIT ?)", (before, before, BATCH)).rowcount


def _sweep_batch(conn, before: float) -> tuple[int, int]:
    """One batch of the sweep (in the caller's transaction): live rows the index holds too
    early moved up, then expired rows deleted. (How many of each.)"""
    return _advance(conn, before), _delete_expired(conn, before)


def _delete_expired(conn, before: float) -> int:
    """Up to BATCH rows expired before ``before`` deleted. How many."""
    return conn.execute(f"DELETE FROM greylist WHERE ({_PK}) IN (SELECT {_PK} FROM greylist "
                        f"INDEXED BY greylist_sweep WHERE {_EXPIRED} LIMIT ?)", (before, before, BATCH)).rowcount


def greylist_live_counts(conn, now: float) -> dict[str, int]:
    """Live triplets, {"pending": n, "passed": n}, for a metrics scrape (stores/counts.py):
    every row by a covering scan of greylist_passed, less the expired ones not swept yet
    (a day's worth at most: GRACE), found by greylist_sweep. A file not migrated yet (a
    scrape before the first decision of an upgraded gate) is scanned whole."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'greylist_sweep'").fetchone() is None:
        rows = conn.execute("SELECT passed, count(*) FROM greylist WHERE expires >= ? GROUP BY passed", (now,))
        counts = {"pending": 0, "passed": 0}
        for passed, n in rows:
            counts["passed" if passed else "pending"] += n
        return counts
    # one statement, so one snapshot: a sweep committed between two would be subtracted
    # from a total that still held its rows
    total, passed, expired, expired_passed = conn.execute(
        "SELECT * FROM (SELECT count(*), total(passed) FROM greylist INDEXED BY greylist_passed), "
        f"(SELECT count(*), total(passed) FROM greylist INDEXED BY greylist_sweep WHERE {_EXPIRED})",
        (now, now)).fetchone()
    live_passed = int(passed) - int(expired_passed)
    return {"pending": total - expired - live_passed, "passed": live_passed}


def _count(conn, name: str, by: int = 1) -> None:
    conn.execute(_ADD_COUNT, (name, by))


def _add_counts(conn, counts: Counter) -> None:
    """The tallied counters (``SqliteDatabase.tally``), inside the write that carries them."""
    conn.executemany(_ADD_COUNT, counts.items())


class SqliteGreylistStore(SqliteComponentStore, GreylistStore):
    component = "greylist"
    schema = GREYLIST_SCHEMA

    def __init__(self, url: str, db: SqliteDatabase | None = None):
        super().__init__(url, db)
        self._add_counts = self._migrated(_add_counts)  # one writer: the key of its tallies
        #: (triplet, client address) pairs last found allowed, oldest first (see attempt): past
        #: ALLOWED_HINTS the first added goes (FIFO, not LRU: a pair still allowed then takes
        #: the write path once, which adds it back)
        self._allowed_before: dict[tuple, None] = {}
        #: the client prefix lengths in use as the last lookup read them: (text, parsed)
        self._lengths_read: tuple[str | None, tuple] = (None, ())
        self._read_allowed = self._migrated(self._allowed)  # built once: they run for every decision
        self._write_attempt = self._migrated(self._attempt)

    # -- the decisive operation --------------------------------------------------------
    async def attempt(self, client, sender, recipient, *, now, params: Params, client_ip=None,
                      dry_run=False) -> Attempt:
        key = (client, sender, recipient)
        if dry_run:
            return await self._call(self._attempt, key, now, params, client_ip, dry_run)
        # An allowed decision writes nothing (its counter is tallied): a read on the loop,
        # without the write lock. Tried first only where the last decision was "allowed":
        # for the others it would be a read more before the write path, which checks the
        # allow list again under the write lock, so both paths answer alike.
        hint = (*key, client_ip)
        hints = self._allowed_before
        result = await self.db.call(self._read_allowed, key, client_ip, now) if self._read_first(hint) else None
        if result is None:
            result = await self.db.write(self._write_attempt, key, now, params, client_ip, dry_run)
        # read after the await: other decisions may have changed the hints meanwhile
        if result.outcome == ALLOWED:
            if hint not in hints:
                self._remember(hint)
            self.db.tally(self._add_counts, ALLOWED)
        else:
            hints.pop(hint, None)
        if self._sweep_due(now):
            await self._run(self._sweep, now - GRACE)
        return result

    def _read_first(self, hint: tuple) -> bool:
        # (a method of its own: tests/unit/test_greylist_allowed.py runs both paths through it)
        return hint in self._allowed_before

    def _remember(self, hint: tuple) -> None:
        """Try the read first next time for this allowed pair (FIFO past ALLOWED_HINTS)."""
        if len(self._allowed_before) >= ALLOWED_HINTS:
            del self._allowed_before[next(iter(self._allowed_before))]
        self._allowed_before[hint] = None

    def _allowed(self, conn, key, client_ip, now) -> Attempt | None:
        """The decision if an allow entry matches (what ``_decide`` answers then), read as
        of now; else None. One statement, so one snapshot without BEGIN/ROLLBACK around it:
        "allowed" is what the write path answered at that instant."""
        found = self._lookup(conn, key, client_ip, now)
        return None if found is None or found[0] is None else Attempt(ALLOWED, found[1], found[0])

    def _attempt(self, conn, key, now, params: Params, client_ip, dry_run) -> Attempt:
        if dry_run:  # read as of now, write nothing
            conn.execute("BEGIN")
            try:
                return self._decide(conn, key, now, params, client_ip, dry_run)
            finally:
                conn.execute("ROLLBACK")
        with write_transaction(conn):
            return self._decide(conn, key, now, params, client_ip, dry_run)

    def _decide(self, conn, key, now, params: Params, client_ip, dry_run) -> Attempt:
        found = self._lookup(conn, key, client_ip, now)
        if found is None:  # in a transaction its second run sees the same snapshot: never
            raise StoreError(f"SQLite {self.db.path}: the greylist lookup found no snapshot")
        allow, entry = found
        counted: list[int] = []

        def passed_count() -> int:
            # the decision only needs "at least auto_whitelist_after": count no further
            # (a dry run, for `greylist show`, counts them all)
            cap = None if dry_run else params.auto_whitelist_after
            counted.append(self._passed_count(conn, key[0], now, cap))
            return counted[-1]

        outcome, new = decide(key, entry, now, params, allowed=allow, passed_count=passed_count)
        if not dry_run:
            if new is not None and entry is None:
                conn.execute(_INSERT, _entry_row(new))
            elif new is not None:
                _update(conn, entry, new)
            if outcome != ALLOWED:  # allowed: tallied by attempt (it may run on the thread)
                _count(conn, outcome)
            if outcome == PASSED_NOW:
                _count(conn, "delay:" + delay_bucket(new.retry_delay))
        return Attempt(outcome, new or entry, allow, counted[-1] if counted else None)

    @staticmethod
    def _stored(conn, key) -> Entry | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM greylist WHERE client = ? AND sender = ? "
                           "AND recipient = ?", key).fetchone()
        return _entry(row) if row else None

    def _lookup(self, conn, key, client_ip, now) -> tuple[AllowEntry | None, Entry | None] | None:
        """(the allow entry covering the triplet, live at ``now``; the stored triplet), read
        by one statement. Its client keys depend on the prefix lengths in use: it takes those
        the last lookup read and reads them again in the same snapshot; if they changed (an
        allow entry added or deleted by any connection), it runs again with the new ones.
        Inside a transaction the second run sees the same snapshot, so it agrees; outside
        one, None if the lengths changed again meanwhile (the caller takes the write path)."""
        text, lengths = self._lengths_read
        for _ in range(2):
            keys = _allow_keys(key, client_ip, lengths)
            rows = conn.execute(_lookup_sql(len(keys)), (*keys, now, *key)).fetchall()
            # several when several entries cover it (rare): the first in ``keys``' order is named
            row = rows[0] if len(rows) == 1 else min(rows, key=lambda r: keys.index(r[3]))
            if row[0] == text:
                return (None if row[3] is None else _matched_allow(row[1:7]),
                        None if row[7] is None else _entry(row[7:]))
            text, lengths = row[0], _lengths(row[0])  # local: the thread's connection may look up too
            self._lengths_read = text, lengths
        return None

    @staticmethod
    def _passed_count(conn, client, now, cap: int | None = None) -> int:
        """The client's live passed triplets, at most ``cap`` of them when given (the index
        holds the passed ones, expired included until swept; expires is read on each row)."""
        if cap is None:
            return conn.execute("SELECT count(*) FROM greylist INDEXED BY greylist_passed WHERE client = ? "
                                "AND passed = 1 AND expires >= ?", (client, now)).fetchone()[0]
        return conn.execute("SELECT count(*) FROM (SELECT 1 FROM greylist INDEXED BY greylist_passed WHERE "
                            "client = ? AND passed = 1 AND expires >= ? LIMIT ?)", (client, now, cap)).fetchone()[0]

    @staticmethod
    def _sweep(conn, before: float) -> None:
        """Drop rows expired for longer than GRACE, a bounded batch at a time (after moving
        up a batch of the live rows the index puts before them)."""
        with write_transaction(conn):
            _sweep_batch(conn, before)
            conn.execute("DELETE FROM greylist_allow WHERE expires IS NOT NULL AND expires < ?", (before,))

    # -- reads -------------------------------------------------------------------------
    async def get(self, client, sender, recipient) -> Entry | None:
        return await self._call(self._stored, (client, sender, recipient))

    async def passed_count(self, client, now) -> int:
        return await self.db.run(self._passed_count, client, now)

    async def allow_entries(self, now=None) -> list[AllowEntry]:
        def read(conn):
            sql = f"SELECT {_ALLOW_COLUMNS} FROM greylist_allow"
            if now is not None:
                return conn.execute(sql + " WHERE expires IS NULL OR expires >= ? ORDER BY created", (now,)).fetchall()
            return conn.execute(sql + " ORDER BY created").fetchall()
        return [_allow(r) for r in await self.db.run(read)]

    async def entries(self, selector: Selector, now, limit=None) -> list[Entry]:
        def read(conn):
            where, args = self._where(selector, now)
            out = []
            for row in conn.execute(f"SELECT {_COLUMNS} FROM greylist{where} ORDER BY last_seen DESC", args):
                e = _entry(row)
                if selector.matches(e, now):
                    out.append(e)
                    if limit is not None and len(out) >= limit:
                        break
            return out
        return await self.db.run(read)

    @staticmethod
    def _where(selector: Selector, now) -> tuple[str, tuple]:
        """An indexed prefilter; Selector.matches has the last word."""
        clauses, args = [], []
        if selector.state == "pending":
            clauses.append("passed = 0 AND expires >= ?")
            args.append(now)
        elif selector.state == "passed":
            clauses.append("passed = 1 AND expires >= ?")
            args.append(now)
        if selector.client and selector.client.startswith("domain:"):
            clauses.append("client = ?")
            args.append(selector.client.lower())
        if selector.sender and not selector.sender.startswith("@"):
            clauses.append("sender = ?")
            args.append("" if selector.sender == "<>" else selector.sender.lower())
        if selector.recipient:
            clauses.append("recipient = ?")
            args.append(selector.recipient.lower())
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    # -- writes from the CLI -----------------------------------------------------------
    async def add_allow(self, entry: AllowEntry) -> None:
        def write(conn):
            with write_transaction(conn):
                conn.execute(f"INSERT OR REPLACE INTO greylist_allow ({_ALLOW_COLUMNS}, family, plen) "
                             "VALUES (?,?,?,?,?,?,?,?)", _allow_row(entry))
        await self.db.run(write)

    async def delete(self, selector: Selector) -> tuple[int, int]:
        far = float("inf")
        keys = [e.key for e in await self.entries(Selector(None, selector.client, selector.sender,
                                                           selector.recipient), far)]
        allows = [a.key for a in await self.allow_entries() if selector.matches_allow(a)]

        def write(conn):
            for i in range(0, len(keys), BATCH):
                with write_transaction(conn):
                    conn.executemany("DELETE FROM greylist WHERE client = ? AND sender = ? AND recipient = ?",
                                     keys[i:i + BATCH])
            with write_transaction(conn):
                conn.executemany("DELETE FROM greylist_allow WHERE key = ?", [(k,) for k in allows])
        await self.db.run(write)
        return len(keys), len(allows)

    async def purge(self, now, dry_run=False) -> tuple[int, int]:
        def run(conn):
            allows = conn.execute("SELECT count(*) FROM greylist_allow WHERE expires IS NOT NULL AND expires < ?",
                                  (now,)).fetchone()[0]
            if dry_run:
                return conn.execute(f"SELECT count(*) FROM greylist INDEXED BY greylist_sweep WHERE {_EXPIRED}",
                                    (now, now)).fetchone()[0], allows
            total = 0
            while True:  # a batch of each per transaction: the write lock is never held long
                with write_transaction(conn):
                    advanced, deleted = _sweep_batch(conn, now)
                total += deleted
                if advanced < BATCH and deleted < BATCH:
                    break
            with write_transaction(conn):
                conn.execute("DELETE FROM greylist_allow WHERE expires IS NOT NULL AND expires < ?", (now,))
            return total, allows
        return await self.db.run(run)

    async def stats(self, now, auto_whitelist_after) -> Stats:
        await self.db.flush()  # this process's tallies: in the counters read below

        def read(conn):
            st = Stats()
            for passed, live, n in conn.execute("SELECT passed, expires >= ?, count(*) FROM greylist "
                                                "GROUP BY 1, 2", (now,)):
                if not live:
                    st.expired += n
                elif passed:
                    st.passed += n
                else:
                    st.pending += n
            if auto_whitelist_after > 0:
                st.auto_whitelisted = conn.execute(
                    "SELECT count(*) FROM (SELECT client FROM greylist WHERE passed = 1 AND expires >= ? "
                    "GROUP BY client HAVING count(*) >= ?)", (now, auto_whitelist_after)).fetchone()[0]
            st.allow_entries = conn.execute("SELECT count(*) FROM greylist_allow WHERE expires IS NULL "
                                            "OR expires >= ?", (now,)).fetchone()[0]
            for name, value in conn.execute("SELECT name, value FROM greylist_counters"):
                if name.startswith("delay:"):
                    st.retry_delays[name[6:]] = value
                else:
                    st.counters[name] = value
            return st
        return await self.db.run(read)

    # -- moving to another store (portable.py) -----------------------------------------
    async def export_batches(self):
        allows = await self.allow_entries()
        if allows:
            yield allows
        async for rows in self._pages(self.db.run, self._page, 3):
            yield [_entry(r) for r in rows]

    @staticmethod
    def _page(conn, after):
        if after is None:
            return conn.execute(f"SELECT {_COLUMNS} FROM greylist ORDER BY client, sender, recipient "
                                "LIMIT ?", (BATCH,)).fetchall()
        return conn.execute(f"SELECT {_COLUMNS} FROM greylist WHERE (client, sender, recipient) > (?, ?, ?) "
                            "ORDER BY client, sender, recipient LIMIT ?", (*after, BATCH)).fetchall()

    async def import_batch(self, items, now) -> Counter:
        kinds = [import_kind(item, now) for item in items]
        kept = [item for item, kind in zip(items, kinds) if kind != "skipped"]

        def write(conn):
            with write_transaction(conn):
                conn.executemany(_INSERT, [_entry_row(e) for e in kept if isinstance(e, Entry)])
                conn.executemany(f"INSERT OR REPLACE INTO greylist_allow ({_ALLOW_COLUMNS}, family, plen) "
                                 "VALUES (?,?,?,?,?,?,?,?)", [_allow_row(a) for a in kept if isinstance(a, AllowEntry)])
        if kept:
            await self.db.run(write)
        return Counter(kinds)
