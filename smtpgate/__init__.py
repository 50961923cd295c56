"""smtpgate: an inline SMTP mail firewall.

The public plugin API is what this module exports; rules (first-party ones in ``rules/``
included) import nothing else from smtpgate.
"""
from .addresses import Address, AddressError, parse_address
from .clock import Clock
from .envelope import Event, Recipient, Session, TraceEntry, Transaction
from .errors import ConfigError, OptionError, PluginError, RelayError, StoreError
from .message import Message
from .options import (Option, anything, boolean, duration, integer, list_of, mapping_of, network,
                      number, one_of, regex, size, string)
from .reply import Reply
from .resolver import DnsError, reverse_name
from .rule import GateContext, Rule
from .spf import SpfResult, check_helo as spf_check_helo, check_host as spf_check_host
from .spf import check_mailfrom as spf_check_mailfrom
from .stores.greylist import Params as GreylistParams
from .verdict import Verdict
from .machine import KNOWN_EVENTS, Machine, MachineError, SenderState, Transition
from .machine_rule import MachineRule, client_key, sender_key, state

__version__ = "0.1.0"

__all__ = [
    "Address", "AddressError", "Clock", "ConfigError", "GateContext", "Message", "Option", "OptionError",
    "GreylistParams", "PluginError", "Recipient", "RelayError", "Reply", "Rule", "Session", "StoreError",
    "TraceEntry", "Transaction", "Verdict", "__version__",
    "DnsError", "SpfResult", "reverse_name", "spf_check_helo", "spf_check_host", "spf_check_mailfrom",
    "anything", "boolean", "duration", "integer", "list_of", "mapping_of", "network", "number",
    "one_of", "parse_address", "regex", "size", "string",
    "Event", "KNOWN_EVENTS", "Machine", "MachineError", "MachineRule", "SenderState", "Transition",
    "client_key", "sender_key", "state",
]
