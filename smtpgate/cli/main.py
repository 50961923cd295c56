"""The ``smtpgate`` command: argument parsing and dispatch. Exit 0 ok, 1 runtime, 2 usage/config."""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

from .. import __version__
from .common import CommandContext
from .quarantine import add_parser as add_quarantine_parser
from .state import add_parser as add_state_parser

#: the entry-point group through which a package adds an ``smtpgate`` subcommand
COMMANDS_GROUP = "smtpgate.commands"


def _contributed(sub, common, extra: dict | None = None) -> dict:
    """``{command: handler}`` from the ``smtpgate.commands`` entry points. Each entry point
    names ``add_parser(subparsers, common) -> handler``; ``add_parser`` adds the subparser
    named like the entry point, ``handler(args, context: CommandContext) -> exit status``.
    A broken one is reported on stderr and left out: it must not take the gate's own
    commands (``serve`` first) down with it."""
    handlers = {name: add_parser(sub, common) for name, add_parser in (extra or {}).items()}
    for ep in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in handlers:  # a plugin's test brings its own (smtpgate.testing.run_command)
            continue
        try:
            handlers[ep.name] = ep.load()(sub, common)
        except Exception as e:  # a third party's bug: say which, carry on
            print(f"smtpgate: command {ep.name!r} ({ep.value}) not loaded: {type(e).__name__}: {e}",
                  file=sys.stderr)
    return handlers


def _parser(extra: dict | None = None) -> tuple[argparse.ArgumentParser, dict]:
    # -c goes before or after the subcommand's own words: both parsers know it; the
    # subparser's copy must not overwrite a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="gate.yaml (default: $SMTPGATE_CONFIG, ./gate.yaml, "
                             "/etc/smtpgate/gate.yaml, else the embedded default)")
    p = argparse.ArgumentParser(prog="smtpgate", parents=[common],
                                description="An inline SMTP mail firewall.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("serve", parents=[common], help="run the gate in the foreground")
    sub.add_parser("check-config", parents=[common],
                   help="validate gate.yaml, policies and rule options")
    t = sub.add_parser("try", parents=[common],
                       help="run one message through the pipeline offline")
    t.add_argument("message", metavar="MESSAGE.eml")
    t.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    t.add_argument("--to", dest="recipients", action="append", required=True, metavar="ADDR")
    t.add_argument("--client-ip", default="192.0.2.1", metavar="IP")
    t.add_argument("--helo", default="client.example", metavar="NAME")
    t.add_argument("--json", action="store_true", help="one JSON document on stdout")
    t.add_argument("--show-message", action="store_true",
                   help="print the message as it would be relayed")
    add_quarantine_parser(sub, common)
    add_state_parser(sub, common)
    sub.add_parser("version", parents=[common], help="print the version")
    return p, _contributed(sub, common, extra)


def main(argv: list[str] | None = None, commands: dict | None = None) -> int:
    """``commands``: ``{name: add_parser}`` added as if installed through the entry points."""
    parser, contributed = _parser(commands)
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if args.command in contributed:
        return _run_contributed(contributed[args.command], args, config)
    if args.command == "version":
        print(f"smtpgate {__version__}")
        return 0
    if args.command == "serve":
        from ..server import serve
        return serve(config)
    if args.command == "check-config":
        from .check import check_config_command
        return check_config_command(config)
    if args.command == "try":
        from .trycmd import try_command
        return try_command(args, config)
    if args.command == "state":
        from .state import state_command
        return state_command(args, config)
    if args.command == "quarantine":
        from .quarantine import quarantine_command
        return quarantine_command(args, config)
    return 2


def _run_contributed(handler, args, config: str | None) -> int:
    from ..errors import ConfigError, PluginError, StoreError
    try:
        return int(handler(args, CommandContext(config)) or 0)
    except (ConfigError, PluginError) as e:
        print(str(e), file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"smtpgate {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
