"""The wall clock's test hook: SMTPGATE_CLOCK_FILE moves `Clock.now()` (never `monotonic`)."""
from __future__ import annotations

import time

import pytest

from smtpgate.clock import CLOCK_FILE_ENV, Clock
from tests.support.clockfile import ClockFile


def test_without_the_variable_now_is_the_wall_clock(monkeypatch):
    monkeypatch.delenv(CLOCK_FILE_ENV, raising=False)
    before = time.time()
    assert before <= Clock().now() <= time.time()


def test_the_file_moves_now_and_not_monotonic(monkeypatch, tmp_path):
    moved = ClockFile(tmp_path / "clock")
    monkeypatch.setenv(CLOCK_FILE_ENV, str(moved.path))
    clock = Clock()
    assert abs(clock.now() - time.time()) < 60
    moved.advance(86400)
    before = time.time()
    assert before + 86400 <= clock.now() <= time.time() + 86400
    assert abs(clock.monotonic() - time.monotonic()) < 60


def test_a_missing_file_is_no_offset_and_garbage_names_the_file(monkeypatch, tmp_path):
    path = tmp_path / "clock"
    monkeypatch.setenv(CLOCK_FILE_ENV, str(path))
    clock = Clock()
    assert abs(clock.now() - time.time()) < 60
    path.write_text("soon\n")
    with pytest.raises(ValueError, match=f"{path}: {CLOCK_FILE_ENV} must hold a number of seconds, got 'soon'"):
        clock.now()
