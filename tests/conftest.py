"""Shared fixtures: the capturing downstream, the real gate as a child process, smtp-sink.

    def test_relay(gate_factory, downstream):
        gate = gate_factory()                  # relays to `downstream` by default
        with gate.smtp() as c:
            c.sendmail("a@sender.test", ["user@example.com"], b"Subject: x\\r\\n\\r\\nhi\\r\\n")
        [msg] = downstream.wait_for_messages(1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support.clockfile import ClockFile
from tests.support.downstream import CapturingDownstream
from tests.support import redisproc
from tests.support.gateproc import (
    GateProcess,
    Plugins,
    SinkProcess,
    free_port as _free_port,
    require_tool as _require_tool,
    start_gate,
    start_smtp_sink,
)

LOG_TAIL = 6000  # characters of a gate's stderr printed at teardown (shown when a test fails)


@pytest.fixture
def free_port() -> Callable[..., int]:
    """`free_port(host="127.0.0.1") -> int`: a TCP port nothing listens on right now."""
    return _free_port


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """`require_tool(name) -> path`: skip if missing, or fail when CI=true."""
    return _require_tool


@pytest.fixture
def gate_clock(tmp_path: Path) -> ClockFile:
    """The wall clock of gates started with `env=gate_clock.env` (and their CLI): `.advance(seconds)`."""
    return ClockFile(tmp_path / "gate-clock")


@pytest.fixture(params=["sqlite", "redis"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A `state:` URL several gates can share, once per backend: a SQLite file in tmp_path, or
    the shared Redis under a key prefix of this test's own (its keys deleted afterwards; name
    it before gate_factory so the gates stop first)."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'shared-state.db'}"
        return
    redisproc.require_redis()
    prefix = redisproc.new_prefix()
    try:
        yield redisproc.redis_state(prefix)
    finally:
        redisproc.delete_redis_keys(prefix)


@pytest.fixture
def downstream_factory() -> Iterator[Callable[..., CapturingDownstream]]:
    """`downstream_factory(**CapturingDownstream kwargs) -> started CapturingDownstream` (stopped at teardown)."""
    started: list[CapturingDownstream] = []

    def make(**kwargs: Any) -> CapturingDownstream:
        ds = CapturingDownstream(**kwargs).start()
        started.append(ds)
        return ds

    yield make
    for ds in started:
        ds.stop()


@pytest.fixture
def downstream(downstream_factory) -> CapturingDownstream:
    """A started CapturingDownstream with default flags (XCLIENT and XFORWARD advertised)."""
    return downstream_factory()


@pytest.fixture
def gate_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., GateProcess]]:
    """`start(policies=None, config=None, plugins=None, downstream_port=None, env=None) -> GateProcess`.

    `plugins`: files (`[PLUGINS / "crasher.py"]`, tests/data/plugins) or {file name: source or file}.

    Writes tmp_path/gateN/{gate.yaml, policies/, plugins/}; listens on 127.0.0.1:<free port>;
    relays to `downstream_port`, or, when None, to this test's `downstream` fixture.
    Teardown stops every started gate by PID (SIGTERM, then SIGKILL after 10s), asserts nothing.
    """
    gates: list[GateProcess] = []

    def start(policies: Mapping[str, str] | None = None,
              config: Mapping[str, Any] | None = None,
              plugins: Plugins | None = None,
              downstream_port: int | None = None,
              env: Mapping[str, str] | None = None) -> GateProcess:
        if downstream_port is None:
            downstream_port = request.getfixturevalue("downstream").port
        folder = tmp_path / f"gate{len(gates)}"
        gate = start_gate(folder, downstream_port=downstream_port, policies=policies,
                          config=config, plugins=plugins, env=env)
        gates.append(gate)
        return gate

    yield start
    for gate in gates:
        code = gate.stop()
        log = gate.log_text()
        print(f"--- gate pid {gate.pid} exited {code}; stderr (last {LOG_TAIL} chars) ---\n{log[-LOG_TAIL:]}")


@pytest.fixture
def gate(gate_factory) -> GateProcess:
    """A gate with the default policy (accepts example.com) relaying to `downstream`."""
    return gate_factory()


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """Postfix's `smtp-sink -c 127.0.0.1:<port> 100` (plus `-u nobody` as root); `.port`, `.counts()`."""
    sink = start_smtp_sink(tmp_path / "smtp-sink")
    yield sink
    sink.stop()
