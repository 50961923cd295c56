"""The plugin base class. A rule is a subclass with a ``name``, declared ``Option``s and hooks."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from typing import Any

from ..errors import OptionError, PluginError
from .options import Option

# hook name -> (stage it runs at, the arguments it may take by name). A hook declares the
# ones it wants as parameters named so, in any order (pluggy-style); the pipeline passes only
# those, so a later version can offer more without breaking a plugin. The documented
# positional signatures come first: ``on_rcpt(self, tx, rcpt)`` is one such subset.
HOOKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "on_connect": ("connect", ("session", "results")),
    "on_helo": ("helo", ("session", "results")),
    "on_mail": ("mail", ("tx", "session", "results")),
    "on_rcpt": ("rcpt", ("tx", "rcpt", "session", "results")),
    "on_data": ("data", ("tx", "session", "message", "results")),
    # the message is final (every on_data ran, the gate's Authentication-Results is on it):
    # stage header fields on ``seal`` (pipeline/seal.py), never edit the message
    "on_seal": ("seal", ("tx", "seal", "session", "message", "results")),
    "on_delivered": ("delivered", ("tx", "reply", "session", "message", "results")),
    # the transaction ended, however (reply None: abandoned)
    "on_end": ("end", ("tx", "reply", "session", "message", "results")),
    # the session ended, however (after on_connect ran)
    "on_disconnect": ("disconnect", ("session", "results")),
}
# the documented positional signatures (the runner passes the caller's arguments as they are)
SIGNATURES = {"on_connect": ("session",), "on_helo": ("session",), "on_mail": ("tx",),
              "on_rcpt": ("tx", "rcpt"), "on_data": ("tx",), "on_seal": ("tx", "seal"), "on_delivered": ("tx", "reply"),
              "on_end": ("tx", "reply"), "on_disconnect": ("session",)}
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

    #: the key in policy files; a subclass that sets none is named after its module
    #: (``rules/dnsbl.py`` -> ``dnsbl``, a package's ``__init__.py`` -> the package's name)
    name: str = ""
    _default_name = True
    #: set by the gate when the rule is built from a policy entry
    mode: str = "enforce"
    on_error: str = "tempfail"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in vars(cls) and cls.name:
            cls._default_name = False
        elif not cls.name or cls._default_name:  # unnamed, or named after its base's module
            cls.name, cls._default_name = module_name(cls), True

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
        raise PluginError(f"{where}: 'name' must be a non-empty string")
    for attr, value in vars(cls).items():
        if not attr.startswith("on_") or isinstance(value, Option):
            continue  # an option may be named on_something (e.g. on_dns_error)
        if attr not in HOOKS:
            raise PluginError(f"{where}: unknown hook {attr!r} (hooks: {', '.join(HOOKS)})")
        if not inspect.iscoroutinefunction(value):
            raise PluginError(f"{where}: hook {attr} must be 'async def'")
        problem = _check_hook_parameters(attr, value)
        if problem:
            raise PluginError(f"{where}: {problem}")
    for key, opt in cls.declared_options().items():
        if key in COMMON_KEYS or key in ("name", "gate", "log", "clock"):
            raise PluginError(f"{where}: option name {key!r} is reserved")
        if not opt.required:
            try:
                opt.convert(opt.default)
            except ValueError as e:
                raise PluginError(f"{where}: default of option {key!r} is invalid: {e}") from None


def module_name(cls: type) -> str:
    """The name a rule class without one gets: its file's name without ``.py`` (a package's
    ``__init__.py``: the folder's), else the last part of its module's name."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if path:
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.basename(os.path.dirname(path)) if stem == "__init__" else stem
    return cls.__module__.rpartition(".")[2]


def _check_hook_parameters(hook: str, fn) -> str | None:
    """Why ``fn`` cannot be hook ``hook`` (parameters are matched by name), or None."""
    allowed = HOOKS[hook][1]
    params = list(inspect.signature(fn).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            return (f"hook {hook} takes its arguments by name ({', '.join(allowed)}), "
                    f"not {p}: has {inspect.signature(fn)}")
        if p.name not in allowed:
            return (f"hook {hook} has no argument {p.name!r} (it may take any of "
                    f"{', '.join(allowed)}, by name): has {inspect.signature(fn)}")
    return None


@functools.lru_cache(maxsize=None)
def hook_parameters(fn) -> tuple[str, ...]:
    """The argument names hook function ``fn`` (unbound) asks for, in its order."""
    return tuple(list(inspect.signature(fn).parameters)[1:])
