"""smtpgate: an inline SMTP mail firewall.

The public plugin API is what this module exports; rules (first-party ones in ``rules/``
included) import nothing else from smtpgate, except ``smtpgate.testing`` in their tests and
``smtpgate.cli_api`` in a command of their own. docs/writing-rules.md lists every name with
one line each ("The public API").
"""
from .errors import ConfigError, OptionError, PluginError, StoreError
from .machines.machine import KNOWN_EVENTS, Machine, MachineError, SenderState, Transition
from .machines.rule import MachineRule, state
from .mail.addresses import AddressError, parse_address
from .mail.keys import client_key, sender_key
from .mail.message import Message
from .mail.reply import Reply
from .mail.session import Event, Recipient, Session, TraceEntry, Transaction
from .pipeline.results import AuthResult, Results, RuleResult
from .pipeline.options import (Option, anything, boolean, duration, integer, list_of, mapping_of, network,
                               number, one_of, prefix_length, regex, size, string)
from .pipeline.rule import Rule
from .pipeline.seal import Seal
from .pipeline.verdict import Verdict
from .resolver import DnsError, reverse_name
from .stores.greylist import Params as GreylistParams

__version__ = "0.1.0"

__all__ = [
    # a rule, its options and its answer
    "Rule", "Option", "Verdict",
    "anything", "boolean", "duration", "integer", "list_of", "mapping_of", "network", "number",
    "one_of", "prefix_length", "regex", "size", "string",
    # what the hooks are given
    "Session", "Transaction", "Recipient", "Message", "Reply", "Event", "TraceEntry", "Seal",
    # the one channel rules report through (tx.results, session.results)
    "Results", "RuleResult", "AuthResult",
    # helpers for what rules look at
    "parse_address", "sender_key", "client_key", "reverse_name", "GreylistParams",
    # errors a rule raises or meets
    "OptionError", "PluginError", "ConfigError", "StoreError", "DnsError", "AddressError",
    # per-key state machines
    "MachineRule", "Machine", "Transition", "state", "SenderState", "MachineError", "KNOWN_EVENTS",
    "__version__",
]
