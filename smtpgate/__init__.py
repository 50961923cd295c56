"""smtpgate: an inline SMTP mail firewall.

The public plugin API is what this module exports; rules (first-party ones in ``rules/``
included) import nothing else from smtpgate.
"""
from .addresses import Address
from .clock import Clock
from .envelope import Recipient, Session, TraceEntry, Transaction
from .errors import ConfigError, OptionError, PluginError, RelayError, StoreError
from .message import Message
from .options import (Option, anything, boolean, duration, integer, list_of, mapping_of, network,
                      number, one_of, regex, size, string)
from .reply import Reply
from .rule import GateContext, Rule
from .verdict import Verdict

__version__ = "0.1.0"

__all__ = [
    "Address", "Clock", "ConfigError", "GateContext", "Message", "Option", "OptionError",
    "PluginError", "Recipient", "RelayError", "Reply", "Rule", "Session", "StoreError",
    "TraceEntry", "Transaction", "Verdict", "__version__",
    "anything", "boolean", "duration", "integer", "list_of", "mapping_of", "network", "number",
    "one_of", "regex", "size", "string",
]
