"""The SQLite sender store's compare-and-set: an update tries one ``UPDATE ... WHERE doc = <the
text this process last read or wrote>`` before the locked read-change-write; both must give
the records the locked path alone gives, whoever wrote in between. And its ``expires``
column, moved only when a record's expiry leaves its window: never earlier than the expiry,
and purge and the metrics' counts drop and count exactly the expired records."""
from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smtpgate import Event, Machine, Transition
from smtpgate.stores import open_sender_store
from smtpgate.stores.counts import _count_sqlite
from smtpgate.stores.senders import SenderRecord
from smtpgate.stores.senders_sqlite import EXPIRES_SLACK
from tests.support.constants import T0

# A machine whose guards need exact counts (as test_senders_store's), and a decay.
COUNTER = Machine("counter", {"a": {"hit": Transition("b", count=3)},
                              "b": {"hit": Transition("c", count=3)},
                              "c": {}}, initial="a", decay={"c": (100, "a")}, forget_after=1000)


@pytest.fixture
async def store(tmp_path):
    """A sender store on this test's SQLite file, closed after the test."""
    store = open_sender_store(f"sqlite://{tmp_path / 'state.db'}")
    yield store
    await store.close()


async def read_at_mail(store, key: str = "k") -> None:
    """One event on ``key``, then its read at MAIL: the row the next event sets on."""
    await COUNTER.feed(store, key, [Event("hit")], T0)
    await COUNTER.current(store, key, T0 + 1)


def statements(store, whole=False) -> list[str]:
    """The statements the store's loop connection runs from now on (their first word)."""
    seen: list[str] = []
    store.db._loop_conn.set_trace_callback(lambda sql: seen.append(sql if whole else sql.split()[0].upper()))
    return seen


async def test_the_expires_column_moves_only_when_the_expiry_leaves_its_window(tmp_path):
    store = open_sender_store(f"sqlite://{tmp_path / 'state.db'}")
    try:
        await COUNTER.feed(store, "k", [Event("hit")], T0)
        seen = statements(store, whole=True)
        await COUNTER.feed(store, "k", [Event("hit")], T0 + 10)  # expiry 10 s later: in the window
        assert len(seen) == 1 and "expires = " not in seen[0].split(" WHERE machine")[0]
        seen.clear()
        await COUNTER.feed(store, "k", [Event("hit")], T0 + EXPIRES_SLACK + 1)  # out of it: moved
        assert len(seen) == 1 and "expires = " in seen[0].split(" WHERE machine")[0]
    finally:
        await store.close()


async def test_an_event_on_the_record_read_at_mail_is_one_update_without_begin(store):
    await read_at_mail(store)
    seen = statements(store)
    state, _ = await COUNTER.feed(store, "k", [Event("hit")], T0 + 1)
    assert seen == ["UPDATE"]
    assert state.counts == {"hit": 2}
    seen.clear()
    await COUNTER.current(store, "new", T0 + 2)  # read as absent at MAIL: an insert alone
    await COUNTER.feed(store, "new", [Event("hit")], T0 + 2)
    assert seen == ["SELECT", "INSERT"]


async def test_events_of_one_key_in_one_group_each_set_on_the_one_before(store):
    # Sessions of one sender ending in the same loop turn share a group commit: each event's
    # compare-and-set is on the row the one before it wrote, none takes the locked path.
    await read_at_mail(store)
    seen = statements(store)
    await asyncio.gather(*(COUNTER.feed(store, "k", [Event("hit")], T0 + 1) for _ in range(4)))
    assert seen == ["BEGIN", "UPDATE", "UPDATE", "UPDATE", "UPDATE", "COMMIT"]
    assert (await COUNTER.current(store, "k", T0 + 2)).counts == {"hit": 5}


async def test_another_writer_between_mail_and_the_event_makes_the_locked_path_apply_it(tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    gate1, gate2 = open_sender_store(url), open_sender_store(url)  # two connections: two gates
    try:
        for key in ("k", "fresh"):
            if key == "k":
                await COUNTER.feed(gate1, key, [Event("hit")], T0)
            await COUNTER.current(gate1, key, T0 + 1)  # gate1's MAIL
            await COUNTER.feed(gate2, key, [Event("hit")], T0 + 2)  # gate2 writes meanwhile
            seen = statements(gate1)
            state, _ = await COUNTER.feed(gate1, key, [Event("hit")], T0 + 3)
            assert seen[0] in ("UPDATE", "INSERT") and "BEGIN" in seen  # compare-and-set lost, then locked
            expected = 3 if key == "k" else 2
            rec = await gate2.get("counter", key)
            assert state.counts == rec.counts == {"hit": expected}
            assert rec.version == expected  # one write per event, none lost
    finally:
        await gate1.close()
        await gate2.close()


async def test_a_key_deleted_between_mail_and_the_event_starts_again(tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    gate, cli = open_sender_store(url), open_sender_store(url)
    try:
        await COUNTER.feed(gate, "k", [Event("hit")], T0)
        await COUNTER.current(gate, "k", T0 + 1)
        assert await cli.delete("counter", "k")  # `smtpgate senders reset` meanwhile
        state, _ = await COUNTER.feed(gate, "k", [Event("hit")], T0 + 2)
        rec = await cli.get("counter", "k")
        assert state.counts == rec.counts == {"hit": 1} and rec.version == 1
    finally:
        await gate.close()
        await cli.close()


async def test_after_its_own_delete_an_update_goes_straight_to_the_locked_path(tmp_path):
    store = open_sender_store(f"sqlite://{tmp_path / 'state.db'}")
    try:
        await COUNTER.feed(store, "k", [Event("hit")], T0)
        assert await store.delete("counter", "k")
        seen = statements(store)
        state, _ = await COUNTER.feed(store, "k", [Event("hit")], T0 + 1)
        assert seen[0] == "BEGIN"  # not a compare-and-set on the deleted row first, bound to lose
        assert state.counts == {"hit": 1}
    finally:
        await store.close()


async def test_the_sweep_goes_by_the_column_and_purge_by_the_expiry_and_both_keep_the_live(tmp_path):
    store = open_sender_store(f"sqlite://{tmp_path / 'state.db'}")
    try:
        await COUNTER.feed(store, "old", [Event("hit")], T0)  # expires T0 + 1000, column T0 + 4600
        await COUNTER.feed(store, "live", [Event("hit")], T0)
        await COUNTER.feed(store, "live", [Event("hit")], T0 + 500)  # expires T0 + 1500, column kept
        with closing(sqlite3.connect(tmp_path / "state.db")) as raw:
            def keys():
                return sorted(key for (key,) in raw.execute("SELECT key FROM senders"))
            column = T0 + 1000 + EXPIRES_SLACK
            assert dict(raw.execute("SELECT key, expires FROM senders")) == {"old": column, "live": column}
            # An update with the store's clock sweeps (the first one, then every GC_EVERY): by
            # the column, so "old", expired, stays until it is past, and reads as forgotten.
            await store.update("counter", "other", lambda rec: (None, None), now=T0 + 1001)
            assert keys() == ["live", "old"]
            assert not (await COUNTER.current(store, "old", T0 + 1001)).tracked
            assert (await COUNTER.current(store, "live", T0 + 1001)).counts == {"hit": 2}
            # purge checks the expiry itself: "old" goes, "live" (its column as near) stays
            assert await store.purge(T0 + 1001) == 1
            assert keys() == ["live"]
            await store.update("counter", "other", lambda rec: (None, None), now=column + 1)
            assert keys() == []
    finally:
        await store.close()


# --- the same records as a store that applies every change to what is stored ---------------

class Reference:
    """Each update applied to the record as stored, as the locked path does (the model)."""

    def __init__(self):
        self.records: dict[str, SenderRecord] = {}

    def update(self, key, change):
        current = self.records.get(key)
        stored = current.copy() if current is not None else None
        new, result = change(stored)
        if new is None:
            self.records.pop(key, None)
        else:
            new.version = current.version + 1 if current is not None else 1
            self.records[key] = SenderRecord.from_json(new.to_json())
        return result


def _feed(key, name, now):
    def change(stored):
        rec = COUNTER.settle(stored, now) or COUNTER.new_record(key, now)
        made = [c for c in [COUNTER.fire(rec, Event(name), now)] if c is not None]
        return rec, (rec.state, dict(rec.counts), [(c.src, c.dst) for c in made])
    return change


def _forget(stored):
    return None, stored is not None


# (which gate, what, which key, seconds later, the updates of a group): reads at MAIL, events,
# deletions, purges, an exact expires column as an older smtpgate writes it, and 2-3 updates
# of one key asked in one turn of the loop (one group commit: the second's compare-and-set,
# if any, finds the first's write in the same transaction), in any order
STEP = st.tuples(st.integers(0, 2), st.sampled_from(["get", "hit", "miss", "forget", "purge", "exact", "group"]),
                 st.sampled_from(["k1", "k2"]), st.sampled_from([0.0, 1.0, 150.0, 999.0, 2000.0, 3700.0]),
                 st.lists(st.sampled_from(["hit", "miss", "forget"]), min_size=2, max_size=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, max_size=25))
def test_compare_and_set_and_locked_paths_give_the_records_of_the_model(steps):
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_compare(Path(folder) / "state.db", steps))


async def _compare(path, steps):
    gates = [open_sender_store(f"sqlite://{path}") for _ in range(3)]  # three connections
    model = Reference()
    now = T0
    try:
        assert await gates[0].records() == []  # the file and its tables made
        for store in gates:  # each its loop connection open, so a group's updates queue in order
            assert await store.get("counter", "none") is None
        for gate, what, key, later, group in steps:
            now += later
            store = gates[gate]
            if what == "get":
                rec = await store.get("counter", key)
                expected = model.records.get(key)
                assert (rec.to_json() if rec else None) == (expected.to_json() if expected else None)
            elif what == "purge":
                gone = [k for k, rec in model.records.items() if rec.expires < now]
                assert await store.purge(now) == len(gone)
                for k in gone:
                    del model.records[k]
            elif what == "exact":
                with closing(sqlite3.connect(path)) as raw, raw:
                    raw.execute("UPDATE senders SET expires = json_extract(doc, '$.expires') WHERE key = ?", (key,))
            elif what == "group":
                changes = [_forget if name == "forget" else _feed(key, name, now) for name in group]
                answers = await asyncio.gather(*(store.update("counter", key, change) for change in changes))
                assert answers == [model.update(key, change) for change in changes]
            else:
                change = _forget if what == "forget" else _feed(key, what, now)
                assert await store.update("counter", key, change) == model.update(key, change)
            _check_columns(path, model, now)
        for key in ("k1", "k2"):
            rec = await gates[0].get("counter", key)
            expected = model.records.get(key)
            assert (rec.to_json() if rec else None) == (expected.to_json() if expected else None)
    finally:
        for store in gates:
            await store.close()


def _check_columns(path, model, now):
    """Every row's expires column within its window; the metrics count the live records."""
    with closing(sqlite3.connect(path)) as raw:
        for doc, column in raw.execute("SELECT doc, expires FROM senders"):
            expires = SenderRecord.from_json(doc).expires
            assert expires <= column <= expires + EXPIRES_SLACK
        counted = {k: n for k, n in _count_sqlite(raw, now).senders.items() if n}
    live = {}
    for rec in model.records.values():
        if rec.expires >= now:
            live[("counter", rec.state)] = live.get(("counter", rec.state), 0) + 1
    assert counted == live
