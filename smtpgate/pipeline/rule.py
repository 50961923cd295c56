"""The plugin base class. A rule is a subclass with a ``name``, declared ``Option``s and hooks."""
from __future__ import annotations

import inspect
import logging
from typing import Any

from ..errors import OptionError, PluginError
from .options import Option

# hook name -> (stage it runs at, parameter names after self)
HOOKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "on_connect": ("connect", ("session",)),
    "on_helo": ("helo", ("session",)),
    "on_mail": ("mail", ("tx",)),
    "on_rcpt": ("rcpt", ("tx", "rcpt")),
    "on_data": ("data", ("tx",)),
    "on_delivered": ("delivered", ("tx", "reply")),
    "on_end": ("end", ("tx", "reply")),  # the transaction ended, however (reply None: abandoned)
    "on_disconnect": ("disconnect", ("session",)),  # the session ended, however (after on_connect ran)
}
STAGES = tuple(stage for stage, _ in HOOKS.values())
# Keys every rule entry accepts besides its own options.
COMMON_KEYS = {"mode": ("enforce", "shadow"), "on_error": ("tempfail", "accept")}


class GateContext:
    """What the gate lends a rule: the clock, a logger and (as they arrive) stores and the resolver.

    Rules never open databases or sockets themselves; they take what is here."""

    def __init__(self, clock, stores: Any = None, resolver: Any = None, quarantine: Any = None):
        self.clock = clock
        self.stores = stores
        self.resolver = resolver
        self.quarantine = quarantine


class Rule:
    """Subclass this. Set ``name``; declare options as ``Option`` class attributes; define hooks.

    Hooks are ``async def`` and return ``None`` (carry on) or a ``Verdict``. Instances are made
    once per policy entry when the configuration loads, so work done in ``setup()`` (compiling
    patterns, building sets) is not repeated per message.
    """

    name: str = ""
    #: set by the gate when the rule is built from a policy entry
    mode: str = "enforce"
    on_error: str = "tempfail"

    def __init__(self, options: dict | None = None, gate: GateContext | None = None):
        self._options = self.validate_options(options or {})
        self.gate = gate
        self.log = logging.getLogger(f"smtpgate.rule.{self.name}")
        self.setup()

    def setup(self) -> None:
        """Override to precompute from options once, at load time. Raise ``OptionError`` to refuse."""

    @property
    def clock(self):
        return self.gate.clock

    @classmethod
    def declared_options(cls) -> dict[str, Option]:
        out: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            for key, value in vars(klass).items():
                if isinstance(value, Option):
                    out[key] = value
        return out

    @classmethod
    def validate_options(cls, given: dict) -> dict:
        """Convert ``given`` against the declarations; the first problem raises ``OptionError``."""
        if not isinstance(given, dict):
            raise OptionError(cls.name or cls.__name__, f"expected a mapping of options, got {given!r}")
        declared = cls.declared_options()
        for key in given:
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise OptionError(str(key), f"unknown option (known: {known})")
        values = {}
        for key, opt in declared.items():
            if key in given:
                raw = given[key]
            elif opt.required:
                raise OptionError(key, "is required")
            else:
                raw = opt.default
            try:
                values[key] = opt.convert(raw)
            except ValueError as e:
                raise OptionError(key, str(e)) from None
        return values

    @classmethod
    def hooks(cls) -> dict[str, str]:
        """``{stage: hook name}`` for the hooks this class defines."""
        return {HOOKS[n][0]: n for n in HOOKS if getattr(cls, n, None) is not getattr(Rule, n, None)}

    def __repr__(self):
        return f"<rule {self.name} {self._options}>"


def check_rule_class(cls: type, source: str) -> None:
    """Refuse a plugin class at load time, naming its file: the pluggy lesson."""
    where = f"{source}: {cls.__qualname__}"
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise PluginError(f"{where}: a rule must set a non-empty 'name'")
    for attr, value in vars(cls).items():
        if not attr.startswith("on_") or isinstance(value, Option):
            continue  # an option may be named on_something (e.g. on_dns_error)
        if attr not in HOOKS:
            raise PluginError(f"{where}: unknown hook {attr!r} (hooks: {', '.join(HOOKS)})")
        if not inspect.iscoroutinefunction(value):
            raise PluginError(f"{where}: hook {attr} must be 'async def'")
        want = HOOKS[attr][1]
        params = list(inspect.signature(value).parameters.values())[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        if len(required) > len(want) or len(positional) < len(want) and not any(
                p.kind == p.VAR_POSITIONAL for p in params):
            raise PluginError(
                f"{where}: hook {attr} must take (self, {', '.join(want)}), "
                f"has {inspect.signature(value)}")
    for key, opt in cls.declared_options().items():
        if key in COMMON_KEYS or key in ("name", "gate", "log", "clock"):
            raise PluginError(f"{where}: option name {key!r} is reserved")
        if not opt.required:
            try:
                opt.convert(opt.default)
            except ValueError as e:
                raise PluginError(f"{where}: default of option {key!r} is invalid: {e}") from None
