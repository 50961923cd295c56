"""A connection's idle timeout ("no command for N seconds"), cheap to re-arm per command.

aiosmtpd cancels its timer and makes a new one for every command line (and twice more per
DATA): on uvloop a timer handle built, started, stopped and closed per command (issue 13).
Here a reset only moves the deadline; the loop's timer is set again only when the new
deadline comes before the armed one, and a timer that fires before the deadline (the
client sent a command meanwhile) re-arms for what is left. The callback runs once the
deadline is reached, as with a fresh timer per reset. ``ReplyDeadline`` puts one under a
downstream session's reply timeout (relay.py).
"""
from __future__ import annotations

import asyncio
from typing import Callable

# Loop timers fire with a resolution of a millisecond (uvloop's clock ticks in ms): a timer
# that fires less than that before the deadline is the deadline, not a reason to re-arm.
RESOLUTION = 0.001


class IdleTimer:
    """Calls ``callback`` once ``reset(seconds)`` was last called ``seconds`` ago."""

    __slots__ = ("_loop", "_callback", "_deadline", "_armed", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
        self._loop = loop
        self._callback: Callable[[], None] | None = callback
        self._deadline = 0.0  # when the callback is due
        self._armed = 0.0  # when the loop's timer fires
        self._handle: asyncio.TimerHandle | None = None

    def reset(self, seconds: float) -> None:
        if self._callback is None:
            return  # closed: the connection is gone
        deadline = self._deadline = self._loop.time() + seconds
        if self._handle is None or deadline < self._armed:
            self._arm(deadline)

    def cancel(self) -> None:
        """Stop the timer (a later ``reset`` starts it again)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Stop for good and let go of the callback (it leads back to the connection)."""
        self.cancel()
        self._callback = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._deadline - self._loop.time() > RESOLUTION:  # reset since it was armed
            self._arm(self._deadline)
        else:  # (never after close: it cancelled the handle, and a cancelled one never runs)
            self._callback()


class ReplyDeadline:
    """A downstream session's "each reply within N seconds", on one IdleTimer.

    A ``wait_for`` per command (aiosmtplib's, given a timeout) builds a waiter future, a loop
    timer and done-callbacks, and costs a loop turn (issue 13). Here ``watch`` names where
    the future a reply is awaited on is found and moves the deadline; ``done`` forgets it
    once the await is over. When the deadline passes while watched, the future found there
    THEN fails with ``TimeoutError``, as the awaiter's own timeout would have ended it: a
    read the awaiter starts on a new future after ``watch`` (a second reply read, a waiter
    replaced) is bounded as well. With nothing watched (the session idle between exchanges)
    nothing happens.
    """

    __slots__ = ("_timer", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._timer = IdleTimer(loop, self._expired)
        self._waiter: Callable[[], asyncio.Future | None] | None = None

    def watch(self, waiter: Callable[[], asyncio.Future | None], seconds: float) -> None:
        """The future ``waiter()`` returns when ``seconds`` have passed (the one awaited
        then; None: none) fails, unless ``done`` or a later ``watch`` comes first."""
        self._waiter = waiter
        self._timer.reset(seconds)

    def done(self) -> None:
        """The watched await is over (a future nobody awaits must never get the error)."""
        self._waiter = None

    def cancel(self) -> None:
        """Stop the timer while the session is not in use (a later ``watch`` starts it)."""
        self._waiter = None
        self._timer.cancel()

    def _expired(self) -> None:
        waiter, self._waiter = self._waiter, None
        future = waiter() if waiter is not None else None
        if future is not None and not future.done():
            future.set_exception(TimeoutError())
            # Marked retrieved, as aiosmtplib marks its own: should nobody await it after
            # all, no "Future exception was never retrieved" is logged. Awaiting still raises.
            future.exception()
