"""IdleTimer: re-arming per command moves a deadline; the callback runs once that deadline is
reached (never before it, less the loops' millisecond resolution), as a fresh timer per reset
would; a shorter reset fires sooner; a closed timer never fires. On both loops the gate runs."""
import asyncio

import pytest
import uvloop

from smtpgate.smtp.idletimer import RESOLUTION, IdleTimer

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
