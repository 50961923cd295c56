"""``smtpgate check-config``: every problem as FILE:LINE:COL: message; exit 0 or 2."""
from __future__ import annotations

import sys

from ..config import check_config, find_config_path


def check_config_command(cli_path: str | None) -> int:
    problems = check_config(cli_path)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 2
    print(f"{find_config_path(cli_path) or '<embedded default>'}: ok")
    return 0
