"""The pool's figures (``smtp/pool.py`` through ``smtpgate.metrics``): the idle gauge after each
change, and the reason each way a session leaves the pool instead of being reused is counted
under. A real ``SessionPool`` with stand-in connections (only ``is_connected``, ``close``
and ``quit`` are used); then the relay's way of closing (``relay.Downstream`` on that pool,
against the capturing downstream on loopback): a client leaving during the reuse check,
sessions in use at a reload or a shutdown, a HELO client's session the pool would refuse
anyway (no EHLO asked for it). Each in a fresh interpreter: ``metrics.prepare`` points
prometheus_client at a multiprocess folder for the whole process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PREPARE = textwrap.dedent('''
    import asyncio, json, re, sys
    from smtpgate import metrics

    folder = metrics.prepare()
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry)

    def scrape():
        text = generate_latest(registry).decode()
        return {m[0] + m[1]: float(m[2]) for m in
                re.findall(r'^(smtpgate_downstream_pool_\\w+)(\\{[^}]*\\})? (\\S+)$', text, re.M)}
''')

POOL = PREPARE + textwrap.dedent('''
    from smtpgate.smtp.pool import Pooled, SessionPool

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
        back(older)  # ...is not taken back (relay.py asks first: a reload during its EHLO)
        back()
        await pool.close(timeout=1)  # a drain: the idle one goes, and what comes back after
        back()
        seen["closed"] = scrape()
        print(json.dumps(seen))

    asyncio.run(main())
    metrics.cleanup(folder)
''')


RELAY = PREPARE + textwrap.dedent('''
    import dataclasses, threading
    from smtpgate.config import load_gate_config
    from smtpgate.mail.session import Session
    from smtpgate.smtp import relay
    from smtpgate.smtp.pool import SessionPool
    from tests.support.downstream import CapturingDownstream

    CFG = load_gate_config(None)
    MSG = b"Subject: t\\r\\n\\r\\nbody\\r\\n"

    def client(esmtp=True, ip="127.0.0.1"):
        return Session(id="T1", client_ip=ip, client_port=2525, helo="client.test", esmtp=esmtp,
                       proto="ESMTP" if esmtp else "SMTP")

    async def delivered(ds, pool, esmtp=True):
        \"\"\"A relay whose client's last exchange delivered a message, still open.\"\"\"
        down = relay.Downstream(dataclasses.replace(CFG.downstream, host=ds.host, port=ds.port,
                                                    timeout=30), CFG.hostname, pool=pool)
        await down.open(client(esmtp))
        assert (await down.mail("a@sender.test", [])).code == 250
        assert (await down.rcpt("user@example.com", [])).code == 250
        assert (await down.data(MSG)).code == 250
        return down

    def verbs(ds, index):
        return [line.split(b" ", 1)[0].decode() for line in ds.sessions[index].transcript]

    async def until(ds, predicate, what):
        await asyncio.to_thread(ds.wait_for, predicate, 5, what)

    async def cancelled_at(ds, verb, step):
        """Run ``step`` until the downstream holds its answer to ``verb``, then cancel it (the
        client's task, as when the client leaves)."""
        ds.stall_at = verb
        task = asyncio.ensure_future(step)
        await until(ds, lambda: ds.stalled == 1, f"{verb} stalled")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def client_left(ds):
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        await (await delivered(ds, pool)).close()  # kept
        second = relay.Downstream(dataclasses.replace(CFG.downstream, host=ds.host, port=ds.port,
                                                      timeout=30), CFG.hostname, pool=pool)
        # the client left while its pooled session answered XCLIENT
        await cancelled_at(ds, "XCLIENT", second.open(client()))
        await pool.close(timeout=5)

    async def reload_to_off(ds):
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        down = await delivered(ds, pool)
        pool.renew(size=0, idle=60, max_uses=100)  # a reload turning the pool off
        await down.close()
        await pool.close(timeout=5)

    async def shutdown(ds):
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        ehlo, helo = await delivered(ds, pool), await delivered(ds, pool, esmtp=False)
        await pool.close(timeout=0)  # a drain: the clients leave after it
        await ehlo.close()
        await helo.close()
        await pool.close(timeout=5)

    async def helo_used_up(ds):
        pool = SessionPool(size=2, idle=60, max_uses=1, farewell=relay.farewell)
        await (await delivered(ds, pool, esmtp=False)).close()  # no EHLO asked: used up
        await pool.close(timeout=5)

    async def helo_reloaded_full(ds):
        pool = SessionPool(size=1, idle=60, max_uses=100, farewell=relay.farewell)
        ehlo, helo = await delivered(ds, pool), await delivered(ds, pool, esmtp=False)
        pool.renew(size=1, idle=60, max_uses=100)  # a reload while both are in use
        await (await delivered(ds, pool)).close()  # opened after it: kept, the pool full
        await helo.close()  # from before the reload: no EHLO asked, not "pool_full"
        await ehlo.close()
        await pool.close(timeout=0)  # (the idle one: shutdown)
        await pool.close(timeout=5)

    async def shutdown_during_ehlo(ds):
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        down = await delivered(ds, pool, esmtp=False)
        answer = threading.Event()
        ds.replies["EHLO"] = lambda line: answer.wait(5) and None  # held until the drain
        closing = asyncio.ensure_future(down.close())  # its EHLO: is XCLIENT still offered?
        await until(ds, lambda: verbs(ds, 0)[-1:] == ["EHLO"], "the gate's EHLO")
        await pool.close(timeout=0)
        answer.set()
        await closing  # XCLIENT offered, but the pool no longer keeps sessions
        await pool.close(timeout=5)

    async def client_left_during_ehlo(ds):
        pool = SessionPool(size=2, idle=60, max_uses=100, farewell=relay.farewell)
        down = await delivered(ds, pool, esmtp=False)
        # the client left while the gate's EHLO (is XCLIENT still offered?) was out
        await cancelled_at(ds, "EHLO", down.close())
        await pool.close(timeout=5)

    async def opened_with_the_pool_off(ds):
        pool = SessionPool(size=0, idle=60, max_uses=100, farewell=relay.farewell)
        down = await delivered(ds, pool)
        pool.renew(size=2, idle=60, max_uses=100)  # a reload turning the pool on
        await down.close()  # never the pool's: QUIT, not counted
        await pool.close(timeout=5)

    async def main():
        with CapturingDownstream() as ds:
            before = scrape()
            await globals()[sys.argv[1]](ds)
            await until(ds, lambda: all(s.closed for s in ds.sessions), "every session closed")
            after = scrape()
            print(json.dumps({
                "closed": {k: v - before.get(k, 0) for k, v in after.items() if "closed" in k},
                "idle": after["smtpgate_downstream_pool_idle"],
                "sessions": [verbs(ds, s.index) for s in ds.sessions]}))

    asyncio.run(main())
    metrics.cleanup(folder)
''')


def drive(script: str, arg: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, arg], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reason(name: str) -> str:
    return f'smtpgate_downstream_pool_closed_total{{reason="{name}"}}'


IDLE = "smtpgate_downstream_pool_idle"


@pytest.mark.timeout(90)
def test_the_idle_gauge_follows_the_pool_and_each_closing_counts_its_reason():
    seen = drive(POOL, "both")
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
    seen = drive(POOL, "one")  # b expired while still connected: it waited idle out
    assert seen["taken none"] == {IDLE: 0, reason("pool_full"): 1, reason("max_uses"): 1,
                                  reason("downstream_closed"): 1, reason("idle"): 1}


EACH = ["XCLIENT", "EHLO", "MAIL", "RCPT", "DATA"]  # a client, EHLO-greeted
HELO_EACH = ["XCLIENT", "HELO", "MAIL", "RCPT", "DATA"]


# The relay's closings, by RELAY's scenario: the reasons counted (each pool closed at the
# end: no idle session left) and each downstream session's commands.
CLOSINGS = {
    # taken (the idle gauge went down), then closed mid-check: counted, so that the sessions
    # taken are those reused plus those closed; closed at once, no QUIT after the XCLIENT
    "client_left": ({"client_left": 1}, [["EHLO"] + EACH + ["XCLIENT"]]),
    "reload_to_off": ({"reload": 1}, [["EHLO"] + EACH + ["QUIT"]]),
    "shutdown": ({"shutdown": 2}, [["EHLO"] + EACH + ["QUIT"], ["EHLO"] + HELO_EACH + ["QUIT"]]),
    # a HELO client's session the pool would not keep: no EHLO asked, the pool's reason
    "helo_used_up": ({"max_uses": 1}, [["EHLO"] + HELO_EACH + ["QUIT"]]),
    "helo_reloaded_full": ({"reload": 2, "shutdown": 1}, [
        ["EHLO"] + EACH + ["QUIT"], ["EHLO"] + HELO_EACH + ["QUIT"], ["EHLO"] + EACH + ["QUIT"]]),
    # the one way a session reaches give() once the pool keeps none: a drain while the
    # gate's own EHLO was out (give() asks the pool's refusal again)
    "shutdown_during_ehlo": ({"shutdown": 1}, [["EHLO"] + HELO_EACH + ["EHLO", "QUIT"]]),
    # the client left while the gate's own EHLO was out: closed at once, counted
    "client_left_during_ehlo": ({"client_left": 1}, [["EHLO"] + HELO_EACH + ["EHLO"]]),
    # opened while the pool was off: never the pool's, whatever a reload did meanwhile
    "opened_with_the_pool_off": ({}, [["EHLO"] + EACH + ["QUIT"]]),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", CLOSINGS)
def test_each_session_the_relay_closes_instead_of_giving_back_is_counted(scenario):
    closed, sessions = CLOSINGS[scenario]
    seen = drive(RELAY, scenario)
    assert seen["closed"] == {reason(name): n for name, n in closed.items()}
    assert seen["idle"] == 0
    assert seen["sessions"] == sessions


def test_every_reason_the_pool_counts_is_documented():
    """docs/operations.md's metrics table names each reason smtp/pool.py can count."""
    from smtpgate.smtp import pool

    reasons = {value for name, value in vars(pool).items() if name.isupper() and isinstance(value, str)}
    row = next(line for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("| `smtpgate_downstream_pool_closed_total`"))
    assert reasons == {"idle", "max_uses", "check_failed", "client_left", "no_xclient", "downstream_closed",
                       "pool_full", "reload", "shutdown"}
    assert [r for r in sorted(reasons) if f"`{r}` (" not in row] == []
