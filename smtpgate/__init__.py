"""smtpgate: an inline SMTP mail firewall.

The public plugin API is what this module exports; rules (first-party ones in ``rules/``
included) import nothing else from smtpgate.
"""
from .mail.addresses import Address, AddressError, parse_address
from .clock import Clock
from .mail.session import Event, Recipient, Session, TraceEntry, Transaction
from .errors import ConfigError, OptionError, PluginError, RelayError, StoreError
from .mail.message import Message
from .pipeline.options import (Option, anything, boolean, duration, integer, list_of, mapping_of, network,
                               number, one_of, regex, size, string)
from .mail.reply import Reply
from .resolver import DnsError, reverse_name
from .pipeline.results import Results, RuleResult
from .pipeline.rule import GateContext, Rule
from .stores.greylist import Params as GreylistParams
from .pipeline.verdict import Verdict
from .machines.machine import KNOWN_EVENTS, Machine, MachineError, SenderState, Transition
from .machines.rule import MachineRule, client_key, sender_key, state

__version__ = "0.1.0"

__all__ = [
    "Address", "AddressError", "Clock", "ConfigError", "GateContext", "Message", "Option", "OptionError",
    "GreylistParams", "PluginError", "Recipient", "RelayError", "Reply", "Results", "Rule", "RuleResult", "Session", "StoreError",
    "TraceEntry", "Transaction", "Verdict", "__version__",
    "DnsError", "reverse_name",
    "anything", "boolean", "duration", "integer", "list_of", "mapping_of", "network", "number",
    "one_of", "parse_address", "regex", "size", "string",
    "Event", "KNOWN_EVENTS", "Machine", "MachineError", "MachineRule", "SenderState", "Transition",
    "client_key", "sender_key", "state",
]
