"""IdleTimer: re-arming per command moves a deadline; the callback runs once that deadline is
reached (never before it, less the loops' millisecond resolution), as a fresh timer per reset
would; a shorter reset fires sooner; a closed timer never fires. ReplyDeadline on it: the
future awaited when the deadline passes fails (marked retrieved), and nothing else. On both
loops the gate runs."""
import asyncio
import gc

import pytest
import uvloop

from smtpgate.smtp.idletimer import RESOLUTION, IdleTimer, ReplyDeadline

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name, scenario):
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reset_moves_the_deadline_past_the_armed_timer(loop_name):
    async def scenario():
        loop = asyncio.get_running_loop()
        fired, done = [], asyncio.Event()
        timer = IdleTimer(loop, lambda: (fired.append(loop.time()), done.set()))
        timer.reset(0.05)
        resets = []
        for delay in (0.02, 0.04, 0.06):  # commands keep coming, past the first deadline
            loop.call_later(delay, lambda: (resets.append(loop.time()), timer.reset(0.05)))
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.1)  # a second call would come by now
        return fired, resets
    fired, resets = run(loop_name, scenario)
    assert len(fired) == 1 and len(resets) == 3
    assert fired[0] >= resets[-1] + 0.05 - RESOLUTION


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_shorter_reset_fires_before_the_armed_timer(loop_name):
    async def scenario():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        timer = IdleTimer(loop, done.set)
        timer.reset(60)
        start = loop.time()
        timer.reset(0.02)  # the data timeout shorter than the command timeout
        await asyncio.wait_for(done.wait(), 5)
        return loop.time() - start
    assert 0.02 - RESOLUTION <= run(loop_name, scenario) < 5


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_closed_timer_never_fires(loop_name):
    async def scenario():
        loop = asyncio.get_running_loop()
        fired, later = [], asyncio.Event()
        timer = IdleTimer(loop, lambda: fired.append(1))
        timer.reset(0.01)
        timer.close()
        timer.reset(0.01)  # a command still finishing after the connection was lost
        loop.call_later(0.05, later.set)
        await asyncio.wait_for(later.wait(), 5)
        return fired
    assert run(loop_name, scenario) == []


def _expiry(deadline: ReplyDeadline) -> asyncio.Event:
    """Set once the deadline's timer has called its expiry (whatever that did)."""
    timer, passed = deadline._timer, asyncio.Event()
    expired = timer._callback
    timer._callback = lambda: (expired(), passed.set())
    return passed


def _until_expired(loop_name, arrange):
    """``arrange(loop, deadline)`` (it watches), then on until the deadline's expiry has run;
    what ``arrange`` returned."""
    async def scenario():
        loop = asyncio.get_running_loop()
        deadline = ReplyDeadline(loop)
        passed = _expiry(deadline)
        arranged = arrange(loop, deadline)
        await asyncio.wait_for(passed.wait(), 5)
        return arranged
    return run(loop_name, scenario)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_deadline_fails_the_future_awaited_when_it_passes(loop_name):
    """Not the one awaited at ``watch``: a read that began on a new future is bounded too."""
    def arrange(loop, deadline):
        first, second = loop.create_future(), loop.create_future()
        awaited = [first]
        deadline.watch(lambda: awaited[0], 0.01)
        awaited[0] = second  # the first read is over; a second one waits
        return first, second
    first, second = _until_expired(loop_name, arrange)
    assert not first.done() and isinstance(second.exception(), TimeoutError)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_deadline_passing_after_done_leaves_a_pending_future_alone(loop_name):
    def arrange(loop, deadline):
        future = loop.create_future()  # aiosmtplib's next waiter, nobody awaiting it yet
        deadline.watch(lambda: future, 0.01)
        deadline.done()
        return future
    assert not _until_expired(loop_name, arrange).done()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_deadline_passing_on_a_done_future_changes_nothing(loop_name):
    """The reply came as the deadline passed, before its awaiter ran ``done``."""
    def arrange(loop, deadline):
        future = loop.create_future()
        future.set_result("250 ok")
        deadline.watch(lambda: future, 0.01)
        return future
    assert _until_expired(loop_name, arrange).result() == "250 ok"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_cancelled_deadline_is_armed_again_by_watch(loop_name):
    """A session given back to the pool (cancel), then taken by the next client (watch)."""
    async def scenario():
        loop = asyncio.get_running_loop()
        deadline = ReplyDeadline(loop)
        before, after = loop.create_future(), loop.create_future()
        deadline.watch(lambda: before, 0.01)
        deadline.cancel()
        deadline.watch(lambda: after, 0.02)
        await asyncio.wait({after}, timeout=5)  # without a timer armed again: not done
        return before, after
    before, after = run(loop_name, scenario)
    assert not before.done() and isinstance(after.exception(), TimeoutError)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_future_failed_by_the_deadline_and_never_awaited_logs_nothing(loop_name):
    """Should its awaiter be gone when the deadline fails it, no "Future exception was never
    retrieved" when it is collected (aiosmtplib marks its own failed waiters the same way)."""
    async def scenario():
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        deadline = ReplyDeadline(loop)
        passed = _expiry(deadline)
        held = [loop.create_future()]
        deadline.watch(lambda: held[0], 0.01)
        await asyncio.wait_for(passed.wait(), 5)
        assert held[0].done()  # (not .exception(): that would mark it retrieved here)
        held.clear()
        gc.collect()
        return reported
    assert run(loop_name, scenario) == []
