"""Policy files: domains, extends (replace/remove/append), common keys, building the rules."""
from __future__ import annotations

import textwrap

import pytest

from smtpgate.config import PolicySet, build_policies, check_domain, load_policy_specs
from smtpgate.errors import ConfigError, OptionError
from smtpgate.pipeline.options import Option, duration, string
from smtpgate.pipeline.plugins import PluginRegistry
from smtpgate.pipeline.policy import Policy
from smtpgate.pipeline.rule import GateContext, Rule


class Greylist(Rule):
    name = "greylist"
    delay = Option(duration, "5m")

    async def on_rcpt(self, tx, rcpt):
        return None


class Attachments(Rule):
    name = "attachments"
    action = Option(string, "reject")

    def setup(self):
        if self.action not in ("reject", "strip"):
            raise OptionError("action", f"expected reject or strip, got {self.action!r}")


class Rewrite(Rule):
    name = "rewrite"
    subject_prefix = Option(string)  # required


class Tagger(Rule):
    name = "tagger"


class Crashing(Rule):
    name = "crashing"

    def setup(self):
        raise RuntimeError("boom")


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    for cls in (Greylist, Attachments, Rewrite, Tagger, Crashing):
        reg.add(cls, __file__)
    return reg


@pytest.fixture
def folder(tmp_path):
    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip("\n"))
        return str(tmp_path / name)
    write.path = str(tmp_path)
    return write


def problems(folder_path: str, registry: PluginRegistry | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        specs = load_policy_specs(folder_path)
        build_policies(specs, registry or PluginRegistry(), GateContext(clock=None))
    return [str(p) for p in e.value.problems]


def build(folder_path: str, registry: PluginRegistry) -> PolicySet:
    return build_policies(load_policy_specs(folder_path), registry, GateContext(clock=None))


# domains

def test_domains_and_suffixes(folder):
    folder("example.com.yaml", "domains: [Example.COM, .Example.com, mail.example.org]\n")
    (spec,) = load_policy_specs(folder.path)
    assert spec.name == "example.com" and spec.path == f"{folder.path}/example.com.yaml"
    assert spec.domains == ("example.com", "mail.example.org")
    assert spec.suffixes == (".example.com",)


@pytest.mark.parametrize("value, message", [
    ("", "expected a domain name, got ''"),
    ("exa mple.com", "a domain has no spaces"),
    ("user@example.com", "expected a domain, not an address"),
    ("*.example.com", "wildcards are not supported"),
    ("192.0.2.1", "IP literals cannot be policy domains"),
    ("[192.0.2.1]", "IP literals cannot be policy domains"),
    ("2001:db8::1", "IP literals cannot be policy domains"),
    ("example.com.", "without a trailing dot"),
    ("exämple.com", "xn-- form"),
    ("a..b", "not a valid domain name"),
    ("-a.com", "not a valid domain name"),
    (5, "expected a domain name, got 5"),
])
def test_bad_domains(value, message):
    with pytest.raises(ValueError, match=message):
        check_domain(value)


def test_bad_domain_is_located(folder):
    folder("a.yaml", """
        domains:
          - example.com
          - "*.example.org"
        """)
    assert problems(folder.path) == [
        f"{folder.path}/a.yaml:3:5: domains[1]: wildcards are not supported; "
        "\".example.com\" means every subdomain, got '*.example.org'"]


def test_domain_in_two_policies_names_both_files(folder):
    folder("a.yaml", "domains: [example.com]\n")
    folder("b.yaml", "domains: [other.example, EXAMPLE.com]\n")
    assert problems(folder.path) == [
        f'{folder.path}/b.yaml:1:26: domains[1]: example.com is already governed by policy "a" ({folder.path}/a.yaml)']


def test_exact_domain_and_suffix_may_live_in_different_policies(folder, registry):
    folder("apex.yaml", "domains: [example.com]\n")
    folder("subs.yaml", "domains: [.example.com]\n")
    policies = build(folder.path, registry)
    assert policies.for_domain("example.com").name == "apex"
    assert policies.for_domain("a.b.example.com").name == "subs"


# rules and extends

def test_extends_replaces_in_place_removes_and_appends(folder, registry):
    folder("default.yaml", """
        domains: [localhost]
        rules:
          - greylist: {delay: 1m}
          - attachments:
          - tagger
        """)
    folder("child.yaml", """
        domains: [example.com]
        extends: default
        rules:
          - attachments: {action: strip}
          - greylist: off
          - rewrite: {subject_prefix: "[EXT] "}
        """)
    specs = {s.name: s for s in load_policy_specs(folder.path)}
    child = specs["child"].entries
    assert [(e.name, e.options, e.inherited_from) for e in child] == [
        ("attachments", {"action": "strip"}, None),
        ("tagger", {}, "default"),
        ("rewrite", {"subject_prefix": "[EXT] "}, None),
    ]
    assert child[1].source == f"{folder.path}/default.yaml" and (child[1].line, child[1].col) == (5, 5)


def test_grandchild_keeps_the_writer_of_each_entry(folder):
    folder("a.yaml", "rules: [greylist, tagger]\n")
    folder("b.yaml", "extends: a\nrules: [{tagger: {}}]\n")
    folder("c.yaml", "extends: b\nrules: [rewrite]\n")
    specs = {s.name: s for s in load_policy_specs(folder.path)}
    assert [(e.name, e.inherited_from) for e in specs["c"].entries] == [
        ("greylist", "a"), ("tagger", "b"), ("rewrite", None)]


def test_inherited_entries_share_the_parents_rule_instance(folder, registry):
    folder("default.yaml", "domains: [localhost]\nrules: [greylist, tagger]\n")
    folder("child.yaml", "domains: [example.com]\nextends: default\nrules: [{tagger: {}}]\n")
    folder("grandchild.yaml", "domains: [example.org]\nextends: child\n")
    policies = build(folder.path, registry)
    default, child, grandchild = (policies.get(n) for n in ("default", "child", "grandchild"))
    assert child.rules[0] is default.rules[0] is grandchild.rules[0]  # greylist, inherited twice
    assert child.rules[1] is not default.rules[1]  # tagger, written again by child
    assert grandchild.rules[1] is child.rules[1]


def test_rule_entry_forms_and_common_keys(folder, registry):
    folder("p.yaml", """
        rules:
          - tagger
          - rewrite: {subject_prefix: "x", mode: shadow, on_error: accept}
          - greylist:
          - attachments: on
        """)
    (spec,) = load_policy_specs(folder.path)
    tagger, rewrite, greylist, attachments = spec.entries
    assert (tagger.options, tagger.mode, tagger.on_error) == ({}, "enforce", "tempfail")
    assert (rewrite.options, rewrite.mode, rewrite.on_error) == ({"subject_prefix": "x"}, "shadow", "accept")
    assert rewrite.option_marks["subject_prefix"] == (3, 31) and rewrite.index == 1
    assert greylist.options == {} and attachments.options == {}
    built = build(folder.path, registry).get("p").rules
    assert isinstance(built, tuple)  # fixed: PolicySet.end_hooks keeps what it built from them
    assert (built[1].mode, built[1].on_error, built[1].entry) == ("shadow", "accept", rewrite)
    assert built[2].delay == 300.0


def test_bad_common_keys_are_located(folder):
    folder("p.yaml", "rules:\n  - greylist: {mode: dry, on_error: ignore}\n")
    assert problems(folder.path) == [
        f"{folder.path}/p.yaml:2:22: rules[0].greylist.mode: expected one of enforce, shadow, got 'dry'",
        f"{folder.path}/p.yaml:2:37: rules[0].greylist.on_error: expected one of tempfail, accept, got 'ignore'",
    ]


def test_malformed_rule_entries(folder):
    folder("p.yaml", """
        rules:
          - greylist:
            delay: 5m
          - greylist: 5m
          - [a]
          - tagger
          - tagger: {}
          - ghost: off
        """)
    p = f"{folder.path}/p.yaml"
    assert problems(folder.path) == [
        f"{p}:2:5: rules[0]: expected one `NAME: {{options}}` mapping "
        "(found greylist, delay: are the options indented under the rule's name?)",
        f"{p}:4:15: rules[1].greylist: expected a mapping of options or off, got '5m'",
        f"{p}:5:5: rules[2]: expected one `NAME: {{options}}` mapping",
        f'{p}:7:5: rules[4]: rule "tagger" is listed twice',
        f"{p}:8:5: rules[5].ghost: nothing to switch off: no inherited rule of that name",
    ]


def test_unknown_policy_keys(folder):
    folder("p.yaml", "domain: [example.com]\n")
    assert problems(folder.path) == [f'{folder.path}/p.yaml:1:1: domain: unknown key (did you mean "domains"?)']


def test_extends_unknown_policy(folder):
    folder("p.yaml", "extends: defualt\n")
    assert problems(folder.path) == [f'{folder.path}/p.yaml:1:10: extends: no policy named "defualt" (policies: p)']


def test_extends_cycles(folder):
    folder("a.yaml", "extends: b\n")
    folder("b.yaml", "extends: a\n")
    folder("c.yaml", "extends: c\n")
    assert problems(folder.path) == [
        f"{folder.path}/b.yaml:1:10: extends: extends itself in a cycle: a -> b -> a",
        f"{folder.path}/c.yaml:1:10: extends: extends itself in a cycle: c -> c",
    ]


def test_two_files_for_one_policy_and_an_empty_folder(folder, tmp_path):
    folder("a.yaml", "{}\n")
    folder("a.yml", "{}\n")
    assert problems(folder.path) == [f'{folder.path}/a.yml: a second file for policy "a" (first: {folder.path}/a.yaml)']
    (tmp_path / "empty").mkdir()
    assert problems(str(tmp_path / "empty")) == [f"{tmp_path}/empty: no policy files (*.yaml) in the policies folder"]


def test_yaml_errors_in_a_policy_are_located(folder):
    folder("p.yaml", "rules:\n  - greylist: {delay: 5m\n")
    (problem,) = problems(folder.path)
    assert problem.startswith(f"{folder.path}/p.yaml:3:1: ")


# building

def test_unknown_rule_name_is_located(folder, registry):
    folder("p.yaml", "domains: [example.com]\nrules:\n  - tagger\n  - greylst: {delay: 5m}\n")
    assert problems(folder.path, registry) == [
        f'{folder.path}/p.yaml:4:5: rules[1].greylst: unknown rule (did you mean "greylist"?)']


def test_bad_option_values_are_located_at_the_option(folder, registry):
    folder("x.yaml", """
        rules:
          - greylist: {delay: soon}
          - attachments: {action: explode}
          - rewrite: {}
          - tagger: {colour: red}
          - crashing
        """)
    p = f"{folder.path}/x.yaml"
    assert problems(folder.path, registry) == [
        f"""{p}:2:23: rules[0].greylist.delay: expected a duration like "5m", got 'soon'""",
        f"{p}:3:27: rules[1].attachments.action: expected reject or strip, got 'explode'",
        f"{p}:4:5: rules[2].rewrite.subject_prefix: is required",
        f"{p}:5:22: rules[3].tagger.colour: unknown option (known: none)",
        f"{p}:6:5: rules[4].crashing: the rule failed to start ({__file__}): RuntimeError: boom",
    ]


def test_a_failed_parent_entry_is_reported_once(folder, registry):
    folder("a.yaml", "rules: [{greylist: {delay: soon}}, tagger]\n")
    folder("b.yaml", "extends: a\n")
    collected = []
    policies = build_policies(load_policy_specs(folder.path), registry, GateContext(clock=None), collected)
    assert len(collected) == 1
    assert [r.name for r in policies.get("b").rules] == ["tagger"]


# the policy set

def test_for_domain_lookup(folder, registry):
    folder("default.yaml", "domains: [localhost]\n")
    folder("ex.yaml", "domains: [example.com, .example.com]\n")
    folder("deep.yaml", "domains: [.mail.example.com, special.mail.example.com]\n")
    policies = build(folder.path, registry)
    name = lambda d: getattr(policies.for_domain(d), "name", None)  # noqa: E731
    assert name("EXAMPLE.com") == "ex"
    assert name("a.example.com") == "ex"
    assert name("x.mail.example.com") == "deep"  # the longest suffix wins
    assert name("mail.example.com") == "ex"  # ".mail.example.com" excludes its apex
    assert name("special.mail.example.com") == "deep"
    assert name("example.com.") is None  # trailing dots are the address layer's to refuse
    assert name("xexample.com") is None and name("") is None and name(".example.com") is None
    assert name("a..example.com") is None
    assert policies.session_policy is policies.get("default")
    assert len(policies) == 3 and [p.name for p in policies] == ["deep", "default", "ex"]
    assert policies.all_domains_description() == (
        "deep: special.mail.example.com .mail.example.com; default: localhost; ex: example.com .example.com")


def test_session_policy_without_a_default_file(folder, registry):
    folder("ex.yaml", "domains: [example.com]\n")
    policies = build(folder.path, registry)
    session = policies.session_policy
    assert isinstance(session, Policy) and session.name == "default" and session.rules == ()
    assert policies.for_domain("localhost") is None


@pytest.mark.parametrize("written", ['off', '"off"', "'OFF'", '"no"', "false", '"False"'])
def test_off_is_off_however_yaml_typed_it(folder, written):
    """`attachments: "off"` (a string) switches the rule off like `attachments: off` (a bool)."""
    folder("default.yaml", "domains: [localhost]\nrules: [greylist, attachments, tagger]\n")
    folder("child.yaml", f"domains: [example.com]\nextends: default\nrules:\n  - attachments: {written}\n")
    specs = {s.name: s for s in load_policy_specs(folder.path)}
    assert [e.name for e in specs["child"].entries] == ["greylist", "tagger"]


@pytest.mark.parametrize("written", ['on', '"on"', '"yes"'])
def test_on_written_as_text_means_default_options(folder, written):
    folder("default.yaml", f"domains: [localhost]\nrules:\n  - tagger: {written}\n")
    [spec] = load_policy_specs(folder.path)
    assert [(e.name, e.options) for e in spec.entries] == [("tagger", {})]
