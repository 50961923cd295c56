"""``smtpgate.metrics``' recording functions against the ``/metrics`` text they produce: the
exposition after a known set of transactions, byte for byte, and each labelled child looked
up once (``labels()`` is not called per message). Each test runs in a fresh interpreter:
``metrics.prepare`` points prometheus_client at a multiprocess folder for the whole process."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RECORD = textwrap.dedent('''
    import sys
    from smtpgate import metrics
    from smtpgate.mail.session import TraceEntry as T

    folder = metrics.prepare()
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client import metrics as client
    from prometheus_client.multiprocess import MultiProcessCollector

    looked_up = []
    labels = client.MetricWrapperBase.labels
    def counted(self, *values):
        looked_up.append((self._name, values))
        return labels(self, *values)
    client.MetricWrapperBase.labels = counted
    verdict_writes = []
    inc = client.Counter.inc
    def counted_inc(self, amount=1, exemplar=None):
        if self._name == "smtpgate_rule_verdicts":
            verdict_writes.append(amount)
        return inc(self, amount, exemplar)
    client.Counter.inc = counted_inc

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    def scrape():
        return generate_latest(registry).decode()

    relayed = [T("mail", "senders", "continue", ms=0.1024), T("rcpt", "greylist", "continue", ms=0.0711),
               T("data", "senders", "continue", ms=0.018), T("data", "attachments", "continue", ms=1.37),
               T("data", "rewrite", "continue", ms=12.5), T("end", "senders", "continue", ms=0.0591)]
    refused = [T("mail", "senders", "continue", ms=0.2),
               T("rcpt", "greylist", "tempfail", "greylisted", "451 4.7.1 try later", ms=3.3),
               T("rcpt", "dnsbl", "reject", "listed", "554 5.7.1 listed", ms=700.0, shadow=True)]
    failed = [T("mail", "senders", "error", "SenderStoreError: down", ms=0.9),
              T("data", "gate", "quarantine", "held as q1"), T("data", "spam", "quarantine", ms=2600.0)]
    before = scrape()
    for n in range(int(sys.argv[1])):
        metrics.connection_opened()
        metrics.transaction_ended(250, relayed)
        metrics.transaction_ended(None, refused)
        metrics.transaction_ended(250, failed)
        metrics.downstream_data(0.0123)
        metrics.dns_query("A")
        metrics.dns_query("TXT")
        metrics.dns_cache_hit()
        metrics.downstream_session("new")
        metrics.downstream_session("pooled")
        metrics.downstream_session("pooled")
        metrics.pool_closed("max_uses")
        metrics.pool_idle(n + 1)
    metrics.pool_closed("idle")
    metrics.connection_closed()
    metrics.connection_refused()
    print(before + "----\\n" + scrape() + "----")
    print(len(set(looked_up)), len(looked_up), len(verdict_writes), sum(verdict_writes))
    metrics.cleanup(folder)
''')


def record(transactions: int) -> tuple[str, str, list[int]]:
    done = subprocess.run([sys.executable, "-c", RECORD, str(transactions)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after, lookups = done.stdout.split("----\n")
    return before, after, [int(n) for n in lookups.split()]


def by_family(text: str) -> str:
    """The exposition with its metric families sorted: prometheus_client lists them in the
    order it finds the multiprocess files in the folder (the file system's), each family's
    text itself is as written."""
    blocks = ["# HELP " + block for block in text.split("# HELP ")[1:]]
    assert "".join(blocks) == text
    return "".join(sorted(blocks))


# written by main before the labelled children were kept (e987b96), same transactions; with
# the downstream pool's families since (checked by eye against the calls above)
EXPECTED_BEFORE = """\
# HELP smtpgate_connections_open Client connections open now
# TYPE smtpgate_connections_open gauge
smtpgate_connections_open 0.0
# HELP smtpgate_connections_refused_total Connections refused by max_connections limits (421)
# TYPE smtpgate_connections_refused_total counter
smtpgate_connections_refused_total 0.0
# HELP smtpgate_connections_total Client connections accepted
# TYPE smtpgate_connections_total counter
smtpgate_connections_total 0.0
# HELP smtpgate_dns_cache_hits_total DNS answers served from the cache
# TYPE smtpgate_dns_cache_hits_total counter
smtpgate_dns_cache_hits_total 0.0
# HELP smtpgate_downstream_data_duration_seconds Time from DATA to the downstream's final reply
# TYPE smtpgate_downstream_data_duration_seconds histogram
smtpgate_downstream_data_duration_seconds_sum 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.005"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.01"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.025"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.05"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.1"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.25"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.5"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="1.0"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="2.5"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="5.0"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="10.0"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="30.0"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="60.0"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="+Inf"} 0.0
smtpgate_downstream_data_duration_seconds_count 0.0
# HELP smtpgate_downstream_pool_idle Idle downstream sessions in the pool now
# TYPE smtpgate_downstream_pool_idle gauge
smtpgate_downstream_pool_idle 0.0
# HELP smtpgate_store_errors_total State store or quarantine failures met by a transaction
# TYPE smtpgate_store_errors_total counter
smtpgate_store_errors_total 0.0
"""

EXPECTED_AFTER_TWO = """\
# HELP smtpgate_connections_open Client connections open now
# TYPE smtpgate_connections_open gauge
smtpgate_connections_open 1.0
# HELP smtpgate_connections_refused_total Connections refused by max_connections limits (421)
# TYPE smtpgate_connections_refused_total counter
smtpgate_connections_refused_total 1.0
# HELP smtpgate_connections_total Client connections accepted
# TYPE smtpgate_connections_total counter
smtpgate_connections_total 2.0
# HELP smtpgate_dns_cache_hits_total DNS answers served from the cache
# TYPE smtpgate_dns_cache_hits_total counter
smtpgate_dns_cache_hits_total 2.0
# HELP smtpgate_dns_queries_total DNS queries sent
# TYPE smtpgate_dns_queries_total counter
smtpgate_dns_queries_total{type="A"} 2.0
smtpgate_dns_queries_total{type="TXT"} 2.0
# HELP smtpgate_downstream_data_duration_seconds Time from DATA to the downstream's final reply
# TYPE smtpgate_downstream_data_duration_seconds histogram
smtpgate_downstream_data_duration_seconds_sum 0.0246
smtpgate_downstream_data_duration_seconds_bucket{le="0.005"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.01"} 0.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.025"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.05"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.1"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.25"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="0.5"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="1.0"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="2.5"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="5.0"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="10.0"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="30.0"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="60.0"} 2.0
smtpgate_downstream_data_duration_seconds_bucket{le="+Inf"} 2.0
smtpgate_downstream_data_duration_seconds_count 2.0
# HELP smtpgate_downstream_pool_closed_total Downstream sessions closed instead of reused, by reason
# TYPE smtpgate_downstream_pool_closed_total counter
smtpgate_downstream_pool_closed_total{reason="max_uses"} 2.0
smtpgate_downstream_pool_closed_total{reason="idle"} 1.0
# HELP smtpgate_downstream_pool_idle Idle downstream sessions in the pool now
# TYPE smtpgate_downstream_pool_idle gauge
smtpgate_downstream_pool_idle 2.0
# HELP smtpgate_downstream_sessions_total Downstream sessions transactions got, by how
# TYPE smtpgate_downstream_sessions_total counter
smtpgate_downstream_sessions_total{how="new"} 2.0
smtpgate_downstream_sessions_total{how="pooled"} 4.0
# HELP smtpgate_rule_duration_seconds Time one rule run took
# TYPE smtpgate_rule_duration_seconds histogram
smtpgate_rule_duration_seconds_sum{rule="senders"} 0.0025590000000000005
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="senders"} 8.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="senders"} 10.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="senders"} 10.0
smtpgate_rule_duration_seconds_count{rule="senders"} 10.0
smtpgate_rule_duration_seconds_sum{rule="greylist"} 0.0067422
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="greylist"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="greylist"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="greylist"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="greylist"} 4.0
smtpgate_rule_duration_seconds_count{rule="greylist"} 4.0
smtpgate_rule_duration_seconds_sum{rule="attachments"} 0.0027400000000000002
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="attachments"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="attachments"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="attachments"} 2.0
smtpgate_rule_duration_seconds_count{rule="attachments"} 2.0
smtpgate_rule_duration_seconds_sum{rule="rewrite"} 0.025
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="rewrite"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="rewrite"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="rewrite"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="rewrite"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="rewrite"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_count{rule="rewrite"} 2.0
smtpgate_rule_duration_seconds_sum{rule="dnsbl"} 1.4
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="dnsbl"} 0.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_count{rule="dnsbl"} 2.0
smtpgate_rule_duration_seconds_sum{rule="spam"} 5.2
smtpgate_rule_duration_seconds_bucket{le="0.0005",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.001",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.0025",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.005",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.01",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.025",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.05",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.1",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.25",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="0.5",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="1.0",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="2.5",rule="spam"} 0.0
smtpgate_rule_duration_seconds_bucket{le="5.0",rule="spam"} 2.0
smtpgate_rule_duration_seconds_bucket{le="10.0",rule="spam"} 2.0
smtpgate_rule_duration_seconds_bucket{le="+Inf",rule="spam"} 2.0
smtpgate_rule_duration_seconds_count{rule="spam"} 2.0
# HELP smtpgate_rule_verdicts_total Rule runs by rule, action and shadow mode
# TYPE smtpgate_rule_verdicts_total counter
smtpgate_rule_verdicts_total{action="continue",rule="senders",shadow="false"} 8.0
smtpgate_rule_verdicts_total{action="continue",rule="greylist",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="continue",rule="attachments",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="continue",rule="rewrite",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="tempfail",rule="greylist",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="reject",rule="dnsbl",shadow="true"} 2.0
smtpgate_rule_verdicts_total{action="error",rule="senders",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="quarantine",rule="gate",shadow="false"} 2.0
smtpgate_rule_verdicts_total{action="quarantine",rule="spam",shadow="false"} 2.0
# HELP smtpgate_store_errors_total State store or quarantine failures met by a transaction
# TYPE smtpgate_store_errors_total counter
smtpgate_store_errors_total 2.0
# HELP smtpgate_transactions_total Transactions ended, by final reply class and deciding rule
# TYPE smtpgate_transactions_total counter
smtpgate_transactions_total{reply_class="2xx",rule="none"} 2.0
smtpgate_transactions_total{reply_class="4xx",rule="greylist"} 2.0
smtpgate_transactions_total{reply_class="2xx",rule="spam"} 2.0
"""


@pytest.mark.timeout(90)
def test_the_exposition_before_and_after_known_transactions_is_exactly_the_expected_text():
    before, after, _ = record(2)
    assert by_family(before) == EXPECTED_BEFORE
    assert by_family(after) == EXPECTED_AFTER_TWO


@pytest.mark.timeout(90)
def test_each_label_set_is_looked_up_once_not_per_message():
    _, _, (distinct, calls, _, _) = record(50)
    # verdicts 9 (the shadow dnsbl and the gate's own included), rule timings 6,
    # transactions 3, DNS types 2, downstream sessions 2, pool closing reasons 2
    assert (distinct, calls) == (24, 24)


@pytest.mark.timeout(90)
def test_a_rule_run_several_times_in_a_transaction_is_counted_in_one_write():
    _, _, (_, _, writes, runs) = record(50)
    # the relayed trace's three senders runs with one outcome: one write for them
    assert (writes, runs) == (50 * (4 + 3 + 3), 50 * (6 + 3 + 3))
