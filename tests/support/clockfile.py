"""The real gate's wall clock, moved by a test: the file behind ``SMTPGATE_CLOCK_FILE``.

    clock = ClockFile(tmp_path / "clock")
    gate = gate_factory(env=clock.env)      # its CLI commands (gate.cli) get the same env
    clock.advance(3600)                     # the gate and its CLI now live an hour later
"""
from __future__ import annotations

import os
from pathlib import Path

from smtpgate.clock import CLOCK_FILE_ENV


class ClockFile:
    """Seconds added to the wall clock of every process started with ``env``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0.0
        self._write()

    @property
    def env(self) -> dict[str, str]:
        return {CLOCK_FILE_ENV: str(self.path)}

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self._write()

    def _write(self) -> None:
        # Replaced whole, so a process reading it never sees half a number.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{self.offset!r}\n")
        os.replace(tmp, self.path)
