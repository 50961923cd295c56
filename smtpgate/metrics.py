"""Prometheus metrics (``metrics: HOST:PORT``): the only module importing prometheus_client.

Multiprocess mode: each worker writes its figures to files in a private directory the
supervisor makes before forking (``prepare``), and the supervisor (or a gate of one process)
answers ``/metrics`` by summing every worker's files. A dead worker's gauges are dropped
(``worker_died``); its counters stay, so totals never go backwards when a worker is replaced.

Until ``prepare`` runs, every recording function here is a no-op and prometheus_client is
not even imported: it reads PROMETHEUS_MULTIPROC_DIR when imported, and a gate without
``metrics:`` (and the in-process tests) pay nothing.

The same port answers ``/healthz``: 200 "ok" when the listeners serve and the downstream
answers its greeting (a connection made by the health check itself, short timeout), else
503 with the reason.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("smtpgate.metrics")

HEALTH_TIMEOUT = 3.0  # seconds the health check gives the downstream to greet
_m = None  # the metric objects once prepared (a _Metrics)
_listening = False  # a gate of one process: its listeners serve (set by the server)

# Rule runs are mostly sub-millisecond (a header check) up to DNS-bound seconds.
RULE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DOWNSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self.connections_open = Gauge(
            "smtpgate_connections_open", "Client connections open now",
            multiprocess_mode="livesum")
        self.connections = Counter("smtpgate_connections", "Client connections accepted")
        self.connections_refused = Counter(
            "smtpgate_connections_refused", "Connections refused by max_connections limits (421)")
        self.transactions = Counter(
            "smtpgate_transactions", "Transactions ended, by final reply class and deciding rule",
            ["reply_class", "rule"])
        self.verdicts = Counter(
            "smtpgate_rule_verdicts", "Rule runs by rule, action and shadow mode",
            ["rule", "action", "shadow"])
        self.rule_seconds = Histogram(
            "smtpgate_rule_duration_seconds", "Time one rule run took", ["rule"],
            buckets=RULE_BUCKETS)
        self.downstream_seconds = Histogram(
            "smtpgate_downstream_data_duration_seconds",
            "Time from DATA to the downstream's final reply", buckets=DOWNSTREAM_BUCKETS)
        self.downstream_sessions = Counter(
            "smtpgate_downstream_sessions", "Downstream sessions transactions got, by how",
            ["how"])
        self.pool_idle = Gauge(
            "smtpgate_downstream_pool_idle", "Idle downstream sessions in the pool now",
            multiprocess_mode="livesum")
        self.pool_closed = Counter(
            "smtpgate_downstream_pool_closed",
            "Downstream sessions closed instead of reused, by reason", ["reason"])
        self.dns_queries = Counter("smtpgate_dns_queries", "DNS queries sent", ["type"])
        self.dns_cache_hits = Counter("smtpgate_dns_cache_hits", "DNS answers served from the cache")
        self.store_errors = Counter(
            "smtpgate_store_errors", "State store or quarantine failures met by a transaction")
        # Labelled children looked up once and kept: ``labels()`` costs ~1.6 µs (argument
        # checks, str() of each value, a lock) and transaction_ended needed it twice per trace
        # entry. Keyed by the raw values; bounded like prometheus_client's own table of
        # children, which already keeps every label set ever used (rule names, actions,
        # reply classes, DNS types: closed sets per configuration).
        self.verdict_children = _Children(self.verdicts, lambda rule, action, shadow: (
            rule, action, "true" if shadow else "false"))
        self.rule_seconds_children = _Children(self.rule_seconds)
        self.transaction_children = _Children(self.transactions)
        self.dns_query_children = _Children(self.dns_queries)
        self.downstream_session_children = _Children(self.downstream_sessions)
        self.pool_closed_children = _Children(self.pool_closed)


class _Children(dict):
    """A metric's labelled children by their raw label values (a tuple, or one value):
    ``labels()`` on the first use of a key, a dict lookup after it."""

    def __init__(self, metric, labels=lambda *values: values):
        super().__init__()
        self.metric, self.labels = metric, labels

    def __missing__(self, key):
        child = self[key] = self.metric.labels(*self.labels(*(key if isinstance(key, tuple) else (key,))))
        return child


# --- set-up (supervisor, before forking) ------------------------------------------------

def prepare() -> str:
    """Make the private multiprocess directory and the metrics; returns the directory."""
    global _m
    directory = tempfile.mkdtemp(prefix="smtpgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _m = _Metrics()
    return directory


def cleanup(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def worker_died(pid: int) -> None:
    if _m is not None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def set_listening(up: bool) -> None:
    global _listening
    _listening = up


def listening() -> str | None:
    """The health of a gate of one process: None when its listeners serve."""
    return None if _listening else "not listening"


# --- recording (workers) -----------------------------------------------------------------

def connection_opened() -> None:
    if _m is not None:
        _m.connections.inc()
        _m.connections_open.inc()


def connection_closed() -> None:
    if _m is not None:
        _m.connections_open.dec()


def connection_refused() -> None:
    if _m is not None:
        _m.connections_refused.inc()


def transaction_ended(code: int | None, trace) -> None:
    """One transaction's outcome and its trace: the verdicts and rule timings."""
    if _m is None:
        return
    m = _m
    decider, decided = "none", None
    runs: dict = {}  # verdict child -> its runs here: one file write each, not one per run
    for entry in trace:
        verdict = m.verdict_children[(entry.rule, entry.action, entry.shadow)]
        runs[verdict] = runs.get(verdict, 0) + 1
        if entry.rule != "gate":
            m.rule_seconds_children[entry.rule].observe(entry.ms / 1000.0)
        if entry.action == "error" and _is_store_error(entry.reason):
            m.store_errors.inc()
        held = entry.rule == "gate" and entry.action == "quarantine"  # the rule's verdict decided
        if not entry.shadow and entry.action != "continue" and not held:
            decider, decided = entry.rule, entry.reply  # the last one that acted decided
    for verdict, n in runs.items():
        verdict.inc(n)  # whole numbers: the same float as n increments of 1
    if code is None and decided and decided[:3].isdigit():
        code = int(decided[:3])  # no DATA reply: the refusal that ended it (RCPT, MAIL)
    reply_class = f"{code // 100}xx" if code else "none"
    m.transaction_children[(reply_class, decider)].inc()


def _is_store_error(reason: str | None) -> bool:
    # the runner writes "StoreError: ..." (or a subclass's name); the quarantine its own text
    return bool(reason) and (reason.split(":", 1)[0].endswith("StoreError")
                             or reason.startswith("quarantine failed") or reason.startswith("Busy:"))


def downstream_data(seconds: float) -> None:
    if _m is not None:
        _m.downstream_seconds.observe(seconds)


def downstream_session(how: str) -> None:
    """A transaction got a downstream session: ``pooled`` (taken from the pool) or ``new``."""
    if _m is not None:
        _m.downstream_session_children[how].inc()


def pool_idle(sessions: int) -> None:
    """This worker's idle pooled sessions now (the scrape adds up the live workers')."""
    if _m is not None:
        _m.pool_idle.set(sessions)


def pool_closed(reason: str) -> None:
    """A downstream session closed instead of reused (``smtp/pool.py``'s reasons)."""
    if _m is not None:
        _m.pool_closed_children[reason].inc()


def dns_query(rdtype: str) -> None:
    if _m is not None:
        _m.dns_query_children[rdtype].inc()


def dns_cache_hit() -> None:
    if _m is not None:
        _m.dns_cache_hits.inc()


# --- serving (supervisor, or a gate of one process) --------------------------------------

def _store_error() -> None:
    if _m is not None:
        _m.store_errors.inc()


def _at_scrape(quarantine: Path | None, state: str | None):
    """Figures read when scraped, not kept by workers: the quarantine's waiting messages,
    the state's entry counts (``stores/counts.py``: cheap, bounded, left out on failure)."""
    from prometheus_client.core import GaugeMetricFamily
    from .stores.counts import counter_for
    entries = counter_for(state, _store_error) if state else None

    class AtScrape:
        def collect(self):
            counts = entries.read() if entries is not None else None
            if counts is not None:
                greylist = GaugeMetricFamily("smtpgate_greylist_entries",
                                             "Live greylist triplets by state", labels=["state"])
                for state_name, n in sorted(counts.greylist.items()):
                    greylist.add_metric([state_name], n)
                yield greylist
                senders = GaugeMetricFamily("smtpgate_sender_entries",
                                            "Live sender-state records by machine and state",
                                            labels=["machine", "state"])
                for (machine, state_name), n in sorted(counts.senders.items()):
                    senders.add_metric([machine, state_name], n)
                yield senders
            yield from self.quarantine()

        def quarantine(self):
            if quarantine is None:
                return
            try:
                with os.scandir(quarantine / "new") as it:
                    count = sum(1 for e in it if not e.name.startswith("."))
            except FileNotFoundError:  # nothing held yet: the Maildir is made at the first
                count = 0
            except OSError:
                return
            yield GaugeMetricFamily("smtpgate_quarantine_messages",
                                    "Messages in the quarantine Maildir's new/", value=count)
    return AtScrape()


def downstream_greets(host: str, port: int, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """None when the downstream answers with a 220 greeting; else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            greeting = sock.makefile("rb").readline(1024)
            if not greeting.startswith(b"220"):
                return f"downstream {host}:{port} greeted {greeting[:40]!r}"
            sock.sendall(b"QUIT\r\n")
    except OSError as e:
        return f"downstream {host}:{port} unreachable ({type(e).__name__})"
    return None


class MetricsServer:
    """/metrics and /healthz on a small threaded HTTP server (a daemon thread)."""

    def __init__(self, address: tuple[str, int], quarantine: Path | None,
                 listeners: Callable[[], str | None], downstream: tuple[str, int],
                 state: str | None = None) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(_at_scrape(quarantine, state))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    why = listeners() or downstream_greets(*downstream)
                    self._send(503 if why else 200, f"{why or 'ok'}\n".encode(),
                               "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        host, port = address
        server_class = ThreadingHTTPServer
        if ":" in host:
            server_class = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        log.info("metrics: serving /metrics and /healthz on %s:%s", *self.httpd.server_address[:2])
        return self

    def forget(self) -> None:
        """In a forked worker: close the inherited listening socket (the thread stayed behind)."""
        self.httpd.socket.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
