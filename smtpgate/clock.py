"""Time comes from a clock object so rules and tests agree on it; tests move a FakeClock."""
from __future__ import annotations

import time


class Clock:
    """Wall-clock seconds since the epoch (``now``) and a monotonic source for durations."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
