"""``smtpgate serve``: listening sockets, worker processes, signals and reload."""
from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import ssl
import sys
import time
from pathlib import Path

from . import metrics
from .smtp.connections import ConnectionTable, ConnectionTracker
from .errors import ConfigError, PluginError, StoreError
from .smtp.front import GateSMTP, settle
from .runtime.collector import settle_for_serving
from .runtime.gate import Gate
from .runtime.loading import load_runtime
from .stores.quarantine import MaildirQuarantine
from .smtp.relay import probe
from .mail.reply import Reply
from .sdnotify import SERVING, SystemdNotifier, WorkerPipe, watchdog_interval
from .units import format_duration

log = logging.getLogger("smtpgate.server")
SHUTDOWN_GRACE = 60.0  # seconds to let transactions in flight finish after SIGTERM
SETTLE_GRACE = 5.0  # seconds for ended sessions to close downstream and give back store slots
PURGE_INTERVAL = 86400.0  # the quarantine's retention is enforced at start-up, then daily


def serve(cli_path: str | None) -> int:
    try:
        runtime = load_runtime(cli_path)
        _tls_context(runtime.config)  # a certificate and key that do not load stop the start
    except (ConfigError, PluginError) as e:
        print(f"smtpgate: configuration refused:\n{e}", file=sys.stderr)
        return 2
    cfg = runtime.config
    from .logs import setup_logging
    setup_logging(cfg.log.format, cfg.log.level)
    # metrics: the private multiprocess directory is made before any fork, removed at exit
    metrics_dir = metrics.prepare() if cfg.metrics is not None else None
    try:
        if cfg.workers <= 1:
            served = _serve_metrics(cfg, metrics.listening)
            if served is False:
                return 1
            return run_worker(cli_path, runtime, housekeeper=True,
                              notifier=SystemdNotifier(), watchdog=watchdog_interval())
        return supervise(cli_path, runtime, cfg.workers)
    finally:
        if metrics_dir is not None:
            metrics.cleanup(metrics_dir)


def _serve_metrics(cfg, listeners):
    """Start /metrics and /healthz when ``metrics:`` is set: the server, None, or False when
    its port cannot be bound (the gate then refuses to start, as for its SMTP port)."""
    if cfg.metrics is None:
        return None
    try:
        return metrics.MetricsServer(
            cfg.metrics, Path(cfg.quarantine) if cfg.quarantine else None, listeners,
            (cfg.downstream.host, cfg.downstream.port), cfg.state).start()
    except OSError as e:
        log.error("metrics: cannot listen on %s:%s: %s", *cfg.metrics, e)
        return False


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_early_stop = False  # SIGTERM/SIGINT came before the event loop could handle it


def _note_early_stop(_sig, _frame) -> None:
    global _early_stop
    _early_stop = True


def _handle_signals_early() -> None:
    """Until the event loop handles them: a stop is remembered (then drained), a reload is
    moot (the worker is loading the current configuration anyway)."""
    signal.signal(signal.SIGTERM, _note_early_stop)
    signal.signal(signal.SIGINT, _note_early_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run_worker(cli_path, runtime, housekeeper: bool = False,
               tracker: ConnectionTracker | None = None,
               notifier: SystemdNotifier | WorkerPipe | None = None,
               watchdog: float | None = None) -> int:
    """One serving process; the ``housekeeper`` (one per gate) also purges the quarantine.
    ``tracker``: its slot in the gate's connection table (a table of its own when alone).
    ``notifier``: told when the worker serves, reloads, stops, and every ``watchdog`` seconds
    that its event loop still runs (systemd itself, or the pipe to the supervisor)."""
    _handle_signals_early()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(_serve(cli_path, runtime, housekeeper, tracker or ConnectionTracker(),
                                  notifier or SystemdNotifier(""), watchdog))
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    except ConfigError as e:  # the certificate broke since the gate started
        log.error("cannot serve: %s", e)
        return 1


def _tls_context(cfg) -> ssl.SSLContext | None:
    """Inbound STARTTLS: TLS 1.2 or later, the configured TLS 1.2 ciphers, the certificate
    and key as the files hold them now (read again on every reload, so a renewed certificate
    is served without a restart). ConfigError when the pair does not load."""
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.tls.ciphers:
        ctx.set_ciphers(cfg.tls.ciphers)  # checked when the configuration was read
    try:
        ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    except (ssl.SSLError, OSError) as e:
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"tls: cannot use the certificate {cfg.tls.cert} with the key "
                          f"{cfg.tls.key}: {why}") from None
    return ctx


async def _serve(cli_path, runtime, housekeeper: bool = False,
                 tracker: ConnectionTracker | None = None,
                 notifier: SystemdNotifier | WorkerPipe | None = None,
                 watchdog: float | None = None) -> int:
    loop = asyncio.get_running_loop()
    cfg = runtime.config
    gate = Gate(runtime, quarantine=MaildirQuarantine(cfg.quarantine, mode=cfg.quarantine_mode))
    gate.draining = False
    tracker = tracker or ConnectionTracker()
    gate.tls_context = _tls_context(cfg)  # replaced by a reload
    notifier = notifier or SystemdNotifier("")
    stop = asyncio.Event()

    def on_stop() -> None:
        notifier.stopping()
        stop.set()

    def on_reload() -> None:
        notifier.reloading()
        asyncio.ensure_future(_reload(gate, cli_path, notifier))

    # Signals are handled before the first socket listens: a SIGTERM at any moment drains.
    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    if _early_stop:  # asked to stop before the event loop ran
        on_stop()
    await probe(cfg.downstream, cfg.hostname, gate.capabilities)
    settle_for_serving()  # all is loaded: spare the collector from scanning it per message
    servers = []
    for host, port in cfg.listen:
        servers.append(await loop.create_server(
            lambda: GateSMTP(gate, tracker, gate.tls_context), host, port, reuse_port=True,
            backlog=1024))
        log.info("listening on %s:%s, relaying to %s:%s", host, port,
                 cfg.downstream.host, cfg.downstream.port)
    purging = asyncio.ensure_future(_purge_quarantine(gate)) if housekeeper else None
    # Ready once it listens and its signals are handled (a SIGTERM right after must drain).
    notifier.ready(f"listening on {', '.join(f'{h}:{p}' for h, p in cfg.listen)}")
    metrics.set_listening(True)
    beating = asyncio.ensure_future(_heartbeat(notifier, watchdog)) if watchdog else None
    await stop.wait()

    log.info("stopping: no new connections, finishing transactions in flight")
    gate.draining = True
    await gate.pool.close(timeout=0)  # idle downstream sessions QUIT; none is kept from now on
    metrics.set_listening(False)
    if purging is not None:
        purging.cancel()
    for server in servers:
        server.close()
    deadline = loop.time() + SHUTDOWN_GRACE
    while loop.time() < deadline and any(p.busy for p in tracker.protocols):
        await asyncio.sleep(0.05)
    bye = Reply(421, f"{cfg.hostname} Service shutting down, try again later", "4.3.2")
    for proto in list(tracker.protocols):
        await proto.hang_up(bye, linger=False)  # closed now: the stores close next
    await asyncio.sleep(0)  # let connection_lost callbacks close downstream sessions
    await settle(SETTLE_GRACE)  # and give back what the sessions held in the stores
    await gate.pool.close(timeout=SETTLE_GRACE)  # their QUITs said
    if gate.runtime.stores is not None:
        await gate.runtime.stores.close()
    if beating is not None:
        beating.cancel()
    log.info("stopped")
    return 0


async def _heartbeat(notifier, interval: float) -> None:
    """WATCHDOG=1 (or its pipe byte) from the event loop itself: a stuck loop stops it."""
    while True:
        notifier.alive()
        await asyncio.sleep(interval)


async def _purge_quarantine(gate: Gate) -> None:
    """Enforce ``quarantine_keep`` now and then daily, in a thread (it lists and deletes files)."""
    while True:
        cfg = gate.runtime.config  # a reload may change the retention
        if cfg.quarantine_keep > 0:
            try:
                gone = await asyncio.to_thread(gate.quarantine.purge, cfg.quarantine_keep)
            except StoreError as e:
                log.error("quarantine purge failed: %s", e)
            else:
                log.log(logging.INFO if gone else logging.DEBUG,
                        "quarantine: purged %d message(s) older than %s from %s", len(gone),
                        format_duration(cfg.quarantine_keep), cfg.quarantine)
        await asyncio.sleep(PURGE_INTERVAL)


async def _reload(gate: Gate, cli_path, notifier=None) -> None:
    """SIGHUP: build the whole new runtime first; swap only if all of it loaded.
    The notifier hears READY=1 once done, whether the new configuration was taken or not."""
    try:
        await _load_and_swap(gate, cli_path)
    finally:
        if notifier is not None:
            notifier.ready()


async def _load_and_swap(gate: Gate, cli_path) -> None:
    try:
        runtime = await asyncio.get_running_loop().run_in_executor(
            None, lambda: load_runtime(cli_path, stores=gate.runtime.stores))
    except (ConfigError, PluginError) as e:
        log.error("reload refused, keeping the running configuration:\n%s", e)
        return
    try:  # the certificate is part of the whole: a broken one refuses the reload
        tls_context = _tls_context(runtime.config)
    except ConfigError as e:
        log.error("reload refused, keeping the running configuration and certificate:\n%s", e)
        if runtime.stores is not None and runtime.stores is not gate.runtime.stores:
            await runtime.stores.close()
        return
    if runtime.config.listen != gate.runtime.config.listen:
        log.warning("listen addresses changed: that takes a restart, the rest is reloaded")
    if runtime.config.metrics != gate.runtime.config.metrics:
        log.warning("metrics address changed: that takes a restart, the rest is reloaded")
    old = gate.runtime
    gate.swap(runtime)
    gate.tls_context = tls_context  # connections from now on; open ones keep their session
    if old.stores is not None and old.stores is not runtime.stores:
        await old.stores.close()
    del old
    settle_for_serving()  # the new runtime joins what the collector no longer scans
    log.info("configuration reloaded from %s", runtime.config.source)


class _Worker:
    """What the supervisor knows of one worker process."""

    def __init__(self, slot: int, fd: int) -> None:
        self.slot = slot
        self.fd = fd            # the read end of the worker's pipe (sdnotify.WorkerPipe)
        self.started = time.monotonic()
        self.serving = False    # it said it listens
        self.heard = self.started


def _current(cli_path, runtime, reloads: int):
    """The configuration a new worker runs: what the gate started with, or after a reload,
    the files as they are now (as its siblings reloaded them), if they still load."""
    if not reloads:
        return runtime
    try:
        current = load_runtime(cli_path)
        _tls_context(current.config)
        return current
    except (ConfigError, PluginError, StoreError) as e:
        log.error("new worker: the configuration does not load, running the one the gate "
                  "started with:\n%s", e)
        return runtime


def _die_with_parent(parent: int) -> None:
    """A worker whose supervisor is gone (even SIGKILLed) must not serve on alone, with nobody
    to restart, reload or stop it: Linux sends it SIGTERM (a drain) when the parent dies."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing watches the parent
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def supervise(cli_path, runtime, workers: int) -> int:
    """Fork ``workers`` processes that each bind the listen addresses with SO_REUSEPORT.

    They share one connection table (made here, before the fork); each worker has a slot in
    it, and a dead worker's slot is cleared before its replacement takes it over.

    The supervisor speaks to systemd for its workers: READY=1 once every one of them listens,
    RELOADING=1 on SIGHUP and READY=1 when all have reloaded, STOPPING=1 on SIGTERM, and
    WATCHDOG=1 only while every serving worker's event loop keeps beating on its pipe."""
    notifier = SystemdNotifier()
    watchdog = watchdog_interval()
    children: dict[int, _Worker] = {}
    table = ConnectionTable(workers)
    housekeeper = 0  # the worker that purges the quarantine (its replacement takes over)
    reloads = 0  # SIGHUPs so far: a replacement worker then loads the configuration anew

    def spawn(slot: int, housekeeping: bool = False) -> None:
        nonlocal housekeeper
        table.clear(slot)
        read_end, write_end = os.pipe()
        parent = os.getpid()
        # Signals wait while the child swaps the supervisor's handlers for a worker's: a
        # SIGTERM right after the fork is then a drain in the worker, never a forward.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle_signals_early()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(wake_read)
            os.close(wake_write)
            os.close(read_end)
            for other in children.values():
                os.close(other.fd)
            _die_with_parent(parent)
            if served:
                served.forget()
            code = run_worker(cli_path, _current(cli_path, runtime, reloads),
                              housekeeping, ConnectionTracker(table, slot),
                              WorkerPipe(write_end), watchdog)
            os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_end)
        children[pid] = _Worker(slot, read_end)
        if housekeeping:
            housekeeper = pid

    # Signals wake the loop below through this pipe (their numbers are written to it).
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    stopping = False

    def listeners() -> str | None:  # for /healthz, from the metrics thread
        serving = sum(1 for w in list(children.values()) if w.serving)
        if stopping:
            return "stopping"
        return None if serving == workers else f"{serving} of {workers} workers listening"

    served = _serve_metrics(runtime.config, listeners)
    if served is False:
        return 1
    for slot in range(workers):
        spawn(slot, housekeeping=slot == 0)
    log.info("started %d worker processes", workers)

    ready_sent = False
    reloading: set[int] = set()  # pids that have not yet reloaded since the last SIGHUP
    next_ping = time.monotonic() + watchdog if watchdog else None
    status = 0

    def on_signal(sig: int) -> None:
        nonlocal stopping, reloads
        if sig in (signal.SIGTERM, signal.SIGINT):
            if not stopping:
                notifier.stopping()
            stopping = True
        elif sig == signal.SIGHUP and not stopping:
            reloads += 1
            notifier.reloading()
            reloading.clear()
            reloading.update(pid for pid, w in children.items() if w.serving)
            if not reloading:
                notifier.ready()  # no worker serves yet: nothing to wait for
        else:
            return
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass

    def reloaded(pid: int) -> None:
        if pid in reloading:
            reloading.discard(pid)
            if not reloading and not stopping:
                notifier.ready()  # every worker has reloaded (or kept its configuration)

    def on_message(pid: int, data: bytes) -> None:
        nonlocal ready_sent
        worker = children[pid]
        worker.heard = time.monotonic()
        if SERVING in data:
            worker.serving = True
            reloaded(pid)
            if not ready_sent and len(children) == workers and all(
                    w.serving for w in children.values()):
                notifier.ready(f"{workers} worker processes listening")
                ready_sent = True

    def on_exit(pid: int) -> None:
        nonlocal status
        worker = children.pop(pid)
        os.close(worker.fd)
        reloaded(pid)
        try:
            _, code = os.waitpid(pid, 0)
        except ChildProcessError:
            code = 0
        exit_code = os.waitstatus_to_exitcode(code)
        metrics.worker_died(pid)
        if not stopping:
            log.error("worker %d exited with %s; starting another", pid, exit_code)
            if time.monotonic() - worker.started < 1.0:
                time.sleep(1.0)  # a worker that dies at once must not spin the supervisor
            spawn(worker.slot, housekeeping=pid == housekeeper)
        elif exit_code != 0:
            status = 1

    def ping_watchdog() -> None:
        # A worker whose event loop stopped beating for a whole watchdog period is stuck:
        # no ping, so systemd's watchdog restarts the gate.
        now = time.monotonic()
        stuck = [pid for pid, w in children.items() if w.serving and now - w.heard > 2 * watchdog]
        if stuck:
            log.error("worker(s) %s silent for over %.1fs: not pinging the watchdog",
                      ",".join(map(str, stuck)), 2 * watchdog)
        else:
            notifier.alive()

    while children:
        timeout = None if next_ping is None else max(0.0, next_ping - time.monotonic())
        fds = {w.fd: pid for pid, w in children.items()}
        readable, _, _ = select.select([wake_read, *fds], [], [], timeout)
        if wake_read in readable:
            for sig in os.read(wake_read, 64):
                on_signal(sig)
        for fd in readable:
            pid = fds.get(fd)
            if pid is None or pid not in children:
                continue
            data = os.read(fd, 512)
            if data:
                on_message(pid, data)
            else:  # end of file: the worker is gone
                on_exit(pid)
        if next_ping is not None and time.monotonic() >= next_ping:
            ping_watchdog()
            next_ping = time.monotonic() + watchdog
    signal.set_wakeup_fd(-1)
    if served:
        served.stop()
    return status
