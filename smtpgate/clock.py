"""Time comes from a clock object so rules and tests agree on it; tests move a FakeClock.

A process test cannot hand the real gate a FakeClock, so it moves the gate's wall clock
through a file instead: with ``SMTPGATE_CLOCK_FILE=PATH`` in the environment, ``now()`` adds
the seconds written in PATH (no file yet: nothing). The gate and its CLI commands started
with the same variable agree on that time. Durations (``monotonic``) are never shifted.
This is a test hook; a production gate leaves the variable unset.
"""
from __future__ import annotations

import os
import time

CLOCK_FILE_ENV = "SMTPGATE_CLOCK_FILE"


def _offset(path: str) -> float:
    """The seconds in the clock file; 0 while it does not exist (a test writes it when it moves time)."""
    try:
        text = open(path, encoding="ascii").read().strip()
    except FileNotFoundError:
        return 0.0
    try:
        return float(text or 0)
    except ValueError:
        raise ValueError(f"{path}: {CLOCK_FILE_ENV} must hold a number of seconds, got {text!r}") from None


class Clock:
    """Wall-clock seconds since the epoch (``now``) and a monotonic source for durations."""

    def __init__(self) -> None:
        self._offset_file = os.environ.get(CLOCK_FILE_ENV) or None

    def now(self) -> float:
        if self._offset_file is None:
            return time.time()
        return time.time() + _offset(self._offset_file)

    def monotonic(self) -> float:
        return time.monotonic()
