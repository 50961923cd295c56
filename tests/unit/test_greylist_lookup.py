"""A SQLite greylist decision reads in one statement (SqliteGreylistStore._lookup), with the
client prefix lengths in use that the last lookup read, checked again in the same snapshot.
An allow entry that another process (the CLI) adds or deletes is seen by the next decision;
every answer is what the three separate fresh reads of before give. Real SQLite files: the
other process is a connection of its own (its own SqliteDatabase); no test sleeps.
"""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.stores import Selector, make_allow, triplet_value
from smtpgate.stores.greylist import client_candidates, sender_allow_keys, triplet_allow_key
from smtpgate.stores.sqlite_store import SqliteDatabase, SqliteGreylistStore
from tests.support.constants import T0
from tests.unit.test_greylist_allowed import ALLOWS, ATTEMPTS, NEVER, P, R


KEY = ("198.51.100.0/24", "alice@sender.example", R)
IP = "198.51.100.9"


def open_store(path) -> SqliteGreylistStore:
    return SqliteGreylistStore(f"sqlite://{path}", SqliteDatabase(str(path), NEVER))


@contextlib.asynccontextmanager
async def gate_and_cli(path, allow_key=False):
    """Two stores on one file, as the gate's worker and the CLI have it (``allow_key``: KEY on
    the allow list)."""
    gate, cli = open_store(path), open_store(path)
    try:
        if allow_key:
            await cli.add_allow(make_allow("triplet", triplet_value(*KEY), T0, None))
        yield gate, cli
    finally:
        await gate.close()
        await cli.close()


def fresh_read(path, key, client_ip, now):
    """(allow entry key, stored triplet row) as three separate reads on a connection of
    their own give them (the code before the one-statement lookup); of several live allow
    entries, the most specific (docs/rules/greylist.md): the triplet, the sender, its
    @domain, then the client's networks by their prefix, the longest first."""
    conn = sqlite3.connect(path)
    try:
        lengths = conn.execute("SELECT DISTINCT family, plen FROM greylist_allow WHERE kind = 'client'").fetchall()
        keys = client_candidates(client_ip, lengths) + sender_allow_keys(key[1]) + [triplet_allow_key(*key)]
        allow = conn.execute(f"SELECT key FROM greylist_allow WHERE key IN ({','.join('?' * len(keys))}) "
                             "AND (expires IS NULL OR expires >= ?) ORDER BY kind = 'triplet' DESC, "
                             "kind = 'sender' DESC, value LIKE '@%', plen DESC LIMIT 1", (*keys, now)).fetchone()
        stored = conn.execute("SELECT attempts, passed, expires FROM greylist WHERE client = ? AND sender = ? "
                              "AND recipient = ?", key).fetchone()
        return (allow[0] if allow else None), stored
    finally:
        conn.close()


async def test_a_client_allow_entry_added_or_deleted_by_another_process_is_seen_at_once(tmp_path):
    path = tmp_path / "state.db"
    async with gate_and_cli(path) as (gate, cli):
        await cli.add_allow(make_allow("client", "198.51.0.0/16", T0, None))
        for _ in range(3):  # allowed: the read path, lengths (4/16) known
            a = await gate.attempt(*KEY, now=T0, params=P, client_ip=IP)
            assert (a.outcome, a.allow.key) == ("allowed", "client:4:c6330000/16")
        await cli.add_allow(make_allow("client", "198.51.100.0/28", T0, None))  # a length not in use before
        a = await gate.attempt(*KEY, now=T0, params=P, client_ip=IP)
        assert (a.outcome, a.allow.key) == ("allowed", "client:4:c6336400/28")  # the longer prefix, as a fresh read finds it
        assert fresh_read(path, KEY, IP, T0)[0] == a.allow.key
        other = sqlite3.connect(path, isolation_level=None)  # the /28 alone gone (a selector would take both)
        other.execute("DELETE FROM greylist_allow WHERE key = 'client:4:c6336400/28'")
        other.close()
        a = await gate.attempt(*KEY, now=T0, params=P, client_ip=IP)  # its length no longer in use
        assert (a.outcome, a.allow.key) == ("allowed", "client:4:c6330000/16")
        await cli.delete(Selector(None, "198.51.100.0/28", None, None))  # the /16: it overlaps it
        a = await gate.attempt(*KEY, now=T0, params=P, client_ip=IP)
        assert (a.outcome, a.allow) == ("new", None)
        await cli.add_allow(make_allow("client", "198.51.100.8/30", T0, None))
        a = await gate.attempt(*KEY, now=T0, params=P, client_ip=IP)  # the write path's lookup
        assert (a.outcome, a.allow.key) == ("allowed", "client:4:c6336408/30")


async def test_lengths_changed_between_two_runs_of_an_outside_read_leave_it_to_the_write_path(tmp_path):
    path = tmp_path / "state.db"
    async with gate_and_cli(path, allow_key=True) as (gate, _):
        conn = await gate.db._loop_connection()
        assert gate._lookup(conn, KEY, IP, T0)[0].kind == "triplet"
        other = sqlite3.connect(path, isolation_level=None)
        lengths = iter(range(20, 30))
        # another connection commits a new length each time the gate's statement starts
        conn.set_trace_callback(lambda sql: other.execute(
            "INSERT INTO greylist_allow (key, kind, value, family, plen, created) "
            "VALUES (?, 'client', '', '4', ?, 0)", (f"client:4:x/{n}", n)) if sql.startswith("SELECT") and
            (n := next(lengths)) else None)
        assert gate._lookup(conn, KEY, IP, T0) is None  # never the same lengths twice
        conn.set_trace_callback(None)
        other.close()
        assert gate._lookup(conn, KEY, IP, T0)[0].kind == "triplet"


async def _against_fresh_reads(allows, attempts, changes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.db"
        async with gate_and_cli(path) as (gate, cli):
            await gate.get(*attempts[0][0])  # the file and its tables
            pending = list(allows)
            now = T0
            for i, (key, ip, step) in enumerate(attempts):
                if i in changes and pending:  # the CLI adds one more allow entry between decisions
                    kind, value, ttl = pending.pop()
                    await cli.add_allow(make_allow(kind, value, now, ttl))
                elif i in changes:
                    await cli.delete(Selector(None, "0.0.0.0/0", None, None))
                now += step
                expected = fresh_read(path, key, ip, now)
                a = await gate.attempt(*key, now=now, params=P, client_ip=ip)
                assert (a.allow.key if a.allow else None) == expected[0]
                if a.outcome == "allowed":  # nothing written: the triplet as read
                    assert ((a.entry.attempts, int(a.entry.passed), a.entry.expires) if a.entry else None) \
                        == expected[1]


@settings(max_examples=60, deadline=None)
@given(ALLOWS, ATTEMPTS, st.sets(st.integers(0, 11)))
def test_every_decision_finds_the_allow_entry_fresh_reads_find(allows, attempts, changes):
    asyncio.run(_against_fresh_reads(allows, attempts, changes))
