"""Moving state from one store to another (``smtpgate state copy FROM-URL TO-URL``), e.g.
from SQLite to Redis when a second gate joins.

Each kind of state is a ``Part``: a name and how to pick its store out of ``Stores``. A
store takes part by implementing the ``Portable`` pair: ``export_batches`` yields its
content in backend-neutral items (the dataclasses the store's interface already speaks),
a bounded batch at a time; ``import_batch`` writes such items, keeping their times and
expiries, and counts what it wrote. So any backend copies to any other, and a new kind of
state joins by implementing the pair in its backends and adding a ``Part`` to ``PARTS``.

Copying writes over entries the target has under the same key and leaves its others; it
copies no statistics counters, so running it twice is harmless. Entries that have expired
for good (past the time the stores would drop them on their own) are counted, not copied.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol


class Portable(Protocol):
    def export_batches(self) -> AsyncIterator[list[Any]]:
        """The store's content, in batches of items (bounded memory on a big store)."""
        ...

    async def import_batch(self, items: list[Any], now: float) -> Counter[str]:
        """Write ``items`` (from any backend's ``export_batches``); counts by kind of item
        (``skipped``: expired for good, not written). ``now``: the wall clock, for TTLs."""
        ...


@dataclass(frozen=True)
class Part:
    name: str
    store: Callable[[Any], Portable]  # Stores -> the part's store


PARTS: list[Part] = [
    Part("greylist", lambda stores: stores.greylist),
    Part("senders", lambda stores: stores.senders),
    Part("limits", lambda stores: stores.limits),
]


async def copy_state(source, target, now: float, parts: list[Part] | None = None) -> dict[str, Counter[str]]:
    """Copy every part from ``source`` to ``target`` (both ``Stores``); counts per part."""
    done: dict[str, Counter[str]] = {}
    for part in PARTS if parts is None else parts:
        counts: Counter[str] = Counter()
        async for batch in part.store(source).export_batches():
            counts.update(await part.store(target).import_batch(batch, now))
        done[part.name] = counts
    return done
