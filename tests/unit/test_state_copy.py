"""``smtpgate state copy FROM-URL TO-URL``, run as a user runs it (a subprocess): SQLite ->
Redis -> SQLite, each store looked at through the CLI listings a user would read
(``greylist list --json``, ``greylist list --allowed --json``, ``senders list --json``,
``senders show KEY --json``), which must be the same on all three. The state is made
through the store API at the real time (the CLI's clock)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import redis

from smtpgate import Event
from smtpgate.stores import Params, make_allow, open_stores
from smtpgate_rules.senders import Senders
from tests.unit.test_stores import REDIS_URL, delete_redis_keys, new_prefix, require_redis

POLICY = "domains: [example.com]\nrules:\n  - senders: {}\n  - greylist: {}\n"
PARAMS = Params(delay=300, retry_window=2 * 86400, pass_ttl=35 * 86400)


def smtpgate(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


class Place:
    """A gate.yaml naming one state URL, for the CLI listings."""

    def __init__(self, folder, state: str) -> None:
        folder.mkdir()
        (folder / "policies").mkdir()
        (folder / "policies" / "default.yaml").write_text(POLICY)
        self.config = folder / "gate.yaml"
        self.config.write_text(f"state: {json.dumps(state)}\npolicies: policies\n")
        self.state = state

    def json(self, *args: str):
        done = smtpgate(*args, "--json", "-c", str(self.config))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def view(self) -> dict:
        """Everything a user sees of the state through the listings."""
        senders = self.json("senders", "list")
        return {"greylist": self.json("greylist", "list"),
                "allowed": self.json("greylist", "list", "--allowed"),
                "senders": senders,
                "history": {k["key"]: self.shown(k["key"]) for k in senders["keys"]}}

    def shown(self, key: str) -> dict:
        doc = self.json("senders", "show", key)
        del doc["now"]  # the CLI's clock
        return doc


def fill(url: str) -> None:
    """Pending, passed and long-expired triplets, allow entries, sender records with history."""
    now = time.time()

    async def go():
        stores = open_stores(url)
        g = stores.greylist
        try:
            await g.attempt("192.0.2.0/24", "alice@sender.test", "bob@example.com", now=now - 60, params=PARAMS)
            await g.attempt("198.51.100.0/24", "carol@sender.test", "bob@example.com", now=now - 900, params=PARAMS)
            await g.attempt("198.51.100.0/24", "carol@sender.test", "bob@example.com", now=now - 100, params=PARAMS)
            await g.attempt("203.0.113.0/24", "", "old@example.com", now=now - 10 * 86400, params=PARAMS)
            await g.add_allow(make_allow("client", "192.0.2.77/32", now - 5, None, "partner"))
            await g.add_allow(make_allow("sender", "@lists.example", now - 4, 86400, "for a day"))
            machine = Senders({}, None).machine
            await machine.feed(stores.senders, "alice@sender.test", [Event("delivered", "test")], now - 30)
            await machine.feed(stores.senders, "mallory@spam.test",
                               [Event(e, "test") for e in ("greylisted", "rejected", "rejected")], now - 20)
            await stores.limits.hit([("client", "192.0.2.1", 86400.0, 100, True)], now - 10)
            await stores.limits.connect("192.0.2.1", "gate:1", 10, now, 3600)  # a live session: not copied
        finally:
            await stores.close()
    asyncio.run(go())


@pytest.mark.timeout(120)
def test_sqlite_to_redis_to_sqlite(tmp_path):
    require_redis()
    prefix = new_prefix()
    first = f"sqlite://{tmp_path / 'first.db'}"
    middle = f"{REDIS_URL}?prefix={prefix}"
    last = f"sqlite://{tmp_path / 'last.db'}"
    fill(first)
    places = [Place(tmp_path / name, url) for name, url in (("a", first), ("b", middle), ("c", last))]
    try:
        want = places[0].view()
        assert [(e["recipient"], e["state"]) for e in want["greylist"]["entries"]] == [
            ("bob@example.com", "pending"), ("bob@example.com", "passed"), ("old@example.com", "expired")]
        assert want["allowed"]["count"] == 2 and want["senders"]["count"] == 2

        there = smtpgate("state", "copy", first, middle)
        assert there.returncode == 0, there.stderr
        # the long-expired triplet is past the day the stores keep it: counted, not copied
        assert "greylist: 1 pending, 1 passed, 2 allow entries (1 expired for good, not copied)" in there.stdout
        assert "senders: 2 records" in there.stdout
        assert "limits: 1 counters" in there.stdout
        back = smtpgate("state", "copy", middle, last, "--json")
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["copied"] == {"greylist": {"allow": 2, "passed": 1, "pending": 1},
                                                     "senders": {"records": 2, "skipped": 0},
                                                     "limits": {"counters": 1, "skipped": 0}}

        del want["greylist"]["entries"][2]
        want["greylist"]["count"] = 2
        for place in places[1:]:
            assert place.view() == want, place.state
        # the copies are live state: the passed triplet passes, on Redis with the TTL the
        # store would have given it (its pass_ttl left, plus the day expired entries stay)
        for place in places[1:]:
            shown = place.json("greylist", "show", "198.51.100.7", "carol@sender.test", "bob@example.com")
            assert shown["outcome"] == "passed_before", place.state
        r = redis.Redis.from_url(REDIS_URL)
        ttl = r.ttl(f"{prefix}gl:t:198.51.100.0/24 carol@sender.test bob@example.com")
        assert 35 * 86400 - 200 < ttl <= 36 * 86400
    finally:
        delete_redis_keys(prefix)


def test_bad_urls_exit_2(tmp_path):
    missing = smtpgate("state", "copy", f"sqlite://{tmp_path / 'none.db'}", "redis://127.0.0.1:6379/15")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad = smtpgate("state", "copy", f"sqlite://{tmp_path / 'none.db'}", "redis://127.0.0.1:6379/x")
    assert bad.returncode == 2 and "TO-URL" in bad.stderr and "Traceback" not in bad.stderr
    unknown = smtpgate("state", "copy", "mysql://x", "redis://127.0.0.1:6379/15")
    assert unknown.returncode == 2 and "FROM-URL" in unknown.stderr
    (tmp_path / "s.db").touch()
    same = smtpgate("state", "copy", "sqlite:///./s.db", f"sqlite://{tmp_path / 's.db'}", cwd=tmp_path)
    assert same.returncode == 2 and "same store" in same.stderr
