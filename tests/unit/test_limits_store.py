"""The limits store: one suite on both backends (SQLite in tmp_path, the real Redis on
127.0.0.1:6379 DB 15 under a key prefix of its own per test). Times are explicit."""
from __future__ import annotations

import asyncio

import pytest

from smtpgate.stores import open_limits_store
from smtpgate.stores.limits import Counter, RateCheck, decide, retry_time

from tests.support.stores import backend, store_maker  # noqa: F401 (backend: a fixture)

HOUR = 3600.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a bucket boundary for every window here


@pytest.fixture
async def make_store(backend, tmp_path):
    """`make_store()` -> another store on this test's state (each call: another gate)."""
    async with store_maker(open_limits_store, backend, tmp_path) as make:
        yield make


@pytest.fixture
async def store(make_store):
    return make_store()


def check(value="192.0.2.1", max=3, window=HOUR, kind="client", count=True):
    return RateCheck(kind, value, window, max, count)


async def test_counts_up_to_the_limit_then_refuses_without_counting(store):
    for n in range(3):
        out = await store.hit([check()], T0 + n)
        assert out.allowed and out.estimates == [n]
    out = await store.hit([check()], T0 + 10)
    assert not out.allowed and out.refused == [0] and out.estimates == [3]
    # the next bucket: the 3 hits weigh 3 * (1 - elapsed/W); one more fits at 1/3 in
    assert out.retry_at == pytest.approx(T0 + HOUR + HOUR / 3)
    [c] = await store.counters()
    assert (c.kind, c.value, c.window, c.current, c.previous) == ("client", "192.0.2.1", HOUR, 3, 0)


async def test_the_window_slides_the_previous_bucket_fades(store):
    for n in range(3):
        await store.hit([check()], T0 + HOUR - 10 + n)  # late in the first bucket
    assert not (await store.hit([check()], T0 + HOUR)).allowed  # 3 * 1.0
    out = await store.hit([check()], T0 + HOUR + HOUR / 2)  # 3 * 0.5 = 1.5: one more fits
    assert out.allowed and out.estimates == [pytest.approx(1.5)]
    out = await store.hit([check()], T0 + HOUR + HOUR / 2 + 1)  # ~1.5 + 1, and one more > 3
    assert not out.allowed and out.retry_at == pytest.approx(T0 + HOUR + 2 * HOUR / 3)  # 3 * 1/3 + 1
    assert (await store.hit([check()], T0 + HOUR + 2 * HOUR / 3)).allowed
    out = await store.hit([check()], T0 + 3 * HOUR)  # both buckets gone
    assert out.allowed and out.estimates == [0]


async def test_several_checks_pass_and_count_together_or_not_at_all(store):
    tight = check("alice@sender.test", max=1, kind="sender")
    loose = check(max=10)
    assert (await store.hit([loose, tight], T0)).allowed
    out = await store.hit([loose, tight], T0 + 1)
    assert not out.allowed and out.refused == [1] and out.estimates == [1, 1]
    counts = {c.kind: c.current for c in await store.counters()}
    assert counts == {"client": 1, "sender": 1}  # the refused attempt counted nowhere
    # a check already counted in this transaction is checked, not counted again
    assert (await store.hit([check(max=10, count=False)], T0 + 2)).allowed
    assert {c.kind: c.current for c in await store.counters()}["client"] == 1


async def test_windows_and_kinds_are_separate_counters(store):
    await store.hit([check(window=60), check(window=HOUR), check(kind="client_net", value="192.0.2.0/24")], T0)
    keys = sorted((c.kind, c.window) for c in await store.counters())
    assert keys == [("client", 60.0), ("client", HOUR), ("client_net", HOUR)]
    assert [c.kind for c in await store.counters("client_net")] == ["client_net"]
    assert len(await store.counters("client", "192.0.2.1")) == 2
    assert len(await store.counters(limit=1)) == 1
    assert await store.reset("client", "192.0.2.1") == 2
    assert [c.kind for c in await store.counters()] == ["client_net"]


async def test_values_with_colons_and_odd_characters_round_trip(store):
    for value in ("2001:db8::/64", "o'brien@sender.test", "a*b?[c]@x.test"):
        await store.hit([check(value, kind="client_net" if ":" in value else "sender")], T0)
    assert sorted(c.value for c in await store.counters()) == ["2001:db8::/64", "a*b?[c]@x.test",
                                                                "o'brien@sender.test"]
    assert await store.reset("sender", "a*b?[c]@x.test") == 1
    assert len(await store.counters()) == 2


async def test_two_gates_share_one_limit_and_never_both_take_the_last_place(make_store):
    gates = [make_store() for _ in range(4)]
    outs = await asyncio.gather(*(gates[i % 4].hit([check(max=10)], T0 + i / 100) for i in range(40)))
    assert sum(o.allowed for o in outs) == 10
    [c] = await gates[0].counters()
    assert c.current == 10


async def test_connections_up_to_the_cap_released_and_expired(make_store):
    a, b = make_store(), make_store()  # two gates
    assert await a.connect("192.0.2.1", "a:1", 2, T0, 600) == (True, 0)
    assert await b.connect("192.0.2.1", "b:1", 2, T0, 600) == (True, 1)
    assert await a.connect("192.0.2.1", "a:2", 2, T0, 600) == (False, 2)
    assert await a.connect("192.0.2.9", "a:3", 2, T0, 600) == (True, 0)  # another client
    assert await a.connections(now=T0) == {"192.0.2.1": 2, "192.0.2.9": 1}
    await b.disconnect("192.0.2.1", "b:1")
    assert await a.connect("192.0.2.1", "a:2", 2, T0 + 1, 600) == (True, 1)
    # a gate that died: its slots expire; a live one refreshed by touch stays
    await a.touch("192.0.2.1", "a:2", T0 + 500, 600)
    assert await b.connect("192.0.2.1", "b:2", 2, T0 + 700, 600) == (True, 1)
    assert await a.connections("192.0.2.1", now=T0 + 700) == {"192.0.2.1": 2}
    assert await a.reset("connections", "192.0.2.1") == 2
    assert await a.connections(now=T0 + 700) == {}  # 192.0.2.9's slot expired at T0 + 600


def test_decide_matches_the_estimate_and_the_retry_hint():
    c = Counter("client", "x", 100.0, 10, 4, 2)  # bucket [1000, 1100)
    out, writes = decide([c], [check("x", max=5, window=100.0)], 1025.0)
    assert out.estimates == [4 * 0.75 + 2] and not out.allowed and writes == []
    # room for one more when 4 * (1 - f) + 2 <= 4: f = 0.5
    assert out.retry_at == retry_time(c, 5) == 1050.0
    out, writes = decide([c], [check("x", max=5, window=100.0)], 1050.0)
    assert out.allowed and writes[0].current == 3


async def test_counters_move_to_another_store_and_expired_ones_stay_behind(store, tmp_path):
    await store.hit([check(), check("alice@sender.test", kind="sender", window=60)], T0)
    await store.hit([check("2001:db8::/64", kind="client_net")], T0 + 10)
    await store.connect("192.0.2.1", "a:1", 2, T0, 600)  # live sessions are not state to move
    other = open_limits_store(f"sqlite://{tmp_path / 'other.db'}")
    try:
        counts = {}
        async for batch in store.export_batches():
            for k, n in (await other.import_batch(batch, T0 + 120)).items():
                counts[k] = counts.get(k, 0) + n
        assert counts == {"counters": 2, "skipped": 1}  # the 1-minute counter is gone at T0 + 120
        moved = sorted((c.kind, c.value, c.window, c.bucket, c.previous, c.current) for c in await other.counters())
        kept = sorted((c.kind, c.value, c.window, c.bucket, c.previous, c.current) for c in await store.counters()
                      if c.window == HOUR)
        assert moved == kept and len(moved) == 2
        assert await other.connections(now=T0) == {}
    finally:
        await other.close()


async def test_a_hit_within_a_bucket_writes_its_counter_row_alone(tmp_path):
    """SQLite: a hit in the counter's current bucket sets ``current`` only, so the expires
    index is not written (at 1M counters, a scattered page per hit less); a hit that moves the
    bucket sets every column, and a new counter is inserted. The counters read back alike."""
    from smtpgate.stores.limits_sqlite import SqliteLimitsStore
    from smtpgate.stores.sqlite_store import SqliteDatabase
    from tests.support.sqlite_plans import btrees_written, traced

    path = tmp_path / "state.db"
    store = SqliteLimitsStore(f"sqlite://{path}", SqliteDatabase(str(path)))
    try:
        await store.hit([check()], T0)  # the counter made
        statements = traced(store)
        await store.hit([check()], T0 + 1)  # the same bucket
        await store.hit([check()], T0 + HOUR + 1)  # the next one: previous = 2
        writes = [s for s in statements if s.startswith(("UPDATE limits_rates", "INSERT OR REPLACE INTO limits_rates"))]
        assert [w.split(" WHERE")[0] for w in writes] == [
            "UPDATE limits_rates SET current = 2",
            f"UPDATE limits_rates SET bucket = {int(T0 // HOUR) + 1}, previous = 2, current = 1, "
            f"expires = {(T0 // HOUR + 3) * HOUR}"]
        assert btrees_written(path, writes[0]) == {"limits_rates"}  # not limits_rates_expires
        assert await store.counters() == [Counter("client", "192.0.2.1", HOUR, int(T0 // HOUR) + 1, 2, 1)]
    finally:
        await store.close()
