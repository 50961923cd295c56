"""Declared rule options: a name, a type (a converter), a default and a line of documentation.

A rule writes ``delay = Option(duration, "5m", "how long a new triplet waits")`` as a class
attribute; after loading, ``self.delay`` is the converted value. Converters take the raw YAML
value and return the typed one or raise ``ValueError`` with a readable message.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from ..units import parse_duration, parse_size

_REQUIRED = object()


class Option:
    """One declared option. ``default`` goes through the converter too, so docs show it as written."""

    def __init__(self, type: Callable[[Any], Any] = str, default: Any = _REQUIRED, doc: str = ""):
        self.type = type
        self.default = default
        self.doc = doc
        self.name = ""  # set by __set_name__

    def __set_name__(self, owner, name):
        self.name = name

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def convert(self, value: Any) -> Any:
        return self.type(value)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        try:
            return obj._options[self.name]
        except (AttributeError, KeyError):
            raise AttributeError(f"option {self.name!r} has not been configured") from None

    def __repr__(self):
        return f"Option({getattr(self.type, '__name__', self.type)}, default={self.default!r})"


# Converters. Each has a readable __name__ for docs and error messages.

def string(value: Any) -> str:
    """Text."""
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def integer(value: Any) -> int:
    """A whole number (``true``/``false`` are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def number(value: Any) -> float:
    """A number, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def boolean(value: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def duration(value: Any) -> float:
    """Seconds, from a number or ``"90s"``, ``"5m"``, ``"2h"``, ``"35d"``."""
    return parse_duration(value)


def size(value: Any) -> int:
    """Bytes, from a number or ``"512KB"``, ``"10MB"``."""
    return parse_size(value)


def network(value: Any):
    """An IP address or CIDR network (``192.0.2.0/24``, ``2001:db8::/32``)."""
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"expected an IP address or network, got {value!r}") from None


def regex(value: Any) -> re.Pattern:
    """A compiled regular expression."""
    try:
        return re.compile(string(value))
    except re.error as e:
        raise ValueError(f"bad regular expression {value!r}: {e}") from None


def anything(value: Any) -> Any:
    """The YAML value as it is (the rule checks it in ``setup``)."""
    return value


def list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A list of ``item``s; a single value is a list of one, nothing an empty list."""
    def convert(value: Any) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return out
    convert.__name__ = f"list of {getattr(item, '__name__', 'values')}"
    return convert


def mapping_of(value_type: Callable[[Any], Any] = anything) -> Callable[[Any], dict]:
    """A mapping of text keys to ``value_type`` values."""
    def convert(value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        out = {}
        for k, v in value.items():
            try:
                out[str(k)] = value_type(v)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return out
    convert.__name__ = f"mapping of {getattr(value_type, '__name__', 'values')}"
    return convert


def one_of(*choices: str) -> Callable[[Any], str]:
    """One of the ``choices``, exactly as written."""
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    convert.__name__ = " | ".join(choices)
    return convert


def prefix_length(longest: int) -> Callable[[Any], int]:
    """A network prefix length from 0 to ``longest`` (32 for IPv4, 128 for IPv6): the
    network a client is keyed by (``smtpgate.client_key``)."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= longest:
            raise ValueError(f"expected a prefix length 0-{longest}, got {value!r}")
        return value
    convert.__name__ = f"prefix length 0-{longest}"
    return convert
