"""The greylist store: what it keeps, the one decisive operation, and the backend interface.

A triplet is ``(client, sender, recipient)`` as the greylist rule keys it: ``client`` is a
network (``192.0.2.0/24``, ``2001:db8:1::/64``) or, for pooled senders, ``domain:<domain>``;
``sender`` is the normalised sender (``""`` for the null sender); ``recipient`` is lower case.

The decisive operation is ``attempt``: *record an attempt for this triplet at ``now`` and
say what it means*. It runs atomically in both backends (one SQLite write transaction, one
Redis Lua script), so gates racing on one triplet never double-count or lose an attempt.
The decision itself is :func:`decide`, a pure function; the Redis script is its mirror, and
the shared test suite runs both backends through the same cases.

Outcomes:

============== ================================================================ ==========
outcome        when                                                             the gate
============== ================================================================ ==========
allowed        an allow-list entry (client, sender or triplet) matches          passes
passed_before  the triplet passed earlier and its ``pass_ttl`` has not run out  passes
auto           the client has ``auto_whitelist_after`` live passed triplets     passes
new            first attempt (or the previous pass has expired)                 451
too_early      retried before ``delay`` has gone by                             451
passed_now     retried after ``delay`` and within ``retry_window``              passes
restarted      retried after ``retry_window``: the wait starts again            451
============== ================================================================ ==========

Times are seconds since the epoch and always come from the caller (``now``): the store
never reads a clock, so tests move a FakeClock.
"""
from __future__ import annotations

import functools
import ipaddress
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import AsyncIterator, Iterable

ALLOWED, PASSED_BEFORE, AUTO = "allowed", "passed_before", "auto"
NEW, TOO_EARLY, PASSED_NOW, RESTARTED = "new", "too_early", "passed_now", "restarted"
OUTCOMES = (ALLOWED, PASSED_BEFORE, AUTO, NEW, TOO_EARLY, PASSED_NOW, RESTARTED)
#: outcomes the gate answers with 451
DEFERRED = frozenset({NEW, TOO_EARLY, RESTARTED})

#: expired entries are kept this long before the stores drop them on their own (``purge``
#: drops them at once); within it a late retry is told "restarted" rather than "new"
GRACE = 86400.0

#: retry-delay distribution: (upper bound in seconds, label); the last bucket is open
DELAY_BUCKETS: tuple[tuple[float, str], ...] = (
    (60, "<1m"), (300, "1m-5m"), (600, "5m-10m"), (900, "10m-15m"), (1800, "15m-30m"),
    (3600, "30m-1h"), (7200, "1h-2h"), (14400, "2h-4h"), (43200, "4h-12h"),
    (86400, "12h-1d"), (172800, "1d-2d"), (math.inf, ">=2d"),
)


def delay_bucket(seconds: float) -> str:
    for bound, label in DELAY_BUCKETS:
        if seconds < bound:
            return label
    return DELAY_BUCKETS[-1][1]


@dataclass(frozen=True)
class Params:
    """The timing of one policy's greylist rule (seconds)."""

    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    pass_ttl: float = 35 * 86400.0
    auto_whitelist_after: int = 0  # 0: off


@dataclass
class Entry:
    """One stored triplet."""

    client: str
    sender: str
    recipient: str
    first_seen: float
    last_seen: float
    attempts: int = 1
    passed: bool = False
    passed_at: float | None = None
    retry_delay: float | None = None  # seconds from first attempt to pass (None: auto/allowed)
    expires: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.client, self.sender, self.recipient)

    def state(self, now: float) -> str:
        if now > self.expires:
            return "expired"
        return "passed" if self.passed else "pending"

    def as_dict(self, now: float | None = None) -> dict:
        out = asdict(self)
        if now is not None:
            out["state"] = self.state(now)
        return out


@dataclass(frozen=True)
class AllowEntry:
    """Let a client network, a sender (address or ``@domain``) or a triplet through at once."""

    kind: str  # client | sender | triplet
    value: str  # display form: "192.0.2.0/24", "alice@example.org", "@example.org", "C S R"
    key: str  # the lookup key (see allow_key)
    created: float
    expires: float | None = None  # None: until deleted
    note: str = ""

    def live(self, now: float) -> bool:
        return self.expires is None or now <= self.expires

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "key"}


@dataclass
class Attempt:
    """What ``attempt`` decided: the outcome, the entry as it now stands (None for
    ``allowed`` when nothing is stored), the allow entry that matched, and the client's live
    passed-triplet count when it was needed (else None)."""

    outcome: str
    entry: Entry | None
    allow: AllowEntry | None = None
    passed_count: int | None = None

    @property
    def deferred(self) -> bool:
        return self.outcome in DEFERRED

    def retry_at(self, params: Params) -> float | None:
        """The earliest time a retry passes (deferred outcomes only)."""
        if not self.deferred or self.entry is None:
            return None
        return self.entry.first_seen + params.delay


@dataclass(frozen=True)
class Selector:
    """Which entries ``list`` and ``delete`` address. Every given part must match.

    ``client``: a network (entries whose network overlaps it) or ``domain:<d>`` (pooled
    entries); ``sender``: a normalised address, or ``@domain`` for every sender there;
    ``recipient``: an address; ``state``: ``pending`` / ``passed`` (live ones only)."""

    state: str | None = None
    client: str | None = None
    sender: str | None = None
    recipient: str | None = None

    def matches(self, e: Entry, now: float) -> bool:
        if self.state is not None and e.state(now) != self.state:
            return False
        if self.sender is not None and not _sender_matches(self.sender, e.sender):
            return False
        if self.recipient is not None and e.recipient != self.recipient.lower():
            return False
        if self.client is not None and not client_matches(self.client, e.client):
            return False
        return True

    def matches_allow(self, a: AllowEntry) -> bool:
        """The allow entries ``delete`` forgets with the triplets: a client selector takes
        client entries overlapping it, a sender selector the entry for that very sender or
        @domain, a full triplet selector the entry for that triplet."""
        if self.state is not None:
            return False
        parts = (self.client is not None, self.sender is not None, self.recipient is not None)
        if a.kind == "client" and parts == (True, False, False):
            return client_matches(self.client, a.value)
        if a.kind == "sender" and parts == (False, True, False):
            return a.value == (self.sender.lower() or "<>")
        if a.kind == "triplet" and parts == (True, True, True):
            return a.value == triplet_value(self.client, self.sender, self.recipient.lower())
        return False


def _sender_matches(selector: str, sender: str) -> bool:
    selector = selector.lower()
    if selector in ("<>", ""):
        return sender == ""
    if selector.startswith("@"):
        return sender.endswith(selector)
    return sender == selector


def client_matches(selector: str, client: str) -> bool:
    """Does stored client key ``client`` fall under ``selector`` (a network or ``domain:d``)?"""
    if selector.startswith("domain:") or client.startswith("domain:"):
        return selector.lower() == client
    try:
        want = ipaddress.ip_network(selector, strict=False)
        have = ipaddress.ip_network(client, strict=False)
    except ValueError:
        return selector == client
    return want.version == have.version and want.overlaps(have)


# --- the decision ----------------------------------------------------------------------

def decide(key: tuple[str, str, str], entry: Entry | None, now: float, p: Params, *,
           allowed: AllowEntry | None = None, passed_count=None) -> tuple[str, Entry | None]:
    """The pure decision: (outcome, the entry to store — None means "leave it as it is").

    ``passed_count`` is a callable giving the client's live passed-triplet count; it is
    called only when the answer depends on it (the auto-whitelist). The Redis Lua script
    in ``redis_store.py`` mirrors this function line by line."""
    if allowed is not None:
        return ALLOWED, None
    if entry is not None and entry.passed and now <= entry.expires:
        return PASSED_BEFORE, replace(entry, last_seen=now, attempts=entry.attempts + 1,
                                      expires=now + p.pass_ttl)
    if p.auto_whitelist_after > 0 and passed_count is not None and passed_count() >= p.auto_whitelist_after:
        base = entry if entry is not None and not entry.passed and now <= entry.first_seen + p.retry_window else None
        return AUTO, Entry(*key,
                           first_seen=base.first_seen if base else now, last_seen=now,
                           attempts=(base.attempts + 1) if base else 1, passed=True, passed_at=now,
                           retry_delay=None, expires=now + p.pass_ttl)
    if entry is None or entry.passed:  # nothing stored, or a pass that has run out
        return NEW, Entry(*key, now, now, 1, False, None, None, now + p.retry_window)
    if now > entry.first_seen + p.retry_window:
        return RESTARTED, replace(entry, first_seen=now, last_seen=now, attempts=1,
                                  expires=now + p.retry_window)
    if now < entry.first_seen + p.delay:
        return TOO_EARLY, replace(entry, last_seen=now, attempts=entry.attempts + 1,
                                  expires=entry.first_seen + p.retry_window)
    return PASSED_NOW, replace(entry, last_seen=now, attempts=entry.attempts + 1, passed=True,
                               passed_at=now, retry_delay=now - entry.first_seen,
                               expires=now + p.pass_ttl)


# --- allow-list keys --------------------------------------------------------------------
# When several live allow entries cover one decision, both backends name the most specific:
# the triplet, the sender address, its @domain, then the client's networks from the longest
# prefix (its own address) to the shortest. The keys below come in that order
# (docs/rules/greylist.md, "The allow list").

def masked_hex(hexdigits: str, plen: int) -> str:
    """The first ``plen`` bits of a fixed-width hex address, the rest zero (mirrored in Lua)."""
    full, rem = divmod(plen, 4)
    out = hexdigits[:full]
    if full < len(hexdigits):
        if rem:
            d = int(hexdigits[full], 16)
            out += "0123456789abcdef"[d - d % (1 << (4 - rem))]
            full += 1
        out += "0" * (len(hexdigits) - full)
    return out


@functools.lru_cache(maxsize=4096)  # every attempt asks it for its client: the same few, mostly
def ip_hex(ip: str) -> tuple[str, str] | None:
    """("4", 8 hex digits) or ("6", 32 hex digits) for an address; IPv4-mapped IPv6 counts
    as IPv4; None if ``ip`` is not an address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return ("4", f"{int(addr):08x}") if addr.version == 4 else ("6", f"{int(addr):032x}")


def client_allow_key(network: str) -> tuple[str, str, int]:
    """(lookup key, family, prefix length) of a client allow entry. ValueError if not a network."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    fam, hexdigits = ip_hex(str(net.network_address))  # type: ignore[misc]
    return f"client:{fam}:{masked_hex(hexdigits, net.prefixlen)}/{net.prefixlen}", fam, net.prefixlen


def sender_allow_keys(sender: str) -> list[str]:
    """``sender:<address>`` and ``sender:@<domain>`` (an allow of ``<>`` is ``sender:<>``)."""
    if not sender:
        return ["sender:<>"]
    domain = sender.rpartition("@")[2]
    return [f"sender:{sender}", f"sender:@{domain}"]


def triplet_value(client: str, sender: str, recipient: str) -> str:
    """``"192.0.2.0/24 alice@example.org bob@example.com"``; the null sender is ``<>``."""
    return f"{client} {sender or '<>'} {recipient}"


def triplet_allow_key(client: str, sender: str, recipient: str) -> str:
    return triplet_allow_key_of(triplet_value(client, sender, recipient))


def triplet_allow_key_of(value: str) -> str:
    """The allow key of a triplet from its ``triplet_value``."""
    return f"triplet:{value}"


def fixed_allow_keys(triplet: str, sender: str) -> list[str]:
    """The allow keys of a triplet (its ``triplet_value``) that its client's address has no
    part in, most specific first: the triplet, the sender, the sender's @domain."""
    return [triplet_allow_key_of(triplet), *sender_allow_keys(sender)]


def client_candidates(ip: str | None, lengths: Iterable[tuple[str, int]]) -> list[str]:
    """The client allow keys that would cover ``ip``, for the prefix lengths in use, the
    longest prefix first (the SQLite store keeps them with the rest of a triplet's allow
    keys: sqlite_store._allow_keys)."""
    probe = ip_hex(ip) if ip else None
    if probe is None:
        return []
    fam, hexdigits = probe
    return [f"client:{fam}:{masked_hex(hexdigits, n)}/{n}"
            for f, n in sorted(lengths, key=lambda length: -length[1]) if f == fam]


def make_allow(kind: str, value: str, now: float, ttl: float | None, note: str = "") -> AllowEntry:
    """Build an allow entry from its display value. ``value`` for ``triplet`` is
    ``triplet_value(...)``. ValueError on a value that does not fit the kind."""
    if kind == "client":
        key, _, _ = client_allow_key(value)
        value = str(ipaddress.ip_network(value, strict=False))
    elif kind == "sender":
        value = value.lower()
        if value in ("", "<>"):
            value = "<>"
        elif "@" not in value or value.endswith("@"):
            raise ValueError(f"expected an address or @domain, got {value!r}")
        key = f"sender:{value}"
    elif kind == "triplet":
        key = triplet_allow_key_of(value)
    else:
        raise ValueError(f"unknown allow kind {kind!r}")
    return AllowEntry(kind, value, key, now, None if ttl is None else now + ttl, note)


# --- the interface ----------------------------------------------------------------------

@dataclass
class Stats:
    pending: int = 0
    passed: int = 0
    expired: int = 0
    auto_whitelisted: int = 0  # client keys with at least auto_whitelist_after live passes
    allow_entries: int = 0
    counters: dict[str, int] = field(default_factory=dict)  # outcome -> count, since created
    retry_delays: dict[str, int] = field(default_factory=dict)  # bucket label -> passes

    @property
    def pass_rate(self) -> float | None:
        """Share of greylisted triplets (new + restarted) that came back and passed."""
        deferred = self.counters.get(NEW, 0) + self.counters.get(RESTARTED, 0)
        return None if deferred == 0 else self.counters.get(PASSED_NOW, 0) / deferred

    def as_dict(self) -> dict:
        return {
            "pending": self.pending, "passed": self.passed, "expired": self.expired,
            "auto_whitelisted": self.auto_whitelisted, "allow_entries": self.allow_entries,
            "pass_rate": self.pass_rate,
            "outcomes": {k: self.counters.get(k, 0) for k in OUTCOMES},
            "retry_delays": {label: self.retry_delays.get(label, 0) for _, label in DELAY_BUCKETS},
        }


class GreylistStore:
    """The interface both backends implement. Every method is a coroutine; errors of the
    database below come out as ``smtpgate.StoreError``."""

    async def attempt(self, client: str, sender: str, recipient: str, *, now: float,
                      params: Params, client_ip: str | None = None,
                      dry_run: bool = False) -> Attempt:
        """Record one attempt atomically and return the decision (see the module doc).

        ``client_ip`` is checked against client allow entries. With ``dry_run`` nothing is
        written: the answer the gate would give now (``smtpgate greylist show``)."""
        raise NotImplementedError

    async def get(self, client: str, sender: str, recipient: str) -> Entry | None:
        raise NotImplementedError

    async def passed_count(self, client: str, now: float) -> int:
        """Live passed triplets of one client key (what the auto-whitelist counts)."""
        raise NotImplementedError

    async def add_allow(self, entry: AllowEntry) -> None:
        raise NotImplementedError

    async def allow_entries(self, now: float | None = None) -> list[AllowEntry]:
        """Every allow entry (only live ones when ``now`` is given)."""
        raise NotImplementedError

    async def entries(self, selector: Selector, now: float, limit: int | None = None) -> list[Entry]:
        """Matching entries, most recently seen first."""
        raise NotImplementedError

    async def delete(self, selector: Selector) -> tuple[int, int]:
        """Forget matching triplets and allow entries: (triplets, allow entries) deleted."""
        raise NotImplementedError

    async def purge(self, now: float, dry_run: bool = False) -> tuple[int, int]:
        """Drop expired triplets and allow entries: (triplets, allow entries)."""
        raise NotImplementedError

    async def stats(self, now: float, auto_whitelist_after: int) -> Stats:
        raise NotImplementedError

    # -- moving to another store (``portable.py``: ``smtpgate state copy``) -----------------
    def export_batches(self) -> AsyncIterator[list[Entry | AllowEntry]]:
        """Every allow entry and triplet, in bounded batches."""
        raise NotImplementedError

    async def import_batch(self, items: list[Entry | AllowEntry], now: float) -> Counter[str]:
        """Store triplets and allow entries as they are (times and expiries kept, replacing
        what is stored under the same key); counts by ``import_kind``."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


def import_kind(item: Entry | AllowEntry, now: float) -> str:
    """How ``import_batch`` counts an item: ``allow``, the entry's state, or ``skipped``
    for one past the ``GRACE`` the stores keep expired entries (they would drop it)."""
    expires = item.expires
    if expires is not None and expires + GRACE <= now:
        return "skipped"
    return "allow" if isinstance(item, AllowEntry) else item.state(now)
