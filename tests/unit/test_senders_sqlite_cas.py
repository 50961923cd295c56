"""The SQLite sender store's compare-and-set: an update tries one ``UPDATE ... WHERE doc = <the
text this process last read or wrote>`` before the locked read-change-write; both must give
the records the locked path alone gives, whoever wrote in between."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from smtpgate import Event, Machine, Transition
from smtpgate.stores import open_sender_store
from smtpgate.stores.senders import SenderRecord
from tests.support.constants import T0

# A machine whose guards need exact counts (as test_senders_store's), and a decay.
COUNTER = Machine("counter", {"a": {"hit": Transition("b", count=3)},
                              "b": {"hit": Transition("c", count=3)},
                              "c": {}}, initial="a", decay={"c": (100, "a")}, forget_after=1000)


def statements(store) -> list[str]:
    """The statements the store's loop connection runs from now on (their first word)."""
    seen: list[str] = []
    store.db._loop_conn.set_trace_callback(lambda sql: seen.append(sql.split()[0].upper()))
    return seen


async def test_an_event_on_the_record_read_at_mail_is_one_update_without_begin(tmp_path):
    store = open_sender_store(f"sqlite://{tmp_path / 'state.db'}")
    try:
        await COUNTER.feed(store, "k", [Event("hit")], T0)
        await COUNTER.current(store, "k", T0 + 1)  # MAIL
        seen = statements(store)
        state, _ = await COUNTER.feed(store, "k", [Event("hit")], T0 + 1)
        assert seen == ["UPDATE"]
        assert state.counts == {"hit": 2}
        seen.clear()
        await COUNTER.current(store, "new", T0 + 2)  # read as absent at MAIL: an insert alone
        await COUNTER.feed(store, "new", [Event("hit")], T0 + 2)
        assert seen == ["SELECT", "INSERT"]
    finally:
        await store.close()


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


# (which gate, what, which key, seconds later): reads at MAIL, events, deletions, in any order
STEP = st.tuples(st.integers(0, 2), st.sampled_from(["get", "hit", "miss", "forget"]),
                 st.sampled_from(["k1", "k2"]), st.sampled_from([0.0, 1.0, 150.0, 2000.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, max_size=25))
def test_compare_and_set_and_locked_paths_give_the_records_of_the_model(steps):
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_compare(Path(folder) / "state.db", steps))


async def _compare(path, steps):
    gates = [open_sender_store(f"sqlite://{path}") for _ in range(3)]  # three connections
    model = Reference()
    now = T0
    try:
        for gate, what, key, later in steps:
            now += later
            store = gates[gate]
            if what == "get":
                rec = await store.get("counter", key)
                expected = model.records.get(key)
                assert (rec.to_json() if rec else None) == (expected.to_json() if expected else None)
            else:
                change = _forget if what == "forget" else _feed(key, what, now)
                assert await store.update("counter", key, change) == model.update(key, change)
        for key in ("k1", "k2"):
            rec = await gates[0].get("counter", key)
            expected = model.records.get(key)
            assert (rec.to_json() if rec else None) == (expected.to_json() if expected else None)
    finally:
        for store in gates:
            await store.close()
