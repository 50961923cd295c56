"""A sender record's JSON built from its parts (``SenderRecord.to_json``) is the text the JSON
encoder gives of the whole record (``as_json_dict``): the same stored bytes, whatever the
record holds: the types records hold and others (json's own rules for those)."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.stores import senders
from smtpgate.stores.senders import Change, SenderRecord
from tests.support.constants import T0

ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def whole(rec: SenderRecord) -> str:
    """The text the encoder gives of the record in one call (what to_json wrote before)."""
    return ENCODE(rec.as_json_dict())


def record(**fields) -> SenderRecord:
    base = dict(machine="senders", key="alice@example.org", state="probation", since=T0 + 0.1234567,
                seen=T0 + 99.98765432, created=T0, expires=T0 + 90 * 86400 + 99.98765432,
                counts={"delivered": 3}, recent={"delivered": [T0 + 1.5, T0 + 2.25]}, hits=[T0 + 3.125],
                history=[Change(T0 + 0.1234567, "delivered", "new", "probation", "delivered", "gate")], version=4)
    base.update(fields)
    return SenderRecord(**base)


class Weird(float):
    """A float subclass: json writes it by float's repr."""


@pytest.mark.parametrize("fields", [
    {},
    {"since": 0.0, "seen": -0.0, "created": 0, "expires": -1.5},  # zeros are one dict key, two texts
    {"since": math.inf, "seen": -math.inf, "created": math.nan},  # json's words, not repr's
    {"since": 1, "seen": 1.0, "created": True, "expires": None},  # 1 and 1.0 are one dict key too
    {"since": Weird(2.5), "version": False},
    {"counts": {}, "recent": {}, "hits": [], "history": []},
    {"counts": {1: 2, None: 3, True: 4, 2.5: 1}},  # json turns such keys into strings
    {"counts": {"delivered": 2.0, "manual": None}, "recent": {"x": (1.5, 2)}},
    {"recent": {"delivered": [0.0, -0.0, math.inf, 1, True]}, "hits": (T0,)},
    {"key": "élodie@exämple.org", "state": "new\"\\\n\u2028", "machine": "m\x00"},  # escapes, no ASCII forced
    {"key": None, "history": [Change(1, "manual", "", "new", "why \"so\" — ü", None)]},
    {"history": (Change(T0, "a", "b", "c"),)},  # not a list: the encoder's own way
])
def test_a_record_is_written_as_the_encoder_writes_it(fields):
    rec = record(**fields)
    assert rec.to_json() == whole(rec)
    assert rec.to_json() == whole(rec)  # again, from the texts it remembered


@pytest.mark.parametrize("fields", [
    {"counts": {"delivered": object()}},
    {"recent": {"delivered": [{1, 2}]}},
    {"history": [Change(T0, "a", "b", "c"), {"at": 1.5}]},  # not a change
])
def test_a_record_json_cannot_write_fails_as_before(fields):
    rec = record(**fields)
    with pytest.raises(Exception) as fast:
        rec.to_json()
    with pytest.raises(Exception) as slow:
        whole(rec)
    assert (type(fast.value), str(fast.value)) == (type(slow.value), str(slow.value))


def test_the_remembered_number_texts_are_bounded(monkeypatch):
    monkeypatch.setattr(senders, "NUMBER_TEXTS_MAX", 8)
    monkeypatch.setattr(senders, "_numbers", {})
    for i in range(50):
        rec = record(seen=T0 + i / 7, expires=T0 + i / 3)
        assert rec.to_json() == whole(rec)
        assert len(senders._numbers) <= 8


def test_the_remembered_number_texts_hold_those_of_every_record_kept_parsed_at_its_next_event(monkeypatch):
    """PARSED_MAX busy keys (9 time texts each), then an event of each (2 new texts: its
    time, the expiry it sets): at each key's event, the texts of its record are remembered."""
    monkeypatch.setattr(senders, "_numbers", {})

    def busy(key: int, events: int) -> SenderRecord:
        times = [T0 + key + n / 64 for n in range(events)]  # (each key's times its own)
        return record(since=times[0], seen=times[-1], created=times[0] - 1 / 8, expires=times[-1] + 90 * 86400,
                      recent={"delivered": times[-6:]}, hits=times[-3:])

    keys = range(senders.PARSED_MAX)
    for key in keys:
        busy(key, 8).to_json()
    for key in keys:
        held = busy(key, 8)
        assert all(x in senders._numbers for x in (held.since, held.seen, held.created, held.expires,
                                                   *held.recent["delivered"], *held.hits))
        rec = busy(key, 9)
        assert rec.to_json() == whole(rec)


TIMES = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.sampled_from([0.0, -0.0, 1, 1.0, T0]))
NAMES = st.text(max_size=12)
KEYS = st.one_of(NAMES, st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False))
CHANGES = st.builds(Change, TIMES, NAMES, NAMES, NAMES, NAMES, st.one_of(st.none(), NAMES))


@settings(max_examples=300, deadline=None)
@given(st.builds(SenderRecord, NAMES, NAMES, NAMES, TIMES, TIMES, TIMES, TIMES,
                 st.dictionaries(KEYS, st.one_of(st.integers(), TIMES), max_size=3),
                 st.dictionaries(KEYS, st.lists(TIMES, max_size=4), max_size=3),
                 st.lists(TIMES, max_size=4), st.lists(CHANGES, max_size=3), st.integers(0, 2**40)))
def test_any_record_is_written_as_the_encoder_writes_it(rec):
    assert rec.to_json() == whole(rec)
    assert rec.to_json() == whole(rec)


def test_a_history_entry_is_made_into_text_once(monkeypatch):
    made = []
    as_dict = Change.as_dict
    monkeypatch.setattr(Change, "as_dict", lambda change: made.append(change) or as_dict(change))
    rec = record(history=[Change(T0, "delivered", "new", "probation"), Change(T0 + 1, "manual", "probation", "new")])
    first = rec.to_json()
    rec.seen += 1  # the next event: the same history
    rec.version += 1
    second = rec.to_json()
    assert len(made) == 2
    assert second == ENCODE({**json.loads(first), "seen": rec.seen, "version": rec.version})
