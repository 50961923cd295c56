"""What SQLite does with a store's statements: which b-trees a statement writes, its query
plan, and the statements a store's loop connection runs (for tests that pin which pages a
decision dirties and which index a query uses)."""
from __future__ import annotations

import sqlite3


def traced(store) -> list[str]:
    """The statements the store's loop connection runs from now on (expanded)."""
    statements: list[str] = []
    store.db._loop_conn.set_trace_callback(statements.append)
    return statements


def plan(path, sql: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    finally:
        conn.close()


def btrees_written(path, sql: str) -> set[str]:
    """The tables and indexes ``sql`` opens for writing (its OpenWrite cursors' root pages)."""
    conn = sqlite3.connect(path)
    try:
        roots = {page: name for name, page in conn.execute("SELECT name, rootpage FROM sqlite_master")}
        return {roots[p2] for _, op, _, p2, *_ in conn.execute("EXPLAIN " + sql) if op == "OpenWrite"}
    finally:
        conn.close()
