"""Run the real gate (``python -m smtpgate serve -c FILE``) as a child process for tests.

The fixtures in conftest.py wrap these; they are plain functions and classes so that a
test module or a benchmark script can use them too.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.constants import LOOPBACK, START_TIMEOUT, STOP_TIMEOUT
from tests.support.procinfo import family, listeners_for, socket_holders, socket_inodes
from tests.support.waiting import wait_until

DEFAULT_POLICIES = {"default.yaml": "domains: [example.com]\nrules: []\n"}
EXTRA_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")  # smtp-sink lives in /usr/sbin


# ---------------------------------------------------------------------------- helpers
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (bound with port 0, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_TOOL_DIRS])
    return shutil.which(name, path=path)


def require_tool(name: str) -> str:
    """The tool's full path; if missing: pytest.fail under CI=true, else pytest.skip."""
    found = find_tool(name)
    if found:
        return found
    msg = f"required tool {name!r} is not installed (make test installs it: Debian packages postfix, swaks)"
    if in_ci():
        pytest.fail(msg + " [CI=true: a missing tool is a failure]", pytrace=False)
    pytest.skip(msg)
    raise AssertionError("unreachable")  # pytest.skip raises


def deep_merge(base: dict, over: Mapping) -> dict:
    """A copy of base with over merged in (dicts recursively; anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_listening(host: str, port: int) -> bool:
    """True when host:port listens (from /proc: no connection the gate would see)."""
    return bool(listeners_for(host, port))


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


class PortTaken(Exception):
    """Another process takes connections on a port meant for our child: free when chosen
    (free_port), it was bound by someone else before the child bound it. Clients would then
    reach that process, not ours (a whole module's messages gone to a stranger's server),
    or both by turns (SO_REUSEPORT, as the gate binds, lets another gate of ours share it)."""


def listens_alone(proc: subprocess.Popen, addrs: list[tuple[str, int]]) -> bool:
    """True when proc (or a process it started) listens on every addr, False while not yet;
    PortTaken when another process takes connections on one (with who it is, when /proc
    lets us see)."""
    listeners = {addr: listeners_for(*addr) for addr in addrs}  # before ours: none is missed
    ours = set().union(*(socket_inodes(pid) for pid in family(proc.pid)))
    for (host, port), inodes in listeners.items():
        if inodes - ours:
            holders = [h for i in sorted(inodes - ours) for h in socket_holders(i)] or ["not visible"]
            raise PortTaken(f"{host}:{port} is {'also ' if inodes & ours else ''}listened on by "
                            f"another process than pid {proc.pid}'s: {', '.join(holders)}")
    return all(listeners.values())


def _await_listening(proc: subprocess.Popen, addrs: list[tuple[str, int]], timeout: float) -> str | None:
    """None once proc listens on every addr; else why not (it exited, or time ran out).
    PortTaken when another process listens there at two looks in a row (at one, it could be
    a worker of ours that exited between the reading of the listeners and of our sockets)."""
    taken: list[PortTaken] = []

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        try:
            listening = listens_alone(proc, addrs)
        except PortTaken as e:
            if taken:
                raise
            taken.append(e)
            return False
        taken.clear()
        return listening

    if not wait_until(ready, timeout, interval=0.05):
        return f"process did not listen on {addrs} within {timeout}s"
    if proc.poll() is not None:
        return f"process exited with {proc.returncode} before listening on {addrs}"
    return None


def wait_listening(proc: subprocess.Popen, addrs: list[tuple[str, int]], timeout: float,
                   describe: Callable[[], str]) -> None:
    """Block until proc (or a process it started) listens on every addr; pytest.fail with
    describe() if proc exits, another process listens there, or time runs out."""
    try:
        problem = _await_listening(proc, addrs, timeout)
    except PortTaken as e:
        problem = str(e)
    if problem:
        stop_pid(proc)
        pytest.fail(f"{problem}\n{describe()}", pytrace=False)


def stop_pid(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Stop one child by its PID: sig, wait up to timeout, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


# ---------------------------------------------------------------------------- the gate
class QuitWaitsForClose(smtplib.SMTP):
    """After its 221, the gate closes the connection only once the session's after-work is
    done (the last transaction's on_end hooks, e.g. the senders event, and its log line).
    This client's QUIT (``quit()`` or leaving ``with``) waits for that close: what a test
    reads next, the state through the CLI or the log, is complete."""

    def docmd(self, cmd, args=""):
        reply = super().docmd(cmd, args)
        if cmd.upper() == "QUIT" and reply[0] == 221 and self.sock is not None:
            if self.file is None:
                self.file = self.sock.makefile("rb")
            while self.file.read(4096):  # until EOF; the socket's timeout bounds the wait
                pass
        return reply


class GateProcess:
    """One running ``smtpgate serve`` child process and the folder it was configured from."""

    def __init__(self, proc: subprocess.Popen, folder: Path, config_path: Path,
                 config: dict, port: int, env: dict[str, str]) -> None:
        self.proc = proc
        self.folder = folder
        self.config_path = config_path
        self.config = config          # the dict written to gate.yaml
        self.port = port              # the first `listen` address's port
        self.host = LOOPBACK
        self.env = env
        self.log_path = folder / "gate.log"         # stderr
        self.stdout_path = folder / "gate.stdout"   # stdout
        self._exit: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 5.0, start: int = 0) -> str:
        """Wait until `text` appears in the log (after character offset `start`); return the log."""
        wait_until(lambda: text in self.log_text()[start:], timeout,
                   what=lambda: f"{text!r} in the gate log\n--- gate log ---\n{self.log_text()}")
        return self.log_text()

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def unhealthy(self) -> str | None:
        """Why this gate cannot be serving a test now (it exited, or another process takes
        connections on its port too), or None: for a gate that many tests share."""
        if not self.is_running():
            return f"the gate exited with {self.proc.returncode}\n--- gate log ---\n{self.log_text()[-3000:]}"
        addrs = _listen_addresses(self.config)
        try:
            return None if listens_alone(self.proc, addrs) else f"the gate does not listen on {addrs}"
        except PortTaken as e:
            return str(e)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit on its own (e.g. after send_signal); return the exit code."""
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by PID, wait up to `timeout`, then SIGKILL. Returns the exit code (idempotent)."""
        if self._exit is None:
            self._exit = stop_pid(self.proc, sig, timeout)
        return self._exit

    def smtp(self, timeout: float = 10.0, local_hostname: str = "client.test") -> smtplib.SMTP:
        """An smtplib client connected to the gate (greeting read; no EHLO sent yet); its
        QUIT returns once the gate closed the connection (see ``QuitWaitsForClose``)."""
        return QuitWaitsForClose(self.host, self.port, local_hostname=local_hostname, timeout=timeout)

    def cli(self, *args: str, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `python -m smtpgate ARGS... -c gate.yaml` with this gate's config and env."""
        return subprocess.run([sys.executable, "-m", "smtpgate", *args, "-c", str(self.config_path)],
                              cwd=self.folder, env=self.env, input=input, capture_output=True,
                              timeout=timeout, check=False)

    def describe(self) -> str:
        return (f"--- gate pid {self.pid}, config {self.config_path} ---\n"
                f"{self.config_path.read_text()}\n--- gate stderr ---\n{self.log_text()}"
                f"--- gate stdout ---\n{self.stdout_text()}")


Plugins = Mapping[str, "str | Path"] | Iterable[Path]


def plugin_files(plugins: Plugins) -> dict[str, str]:
    """{file name: source} from {name: source text or file} or from files (tests/data/plugins/...)."""
    items = plugins.items() if isinstance(plugins, Mapping) else ((p.name, p) for p in plugins)
    return {(name if str(name).endswith(".py") else f"{name}.py"):
            (src if isinstance(src, str) else Path(src).read_text()) for name, src in items}


def write_gate_folder(folder: Path, *, port: int, downstream_port: int,
                      policies: Mapping[str, str] | None = None,
                      config: Mapping[str, Any] | None = None,
                      plugins: Plugins | None = None) -> tuple[Path, dict]:
    """Write gate.yaml, policies/ and plugins/ into folder; return (gate.yaml path, config)."""
    folder.mkdir(parents=True, exist_ok=True)
    pol_dir = folder / "policies"
    pol_dir.mkdir(exist_ok=True)
    for name, text in (DEFAULT_POLICIES if policies is None else policies).items():
        (pol_dir / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")).write_text(text)
    base: dict[str, Any] = {
        "hostname": "gate.test",
        "listen": [f"{LOOPBACK}:{port}"],
        "workers": 1,
        "downstream": {"host": LOOPBACK, "port": downstream_port, "xclient": True},
        "state": f"sqlite://{folder / 'state.db'}",      # sqlite:// + absolute path
        "quarantine": str(folder / "quarantine"),
        "policies": str(pol_dir),
    }
    if plugins:
        plug_dir = folder / "plugins"
        plug_dir.mkdir(exist_ok=True)
        for name, text in plugin_files(plugins).items():
            (plug_dir / name).write_text(text)
        base["plugins"] = [str(plug_dir)]
    cfg = deep_merge(base, config or {})
    path = folder / "gate.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


PORT_TRIES = 3  # a gate whose chosen port was taken meanwhile is started again on another
BIND_REFUSED = f"cannot listen: [Errno {errno.EADDRINUSE}]"  # the gate's log line for it


def start_gate(folder: Path, *, downstream_port: int,
               policies: Mapping[str, str] | None = None,
               config: Mapping[str, Any] | None = None,
               plugins: Plugins | None = None,
               env: Mapping[str, str] | None = None,
               start_timeout: float = START_TIMEOUT) -> GateProcess:
    """Write the folder, start `python -m smtpgate serve -c gate.yaml`, wait until it listens.

    When the port chosen here (no `listen` in config) was taken by another process before the
    gate bound it, the gate is started again on another port (with a warning)."""
    chosen = "listen" not in (config or {})
    for attempt in range(1, PORT_TRIES + 1):
        gate = _launch_gate(folder, free_port(), downstream_port, policies, config, plugins, env)
        try:
            problem = _await_listening(gate.proc, _listen_addresses(gate.config), start_timeout)
            taken = problem is not None and BIND_REFUSED in gate.log_text()
        except PortTaken as e:
            problem, taken = str(e), True
        if problem is None:
            return gate
        gate.stop()
        if not (taken and chosen and attempt < PORT_TRIES):
            pytest.fail(f"{problem}\n{gate.describe()}", pytrace=False)
        warnings.warn(f"start_gate: port {gate.port} taken by another process ({problem}); "
                      f"starting the gate again on another port")
    raise AssertionError("unreachable")  # the last try returns or fails


def _listen_addresses(cfg: Mapping[str, Any]) -> list[tuple[str, int]]:
    listen = cfg.get("listen") or []
    return [parse_hostport(a) for a in (listen if isinstance(listen, list) else [listen])]


def _launch_gate(folder: Path, port: int, downstream_port: int, policies, config, plugins, env) -> GateProcess:
    path, cfg = write_gate_folder(folder, port=port, downstream_port=downstream_port,
                                  policies=policies, config=config, plugins=plugins)
    addrs = _listen_addresses(cfg)
    child_env = {k: v for k, v in os.environ.items() if k != "SMTPGATE_CONFIG"}
    child_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    with open(folder / "gate.log", "wb") as err, open(folder / "gate.stdout", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(path)],
                                cwd=folder, env=child_env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
    return GateProcess(proc, folder, path, cfg, addrs[0][1] if addrs else port, child_env)


# ---------------------------------------------------------------------------- smtp-sink
class SinkProcess:
    """Postfix's smtp-sink on 127.0.0.1:port, started with -c (counters on stdout)."""

    def __init__(self, proc: subprocess.Popen, port: int, out_path: Path) -> None:
        self.proc, self.port, self.out_path = proc, port, out_path
        self.host = LOOPBACK

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counts(self) -> dict[str, int]:
        """The last counter line smtp-sink printed: {'sess': .., 'quit': .., 'mesg': ..}."""
        text = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        last = [chunk for chunk in text.replace("\n", "\r").split("\r") if "mesg=" in chunk]
        if not last:
            return {"sess": 0, "quit": 0, "mesg": 0}
        return {k: int(v) for k, v in (w.split("=", 1) for w in last[-1].split() if "=" in w)}

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> dict[str, int]:
        """Wait until smtp-sink counted n messages. (It prints counters when a session ends.)"""
        wait_until(lambda: self.counts().get("mesg", 0) >= n, timeout,
                   what=lambda: f"smtp-sink to count mesg>={n}; it counted {self.counts()}")
        return self.counts()

    def stop(self) -> int:
        return stop_pid(self.proc)


def start_smtp_sink(folder: Path, *extra_args: str, backlog: int = 100) -> SinkProcess:
    sink = require_tool("smtp-sink")
    port = free_port()
    args = [sink, *extra_args]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
    args += ["-c", f"{LOOPBACK}:{port}", str(backlog)]
    folder.mkdir(parents=True, exist_ok=True)
    out_path = folder / f"smtp-sink-{port}.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_listening(proc, [(LOOPBACK, port)], 10.0,
                   lambda: f"{' '.join(args)}\n{out_path.read_text(errors='replace')}")
    return SinkProcess(proc, port, out_path)
