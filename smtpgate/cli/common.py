"""Pieces every ``smtpgate`` subcommand shares: --json, counts, loading the runtime."""
from __future__ import annotations

import argparse
import sys


def json_parent() -> argparse.ArgumentParser:
    """A parent parser adding ``--json`` (one JSON document on stdout)."""
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return out


def positive(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {n}")
    return n


def load_runtime_or_report(config_path: str | None, **kwargs):
    """The runtime, or None after printing every configuration problem (the caller exits 2)."""
    from ..errors import ConfigError, PluginError
    from ..runtime.loading import load_runtime
    try:
        return load_runtime(config_path, **kwargs)
    except (ConfigError, PluginError) as e:
        print(str(e), file=sys.stderr)
        return None
