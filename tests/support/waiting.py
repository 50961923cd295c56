"""Waiting on an observable event, never on the wall clock: the one polling loop of the tests."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

WAIT_TIMEOUT = 5.0     # seconds a test waits for something the gate does at once (a log line, a file)
WAIT_INTERVAL = 0.02   # seconds between two looks


def wait_until(predicate: Callable[[], T], timeout: float = WAIT_TIMEOUT, interval: float = WAIT_INTERVAL,
               what: str | Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns something true; return that.

    On timeout: with ``what`` (a description, or a function giving one, called only then)
    the test fails saying what it waited for; without it the last (false) value is returned,
    for a caller that decides what a timeout means (``if not wait_until(...)``).
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            if what is None:
                return value
            text = what() if callable(what) else what
            pytest.fail(f"waited {timeout}s in vain for {text}", pytrace=False)
        time.sleep(interval)
    return value
