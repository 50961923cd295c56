"""Running policies: the rules built from policy files, and the lookup by recipient domain."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from ..errors import ConfigError, OptionError, Problem
from .rule import STAGES, GateContext, Rule
from .runner import prepare

if TYPE_CHECKING:  # smtpgate.config imports this module; keep the import one-way at run time
    from ..config.policies import PolicySpec, RuleEntry
    from .plugins import PluginRegistry


@dataclass(frozen=True, eq=False)
class Policy:
    """The ordered rules for a family of recipient domains. Compared by identity: a
    transaction's recipients share one policy object."""

    name: str
    domains: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()  # with their leading dot: ".example.com"
    rules: tuple[Rule, ...] = ()  # (given as any sequence: kept as a tuple, never changed)
    source: str | None = None

    def __post_init__(self):
        # PolicySet.end_hooks keeps what it builds from the rules: they must stay as they are
        object.__setattr__(self, "rules", tuple(self.rules))
        #: stage -> its hooks as the runner calls them (``runner.prepare``), made once here
        #: rather than at every call: the rules that have the hook, bound, with their
        #: calling convention. So a rule's hooks are read once, here, after its ``setup``:
        #: setting or clearing ``on_<stage>`` on a live instance later changes nothing
        #: (docs/writing-rules.md).
        object.__setattr__(self, "hooks", {stage: prepare(self.rules, stage) for stage in _RUN_STAGES})


# the stages a policy's own hooks run at ("end": PolicySet.end_hooks, across two policies)
_RUN_STAGES = tuple(s for s in STAGES if s != "end")


class PolicySet:
    """All policies, looked up by recipient domain."""

    def __init__(self, policies: Iterable[Policy]):
        self._by_name = {p.name: p for p in sorted(policies, key=lambda p: p.name)}
        self._exact = {d: p for p in self._by_name.values() for d in p.domains}
        self._suffix = {s: p for p in self._by_name.values() for s in p.suffixes}
        #: the policy whose rules run at CONNECT and HELO, before any recipient is known
        self.session_policy = self._by_name.get("default") or Policy("default")
        self._end_hooks: dict[Policy | None, tuple] = {}
        self._own_mail: dict[Policy, tuple] = {}

    def end_hooks(self, policy: Policy | None) -> tuple:
        """The ``on_end`` hooks a transaction under ``policy`` ends with (``runner.prepare``'s,
        in this order): the session policy's rules, then ``policy``'s others, each instance
        once. Built at the first transaction of each policy, not at every one (a policy's
        rules are a tuple: fixed)."""
        hooks = self._end_hooks.get(policy)
        if hooks is None:
            session_rules = self.session_policy.rules
            hooks = self._end_hooks[policy] = prepare(tuple(session_rules) + tuple(
                r for r in (policy.rules if policy else ()) if r not in session_rules), "end")
        return hooks

    def own_mail(self, policy: Policy) -> tuple:
        """``policy``'s ``on_mail`` hooks without the rules it shares with the session policy
        (they ran at MAIL already: no hook runs twice), for its first recipient."""
        hooks = self._own_mail.get(policy)
        if hooks is None:
            shared = set(self.session_policy.rules)
            hooks = self._own_mail[policy] = tuple(h for h in policy.hooks["mail"] if h[0] not in shared)
        return hooks

    def for_domain(self, domain: str) -> Policy | None:
        """Exact domain first, then the longest ``.suffix``; None: no policy governs it.

        Nothing is normalised beyond case: a trailing dot or an empty label matches nothing."""
        d = domain.lower()
        if not d or "" in d.split("."):
            return None
        if d in self._exact:
            return self._exact[d]
        at = d.find(".")
        while at != -1:
            if d[at:] in self._suffix:
                return self._suffix[d[at:]]
            at = d.find(".", at + 1)
        return None

    def get(self, name: str) -> Policy | None:
        return self._by_name.get(name)

    def all_domains_description(self) -> str:
        """``example: example.com .example.com; default: localhost`` for logs."""
        return "; ".join(f"{p.name}: {' '.join(p.domains + p.suffixes) or '(no domains)'}"
                         for p in self._by_name.values()) or "(no policies)"

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


def build_policies(specs: Iterable[PolicySpec], registry: PluginRegistry, gate_context: GateContext,
                   problems: list[Problem] | None = None) -> PolicySet:
    """One Rule instance per entry a policy writes; an entry inherited unchanged reuses its
    parent's very instance (the pipeline relies on identity not to run a hook twice).

    Without ``problems``, any problem raises one ConfigError listing them all; with it, they
    are appended and the entries that failed are left out."""
    specs = list(specs)
    found: list[Problem] = []
    instances: dict[tuple[str, str], Rule] = {}  # (policy that wrote the entry, rule name)
    for spec in specs:
        for entry in spec.entries:
            if entry.inherited_from is None:
                rule = _build(entry, registry, gate_context, found)
                if rule is not None:
                    instances[spec.name, entry.name] = rule
    policies = []
    for spec in specs:
        rules = [instances[key] for e in spec.entries if (key := (e.inherited_from or spec.name, e.name)) in instances]
        policies.append(Policy(spec.name, spec.domains, spec.suffixes, rules, spec.path))
    if problems is None and found:
        raise ConfigError(found)
    if problems is not None:
        problems.extend(found)
    return PolicySet(policies)


def _build(entry: RuleEntry, registry: PluginRegistry, gate: GateContext, problems: list[Problem]) -> Rule | None:
    if entry.name not in registry:
        close = difflib.get_close_matches(entry.name, registry.names(), 1)
        hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(registry.names()) or 'none'}"
        problems.append(entry.problem(f"unknown rule ({hint})"))
        return None
    rule_cls = registry.get(entry.name)
    try:
        rule = rule_cls(entry.options, gate)
    except OptionError as e:
        problems.append(entry.problem(str(e).removeprefix(f"{e.key}: "), e.key))
        return None
    except Exception as e:  # a plugin's setup() crashing is its author's bug; say where, not how
        problems.append(entry.problem(f"the rule failed to start ({registry.source(entry.name)}): "
                                      f"{type(e).__name__}: {e}"))
        return None
    rule.mode, rule.on_error, rule.entry = entry.mode, entry.on_error, entry
    return rule
