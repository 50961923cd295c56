"""The bytes of all messages being received at once, bounded (``limits.max_inflight_data``).

Each worker process owns an equal share of the budget (``max_inflight_data / workers``): no
shared memory, no lock, and the sum across workers still holds the bound. A DATA command
reserves the size the client announced in ``MAIL … SIZE=`` (else one read's worth) before
354 is sent; while the message is read, bytes beyond that reservation are charged as they
arrive. The reservation is released when the transaction ends (relayed or refused).
"""
from __future__ import annotations


class Budget:
    """One worker's share; ``limit`` is read at each reservation so a reload applies at once."""

    def __init__(self) -> None:
        self.used = 0

    def reserve(self, size: int, limit: int) -> "Reservation | None":
        """A reservation of ``size`` bytes, or None when it would go over ``limit`` (0: none)."""
        if limit and self.used and self.used + size > limit:
            return None  # an empty budget always lets one message through
        self.used += size
        return Reservation(self, size, limit)


class Reservation:
    def __init__(self, budget: Budget, size: int, limit: int) -> None:
        self.budget, self.size, self.limit = budget, size, limit

    def grow(self, total: int) -> bool:
        """Charge the message's bytes up to ``total``; False when that would pass the limit."""
        extra = total - self.size
        if extra <= 0:
            return True
        others = self.budget.used - self.size
        if self.limit and others and others + total > self.limit:
            return False
        self.budget.used += extra
        self.size = total
        return True

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0


#: this process's budget, shared by all its client sessions
BUDGET = Budget()
