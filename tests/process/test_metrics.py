"""``metrics: HOST:PORT``: a real gate of two workers scraped over HTTP after a known mix of
traffic (the figures sum every worker's), and its ``/healthz`` following the downstream."""
from __future__ import annotations

import os
import re
import smtplib
from collections import Counter
from pathlib import Path

import pytest

from tests.support.gateproc import free_port, wait_until
from tests.support.scrape import get, scrape

POLICIES = {
    "default.yaml": "domains: [example.com]\nrules: []\n",
    "grey.yaml": "domains: [grey.example]\nrules:\n  - greylist: {delay: 10m}\n",
}


def worker_of(gate_pid: int, gate_port: int, client_port: int) -> int | None:
    """The worker process holding the gate's end of the connection from client_port (/proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == gate_port and int(f[2].rsplit(":", 1)[1], 16) == client_port:
                inode = f[9]
    if inode is None:
        return None
    for pid in Path(f"/proc/{gate_pid}/task/{gate_pid}/children").read_text().split():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(pid)
            except OSError:
                continue
    return None


@pytest.mark.timeout(90)
def test_two_workers_scraped_after_a_known_mix_then_healthz_follows_the_downstream(
        gate_factory, downstream):
    mport = free_port()
    gate = gate_factory(policies=POLICIES, config={"workers": 2, "metrics": f"127.0.0.1:{mport}",
                                                   "downstream": {"pool": {"size": 8}}})
    assert wait_until(lambda: "listening" in get(f"http://127.0.0.1:{mport}/healthz")[1]
                      or get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    before = scrape(mport)
    workers: Counter[int] = Counter()
    # whether each worker's last session delivered: its downstream session is then idle in
    # that worker's pool (one at most: the sessions come one at a time)
    keeps: dict[int | None, bool] = {}

    def session(rcpt: str) -> None:
        with gate.smtp() as client:  # its QUIT waits for the end hooks: metrics counted
            client.ehlo("client.test")
            worker = worker_of(gate.pid, gate.port, client.sock.getsockname()[1])
            workers[worker] += 1
            keeps[worker] = rcpt.endswith("example.com")
            try:
                client.sendmail("alice@sender.test", [rcpt], b"Subject: hi\r\n\r\nhello\r\n")
            except smtplib.SMTPRecipientsRefused:
                pass

    delivered = 0
    for rcpt in ["bob@example.com"] * 3 + ["eve@elsewhere.test"] * 2 + ["carol@grey.example"]:
        session(rcpt)
        delivered += rcpt.endswith("example.com")
    while len(workers) < 2 and delivered < 40:  # until both workers served (the kernel picks)
        session("bob@example.com")
        delivered += 1
    assert len(workers) == 2 and None not in workers, workers
    downstream.wait_for_messages(delivered)
    sessions = sum(workers.values())

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    after = scrape(mport)
    assert wait_until(lambda: scrape(mport)["smtpgate_connections_open"] == 0, 10)
    assert delta("smtpgate_connections_total") == sessions
    assert delta("smtpgate_connections_refused_total") == 0
    assert delta('smtpgate_transactions_total{reply_class="2xx",rule="none"}') == delivered
    assert delta('smtpgate_transactions_total{reply_class="5xx",rule="gate"}') == 2
    assert delta('smtpgate_transactions_total{reply_class="4xx",rule="greylist"}') == 1
    assert delta('smtpgate_rule_verdicts_total{action="reject",rule="gate",shadow="false"}') == 2
    assert delta('smtpgate_rule_verdicts_total{action="tempfail",rule="greylist",shadow="false"}') == 1
    assert delta('smtpgate_rule_duration_seconds_count{rule="greylist"}') == 1
    assert delta("smtpgate_downstream_data_duration_seconds_count") == delivered
    assert after["smtpgate_quarantine_messages"] == 0
    assert delta("smtpgate_store_errors_total") == 0
    # a gauge of each live worker's, added up by the scrape (given back as its client left)
    assert wait_until(lambda: scrape(mport)["smtpgate_downstream_pool_idle"] == sum(keeps.values()), 10), keeps

    assert get(f"http://127.0.0.1:{mport}/healthz") == (200, "ok\n")
    downstream.stop()
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 503, 20)
    status, reason = get(f"http://127.0.0.1:{mport}/healthz")
    assert status == 503 and "downstream" in reason, reason
    assert gate.stop() == 0


def test_single_process_gate_serves_metrics_and_frees_its_directory(gate_factory):
    mport = free_port()
    gate = gate_factory(config={"workers": 1, "metrics": f"127.0.0.1:{mport}"})
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    with gate.smtp() as client:
        client.sendmail("alice@sender.test", ["bob@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
    samples = scrape(mport)
    assert samples['smtpgate_transactions_total{reply_class="2xx",rule="none"}'] == 1
    assert get(f"http://127.0.0.1:{mport}/nothing")[0] == 404
    assert gate.stop() == 0
    assert "metrics: serving /metrics and /healthz on 127.0.0.1" in gate.log_text()


def test_a_taken_metrics_port_refuses_to_start(gate_factory, tmp_path):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(BaseException):
            gate_factory(config={"workers": 2, "metrics": f"127.0.0.1:{port}"})
    log = (tmp_path / "gate0" / "gate.log").read_text()
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in log, log


def test_every_metric_is_in_the_operations_guide(gate_factory):
    """docs/operations.md's table names exactly what smtpgate/metrics.py defines, and every
    family a real gate exposes is in it."""
    repo = Path(__file__).resolve().parents[2]
    doc = (repo / "docs" / "operations.md").read_text()
    section = doc[doc.index("## Metrics"):doc.index("### `/healthz`")]
    documented = set(re.findall(r"^\| `(smtpgate_\w+)`", section, re.M))
    source = (repo / "smtpgate" / "metrics.py").read_text()
    defined = {name + ("_total" if kind == "Counter" else "") for kind, name in
               re.findall(r'(Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*"(smtpgate_\w+)"', source)}
    assert documented == defined
    mport = free_port()
    gate_factory(config={"metrics": f"127.0.0.1:{mport}"})
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    exposed = {re.sub(r"_(bucket|count|sum)$", "", name.split("{")[0]) for name in scrape(mport)}
    assert exposed <= documented, exposed - documented


def test_dns_queries_and_cache_hits(gate_factory, downstream):
    from tests.support.dnsserver import DnsServer
    policy = ("domains: [example.com]\nrules:\n  - dnsbl:\n      check_private: true\n"
              "      lists: [{zone: bl.test, answers: [127.0.0.2]}]\n")
    with DnsServer({"bl.test": {"2.0.0.127": {"A": "127.0.0.2"}}}) as ns:
        mport = free_port()
        gate = gate_factory(policies={"default.yaml": policy}, config={
            "metrics": f"127.0.0.1:{mport}", "dns": {"nameservers": [f"127.0.0.1:{ns.port}"]}})
        for _ in range(2):  # the second asks the cache (the NXDOMAIN is kept its negative TTL)
            with gate.smtp() as client:
                client.sendmail("alice@sender.test", ["bob@example.com"], b"Subject: x\r\n\r\nx\r\n")
        downstream.wait_for_messages(2)
        samples = scrape(mport)
        assert ns.count("1.0.0.127.bl.test", "A") == 1
        assert samples['smtpgate_dns_queries_total{type="A"}'] == len(ns.queries) == 1
        assert samples["smtpgate_dns_cache_hits_total"] == 1
        assert samples['smtpgate_rule_verdicts_total{action="continue",rule="dnsbl",shadow="false"}'] == 4  # MAIL and RCPT
        assert samples['smtpgate_rule_duration_seconds_count{rule="dnsbl"}'] == 4
        gate.stop()


def test_a_killed_worker_keeps_its_counts_and_drops_its_open_connections(gate_factory):
    import signal
    mport = free_port()
    gate = gate_factory(config={"workers": 2, "metrics": f"127.0.0.1:{mport}"})
    healthz = f"http://127.0.0.1:{mport}/healthz"
    assert wait_until(lambda: get(healthz)[0] == 200, 20)
    base = scrape(mport)["smtpgate_connections_total"]
    with gate.smtp() as client:
        client.sendmail("alice@sender.test", ["bob@example.com"], b"Subject: x\r\n\r\nx\r\n")
    held = smtplib.SMTP(gate.host, gate.port, timeout=10)
    held.ehlo("client.test")
    victim = worker_of(gate.pid, gate.port, held.sock.getsockname()[1])
    assert victim is not None
    assert scrape(mport)["smtpgate_connections_open"] == 1
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: scrape(mport)["smtpgate_connections_open"] == 0, 10)
    held.close()
    assert wait_until(lambda: get(healthz)[0] == 200, 20)  # the replacement listens
    samples = scrape(mport)
    assert samples["smtpgate_connections_total"] == base + 2
    assert samples['smtpgate_transactions_total{reply_class="2xx",rule="none"}'] == 1
    assert gate.stop() == 0


def test_quarantine_size_and_store_errors(gate_factory, downstream, tmp_path):
    from tests.support import attachment_samples as S
    raw = S.multipart(S.text_part(), S.part(S.pe(), "a.exe"))
    policy = "domains: [example.com]\nrules:\n  - attachments: {action: quarantine}\n"
    broken = tmp_path / "not-a-folder"
    broken.write_text("a file where the quarantine Maildir should be\n")
    for quarantine, reply in ((tmp_path / "q", 554), (broken, 451)):
        mport = free_port()
        gate = gate_factory(policies={"default.yaml": policy},
                            config={"metrics": f"127.0.0.1:{mport}", "quarantine": str(quarantine)})
        with gate.smtp() as client:
            client.ehlo("client.test")
            client.mail("alice@sender.test")
            client.rcpt("bob@example.com")
            assert client.data(raw)[0] == reply
        samples = scrape(mport)
        if reply == 554:
            assert samples["smtpgate_quarantine_messages"] == 1
            assert samples['smtpgate_transactions_total{reply_class="5xx",rule="attachments"}'] == 1
            assert samples["smtpgate_store_errors_total"] == 0
        else:
            assert "smtpgate_quarantine_messages" not in samples  # not a Maildir: not counted
            assert samples['smtpgate_transactions_total{reply_class="4xx",rule="gate"}'] == 1
            assert samples["smtpgate_store_errors_total"] == 1
        assert gate.stop() == 0


def test_connections_refused_by_max_connections_and_by_the_limits_rule(gate_factory, tmp_path):
    mport = free_port()
    policy = "domains: [example.com]\nrules:\n  - limits: {connections: 1}\n"
    gate = gate_factory(policies={"default.yaml": policy}, config={
        "metrics": f"127.0.0.1:{mport}", "state": f"sqlite://{tmp_path}/state.db",
        "limits": {"max_connections": 2, "max_connections_per_client": 5}})
    assert wait_until(lambda: get(f"http://127.0.0.1:{mport}/healthz")[0] == 200, 20)
    base = scrape(mport)

    def greeting(source: str) -> int:
        client = smtplib.SMTP(timeout=10, source_address=(source, 0))
        code = client.connect(gate.host, gate.port)[0]
        opened.append(client)
        return code

    opened: list[smtplib.SMTP] = []
    assert greeting("127.0.0.1") == 220
    assert greeting("127.0.0.1") == 421  # the limits rule: one at a time per client
    assert wait_until(lambda: scrape(mport)["smtpgate_connections_open"] == 1, 10)
    assert greeting("127.0.0.2") == 220
    assert greeting("127.0.0.3") == 421  # max_connections: 2
    after = scrape(mport)
    assert after["smtpgate_connections_refused_total"] - base.get("smtpgate_connections_refused_total", 0) == 2
    assert after["smtpgate_connections_total"] - base["smtpgate_connections_total"] == 4
    for client in opened:
        client.close()
    assert wait_until(lambda: scrape(mport)["smtpgate_connections_open"] == 0, 10)
