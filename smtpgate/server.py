"""``smtpgate serve``: listening sockets, worker processes, signals and reload."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import time

from .smtp.connections import ConnectionTable, ConnectionTracker
from .errors import ConfigError, PluginError, StoreError
from .smtp.front import GateSMTP
from .runtime.gate import Gate
from .runtime.loading import load_runtime
from .stores.quarantine import MaildirQuarantine
from .smtp.relay import probe
from .mail.reply import Reply
from .units import format_duration

log = logging.getLogger("smtpgate.server")
SHUTDOWN_GRACE = 60.0  # seconds to let transactions in flight finish after SIGTERM
PURGE_INTERVAL = 86400.0  # the quarantine's retention is enforced at start-up, then daily


def serve(cli_path: str | None) -> int:
    try:
        runtime = load_runtime(cli_path)
    except (ConfigError, PluginError) as e:
        print(f"smtpgate: configuration refused:\n{e}", file=sys.stderr)
        return 2
    cfg = runtime.config
    from .logs import setup_logging
    setup_logging(cfg.log.format, cfg.log.level)
    if cfg.workers <= 1:
        return run_worker(cli_path, runtime, housekeeper=True)
    return supervise(cli_path, runtime, cfg.workers)


def run_worker(cli_path, runtime, housekeeper: bool = False,
               tracker: ConnectionTracker | None = None) -> int:
    """One serving process; the ``housekeeper`` (one per gate) also purges the quarantine.
    ``tracker``: its slot in the gate's connection table (a table of its own when alone)."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(_serve(cli_path, runtime, housekeeper, tracker or ConnectionTracker()))
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1


def _tls_context(cfg) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    return ctx


async def _serve(cli_path, runtime, housekeeper: bool = False,
                 tracker: ConnectionTracker | None = None) -> int:
    loop = asyncio.get_running_loop()
    cfg = runtime.config
    gate = Gate(runtime, quarantine=MaildirQuarantine(cfg.quarantine, mode=cfg.quarantine_mode))
    gate.draining = False
    tracker = tracker or ConnectionTracker()
    tls_ctx = _tls_context(cfg)
    await probe(cfg.downstream, cfg.hostname, gate.capabilities)
    servers = []
    for host, port in cfg.listen:
        servers.append(await loop.create_server(
            lambda: GateSMTP(gate, tracker, tls_ctx), host, port, reuse_port=True, backlog=1024))
        log.info("listening on %s:%s, relaying to %s:%s", host, port,
                 cfg.downstream.host, cfg.downstream.port)
    purging = asyncio.ensure_future(_purge_quarantine(gate)) if housekeeper else None
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(gate, cli_path)))
    await stop.wait()

    log.info("stopping: no new connections, finishing transactions in flight")
    gate.draining = True
    if purging is not None:
        purging.cancel()
    for server in servers:
        server.close()
    deadline = loop.time() + SHUTDOWN_GRACE
    while loop.time() < deadline and any(p.busy for p in tracker.protocols):
        await asyncio.sleep(0.05)
    bye = Reply(421, f"{cfg.hostname} Service shutting down, try again later", "4.3.2")
    for proto in list(tracker.protocols):
        await proto.hang_up(bye)
    await asyncio.sleep(0)  # let connection_lost callbacks close downstream sessions
    if gate.runtime.stores is not None:
        await gate.runtime.stores.close()
    log.info("stopped")
    return 0


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


async def _reload(gate: Gate, cli_path) -> None:
    """SIGHUP: build the whole new runtime first; swap only if all of it loaded."""
    try:
        runtime = await asyncio.get_running_loop().run_in_executor(
            None, lambda: load_runtime(cli_path, stores=gate.runtime.stores))
    except (ConfigError, PluginError) as e:
        log.error("reload refused, keeping the running configuration:\n%s", e)
        return
    if runtime.config.listen != gate.runtime.config.listen:
        log.warning("listen addresses changed: that takes a restart, the rest is reloaded")
    old = gate.runtime
    gate.swap(runtime)
    if old.stores is not None and old.stores is not runtime.stores:
        await old.stores.close()
    log.info("configuration reloaded from %s", runtime.config.source)


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
    it, and a dead worker's slot is cleared before its replacement takes it over."""
    children: dict[int, tuple[float, int]] = {}  # pid -> (started, slot)
    table = ConnectionTable(workers)
    housekeeper = 0  # the worker that purges the quarantine (its replacement takes over)

    def spawn(slot: int, housekeeping: bool = False) -> None:
        nonlocal housekeeper
        table.clear(slot)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent(parent)
            code = run_worker(cli_path, runtime, housekeeping, ConnectionTracker(table, slot))
            os._exit(code)
        children[pid] = (time.monotonic(), slot)
        if housekeeping:
            housekeeper = pid

    stopping = False

    def forward(sig, _frame):
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in range(workers):
        spawn(slot, housekeeping=slot == 0)
    log.info("started %d worker processes", workers)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        child = children.pop(pid, None)
        if child is None:
            continue
        started, slot = child
        exit_code = os.waitstatus_to_exitcode(code)
        if not stopping:
            log.error("worker %d exited with %s; starting another", pid, exit_code)
            if time.monotonic() - started < 1.0:
                time.sleep(1.0)  # a worker that dies at once must not spin the supervisor
            spawn(slot, housekeeping=pid == housekeeper)
        elif exit_code != 0:
            status = 1
    return status
