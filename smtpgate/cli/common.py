"""Pieces every ``smtpgate`` subcommand shares: the context a contributed command gets,
--json, counts, tables and times. A rule's command reaches them through ``smtpgate.cli_api``."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Callable


class CommandContext:
    """What the handler of a contributed subcommand gets besides its parsed arguments: the
    configuration path and, on demand, the gate's runtime (its stores and policies, as
    ``smtpgate serve`` would load them). A contributed command imports nothing else from
    smtpgate's insides.

    A handler may raise ``smtpgate.ConfigError`` / ``PluginError`` (exit 2, the message
    printed) or ``smtpgate.StoreError`` (exit 1); anything else is a bug and shows as one."""

    def __init__(self, config_path: str | None):
        self.config_path = config_path
        self._runtime = None

    def runtime(self):
        """The loaded configuration: ``.stores`` (``.greylist``, ``.senders``, ``.limits``;
        ``await .stores.close()`` when done), ``.policies`` (each with its rule instances
        ``.rules``; ``.get(name)``), ``.config``."""
        if self._runtime is None:
            from ..runtime.loading import load_runtime
            self._runtime = load_runtime(self.config_path)
        return self._runtime

    def now(self) -> float:
        """The gate's wall-clock time (``time.time()``, moved as the gate's own clock is:
        ``SMTPGATE_CLOCK_FILE``), so a command judges expiry exactly as the gate does."""
        from ..clock import Clock
        return Clock().now()

    def rules(self, name: str) -> list:
        """The instances of rule ``name`` in the configuration, the default policy's first."""
        return [r for _, r in self.policy_rules(lambda r: r.name == name)]

    def policy_rules(self, wanted) -> list[tuple]:
        """``(policy, rule)`` for each rule instance ``wanted(rule)`` accepts, the default
        policy's first."""
        policies = sorted(self.runtime().policies, key=lambda p: p.name != "default")
        return [(p, r) for p in policies for r in p.rules if wanted(r)]

    def policy_for(self, address: str):
        """The policy governing an address's domain (as the gate picks it at RCPT), or None."""
        from ..mail.addresses import normalise_domain
        domain = address.rpartition("@")[2]
        return self.runtime().policies.for_domain(normalise_domain(domain)) if domain else None


class UsageError(Exception):
    """A bad argument: the command exits 2 with this message."""


def answer(command: str, work: Callable[[], tuple | None], as_json: bool, *,
           store_errors: bool = True, ascii_json: bool = False) -> int:
    """Run one subcommand's ``work()`` and report it as every smtpgate command does: its
    ``(doc, text)`` printed (the doc as JSON with ``as_json``), exit 0; None when it wrote
    its output itself. A UsageError exits 2, a StoreError 1 (unless ``store_errors`` is
    False: the caller's caller reports it), the message on stderr after ``smtpgate COMMAND:``."""
    from ..errors import StoreError
    caught = (StoreError,) if store_errors else ()
    try:
        result = work()
    except UsageError as e:
        print(f"smtpgate {command}: {e}", file=sys.stderr)
        return 2
    except caught as e:
        print(f"smtpgate {command}: {e}", file=sys.stderr)
        return 1
    if result is not None:
        doc, text = result
        print(json.dumps(doc, indent=2, ensure_ascii=ascii_json) if as_json else text)
    return 0


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


def utc(t: float | None) -> str | None:
    """Seconds since the epoch as ``2026-01-01T00:05:00Z``; None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(rows: list[tuple], header: tuple) -> str:
    """Rows as aligned text columns under ``header``; None shows as ``-``."""
    rows = [tuple("-" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)
