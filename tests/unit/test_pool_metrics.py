"""The pool's figures (``smtp/pool.py`` through ``smtpgate.metrics``): the idle gauge after each
change, and the reason each way a session leaves the pool instead of being reused is counted
under. A real ``SessionPool`` with stand-in connections (only ``is_connected``, ``close``
and ``quit`` are used), in a fresh interpreter: ``metrics.prepare`` points prometheus_client
at a multiprocess folder for the whole process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DRIVE = textwrap.dedent('''
    import asyncio, json, re, sys
    from smtpgate import metrics
    from smtpgate.smtp.pool import Pooled, SessionPool

    folder = metrics.prepare()
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry)

    def scrape():
        text = generate_latest(registry).decode()
        return {m[0] + m[1]: float(m[2]) for m in
                re.findall(r'^(smtpgate_downstream_pool_\\w+)(\\{[^}]*\\})? (\\S+)$', text, re.M)}

    class Connection:  # what the pool asks of an aiosmtplib.SMTP
        def __init__(self):
            self.is_connected = True
        def close(self):
            self.is_connected = False

    async def farewell(smtp):
        smtp.close()

    async def main():
        pool = SessionPool(size=2, idle=30, max_uses=3, farewell=farewell)
        def back(entry=None):
            entry = entry or Pooled(Connection(), pool.generation, xclient=True)
            pool.give(entry)
            return entry
        seen = {}
        a, b, c = back(), back(), back()  # three given back to a pool of two: a goes
        seen["three back"] = scrape()
        assert pool.take() is c
        seen["one taken"] = scrape()
        c.uses = 2
        back(c)  # its third client: used up
        b.idle_since -= 60  # waited past idle: found so by the next take
        c = back()
        seen["used up"] = scrape()
        c.smtp.close()  # the downstream hung up on c (and on b, expired, with "both")
        if sys.argv[1] == "both":
            b.smtp.close()
        assert pool.take() is None
        seen["taken none"] = scrape()
        d = back()
        d.smtp.close()
        pool._sweep()  # not expired yet: kept, the gauge unchanged
        d.idle_since -= 60
        pool._sweep()
        e = back()
        seen["swept"] = scrape()
        gone = Pooled(Connection(), pool.generation, xclient=True)
        gone.smtp.close()
        back(gone)  # given back closed
        older = pool.take()
        back()
        pool.renew(size=2, idle=30, max_uses=3)  # a reload: the idle one goes, and in use...
        back(older)  # ...is not taken back
        back()
        await pool.close(timeout=1)  # a drain: the idle one goes, and what comes back after
        back()
        seen["closed"] = scrape()
        print(json.dumps(seen))

    asyncio.run(main())
    metrics.cleanup(folder)
''')


def drive(hung_up: str) -> dict[str, dict[str, float]]:
    done = subprocess.run([sys.executable, "-c", DRIVE, hung_up], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reason(name: str) -> str:
    return f'smtpgate_downstream_pool_closed_total{{reason="{name}"}}'


IDLE = "smtpgate_downstream_pool_idle"


@pytest.mark.timeout(90)
def test_the_idle_gauge_follows_the_pool_and_each_closing_counts_its_reason():
    seen = drive("both")
    assert seen["three back"] == {IDLE: 2, reason("pool_full"): 1}
    assert seen["one taken"] == {IDLE: 1, reason("pool_full"): 1}
    assert seen["used up"] == {IDLE: 2, reason("pool_full"): 1, reason("max_uses"): 1}
    assert seen["taken none"] == {IDLE: 0, reason("pool_full"): 1, reason("max_uses"): 1,
                                  reason("downstream_closed"): 2}
    assert seen["swept"] == {IDLE: 1, reason("pool_full"): 1, reason("max_uses"): 1,
                             reason("downstream_closed"): 3}
    assert seen["closed"] == {IDLE: 0, reason("pool_full"): 1, reason("max_uses"): 1,
                              reason("downstream_closed"): 4, reason("reload"): 2,
                              reason("shutdown"): 2}


@pytest.mark.timeout(90)
def test_a_session_past_idle_and_still_connected_counts_as_idle():
    seen = drive("one")  # b expired while still connected: it waited idle out
    assert seen["taken none"] == {IDLE: 0, reason("pool_full"): 1, reason("max_uses"): 1,
                                  reason("downstream_closed"): 1, reason("idle"): 1}
