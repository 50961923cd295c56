"""A gate.yaml for the `smtpgate` CLI tests: its policies and its state in a folder, and the
CLI run on it — in this process (`main(argv)`: a subprocess costs ~0.4 s of imports, and the
detailed tests make many calls) or as a subprocess, as a user runs it."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from smtpgate.cli.main import main


class CliGate:
    def __init__(self, folder, state: str, policies: dict[str, str], subprocess_: bool = False):
        """``policies``: file name (without .yaml) -> its text, in ``folder/policies``."""
        self.folder, self.state, self.subprocess = folder, state, subprocess_
        (folder / "policies").mkdir()
        for name, text in policies.items():
            (folder / "policies" / f"{name}.yaml").write_text(text)
        self.config = folder / "gate.yaml"
        self.config.write_text(f"state: {json.dumps(state)}\npolicies: policies\n")  # quoted: "prefix=x:"

    def run_cli(self, argv: list[str], expect: int = 0, subprocess_: bool | None = None):
        """``smtpgate ARGV``, its exit status checked: a CompletedProcess (text out and err)."""
        if self.subprocess if subprocess_ is None else subprocess_:
            argv = [sys.executable, "-m", "smtpgate", *argv]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=self.folder)
        else:
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's usage errors
                    code = e.code
            done = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
        assert done.returncode == expect, f"{argv}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        return done
