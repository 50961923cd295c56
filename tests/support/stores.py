"""The store suites' shared set-up: one suite runs on both backends (SQLite in tmp_path, the
real Redis on 127.0.0.1:6379 DB 15 under a key prefix of each test's own)."""
from __future__ import annotations

import contextlib

import pytest

from tests.support.redisproc import delete_redis_keys, new_prefix, redis_state, require_redis


@pytest.fixture(params=["sqlite", "redis"])
def backend(request) -> str:
    """Import it into a suite's module to run each of its tests on both backends."""
    if request.param == "redis":
        require_redis()
    return request.param


@contextlib.asynccontextmanager
async def store_maker(open_store, backend: str, tmp_path):
    """``make()`` -> a new ``open_store(url)`` on one state of this test's (each call: another
    gate); ``make.url``, ``make.made``. Leaving closes every store made and, on Redis, deletes
    the test's keys."""
    made = []
    prefix = new_prefix()
    url = f"sqlite://{tmp_path / 'state.db'}" if backend == "sqlite" else redis_state(prefix)

    def make():
        store = open_store(url)
        made.append(store)
        return store

    make.url, make.made = url, made
    yield make
    for store in made:
        await store.close()
    if backend == "redis":
        delete_redis_keys(prefix)
