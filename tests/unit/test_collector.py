"""The worker's garbage collector settings (smtpgate.runtime.collector), applied for real in
this process and put back afterwards."""
import gc
import weakref

import pytest

from smtpgate.runtime.collector import GEN0_THRESHOLD, OLDER_THRESHOLDS, settle_for_serving


class Node:
    """A reference cycle's member: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


@pytest.fixture
def restored_collector():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_freezes_what_is_loaded_and_raises_the_threshold(restored_collector):
    loaded = Node()
    settle_for_serving()
    assert gc.get_threshold() == (GEN0_THRESHOLD, *OLDER_THRESHOLDS)
    assert gc.get_freeze_count() > 0
    assert not any(o is loaded for o in gc.get_objects())  # no generation holds it: frozen


def test_cycles_made_while_serving_are_still_collected(restored_collector):
    settle_for_serving()
    garbage = weakref.ref(Node())
    assert garbage() is not None  # a cycle: reference counting alone does not free it
    gc.collect()  # what the raised threshold runs, less often
    assert garbage() is None


def test_a_reload_collects_the_cycles_the_previous_one_froze(restored_collector):
    in_flight = Node()  # a session's cycle, alive when the gate (re)loads
    settle_for_serving()
    left = weakref.ref(in_flight)
    del in_flight  # the session ends: frozen garbage, no collection sees it
    gc.collect()
    assert left() is not None
    settle_for_serving()  # the next reload
    assert left() is None
