"""The sender-state store: one suite over both backends (SQLite in tmp_path, the real Redis on
127.0.0.1:6379 DB 15 under a key prefix of its own per test), and the concurrency proof:
many transactions of one sender applied at once through two store instances ("two gates",
or two workers on one SQLite file) lose no event and never break a guard.

Times are explicit: the stores never read a clock. No test sleeps.
"""
from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from smtpgate import Event, Machine, StoreError, Transition
from smtpgate.stores import Stores, open_sender_store, open_stores
from smtpgate.stores import senders as senders_module
from smtpgate.stores.senders import HISTORY_MAX, Change, SenderRecord
from smtpgate.stores.senders_sqlite import SENDERS_SCHEMA
from smtpgate.stores.sqlite_store import GREYLIST_SCHEMA
from tests.support.constants import ROOT, T0
from tests.support.redisproc import UNREACHABLE_REDIS_URL, require_redis
from tests.support.stores import backend, store_maker  # noqa: F401 (backend: a fixture)


# A machine whose guards need exact counts: 10 hits to leave a, 10 more to leave b.
COUNTER = Machine("counter", {"a": {"hit": Transition("b", count=10)},
                              "b": {"hit": Transition("c", count=10)},
                              "c": {}}, initial="a")


@pytest.fixture
async def make_store(backend, tmp_path):
    """`make_store()` -> a new store instance on this test's state (each call: another gate)."""
    async with store_maker(open_sender_store, backend, tmp_path) as make:
        yield make


def _with_pool_timeout(make_store, seconds: int):
    url = f"{make_store.url}{'&' if '?' in make_store.url else '?'}pool_timeout={seconds}"

    def make():
        store = open_sender_store(url)
        make_store.made.append(store)
        return store

    return make


@pytest.fixture
async def store(make_store):
    return make_store()


def record(key="alice@example.org", state="new", seen=T0, **kw) -> SenderRecord:
    return SenderRecord("senders", key, state, seen, seen, seen, seen + 90 * 86400, **kw)


async def put(store, rec):
    return await store.update(rec.machine, rec.key, lambda cur: (rec, cur))


# --- the basics --------------------------------------------------------------------------

async def test_update_get_delete(store):
    assert await store.get("senders", "alice@example.org") is None
    rec = record(counts={"delivered": 2}, recent={"delivered": [T0]},
                 history=[Change(T0, "delivered", "new", "probation", "250 ok", "downstream")])
    assert await put(store, rec) is None  # what change returned second: the record before (none)
    got = await store.get("senders", "alice@example.org")
    assert got == rec and got.version == 1
    assert (await put(store, record(state="trusted"))).version == 1
    assert (await store.get("senders", "alice@example.org")).version == 2
    assert await store.delete("senders", "alice@example.org") is True
    assert await store.delete("senders", "alice@example.org") is False
    assert await store.get("senders", "alice@example.org") is None


async def test_change_returning_none_deletes_and_leaves_nothing_when_absent(store):
    await put(store, record())
    assert await store.update("senders", "alice@example.org", lambda cur: (None, "gone")) == "gone"
    assert await store.get("senders", "alice@example.org") is None
    assert await store.update("senders", "nobody@example.org", lambda cur: (None, cur)) is None


async def test_machines_and_keys_are_separate_namespaces(store):
    await put(store, record(key="a@x.example"))
    other = SenderRecord("domains", "a@x.example", "known", T0, T0, T0, T0 + 100)
    await put(store, other)
    assert (await store.get("senders", "a@x.example")).state == "new"
    assert (await store.get("domains", "a@x.example")).state == "known"
    assert await store.get("senders", "a@x.example ") is None


async def test_records_filter_by_machine_and_state_most_recent_first(store):
    for i, state in enumerate(["new", "trusted", "new", "blocked"]):
        await put(store, record(key=f"s{i}@x.example", state=state, seen=T0 + i))
    await put(store, SenderRecord("domains", "x.example", "new", T0, T0 + 99, T0, T0 + 100))
    assert [r.key for r in await store.records("senders")] == ["s3@x.example", "s2@x.example", "s1@x.example",
                                                                 "s0@x.example"]
    assert [r.key for r in await store.records("senders", "new")] == ["s2@x.example", "s0@x.example"]
    assert [r.key for r in await store.records("senders", limit=2)] == ["s3@x.example", "s2@x.example"]
    assert len(await store.records()) == 5


async def test_the_columns_lists_and_purge_use_follow_every_update_of_a_stored_record(store):
    # SQLite sets the state column only when an update changes the state: lists by state,
    # the most-recent-first order and purge must still see each update's state, seen, expires.
    await put(store, record(key="a@x.example", seen=T0))
    await put(store, record(key="b@x.example", seen=T0 + 1))
    await put(store, record(key="a@x.example", seen=T0 + 2))  # same state, seen and expires later
    assert [r.key for r in await store.records("senders", "new")] == ["a@x.example", "b@x.example"]
    await put(store, record(key="a@x.example", state="trusted", seen=T0 + 3))
    assert [r.key for r in await store.records("senders", "new")] == ["b@x.example"]
    assert [r.key for r in await store.records("senders", "trusted")] == ["a@x.example"]
    await put(store, record(key="a@x.example", state="trusted", seen=T0 + 10 ** 8))  # same state, far later
    assert await store.purge(T0 + 1 + 90 * 86400 + 1) == 1  # b expired; a's expires moved on with it
    assert [(r.key, r.state, r.version) for r in await store.records()] == [("a@x.example", "trusted", 4)]


async def test_a_change_that_edits_the_record_it_is_given_in_place_moves_its_state_in_lists(store):
    # as Machine.feed does: the record read is changed in place and returned
    def to_trusted(rec):
        rec.state, rec.seen, rec.expires = "trusted", rec.seen + 1, rec.expires + 1
        return rec, None
    await put(store, record(key="a@x.example"))
    await store.update("senders", "a@x.example", to_trusted)
    assert [r.key for r in await store.records("senders", "new")] == []
    assert [(r.key, r.state, r.version) for r in await store.records("senders", "trusted")] == [
        ("a@x.example", "trusted", 2)]
    await store.update("senders", "a@x.example", lambda rec: (rec, None))  # written back unchanged
    assert [(r.key, r.version) for r in await store.records("senders", "trusted")] == [("a@x.example", 3)]


async def test_purge_drops_expired_records(store):
    await put(store, record(key="old@x.example"))
    await put(store, SenderRecord("senders", "new@x.example", "new", T0, T0 + 50, T0, T0 + 10 ** 9))
    assert await store.purge(T0 + 91 * 86400) == 1
    assert [r.key for r in await store.records()] == ["new@x.example"]


async def test_keys_with_odd_characters_round_trip(store):
    for key in ['"a b"@x.example', "*@x.example", "ü@exämple.org", "2001:db8::/64", "a:b:c"]:
        await put(store, record(key=key))
        assert (await store.get("senders", key)).key == key
    assert len(await store.records("senders")) == 5


async def test_history_is_bounded(store):
    m = Machine("senders", {"a": {"x": "b"}, "b": {"x": "a"}}, initial="a")
    for i in range(HISTORY_MAX + 30):
        await m.feed(store, "k", [Event("x")], T0 + i)
    rec = await store.get("senders", "k")
    assert rec.counts == {"x": HISTORY_MAX + 30} and len(rec.history) == HISTORY_MAX
    assert rec.history[-1].at == T0 + HISTORY_MAX + 29


async def test_a_store_failure_is_a_store_error(backend, tmp_path):
    url = f"sqlite://{tmp_path / 'a-file'}/x.db" if backend == "sqlite" else UNREACHABLE_REDIS_URL
    if backend == "sqlite":
        (tmp_path / "a-file").write_text("not a folder")
    store = open_sender_store(url)
    try:
        with pytest.raises(StoreError):
            await store.get("senders", "k")
    finally:
        await store.close()


# --- the machine through the store --------------------------------------------------------

async def test_feed_current_move_and_hit(store):
    state, made = await COUNTER.feed(store, "k", [Event("hit")] * 9, T0)
    assert (state.state, made, state.counts) == ("a", [], {"hit": 9})
    state, made = await COUNTER.feed(store, "k", [Event("hit", "r", "why")], T0 + 1)
    assert state.state == "b" and [(c.src, c.dst, c.rule) for c in made] == [("a", "b", "r")]
    assert (await COUNTER.current(store, "k", T0 + 2)).state == "b"
    change = await COUNTER.move(store, "k", "a", T0 + 3, "by hand")
    assert (change.event, change.src, change.dst, change.rule) == ("manual", "b", "a", "cli")
    assert [await COUNTER.hit(store, "k", T0 + 4 + i, 2, 60) for i in range(3)] == [(False, 1), (False, 2), (True, 2)]
    assert await COUNTER.hit(store, "k", T0 + 70, 2, 60) == (False, 1)


# --- concurrency --------------------------------------------------------------------------

async def test_one_gates_concurrent_updates_of_one_key_are_applied_in_order_without_a_race(store):
    # every session of a busy sender ends at once: one process, one key, 40 updates
    results = await asyncio.gather(*(COUNTER.feed(store, "busy@x.example", [Event("hit", f"s{i}")], T0 + i)
                                     for i in range(40)))
    rec = await store.get("counter", "busy@x.example")
    assert (rec.counts, rec.version, rec.state) == ({"hit": 40}, 40, "c")
    assert [state.counts["hit"] for state, _ in results] == list(range(1, 41))  # each saw the ones before
    assert getattr(store, "retries", 0) == 0  # Redis: applied together, no compare-and-set lost

@pytest.mark.parametrize("n", [25, 200])
async def test_concurrent_updates_from_two_gates_lose_no_event_and_keep_every_guard(make_store, n):
    if make_store.url.startswith("redis"):
        # Correctness under contention, not latency: on a loaded machine 200 racing
        # transactions through 32 connections can wait past the default 5 s pool timeout.
        make_store = _with_pool_timeout(make_store, 60)
    gate1, gate2 = make_store(), make_store()
    jobs = [COUNTER.feed(gate1 if i % 2 else gate2, "spammer@x.example", [Event("hit", f"g{i % 2}")], T0 + i)
            for i in range(n)]
    results = await asyncio.gather(*jobs)
    rec = await gate1.get("counter", "spammer@x.example")
    assert rec.counts == {"hit": n}  # not one event lost
    assert rec.version == n  # one write per transaction
    # the guards held exactly: a -> b at the 10th hit, b -> c at the 20th, never twice
    assert [(c.src, c.dst) for c in rec.history] == [("a", "b"), ("b", "c")]
    assert rec.state == "c"
    moves = [m for _, made in results for m in made]
    assert sorted((c.src, c.dst) for c in moves) == [("a", "b"), ("b", "c")]
    if hasattr(gate1, "retries"):  # Redis: the race really happened and was retried
        assert gate1.retries + gate2.retries > 0


SQLITE_WORKER = textwrap.dedent("""
    import asyncio, sys
    from smtpgate import Event
    from smtpgate.stores import open_sender_store
    from tests.support.constants import ROOT, T0
    from tests.unit.test_senders_store import COUNTER  # run from the repository root

    async def main(url, n):
        store = open_sender_store(url)
        try:
            await asyncio.gather(*(COUNTER.feed(store, "k", [Event("hit")], T0 + i) for i in range(n)))
        finally:
            await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def test_two_worker_processes_on_one_sqlite_file_lose_no_event(tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", SQLITE_WORKER, url, "60"], cwd=ROOT)
             for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    conn = sqlite3.connect(tmp_path / "state.db")
    (doc,) = conn.execute("SELECT doc FROM senders WHERE machine = 'counter' AND key = 'k'").fetchone()
    rec = SenderRecord.from_json(doc)
    assert rec.counts == {"hit": 120} and rec.version == 120
    assert [(c.src, c.dst) for c in rec.history] == [("a", "b"), ("b", "c")]


# --- SQLite: one file, schemas versioned per store ----------------------------------------

async def test_sqlite_senders_and_greylist_share_one_file_with_their_own_versions(tmp_path):
    stores = open_stores(f"sqlite://{tmp_path / 'state.db'}")
    assert stores.senders.db is stores.greylist.db  # one connection, one thread per process
    assert stores.limits.db is stores.greylist.db
    await put(stores.senders, record())
    await stores.greylist.get("c", "s", "r")
    await stores.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    from smtpgate.stores.limits_sqlite import LIMITS_SCHEMA
    assert dict(conn.execute("SELECT component, version FROM meta")) == {
        "greylist": len(GREYLIST_SCHEMA), "senders": len(SENDERS_SCHEMA), "limits": len(LIMITS_SCHEMA)}


async def test_sqlite_a_database_opened_before_the_sender_store_is_migrated_on_use(tmp_path):
    from smtpgate.stores.sqlite_store import SqliteGreylistStore
    greylist = SqliteGreylistStore(f"sqlite://{tmp_path / 'state.db'}")
    await greylist.get("c", "s", "r")  # connected: only the greylist tables
    senders = open_sender_store(f"sqlite://{tmp_path / 'state.db'}", greylist.db)
    await put(senders, record())
    assert (await senders.get("senders", "alice@example.org")).state == "new"
    stores = Stores(f"sqlite://{tmp_path / 'state.db'}", greylist=greylist, senders=senders)
    await stores.close()


async def test_sqlite_in_memory_state_holds_both_stores():
    stores = open_stores("sqlite://:memory:")
    await put(stores.senders, record())
    assert (await stores.senders.get("senders", "alice@example.org")).state == "new"
    await stores.close()


def _fresh_parse(text: str) -> SenderRecord:
    """The record a text stands for, parsed without the cache of SenderRecord.from_json."""
    import json
    d = json.loads(text)
    d["history"] = [Change.from_dict(c) for c in d["history"]]
    return SenderRecord(**d)


def test_a_record_read_back_is_its_text_parsed_and_owned_by_its_reader():
    rec = SenderRecord("m", "alice@example.com", "probation", T0, T0 + 1, T0, T0 + 90, {"delivered": 2},
                       {"delivered": [T0, T0 + 1]}, [T0 + 1], [Change(T0, "delivered", "new", "probation", "x", "r")], 7)
    text = rec.to_json()
    first = SenderRecord.from_json(text)
    assert first == rec == _fresh_parse(text)
    # what one reader changes in place (Machine.settle and fire do) is not what the next one reads
    first.counts["delivered"] += 1
    first.recent["delivered"].append(T0 + 2)
    first.hits.append(T0 + 2)
    first.history.append(Change(T0 + 2, "manual", "probation", "trusted"))
    first.state = "trusted"
    rec.counts["delivered"] = 99  # nor what the writer does with its record afterwards
    assert SenderRecord.from_json(text) == _fresh_parse(text)
    assert SenderRecord.from_json(first.to_json()) == first
    with pytest.raises(AttributeError):  # changes are shared by copies of a record: immutable
        first.history[0].to = "blocked"


def test_a_record_taken_for_a_change_is_not_read_again_by_its_text():
    rec = record(counts={"delivered": 2}, recent={"delivered": [T0]})
    text = rec.to_json()
    taken = SenderRecord.from_json(text, take=True)
    assert taken == _fresh_parse(text)
    taken.counts["delivered"] += 1  # the update changes it in place
    taken.state = "probation"
    assert SenderRecord.from_json(text) == _fresh_parse(text)  # parsed again, as stored
    assert SenderRecord.from_json(text, take=True) == _fresh_parse(text)


# SQLite reads and writes on two threads (the loop's, the database's): a reader on one may be
# copying the record kept for a text while an update on the other takes it and changes it.
# Each test plays the other thread's part inside the reader's copy, at the worst moment.
def test_a_record_taken_and_changed_while_a_reader_copies_it_is_parsed_afresh(monkeypatch):
    text = record(counts={"delivered": 2}, recent={"delivered": [T0]}).to_json()
    kept = senders_module._parsed[text]
    copy = SenderRecord.copy

    def copy_as_the_other_thread_takes_it(rec):
        if rec is kept and SenderRecord.from_json(text, take=True) is kept:  # the other thread's update
            kept.state = "blocked"
            kept.counts["delivered"] += 5
        return copy(rec)

    monkeypatch.setattr(SenderRecord, "copy", copy_as_the_other_thread_takes_it)
    assert SenderRecord.from_json(text) == _fresh_parse(text)


def test_a_record_whose_events_change_while_a_reader_copies_it_is_parsed_afresh():
    text = record(counts={"delivered": 2}, recent={"delivered": [T0], "bounced": [T0]}).to_json()
    kept = senders_module._parsed[text]

    class Changing(dict):  # the other thread adds an event as the copy walks them
        def items(self):
            for n, item in enumerate(super().items()):
                if n == 0 and SenderRecord.from_json(text, take=True) is kept:
                    self["manual"] = [T0 + 1]
                yield item

    kept.recent = Changing(kept.recent)
    assert SenderRecord.from_json(text) == _fresh_parse(text)


def test_the_oldest_record_kept_dropped_by_the_other_thread_too_is_no_error(monkeypatch):
    class Dropping(dict):  # the other thread drops the same oldest record as this one looks at it
        def __iter__(self):
            oldest = next(super().__iter__())
            del self[oldest]
            yield oldest

    monkeypatch.setattr(senders_module, "PARSED_MAX", 2)
    monkeypatch.setattr(senders_module, "_parsed", Dropping())
    texts = [record(key=f"k{i}@example.org").to_json() for i in range(5)]
    assert list(senders_module._parsed.keys()) == texts[-2:]


def test_a_record_taken_and_changed_while_a_reader_looks_at_it_is_parsed_afresh():
    text = record(counts={"delivered": 2}, recent={"delivered": [T0]}).to_json()
    kept = senders_module._parsed[text]
    looked = []

    def look_as_the_other_thread_takes_it(rec):
        looked.append(rec)
        if rec is kept and SenderRecord.from_json(text, take=True) is kept:  # the other thread's update
            kept.state = "blocked"
            kept.counts["delivered"] += 5
        return rec.state, dict(rec.counts)

    assert SenderRecord.look(text, look_as_the_other_thread_takes_it) == ("new", {"delivered": 2})
    assert looked[0] is kept and looked[1] is not kept  # the kept one looked at first, then a parse
    assert senders_module._parsed[text] is looked[1]  # the parsed one kept itself (no copy)
    assert SenderRecord.look(text, lambda rec: rec) is looked[1]  # not copied: looked at


def test_a_reader_that_fails_on_a_record_changed_meanwhile_reads_it_afresh():
    text = record(state="probation").to_json()
    kept = senders_module._parsed[text]
    states = {"probation": "p"}

    def look(rec):
        if rec is kept and SenderRecord.from_json(text, take=True) is kept:
            kept.state = "gone"
        return states[rec.state]

    assert SenderRecord.look(text, look) == "p"
    with pytest.raises(KeyError):  # its own error, on a record no one took
        SenderRecord.look(record(state="other").to_json(), look)


async def test_the_mail_read_leaves_the_stored_record_as_it_was(store):
    """Machine.current settles a record due to decay on a copy: the record it looks at is
    the store's (kept parsed), which the key's next update takes."""
    machine = Machine("senders", {"new": {"delivered": "probation"}, "probation": {}}, initial="new",
                      decay={"probation": ("1h", "new")})
    await machine.feed(store, "alice@example.org", [Event("delivered")], T0)
    stored = await store.get("senders", "alice@example.org")
    view = await machine.current(store, "alice@example.org", T0 + 7200)
    assert (view.state, view.since) == ("new", T0 + 3600)
    assert await store.get("senders", "alice@example.org") == stored
    assert (await machine.current(store, "alice@example.org", T0 + 10)).state == "probation"


async def test_an_event_copies_the_record_once(store, monkeypatch):
    """Read at MAIL (its view made from the record kept parsed, no copy: Machine.current
    only looks), changed and written at the end: the read one is handed to the change, not
    copied, and the record the change returns is the store's (kept parsed for the text
    written as it is, not copied). What the reads and events answered does not move with
    the later events that change that record."""
    machine = Machine("senders", {"new": {"delivered": "probation"}, "probation": {}}, initial="new")
    await machine.feed(store, "alice@example.org", [Event("delivered")], T0)
    copies = []
    copy = SenderRecord.copy
    monkeypatch.setattr(SenderRecord, "copy", lambda rec: copies.append(rec) or copy(rec))
    views, read = [], []
    for i in range(1, 4):
        read.append(await machine.current(store, "alice@example.org", T0 + i))
        view, _ = await machine.feed(store, "alice@example.org", [Event("delivered")], T0 + i)
        views.append(view)
    assert copies == []
    assert [(v.counts, v.seen) for v in views] == [({"delivered": i + 1}, T0 + i) for i in range(1, 4)]
    assert [(v.state, v.counts, v.seen) for v in read] == [("probation", {"delivered": i}, T0 + i - 1)
                                                           for i in range(1, 4)]


class _Pauses:
    """Stands in for ``random`` in senders_redis: notes each back-off drawn, pauses none."""

    def __init__(self):
        self.drawn = []

    def uniform(self, low, high):
        self.drawn.append(high)
        return 0.0


@pytest.mark.parametrize("losses, pauses", [(3, 0), (5, 2)])
async def test_redis_retries_its_first_lost_compare_and_sets_at_once(tmp_path, monkeypatch, losses, pauses):
    # Two workers writing one busy key lose to each other often: the first FREE_RETRIES
    # losses retry at once (backing off from the second one left a gate waiting), later
    # ones back off. Another gate writes before each of the first `losses` tries.
    from smtpgate.stores import senders_redis
    require_redis()
    async with store_maker(open_sender_store, "redis", tmp_path) as make:
        gate, other = make(), make()
        await COUNTER.feed(gate, "k", [Event("hit")], T0)
        script, left, inside = gate.link.script, [losses], [False]

        async def contended(name, keys, args):
            if name == "cas" and left[0] and not inside[0]:
                left[0] -= 1
                inside[0] = True
                try:
                    await COUNTER.feed(other, "k", [Event("hit")], T0)
                finally:
                    inside[0] = False
            return await script(name, keys, args)
        monkeypatch.setattr(gate.link, "script", contended)
        pauses_drawn = _Pauses()
        monkeypatch.setattr(senders_redis, "random", pauses_drawn)
        await COUNTER.feed(gate, "k", [Event("hit")], T0)
        assert gate.retries == losses and len(pauses_drawn.drawn) == pauses
        assert (await gate.get("counter", "k")).counts == {"hit": 2 + losses}


def test_seen_keeps_the_keys_remembered_last(monkeypatch):
    monkeypatch.setattr(senders_module, "SEEN_MAX", 3)
    seen = senders_module.Seen()
    for key in "abc":
        seen.remember("m", key, key.upper())
    seen.remember("m", "a", "A2")  # remembered again: the newest now
    seen.remember("m", "d", "D")  # b, the oldest, goes
    assert [seen.get("m", k) for k in "abcd"] == ["A2", None, "C", "D"]
    assert seen.forget("m", "c") == "C" and seen.get("m", "c") is None
