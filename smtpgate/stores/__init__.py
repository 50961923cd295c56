"""State stores behind small async interfaces: SQLite (one host, several workers) and Redis
(a fleet of gates). Rules receive them through ``self.gate.stores``; they never open a
database themselves. One Stores object per process, kept across reloads while ``state:``
names the same place."""
from __future__ import annotations


class Stores:
    def __init__(self, url: str, clock=None):
        self.url = url
        self.clock = clock
        #: the greylist store (filled in by the greylist work)
        self.greylist = None

    async def close(self) -> None:
        pass


def open_stores(url: str, clock=None) -> Stores:
    """Open (lazily: no I/O until first use) the stores ``state:`` names."""
    return Stores(url, clock)
