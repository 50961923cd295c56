"""The public API for a rule's own ``smtpgate SUBCOMMAND`` (the ``smtpgate.commands`` entry
points): what such a command may import besides ``smtpgate`` itself.

- ``CommandContext``: what the handler gets (``context.runtime()``, ``.rules(name)``,
  ``.policy_rules(wanted)``, ``.policy_for(address)``, ``.config_path``).
- ``answer(command, work, as_json)``, ``UsageError``: run a handler's work and report it
  (its output, or exit 2 for a UsageError and 1 for a StoreError, the message on stderr).
- ``json_parent()``, ``positive``: argparse pieces every subcommand shares (``--json``, N >= 1).
- ``table(rows, header)``, ``utc(t)``: the text output of the gate's own commands.
- ``GreylistSelector``, ``make_allow``, ``triplet_value``: the greylist store's interface
  (``runtime.stores.greylist``: which entries ``list``/``delete`` address, allow entries).

docs/writing-rules.md ("A command of your own") shows a complete command.
"""
from .cli.common import CommandContext, UsageError, answer, json_parent, positive, table, utc
from .stores.greylist import Selector as GreylistSelector
from .stores.greylist import make_allow, triplet_value

__all__ = ["CommandContext", "GreylistSelector", "UsageError", "answer", "json_parent", "make_allow",
           "positive", "table", "triplet_value", "utc"]
