"""Options of the ``rewrite`` rule: converters (each raises ValueError with a readable message,
so check-config reports it at the option's file and line) and the blocks they build."""
from __future__ import annotations

import re

from smtpgate import Message

from .headers import decode, header_text
from .maps import AddressMap, Condition, Context

ADDRESS_FIELDS = ("From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Resent-From", "Resent-To",
                  "Resent-Cc", "Resent-Bcc", "Resent-Sender")
DEFAULT_FIELDS = ["From", "To", "Cc", "Reply-To", "Sender"]
BLOCK_KEYS = ("sender_map", "recipient_map", "header_map", "header_fields", "add_headers",
              "remove_headers", "replace_headers", "subject_prefix", "when", "unless")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


# --- option types (each raises ValueError with a readable message) -------------------------

def address_map(value) -> AddressMap:
    return AddressMap({} if value is None else value)


address_map.__name__ = "mapping of old address: new address"


def header_fields(value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    known = {f.lower(): f for f in ADDRESS_FIELDS}
    out = []
    for item in items:
        if not isinstance(item, str) or item.lower() not in known:
            raise ValueError(f"{item!r} is not an address header (known: {', '.join(ADDRESS_FIELDS)})")
        out.append(known[item.lower()])
    return out


header_fields.__name__ = "list of address header names"


def header_name(name, glob: bool = False) -> str:
    text = str(name)
    body = text[:-1] if glob and text.endswith("*") else text
    if not Message.is_field_name(body) or "*" in body and glob:
        raise ValueError(f"{text!r} is not a header name")
    return text


def headers(value) -> list[tuple[str, str]]:
    """``{Name: value}`` -> [(name, value as it goes on the wire)], refusing anything that could
    start a new line (no header injection from configuration)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of header name: value, got {value!r}")
    out = []
    for name, text in value.items():
        name = header_name(name)
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ValueError(f"{name}: expected a text value, got {text!r}")
        text = str(text)
        if _CONTROL.search(text):
            raise ValueError(f"{name}: CR, LF, NUL and other control characters are not allowed")
        wire = header_text(text.strip())
        if len(name) + 2 + len(wire) > 998:
            raise ValueError(f"{name}: the header line would be longer than 998 characters")
        out.append((name, wire))
    return out


headers.__name__ = "mapping of header name: value"


def header_names(value) -> list[str]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    return [header_name(v, glob=True) for v in items]


header_names.__name__ = "list of header names (Name or Prefix-*)"


def subject_prefix(value) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    if _CONTROL.search(value) or "\t" in value:
        raise ValueError("CR, LF, NUL, tabs and other control characters are not allowed")
    if not value.strip():
        raise ValueError("the prefix needs some text, not only spaces")
    if len(value) > 200:
        raise ValueError("a subject prefix of more than 200 characters is not a tag")
    return value


subject_prefix.__name__ = "text"


def condition(value) -> Condition | None:
    return None if value is None else Condition(value, "")


condition.__name__ = "conditions (sender, recipient, client, authenticated, header)"

_CONVERTERS = {"sender_map": address_map, "recipient_map": address_map, "header_map": address_map,
               "header_fields": header_fields, "add_headers": headers, "remove_headers": header_names,
               "replace_headers": headers, "subject_prefix": subject_prefix, "when": condition,
               "unless": condition}


class Block:
    """One set of operations and the conditions under which they apply."""

    def __init__(self, options: dict, where: str, outer: "Block | None" = None):
        self.where = where
        o = {k: options.get(k, _DEFAULTS[k]) for k in BLOCK_KEYS}
        self.sender_map, self.recipient_map, self.header_map = o["sender_map"], o["recipient_map"], o["header_map"]
        self.fields, self.add, self.remove = o["header_fields"], o["add_headers"], o["remove_headers"]
        self.replace, self.prefix = o["replace_headers"], o["subject_prefix"]
        self.whens = [c for c in (outer and outer.whens or []) + [o["when"]] if c is not None]
        self.unlesses = [c for c in (outer and outer.unlesses or []) + [o["unless"]] if c is not None]
        needs = set().union(*(c.needs for c in self.whens + self.unlesses))
        if self.sender_map and needs:
            raise ValueError(f"{where}: sender_map is decided at MAIL, before any recipient or header is "
                             f"known; a condition on {' or '.join(sorted(needs))} cannot apply to it")
        if self.recipient_map and "header" in needs:
            raise ValueError(f"{where}: recipient_map is decided at RCPT, before the message is known; "
                             "a header condition cannot apply to it")
        # Decided once here, not per message: a block's options do not change after loading.
        #: whether ``applies`` looks at its context at all
        self.conditional = bool(self.whens or self.unlesses)
        #: edits of fields already there (removal, replacement, header_map, subject_prefix)
        self.edits_fields = bool(self.remove or self.replace or self.header_map or self.prefix)
        self.has_header_ops = self.edits_fields or bool(self.add)
        #: ``add`` in the order of prepending: the last listed first, so the first ends on top
        self.add_bottom_up = self.add[::-1]

    def applies(self, ctx: Context | None) -> bool:
        return (all(c.matches(ctx, _header_values) for c in self.whens)
                and not any(c.matches(ctx, _header_values) for c in self.unlesses))


_DEFAULTS = {"sender_map": AddressMap({}), "recipient_map": AddressMap({}), "header_map": AddressMap({}),
             "header_fields": DEFAULT_FIELDS, "add_headers": [], "remove_headers": [], "replace_headers": [],
             "subject_prefix": "", "when": None, "unless": None}


def steps(value) -> list[dict]:
    """Each step: the block options, converted (conditions are combined in ``setup``)."""
    items = [] if value is None else value
    if not isinstance(items, list):
        raise ValueError(f"expected a list of steps, got {value!r}")
    out = []
    for i, step in enumerate(items):
        if not isinstance(step, dict) or not step:
            raise ValueError(f"steps[{i}]: expected a mapping of rewrite options, got {step!r}")
        converted = {}
        for key, raw in step.items():
            if key not in _CONVERTERS:
                raise ValueError(f"steps[{i}].{key}: unknown option (known: {', '.join(BLOCK_KEYS)})")
            try:
                converted[key] = _CONVERTERS[key](raw)
            except ValueError as e:
                raise ValueError(f"steps[{i}].{key}: {e}") from None
        out.append(converted)
    return out


steps.__name__ = "list of blocks of these options"


def _header_values(message, name: str) -> list[str]:
    return [decode(v) for v in message.get_all(name)]
