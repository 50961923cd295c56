"""The supervisor of `workers: N` and its workers live and die together."""
from __future__ import annotations

import os
import signal

from tests.support.gateproc import wait_until


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited already
    except FileNotFoundError:
        return False


def test_workers_stop_when_the_supervisor_is_killed(gate_factory):
    gate = gate_factory(config={"workers": 2})
    assert wait_until(lambda: len(_children(gate.pid)) == 2, timeout=10)
    workers = _children(gate.pid)
    gate.send_signal(signal.SIGKILL)
    gate.wait()
    # Orphaned workers would go on serving with nobody to reload or stop them.
    assert wait_until(lambda: not any(_alive(w) for w in workers), timeout=15), \
        [w for w in workers if _alive(w)]
    for w in workers:
        if _alive(w):  # never leave a process behind, even when the test fails
            os.kill(w, signal.SIGKILL)
