"""The ``senders`` rule's YAML: states, their transitions and decays, and what each does.

``build(options)`` reads the rule's options into a ``smtpgate.Machine`` and the actions of
each state, or raises ``OptionError`` whose key is the dotted path of the offending value
(``states.trusted.events.rejected[1].count``), so ``check-config`` names its line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points

from smtpgate import Machine, MachineError, Message, OptionError, Rule, Transition, duration, integer

from .defaults import DEFAULT_INITIAL, DEFAULT_STATES

STATE_KEYS = ("events", "ttl", "decay_to", "skip", "reject", "tempfail", "at", "add_header", "rate")
GUARD_KEYS = ("to", "count", "within", "min_time")
STAGES = ("mail", "rcpt", "data")
_REPLY = re.compile(r"^\s*(\d{3})(?:\s+(\d\.\d{1,3}\.\d{1,3}))?(?:\s+(.*))?$")
_SAMPLE = {"key": "alice@example.org", "state": "new", "machine": "senders"}
KEY_KINDS_DOC = ("what a key is: sender (the address, normalised), sender_domain, client_ip or "
                 "client_net (its ipv4_prefix / ipv6_prefix network)")


@dataclass(frozen=True)
class Refusal:
    """A state's reject or tempfail: code, enhanced code, text (with {key} {state})."""

    action: str  # reject | tempfail
    code: int
    enhanced: str
    text: str
    at: str = "mail"

    def describe(self) -> str:
        return f"{self.action} {self.code} {self.enhanced} at {self.at}"


@dataclass(frozen=True)
class Actions:
    """What a key in one state gets."""

    skip: tuple[str, ...] = ()
    refusal: Refusal | None = None
    add_header: tuple[str, str] | None = None
    rate: tuple[int, float] | None = None  # (transactions, per seconds)

    def describe(self) -> list[str]:
        out = []
        if self.refusal:
            out.append(self.refusal.describe())
        if self.rate:
            out.append(f"rate {self.rate[0]} per {_dur(self.rate[1])} (451 4.7.1 past it)")
        if self.skip:
            out.append("skip " + ", ".join(self.skip))
        if self.add_header:
            out.append(f"header {self.add_header[0]}: {self.add_header[1]}")
        return out


def _dur(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def rule_names() -> set[str]:
    """Names of every rule installed (``smtpgate.rules`` entry points) or loaded (plugin
    folders are imported before policies are built)."""
    out, todo = {ep.name for ep in entry_points(group="smtpgate.rules")}, [Rule]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if isinstance(getattr(sub, "name", None), str) and sub.name:
                out.add(sub.name)
    return out


def build(machine_name: str, states, initial, forget_after: float, own_name: str) -> tuple[Machine, dict[str, Actions]]:
    """(the machine, {state: Actions}) from the options; OptionError with a dotted path."""
    if states is None:
        if initial is not None:
            raise OptionError("initial", "only with states: (the default machine starts in new)")
        states, initial = DEFAULT_STATES, DEFAULT_INITIAL
    elif initial is None:
        initial = "new"
    if not isinstance(states, dict) or not states:
        raise OptionError("states", f"expected a mapping of state names to what they do, got {states!r}")
    table, decay, actions = {}, {}, {}
    for name, spec in states.items():
        path = f"states.{name}"
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise OptionError(path, f"expected a mapping ({', '.join(STATE_KEYS)}), got {spec!r}")
        for k in spec:
            if k not in STATE_KEYS:
                raise OptionError(f"{path}.{k}", f"unknown key (known: {', '.join(STATE_KEYS)})")
        table[name] = _transitions(path, spec.get("events"))
        if ("ttl" in spec) != ("decay_to" in spec):
            missing = "decay_to" if "ttl" in spec else "ttl"
            raise OptionError(f"{path}.{'ttl' if 'ttl' in spec else 'decay_to'}", f"needs {missing} too")
        if "ttl" in spec:
            decay[name] = (_convert(f"{path}.ttl", duration, spec["ttl"]), spec["decay_to"])
        actions[name] = _actions(path, spec, own_name)
    try:
        machine = Machine(machine_name, table, initial=initial, decay=decay, forget_after=forget_after,
                          labels={s: "\n".join(a.describe()) for s, a in actions.items()})
    except MachineError as e:
        raise OptionError(error_path(e, states), e.detail) from None
    return machine, actions


def error_path(e: MachineError, states=None) -> str:
    """The option path a MachineError points at."""
    if e.state is None:
        return e.field or "states"
    path = f"states.{e.state}"
    if e.event is None:
        return f"{path}.{e.field}" if e.field in ("ttl", "decay_to") else path
    path += f".events.{e.event}"
    if e.index is not None:
        path += f"[{e.index}]"
    written = _written(states, e.state, e.event, e.index)
    if e.field and isinstance(written, dict):  # not for a plain "event: state"
        path += f".{e.field}"
    return path


def _written(states, state, event, index):
    try:
        value = states[state]["events"][event]
        return value[index] if index is not None else value
    except (KeyError, IndexError, TypeError):
        return None


def _convert(path, convert, value):
    try:
        return convert(value)
    except ValueError as e:
        raise OptionError(path, str(e)) from None


def _transitions(path: str, events) -> dict:
    if events is None:
        return {}
    if not isinstance(events, dict):
        raise OptionError(f"{path}.events", f"expected a mapping of event: next state, got {events!r}")
    out = {}
    for event, value in events.items():
        epath = f"{path}.events.{event}"
        items = value if isinstance(value, list) else [value]
        if not items:
            raise OptionError(epath, "expected a next state or a list of {to, count, within, min_time}")
        made = []
        for i, item in enumerate(items):
            ipath = f"{epath}[{i}]" if isinstance(value, list) else epath
            made.append(_transition(ipath, item))
        out[event] = made
    return out


def _transition(path: str, item) -> Transition:
    if isinstance(item, str):
        return Transition(item)
    if not isinstance(item, dict):
        raise OptionError(path, f'expected a state name or {{to: STATE, count: N, within: DURATION, '
                                f'min_time: DURATION}}, got {item!r}')
    for k in item:
        if k not in GUARD_KEYS:
            raise OptionError(f"{path}.{k}", f"unknown key (known: {', '.join(GUARD_KEYS)})")
    if "to" not in item:
        raise OptionError(path, "needs to: (the next state)")
    args = {"count": _convert(f"{path}.count", integer, item.get("count", 1))}
    for k in ("within", "min_time"):
        if k in item:
            args[k] = _convert(f"{path}.{k}", duration, item[k])
    try:
        return Transition(item["to"], **args)
    except MachineError as e:
        raise OptionError(f"{path}.{e.field}" if e.field else path, e.detail) from None


def _actions(path: str, spec: dict, own_name: str) -> Actions:
    skip = spec.get("skip") or []
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(skip, list):
        raise OptionError(f"{path}.skip", f"expected a list of rule names, got {skip!r}")
    known = rule_names()
    for i, name in enumerate(skip):
        if name == own_name:
            raise OptionError(f"{path}.skip[{i}]", f"a state cannot skip its own rule ({own_name})")
        if not isinstance(name, str) or name not in known:
            raise OptionError(f"{path}.skip[{i}]", f"no rule named {name!r} (rules: {', '.join(sorted(known))})")
    if "reject" in spec and "tempfail" in spec:
        raise OptionError(f"{path}.tempfail", "a state either rejects or tempfails, not both")
    at = spec.get("at", "mail")
    if at not in STAGES:
        raise OptionError(f"{path}.at", f"expected one of {', '.join(STAGES)}, got {at!r}")
    refusal = None
    for action in ("reject", "tempfail"):
        if action in spec:
            refusal = _refusal(f"{path}.{action}", action, spec[action], at)
    if "at" in spec and refusal is None:
        raise OptionError(f"{path}.at", "only with reject or tempfail")
    header = None
    if "add_header" in spec:
        header = _header(f"{path}.add_header", spec["add_header"])
    rate = _rate(f"{path}.rate", spec["rate"]) if "rate" in spec else None
    return Actions(tuple(skip), refusal, header, rate)


def _template(path: str, text: str) -> str:
    try:
        sample = text.format(**_SAMPLE)
    except (KeyError, IndexError, ValueError) as e:
        raise OptionError(path, f"only {{key}}, {{state}} and {{machine}} can be filled in ({e!r})") from None
    if any(c in sample for c in "\r\n\x00"):
        raise OptionError(path, "must be one line")
    return text


def _refusal(path: str, action: str, value, at: str) -> Refusal:
    default = (554, "5.7.1", "Sender {key} refused by local policy") if action == "reject" else \
        (451, "4.7.1", "Sender {key} deferred by local policy, try again later")
    if value is True:
        return Refusal(action, *default, at)
    if not isinstance(value, str) or not value.strip():
        raise OptionError(path, f'expected a reply like "{default[0]} {default[1]} text" or true, got {value!r}')
    m = _REPLY.match(value)
    code, enhanced, text = default
    if m:
        code, enhanced, text = int(m.group(1)), m.group(2) or default[1], m.group(3) or default[2]
        want = "5" if action == "reject" else "4"
        if str(code)[0] != want or enhanced[0] != want:
            raise OptionError(path, f"a {action} needs a {want}xx code and a {want}.x.x enhanced code, got {value!r}")
    else:
        text = value.strip()
    return Refusal(action, code, enhanced, _template(path, text), at)


def _header(path: str, value) -> tuple[str, str]:
    if not isinstance(value, str) or ":" not in value:
        raise OptionError(path, f'expected "Name: value", got {value!r}')
    name, _, text = value.partition(":")
    name, text = name.strip(), text.strip()
    if not Message.is_field_name(name):
        raise OptionError(path, f"not a header name: {name!r}")
    return name, _template(path, text)


def _rate(path: str, value) -> tuple[int, float]:
    if isinstance(value, str) and "/" in value:
        count, _, per = value.partition("/")
        value = {"max": int(count) if count.strip().isdigit() else count, "per": per.strip()}
    if not isinstance(value, dict) or set(value) != {"max", "per"}:
        raise OptionError(path, f'expected "N/DURATION" (like "10/1h") or {{max: N, per: DURATION}}, got {value!r}')
    count = _convert(f"{path}.max", integer, value["max"])
    per = _convert(f"{path}.per", duration, value["per"])
    if not 1 <= count <= 1000:
        raise OptionError(f"{path}.max", f"expected 1-1000, got {count}")
    if per <= 0:
        raise OptionError(f"{path}.per", "must be longer than zero")
    return count, per
