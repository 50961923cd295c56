"""``downstream.pool``: idle downstream sessions reused by the next client connection, against
the capturing downstream (which counts connections and records every command)."""
from __future__ import annotations

import signal

import yaml

from tests.support.gateproc import deep_merge, free_port
from tests.support.rawsmtp import connect, reply
from tests.support.scrape import get, scrape
from tests.support.waiting import wait_until

MSG = b"Subject: pooled\r\n\r\nhello\r\n"
POOL = {"size": 8}  # downstream.pool is off by default


def pooled(gate_factory, **config):
    """A gate with the pool on (``pool``: its other keys), relaying to ``downstream``."""
    pool = {**POOL, **config.pop("pool", {})}
    downstream = {**config.pop("downstream", {}), "pool": pool}
    return gate_factory(config={**config, "downstream": downstream})


def send(gate, sender: str = "a@sender.test", rcpt: str = "user@example.com") -> int:
    """One client connection, one message; the client's port (XCLIENT PORT=)."""
    with gate.smtp() as c:
        port = c.sock.getsockname()[1]
        assert c.sendmail(sender, [rcpt], MSG) == {}
    return port


def verbs(session) -> list[str]:
    return [line.split(b" ", 1)[0].decode().upper() for line in session.transcript]


def relay_sessions(ds) -> list:
    """Downstream sessions that carried a client (not the start-up probe)."""
    return [s for s in ds.sessions if {"MAIL", "XCLIENT", "RSET"} & set(verbs(s))]


def test_the_next_client_reuses_the_session_greeted_again_as_itself(gate_factory, downstream):
    gate = pooled(gate_factory)
    before = downstream.connections
    ports = [send(gate, f"s{n}@sender.test") for n in range(3)]
    msgs = downstream.wait_for_messages(3)
    assert downstream.connections - before == 1
    assert len({m.session for m in msgs}) == 1
    assert [m.xclient["PORT"] for m in msgs] == [str(p) for p in ports]
    sess = downstream.sessions[msgs[0].session]
    # each client: XCLIENT then EHLO again before its MAIL; no RSET needed (XCLIENT starts
    # a new downstream session) and no QUIT until the gate stops
    assert verbs(sess) == ["EHLO"] + ["XCLIENT", "EHLO", "XFORWARD", "MAIL", "RCPT", "DATA"] * 3



def say(s, f, line: bytes) -> bytes:
    s.sendall(line + b"\r\n")
    return reply(f)


def deliver(s, f) -> None:
    for line in (b"MAIL FROM:<a@sender.test>", b"RCPT TO:<user@example.com>"):
        assert say(s, f, line).startswith(b"250 ")
    assert say(s, f, b"DATA").startswith(b"354 ")
    s.sendall(MSG + b".\r\n")
    assert reply(f).startswith(b"250 ")
    assert say(s, f, b"QUIT").startswith(b"221 ")


def test_xclient_of_the_next_client_carries_nothing_of_the_previous_one(gate_factory, downstream):
    gate = pooled(gate_factory, trusted_forwarders=["127.0.0.2/32"])
    s, f = connect(gate, "127.0.0.2")  # a forwarder naming client A, with a host name
    with s:
        assert reply(f).startswith(b"220 ")
        assert say(s, f, b"EHLO forwarder.test").startswith(b"250 ")
        assert say(s, f, b"XCLIENT ADDR=203.0.113.9 PORT=40001 NAME=a.client.example "
                         b"HELO=a.client.example PROTO=ESMTP").startswith(b"220 ")
        assert say(s, f, b"EHLO a.client.example").startswith(b"250 ")
        deliver(s, f)
    downstream.wait_for_messages(1)
    s, f = connect(gate, "127.0.0.3")  # client B: no name, HELO (not EHLO)
    with s:
        assert reply(f).startswith(b"220 ")
        assert say(s, f, b"HELO b.client.test").startswith(b"250 ")
        deliver(s, f)
    a, b = downstream.wait_for_messages(2)
    assert a.session == b.session  # one downstream session served both
    assert a.xclient["NAME"] == "a.client.example" and a.xclient["ADDR"] == "203.0.113.9"
    assert b.xclient == {"ADDR": "127.0.0.3", "NAME": "[UNAVAILABLE]", "HELO": "b.client.test",
                         "PROTO": "SMTP", "PORT": b.xclient["PORT"]}
    assert b.xclient["PORT"] != "40001"
    assert b.helo == "b.client.test" and not b.esmtp  # greeted as B did: HELO
    [_, second] = [line for line in downstream.sessions[b.session].transcript
                   if line.startswith(b"XCLIENT ")]
    assert b"a.client.example" not in second and b"203.0.113.9" not in second


def test_a_pooled_session_that_fails_its_check_is_never_seen_by_the_client(gate_factory, downstream):
    gate = pooled(gate_factory)
    before = downstream.connections
    send(gate)
    downstream.wait_for_messages(1)
    # the pooled session answers its XCLIENT with 421 and closes: the gate connects anew
    downstream.replies["XCLIENT"] = ["421 4.4.2 downstream.test closing"]
    send(gate, "b@sender.test")
    first, second = downstream.wait_for_messages(2)
    assert downstream.connections - before == 2
    assert first.session != second.session
    assert second.mail_from == "b@sender.test"
    assert "pooled session failed its check" in gate.wait_for_log("pooled session failed")


def test_a_session_without_a_delivery_at_its_end_is_not_kept(gate_factory, downstream):
    gate = pooled(gate_factory)
    downstream.replies["RCPT:nobody@example.com"] = "550 5.1.1 User unknown"
    before = downstream.connections
    with gate.smtp() as c:
        refused = c.sendmail("a@sender.test", ["user@example.com", "nobody@example.com"], MSG)
        assert list(refused) == ["nobody@example.com"]  # delivered to the other: kept
    with gate.smtp() as c:
        c.ehlo()
        assert c.mail("b@sender.test")[0] == 250
        assert c.rcpt("nobody@example.com")[0] == 550  # its errors would be the next one's
    send(gate, "c@sender.test")
    msgs = downstream.wait_for_messages(2)
    assert downstream.connections - before == 2
    sessions = relay_sessions(downstream)
    assert verbs(sessions[0])[-1] == "QUIT"  # the second client's session said goodbye
    assert msgs[1].session == sessions[1].index


def send_after_helo(gate, sender: str) -> None:
    """One client connection that greets with HELO (as smtp-source does), one message."""
    with gate.smtp() as c:
        assert c.helo()[0] == 250
        assert c.sendmail(sender, ["user@example.com"], MSG) == {}


def test_a_helo_clients_session_is_kept_once_the_gates_ehlo_shows_xclient(gate_factory, downstream):
    """A HELO answer lists no keywords: whether the session may take the next client's
    XCLIENT is asked with the gate's own EHLO after the client's delivered message, once
    per XCLIENT NAME and ADDR (what Postfix decides it by): later clients named the same on
    that session are kept without asking again."""
    gate = pooled(gate_factory, log={"level": "debug"})
    before = downstream.connections
    for n in range(3):
        logged = len(gate.log_text())
        send_after_helo(gate, f"s{n}@sender.test")
        gate.wait_for_log("session given back to the pool", start=logged)  # once EHLO answered
    msgs = downstream.wait_for_messages(3)
    assert downstream.connections - before == 1 and len({m.session for m in msgs}) == 1
    assert [(m.helo, m.esmtp) for m in msgs] == [("client.test", False)] * 3  # greeted as the client
    assert len({m.xclient["PORT"] for m in msgs}) == 3  # the port differs: not part of the naming
    each = ["XCLIENT", "HELO", "XFORWARD", "MAIL", "RCPT", "DATA"]
    assert verbs(downstream.sessions[msgs[0].session]) == ["EHLO"] + each + ["EHLO"] + each * 2


def test_without_addr_offered_the_name_alone_is_the_naming(gate_factory, downstream_factory):
    """smtp-sink offers XCLIENT NAME HELO, no ADDR: the address it knows stays the gate's
    own, so the NAME alone decides whether the EHLO's answer holds for the next client."""
    ds = downstream_factory(xclient_attrs=("NAME", "HELO"))
    gate = gate_factory(downstream_port=ds.port, config={"downstream": {"pool": POOL},
                                                         "log": {"level": "debug"}})
    for n in range(3):
        logged = len(gate.log_text())
        send_after_helo(gate, f"s{n}@sender.test")
        gate.wait_for_log("session given back to the pool", start=logged)
    msgs = ds.wait_for_messages(3)
    assert len({m.session for m in msgs}) == 1 and "ADDR" not in msgs[0].xclient
    each = ["XCLIENT", "HELO", "XFORWARD", "MAIL", "RCPT", "DATA"]
    assert verbs(ds.sessions[msgs[0].session]) == ["EHLO"] + each + ["EHLO"] + each * 2


def test_a_helo_client_named_otherwise_is_asked_for_again(gate_factory, downstream):
    """The EHLO's answer holds for the NAME and ADDR it was asked under only: a HELO client
    from another address on the same session gets its own EHLO check, and then the first
    address again its own (the session remembers the last naming asked for)."""
    gate = pooled(gate_factory, log={"level": "debug"})
    for source in ("127.0.0.1", "127.0.0.3", "127.0.0.3", "127.0.0.1"):
        logged = len(gate.log_text())
        s, f = connect(gate, source)
        with s:
            assert reply(f).startswith(b"220 ")
            assert say(s, f, b"HELO client.test").startswith(b"250 ")
            deliver(s, f)
        gate.wait_for_log("session given back to the pool", start=logged)
    msgs = downstream.wait_for_messages(4)
    assert len({m.session for m in msgs}) == 1
    assert [m.xclient["ADDR"] for m in msgs] == ["127.0.0.1", "127.0.0.3", "127.0.0.3", "127.0.0.1"]
    each = ["XCLIENT", "HELO", "XFORWARD", "MAIL", "RCPT", "DATA"]
    assert verbs(downstream.sessions[msgs[0].session]) == (
        ["EHLO"] + each + ["EHLO"] + each + ["EHLO"] + each + each + ["EHLO"])


def test_a_helo_clients_session_no_longer_offering_xclient_is_closed(gate_factory, downstream):
    """As with Postfix authorising XCLIENT by the named client's address: the EHLO after a
    HELO client's message lists no XCLIENT, so the session says QUIT and the next client
    gets a new one, with no failed check."""
    gate = pooled(gate_factory)
    downstream.replies["EHLO"] = lambda line: (
        f"250 {downstream.hostname}\nPIPELINING\nENHANCEDSTATUSCODES" if downstream.messages else None)
    before = downstream.connections
    send_after_helo(gate, "a@sender.test")
    downstream.wait_for_messages(1)
    first = relay_sessions(downstream)[0]
    wait_until(lambda: first.closed, 5, what="the first session closed")
    assert verbs(first)[-2:] == ["EHLO", "QUIT"]
    send_after_helo(gate, "b@sender.test")
    a, b = downstream.wait_for_messages(2)
    assert downstream.connections - before == 2 and a.session != b.session
    assert "pooled session failed" not in gate.log_text()


def test_a_helo_clients_session_is_not_checked_when_the_pool_is_full(gate_factory, downstream):
    """Two HELO clients at once, a pool of one: the first one's session fills the pool, so
    the second one's says QUIT at once instead of an EHLO check."""
    gate = pooled(gate_factory, pool={"size": 1}, log={"level": "debug"})
    first, second = gate.smtp(), gate.smtp()
    for n, c in enumerate((first, second)):
        assert c.helo()[0] == 250
        assert c.sendmail(f"s{n}@sender.test", ["user@example.com"], MSG) == {}
    a, b = downstream.wait_for_messages(2)
    assert a.session != b.session
    first.quit()
    gate.wait_for_log("session given back to the pool (1 idle)")
    second.quit()
    wait_until(lambda: downstream.sessions[b.session].closed, 5, what="the second session closed")
    assert verbs(downstream.sessions[b.session])[-2:] == ["DATA", "QUIT"]
    assert verbs(downstream.sessions[a.session])[-1] == "EHLO"  # checked, kept


def test_without_xclient_a_reused_session_is_checked_with_rset(gate_factory, downstream):
    gate = pooled(gate_factory, downstream={"xclient": False})
    before = downstream.connections
    send(gate)
    send(gate, "b@sender.test")
    a, b = downstream.wait_for_messages(2)
    assert downstream.connections - before == 1 and a.session == b.session
    assert verbs(downstream.sessions[a.session]) == [
        "EHLO", "XFORWARD", "MAIL", "RCPT", "DATA", "RSET", "XFORWARD", "MAIL", "RCPT", "DATA"]


def test_by_default_a_connection_per_client(gate, downstream):
    before = downstream.connections
    send(gate)
    send(gate, "b@sender.test")
    a, b = downstream.wait_for_messages(2)
    assert downstream.connections - before == 2 and a.session != b.session


def test_max_uses_bounds_the_clients_of_one_session(gate_factory, downstream):
    gate = pooled(gate_factory, pool={"max_uses": 2})
    before = downstream.connections
    for n in range(3):
        send(gate, f"s{n}@sender.test")
    msgs = downstream.wait_for_messages(3)
    assert downstream.connections - before == 2
    assert msgs[0].session == msgs[1].session != msgs[2].session
    assert verbs(downstream.sessions[msgs[0].session])[-1] == "QUIT"


def test_reload_and_shutdown_close_the_idle_sessions(gate_factory, downstream):
    gate = pooled(gate_factory)
    send(gate)
    [msg] = downstream.wait_for_messages(1)
    kept = downstream.sessions[msg.session]
    gate.send_signal(signal.SIGHUP)
    gate.wait_for_log("configuration reloaded")
    wait_until(lambda: kept.closed, 5, what="the idle session closed at reload")
    assert verbs(kept)[-1] == "QUIT"
    send(gate, "b@sender.test")  # a new session after the reload...
    _, second = downstream.wait_for_messages(2)
    assert second.session != msg.session
    assert gate.stop() == 0  # ...closed with QUIT at shutdown
    assert downstream.sessions[second.session].closed
    assert verbs(downstream.sessions[second.session])[-1] == "QUIT"


def test_an_idle_session_is_closed_after_idle(gate_factory, downstream):
    gate = pooled(gate_factory, pool={"idle": "200ms"})
    send(gate)
    [msg] = downstream.wait_for_messages(1)
    kept = downstream.sessions[msg.session]
    wait_until(lambda: kept.closed, 10, what="the idle session closed")
    assert verbs(kept)[-1] == "QUIT"
    send(gate, "b@sender.test")  # the next client: a new connection
    _, second = downstream.wait_for_messages(2)
    assert second.session != msg.session


def test_metrics_count_reuse_idle_sessions_and_why_sessions_close(gate_factory, downstream):
    """``metrics:`` with the pool on (one idle session at most): sessions got from the pool or
    connected, the idle ones now, and each way a session was closed instead of reused, as
    the scrape adds them up. ``idle`` is long until the last step (no session times out
    under a slow step), which reloads with a short one."""
    mport = free_port()
    gate = pooled(gate_factory, pool={"size": 1, "max_uses": 3, "idle": "60s"},
                  metrics=f"127.0.0.1:{mport}")
    wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20, what="healthz")
    pool_figures: dict = {}

    def figures(new: int, taken: int, idle_now: int, **closed: int) -> None:
        """Wait until the pool's figures are these (a session goes back as its client leaves)."""
        want = {'smtpgate_downstream_sessions_total{how="new"}': new,
                'smtpgate_downstream_sessions_total{how="pooled"}': taken,
                "smtpgate_downstream_pool_idle": idle_now,
                **{f'smtpgate_downstream_pool_closed_total{{reason="{r}"}}': n for r, n in closed.items()}}

        def match() -> bool:
            pool_figures.clear()
            pool_figures.update({k: v for k, v in scrape(mport).items()
                                 if k.startswith(("smtpgate_downstream_sessions", "smtpgate_downstream_pool"))})
            return pool_figures == want
        wait_until(match, 10, what=lambda: f"{want}, scraped {pool_figures}")

    for n in range(4):  # the third client uses the first session up: the fourth connects
        send(gate, f"s{n}@sender.test")
    figures(new=2, taken=2, idle_now=1, max_uses=1)

    msgs = downstream.wait_for_messages(4)
    downstream.hang_up(msgs[3].session)  # as Postfix's smtpd_timeout would
    send(gate, "s4@sender.test")
    figures(new=3, taken=2, idle_now=1, max_uses=1, downstream_closed=1)

    downstream.replies["XCLIENT"] = ["421 4.4.2 downstream.test closing"]
    send(gate, "s5@sender.test")
    figures(new=4, taken=2, idle_now=1, max_uses=1, downstream_closed=1, check_failed=1)

    # the client's EHLO, after XCLIENT, no longer lists XCLIENT: used, then not kept
    without_xclient = f"250 {downstream.hostname}\nPIPELINING\nENHANCEDSTATUSCODES"
    downstream.replies["EHLO"] = lambda line: without_xclient if "client.test" in line else None
    send(gate, "s6@sender.test")
    figures(new=4, taken=3, idle_now=0, max_uses=1, downstream_closed=1, check_failed=1,
            no_xclient=1)
    del downstream.replies["EHLO"]

    send(gate, "s7@sender.test")
    seen = dict(new=5, taken=3, max_uses=1, downstream_closed=1, check_failed=1, no_xclient=1)
    figures(idle_now=1, **seen)

    # HELO clients: after the delivered message the gate's own EHLO (gate.test) asks
    delivered = len(downstream.wait_for_messages(8))
    downstream.replies["EHLO"] = lambda line: (
        without_xclient if len(downstream.messages) > delivered else None)
    send_after_helo(gate, "h1@sender.test")  # on s7's session: XCLIENT not listed any more
    seen.update(taken=4, no_xclient=2)
    figures(idle_now=0, **seen)
    delivered += 1
    downstream.replies["EHLO"] = lambda line: (
        "421 4.4.2 downstream.test closing" if len(downstream.messages) > delivered else None)
    send_after_helo(gate, "h2@sender.test")  # a new session; its check fails
    seen.update(new=6, check_failed=2)
    figures(idle_now=0, **seen)
    del downstream.replies["EHLO"]

    ehlo_client, helo_client = gate.smtp(), gate.smtp()  # both at once: two new sessions
    assert helo_client.helo()[0] == 250
    for n, c in enumerate((ehlo_client, helo_client)):
        assert c.sendmail(f"f{n}@sender.test", ["user@example.com"], MSG) == {}
    ehlo_client.quit()  # kept: the pool (of one) is full
    seen.update(new=8)
    figures(idle_now=1, **seen)
    helo_client.quit()  # not kept, and not asked with an EHLO
    seen.update(pool_full=1)
    figures(idle_now=1, **seen)
    last = downstream.sessions[-1]
    wait_until(lambda: last.closed, 5, what="the HELO client's session closed")
    assert verbs(last)[-3:] == ["RCPT", "DATA", "QUIT"]

    # a reload with a short idle: the idle session goes, and the next one waits 200ms only
    logged = len(gate.log_text())
    shorter = deep_merge(gate.config, {"downstream": {"pool": {"idle": "200ms"}}})
    gate.config_path.write_text(yaml.safe_dump(shorter, sort_keys=False))
    gate.send_signal(signal.SIGHUP)
    gate.wait_for_log("configuration reloaded", start=logged)
    seen.update(reload=1)
    figures(idle_now=0, **seen)

    send(gate, "s8@sender.test")  # kept, then closed after idle unused
    seen.update(new=9, idle=1)
    figures(idle_now=0, **seen)
