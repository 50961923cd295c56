"""Policy files (SPEC §3): one ``*.yaml`` per domain family, named by its file stem.

This module reads and resolves them (``extends``, replace/remove/append) into
``PolicySpec``s of ``RuleEntry``s; ``smtpgate.pipeline.policy`` turns those into running rules.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError, Problem
from ..pipeline.rule import COMMON_KEYS
from .yamlsrc import (LocatedDict, LocatedList, empty_mapping, join_path, load_file, problem_at, to_plain,
                      unknown_key)

POLICY_KEYS = ("domains", "extends", "rules")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class RuleEntry:
    """One ``NAME: {options}`` line of a policy, with the common keys split off.

    ``source``/``line``/``col`` locate the rule's name and ``index`` its place in that file's
    ``rules`` list; ``inherited_from`` names the policy that wrote the entry when this one
    inherited it unchanged (None when the policy wrote it itself)."""

    name: str
    options: dict
    mode: str
    on_error: str
    source: str
    line: int | None
    col: int | None
    option_marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    inherited_from: str | None = None
    index: int = 0

    @property
    def path(self) -> str:
        return f"rules[{self.index}].{self.name}"

    def problem(self, message: str, option: str | None = None) -> Problem:
        """A Problem at this entry, or about one of its options (at the option's value when it
        is written, e.g. not for a missing one): ``FILE:L:C: rules[i].NAME.OPT: message``."""
        line, col = self._mark(option) if option else (self.line, self.col)
        return Problem(self.source, line, col, f"{join_path(self.path, option) if option else self.path}: {message}")

    def _mark(self, option: str) -> tuple[int | None, int | None]:
        """Where ``option`` is written; for a nested one (``states.new.events.x[0]``) the closest
        enclosing value that is; else the entry itself."""
        while option:
            if option in self.option_marks:
                return self.option_marks[option]
            shorter = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", option)
            if shorter == option:
                break
            option = shorter
        return self.line, self.col


@dataclass(frozen=True)
class PolicySpec:
    """A policy file, read and resolved. ``suffixes`` keep their leading dot (``.example.com``)."""

    name: str
    path: str
    domains: tuple[str, ...]
    suffixes: tuple[str, ...]
    extends: str | None
    entries: list[RuleEntry]


@dataclass
class _Raw:
    """A policy file before ``extends`` is resolved."""

    name: str
    path: str
    doc: LocatedDict
    domains: list[str] = field(default_factory=list)
    suffixes: list[str] = field(default_factory=list)
    extends: str | None = None
    items: list[tuple[bool, RuleEntry]] = field(default_factory=list)  # (switched off?, entry)


def check_domain(value: Any) -> str:
    """A policy's domain, lower-cased: ``example.com`` or ``.example.com``. ValueError if not."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a domain name, got {value!r}")
    d = value.lower()
    if any(c.isspace() for c in d):
        raise ValueError(f"a domain has no spaces, got {value!r}")
    if "@" in d:
        raise ValueError(f"expected a domain, not an address, got {value!r}")
    if "*" in d:
        raise ValueError(f'wildcards are not supported; ".example.com" means every subdomain, got {value!r}')
    body = d[1:] if d.startswith(".") else d
    if body.startswith("[") or ":" in body or _is_ip(body):
        raise ValueError(f"IP literals cannot be policy domains, got {value!r}")
    if d.endswith("."):
        raise ValueError(f"write the domain without a trailing dot, got {value!r}")
    if not body.isascii():
        raise ValueError(f"write internationalised domains in their xn-- form, got {value!r}")
    if len(body) > 253 or not all(_LABEL.fullmatch(label) for label in body.split(".")):
        raise ValueError(f"not a valid domain name: {value!r}")
    return d


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def load_policy_specs(folder: str, problems: list[Problem] | None = None) -> list[PolicySpec]:
    """Every policy in ``folder``, resolved, sorted by name. Without ``problems``, any problem
    raises one ConfigError listing them all; with it, they are appended and the policies
    that could be read are returned."""
    found: list[Problem] = []
    raws = _read_folder(folder, found)
    _check_domains(raws, found)
    resolved: dict[str, list[RuleEntry]] = {}
    for name in raws:
        _resolve(name, raws, resolved, [], found)
    specs = [PolicySpec(r.name, r.path, tuple(r.domains), tuple(r.suffixes), r.extends, resolved[r.name])
             for r in raws.values()]
    if problems is None and found:
        raise ConfigError(found)
    if problems is not None:
        problems.extend(found)
    return specs


def _read_folder(folder: str, problems: list[Problem]) -> dict[str, _Raw]:
    try:
        names = sorted(n for n in os.listdir(folder)
                       if n.endswith((".yaml", ".yml")) and not n.startswith("."))
    except OSError as e:
        problems.append(Problem(folder, None, None, f"cannot read the policies folder: {e.strerror or e}"))
        return {}
    if not names:
        problems.append(Problem(folder, None, None, "no policy files (*.yaml) in the policies folder"))
    raws: dict[str, _Raw] = {}
    for filename in names:
        path = os.path.join(folder, filename)
        name = os.path.splitext(filename)[0]
        if name in raws:
            problems.append(Problem(path, None, None, f'a second file for policy "{name}" (first: {raws[name].path})'))
            continue
        try:
            doc = load_file(path)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        raw = _parse(name, path, doc, problems)
        if raw:
            raws[name] = raw
    return raws


def _parse(name: str, path: str, doc: Any, problems: list[Problem]) -> _Raw | None:
    if doc is None:
        doc = empty_mapping(path)
    if not isinstance(doc, LocatedDict):
        problems.append(Problem(path, 1, 1, "expected a mapping with domains, extends and rules"))
        return None
    raw = _Raw(name, path, doc)
    for key in doc:
        if key not in POLICY_KEYS:
            problems.append(unknown_key(doc, key, str(key), POLICY_KEYS))
    _parse_domains(raw, problems)
    extends = doc.get("extends")
    if extends is not None and (not isinstance(extends, str) or not extends):
        problems.append(problem_at(doc, "extends", "extends", f"expected a policy name, got {extends!r}"))
    elif extends is not None:
        raw.extends = extends
    rules = doc.get("rules")
    if isinstance(rules, LocatedList):
        for i in range(len(rules)):
            item = _parse_entry(rules, i, path, problems)
            if item and any(e.name == item[1].name for _, e in raw.items):
                problems.append(problem_at(rules, i, f"rules[{i}]", f'rule "{item[1].name}" is listed twice'))
            elif item:
                raw.items.append(item)
    elif rules is not None:
        problems.append(problem_at(doc, "rules", "rules", f"expected a list of rules, got {rules!r}"))
    return raw


def _parse_domains(raw: _Raw, problems: list[Problem]) -> None:
    doc = raw.doc
    value = doc.get("domains")
    if value is None:
        return
    if isinstance(value, LocatedList):
        items = [(value, i, f"domains[{i}]") for i in range(len(value))]
    else:  # a single domain written without a list
        items = [(doc, "domains", "domains")]
    for container, key, path in items:
        try:
            domain = check_domain(container[key])
        except ValueError as e:
            problems.append(problem_at(container, key, path, str(e)))
            continue
        target = raw.suffixes if domain.startswith(".") else raw.domains
        if domain in target:
            problems.append(problem_at(container, key, path, f"{domain} is listed twice"))
        else:
            target.append(domain)


# What YAML 1.1 reads as a boolean, also accepted when written as a (quoted) string.
_SWITCH_WORDS = {"off": False, "no": False, "false": False, "on": True, "yes": True, "true": True}


def _parse_entry(rules: LocatedList, i: int, path: str, problems: list[Problem]) -> tuple[bool, RuleEntry] | None:
    item, ipath = rules[i], f"rules[{i}]"
    if isinstance(item, str) and item:  # "- greylist": the rule with its default options
        line, col = rules.where(i)
        return False, RuleEntry(item, {}, "enforce", "tempfail", path, line, col, {}, None, i)
    if not isinstance(item, LocatedDict) or len(item) != 1:
        hint = ""
        if isinstance(item, LocatedDict) and len(item) > 1:
            hint = f" (found {', '.join(map(str, item))}: are the options indented under the rule's name?)"
        problems.append(problem_at(rules, i, ipath, "expected one `NAME: {options}` mapping" + hint))
        return None
    (name, value), = item.items()
    line, col = item.where(name, at_key=True)
    if not isinstance(name, str) or not name:
        problems.append(problem_at(item, name, ipath, f"a rule name must be text, got {name!r}", at_key=True))
        return None
    epath = join_path(ipath, name)
    switch = _SWITCH_WORDS.get(value.strip().lower()) if isinstance(value, str) else value
    if switch is False:  # "NAME: off": YAML reads off/no/false as False, "off" quoted as text
        return True, RuleEntry(name, {}, "enforce", "tempfail", path, line, col, {}, None, i)
    if value is None or switch is True:
        value = {}
    elif not isinstance(value, LocatedDict):
        problems.append(problem_at(item, name, epath, f"expected a mapping of options or off, got {value!r}"))
        return None
    options = to_plain(value)
    common: dict[str, str] = {}
    for key, choices in COMMON_KEYS.items():
        common[key] = choices[0]
        if key in options:
            chosen = options.pop(key)
            if chosen in choices:
                common[key] = chosen
            else:
                problems.append(problem_at(value, key, join_path(epath, key),
                                           f"expected one of {', '.join(choices)}, got {chosen!r}"))
    marks = _option_marks(value)
    return False, RuleEntry(name, options, common["mode"], common["on_error"], path, line, col, marks, None, i)


def _option_marks(value: Any) -> dict[str, tuple[int, int]]:
    """(line, col) of every option value, nested ones under dotted paths (``states.new.events``,
    ``lists[1].zone``), so a rule's error about a nested value names its line. Each container
    is walked once (YAML aliases share one object)."""
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, (LocatedDict, LocatedList)) or id(node) in seen:
            return
        seen.add(id(node))
        for key, mark in node.marks.items():
            sub = join_path(path, key)
            out.setdefault(sub, mark)
            walk(node[key], sub)

    walk(value, "")
    return out


def _check_domains(raws: dict[str, _Raw], problems: list[Problem]) -> None:
    """A domain (or suffix) governed by two policies is an error naming both files."""
    owner: dict[str, _Raw] = {}
    for raw in raws.values():
        for domain in raw.domains + raw.suffixes:
            if domain in owner:
                first = owner[domain]
                problems.append(_domain_problem(raw, domain, f'{domain} is already governed by policy '
                                                f'"{first.name}" ({first.path})'))
            else:
                owner[domain] = raw


def _domain_problem(raw: _Raw, domain: str, message: str) -> Problem:
    value = raw.doc.get("domains")
    if isinstance(value, LocatedList):
        for i, written in enumerate(value):
            if isinstance(written, str) and written.lower() == domain:
                return problem_at(value, i, f"domains[{i}]", message)
    return problem_at(raw.doc, "domains", "domains", message)


def _resolve(name: str, raws: dict[str, _Raw], resolved: dict[str, list[RuleEntry]], chain: list[str],
             problems: list[Problem]) -> list[RuleEntry]:
    """The policy's entries: the parent's, in order, with the child's replacing (in place),
    removing (``off``) and appending."""
    if name in resolved:
        return resolved[name]
    raw = raws[name]
    chain = chain + [name]
    entries: list[RuleEntry] = []
    parent_ok = raw.extends is None
    if raw.extends is not None:
        if raw.extends not in raws:
            known = ", ".join(sorted(raws)) or "none"
            problems.append(problem_at(raw.doc, "extends", "extends",
                                       f'no policy named "{raw.extends}" (policies: {known})'))
        elif raw.extends in chain:
            cycle = " -> ".join(chain[chain.index(raw.extends):] + [raw.extends])
            problems.append(problem_at(raw.doc, "extends", "extends", f"extends itself in a cycle: {cycle}"))
        else:
            parent = _resolve(raw.extends, raws, resolved, chain, problems)
            entries = [e if e.inherited_from else replace(e, inherited_from=raw.extends) for e in parent]
            parent_ok = True
    for off, entry in raw.items:
        at = next((i for i, e in enumerate(entries) if e.name == entry.name), None)
        if off and at is not None:
            del entries[at]
        elif off and parent_ok:
            problems.append(entry.problem("nothing to switch off: no inherited rule of that name"))
        elif not off and at is not None:
            entries[at] = entry
        elif not off:
            entries.append(entry)
    resolved[name] = entries
    return entries
