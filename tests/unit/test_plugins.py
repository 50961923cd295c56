"""Loading rule plugins from folders and entry points; each bad plugin fails naming its file."""
from __future__ import annotations

import textwrap
import uuid

import pytest

from smtpgate.config import check_config, load_all
from smtpgate.config import gate as gate_module
from smtpgate.errors import PluginError
from smtpgate.pipeline.plugins import PluginRegistry
from smtpgate.pipeline.rule import Rule

GOOD = """
    from smtpgate.pipeline.options import Option, duration
    from smtpgate.pipeline.rule import Rule

    class Slow(Rule):
        name = "slow"
        pause = Option(duration, "1s")

        async def on_mail(self, tx):
            return None
    """


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def load_problems(*folders) -> list[str]:
    collected = []
    PluginRegistry.load(folders, entry_points=False, problems=collected)
    return [str(p) for p in collected]


# folders

def test_folder_plugins_are_loaded(tmp_path):
    path = write(tmp_path / "rules" / "slow.py", GOOD)
    write(tmp_path / "rules" / "_helpers.py", "raise RuntimeError('never imported')\n")
    write(tmp_path / "rules" / "notes.txt", "not python\n")
    write(tmp_path / "rules" / "tag.py", """
        from smtpgate.pipeline.rule import Rule

        class _Base(Rule):  # a private helper base, not a rule
            pass

        class Tag(_Base):
            name = "tag"
        """)
    registry = PluginRegistry.load([str(tmp_path / "rules")], entry_points=False)
    assert registry.names() == ["slow", "tag"]
    assert registry.source("slow") == path
    slow = registry.get("slow")
    assert issubclass(slow, Rule) and slow({}).pause == 1.0
    with pytest.raises(KeyError):
        registry.get("fast")


def test_imported_rule_classes_are_not_registered_twice(tmp_path):
    write(tmp_path / "lib" / "shared_rule_mod.py", GOOD)
    write(tmp_path / "rules" / "uses.py", """
        import importlib.util
        spec = importlib.util.spec_from_file_location("shared_rule_mod", %r)
        shared = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shared)
        Slow = shared.Slow  # imported, not defined here
        """ % str(tmp_path / "lib" / "shared_rule_mod.py"))
    assert PluginRegistry.load([str(tmp_path / "rules")], entry_points=False).names() == []


@pytest.mark.parametrize("body, message", [
    ("    async def on_rcpt_to(self, tx, rcpt):\n        return None\n",
     "unknown hook 'on_rcpt_to'"),
    ("    def on_rcpt(self, tx, rcpt):\n        return None\n",
     "hook on_rcpt must be 'async def'"),
    ("    async def on_rcpt(self, tx):\n        return None\n",
     "hook on_rcpt must take (self, tx, rcpt), has (self, tx)"),
    ("    limit = Option(integer, 'ten')\n",
     "default of option 'limit' is invalid"),
])
def test_bad_plugins_fail_naming_their_file(tmp_path, body, message):
    header = "from smtpgate.pipeline.options import Option, integer\nfrom smtpgate.pipeline.rule import Rule\n\n\n"
    path = write(tmp_path / "rules" / "bad.py", header + "class Bad(Rule):\n    name = 'bad'\n" + body)
    with pytest.raises(PluginError) as e:
        PluginRegistry.load([str(tmp_path / "rules")], entry_points=False)
    assert str(e.value).startswith(f"{path}:5: ")
    assert message in str(e.value)
    (problem,) = load_problems(str(tmp_path / "rules"))
    assert problem.startswith(f"{path}:5: Bad: ") and message in problem


def test_a_rule_without_a_name(tmp_path):
    path = write(tmp_path / "rules" / "anon.py", "from smtpgate.pipeline.rule import Rule\nclass Anon(Rule):\n    pass\n")
    (problem,) = load_problems(str(tmp_path / "rules"))
    assert problem.startswith(f"{path}:2: ") and problem.endswith("a rule must set a non-empty 'name'")


def test_duplicate_rule_names_name_both_files(tmp_path):
    first = write(tmp_path / "a" / "slow.py", GOOD)
    second = write(tmp_path / "b" / "slow_again.py", GOOD)
    (problem,) = load_problems(str(tmp_path / "a"), str(tmp_path / "b"))
    assert problem.startswith(f"{second}:4: ")
    assert 'rule name "slow" is already taken by ' in problem and problem.endswith(f"Slow in {first}")


def test_import_errors_name_the_file_and_line(tmp_path):
    crash = write(tmp_path / "rules" / "crash.py", "import os\n\nraise RuntimeError('no config here')\n")
    syntax = write(tmp_path / "rules" / "syntax.py", "def broken(:\n    pass\n")
    missing = write(tmp_path / "rules" / "zmissing.py", "import no_such_module_for_smtpgate\n")
    assert load_problems(str(tmp_path / "rules")) == [
        f"{crash}:3: cannot import: RuntimeError: no config here",
        f"{syntax}:1:12: cannot import: SyntaxError: invalid syntax",
        f"{missing}:1: cannot import: ModuleNotFoundError: No module named 'no_such_module_for_smtpgate'",
    ]


def test_a_missing_plugins_folder(tmp_path):
    (problem,) = load_problems(str(tmp_path / "nowhere"))
    assert problem.startswith(f"{tmp_path}/nowhere: cannot read the plugins folder")


# entry points

def fake_distribution(tmp_path, monkeypatch, group: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """A tiny installed distribution: ``*.dist-info`` with METADATA and entry_points.txt."""
    dist = tmp_path / "site" / f"fake_rules_{uuid.uuid4().hex[:8]}-1.0.dist-info"
    write(dist / "METADATA", f"Metadata-Version: 2.1\nName: {dist.name.split('-')[0]}\nVersion: 1.0\n")
    write(dist / "entry_points.txt", f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, text in modules.items():
        write(tmp_path / "site" / f"{name}.py", text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_entry_point_naming_a_class(tmp_path, monkeypatch):
    mod = f"ep_class_{uuid.uuid4().hex[:8]}"
    fake_distribution(tmp_path, monkeypatch, "smtpgate.rules", {"slow": f"{mod}:Slow"}, {mod: GOOD})
    registry = PluginRegistry.load()
    assert "slow" in registry
    assert registry.source("slow") == str(tmp_path / "site" / f"{mod}.py")


def test_entry_point_naming_a_module_takes_every_rule_defined_in_it(tmp_path, monkeypatch):
    mod = f"ep_module_{uuid.uuid4().hex[:8]}"
    text = GOOD + "\n    class Other(Rule):\n        name = 'other'\n\n    class NotARule:\n        name = 'x'\n"
    fake_distribution(tmp_path, monkeypatch, "smtpgate_test.rules", {"pack": mod}, {mod: text})
    registry = PluginRegistry.load(group="smtpgate_test.rules")
    assert registry.names() == ["other", "slow"]


def test_broken_entry_points(tmp_path, monkeypatch):
    mod = f"ep_broken_{uuid.uuid4().hex[:8]}"
    fake_distribution(tmp_path, monkeypatch, "smtpgate_test.rules",
                      {"a": f"{mod}:Missing", "b": f"{mod}:NOT_A_RULE", "c": f"{mod}_gone"},
                      {mod: GOOD + "\n    NOT_A_RULE = 5\n"})
    collected = []
    PluginRegistry.load(group="smtpgate_test.rules", problems=collected)
    assert [str(p) for p in collected] == [
        f"entry point a = {mod}:Missing: cannot import: AttributeError: "
        f"module '{mod}' has no attribute 'Missing'",
        f"entry point b = {mod}:NOT_A_RULE: names neither a Rule subclass nor a module",
        f"entry point c = {mod}_gone: cannot import: ModuleNotFoundError: No module named '{mod}_gone'",
    ]


def test_entry_point_and_folder_with_the_same_name(tmp_path, monkeypatch):
    mod = f"ep_dup_{uuid.uuid4().hex[:8]}"
    fake_distribution(tmp_path, monkeypatch, "smtpgate_test.rules", {"slow": f"{mod}:Slow"}, {mod: GOOD})
    path = write(tmp_path / "rules" / "slow.py", GOOD)
    with pytest.raises(PluginError, match=f'^{path}:4: rule name "slow" is already taken by {mod}.Slow in '):
        PluginRegistry.load([str(tmp_path / "rules")], group="smtpgate_test.rules")


# through the whole configuration

def test_plugin_rules_in_policies_and_check_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SMTPGATE_CONFIG", raising=False)
    monkeypatch.setattr(gate_module, "SYSTEM_CONFIG", str(tmp_path / "none.yaml"))
    write(tmp_path / "rules" / "slow.py", GOOD)
    write(tmp_path / "policies" / "default.yaml", "domains: [example.com]\nrules: [{slow: {pause: 2s}}]\n")
    gate = write(tmp_path / "gate.yaml", "policies: policies\nplugins: [rules]\n")
    config, registry, policies = load_all(gate)
    (rule,) = policies.for_domain("example.com").rules
    assert rule.pause == 2.0 and registry.source("slow") == str(tmp_path / "rules" / "slow.py")
    assert check_config(gate) == []

    bad = write(tmp_path / "rules" / "typo.py",
                "from smtpgate.pipeline.rule import Rule\nclass Typo(Rule):\n    name = 'typo'\n"
                "    async def on_rcpt_to(self, tx, rcpt):\n        pass\n")
    with pytest.raises(PluginError, match=f"^{bad}:2: "):
        load_all(gate)
    (problem,) = check_config(gate)
    assert problem.file == bad and problem.line == 2 and "unknown hook 'on_rcpt_to'" in problem.message
