"""The house rules DESIGN.md states, checked: they hold because a test fails when they don't."""
import ast
import pathlib

import pytest

from tests.support.constants import ROOT

PRODUCT = ROOT / "smtpgate"

# Each outside library is imported by exactly one product module (the translation boundary).
ONE_IMPORTER = {
    "aiosmtpd": {"smtp/front.py"},
    "aiosmtplib": {"smtp/relay.py"},
    "authres": {"pipeline/authheader.py"},
    "dns": {"resolver.py"},  # dnspython
    "yaml": {"config/yamlsrc.py"},
}


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("library", sorted(ONE_IMPORTER))
def test_each_outside_library_has_one_importer(library):
    importers = {str(p.relative_to(PRODUCT)) for p in PRODUCT.rglob("*.py")
                 if any(m == library or m.startswith(library + ".") for m in imports(p))}
    assert importers == ONE_IMPORTER[library]


# Outside libraries first-party rules use, each imported by one module of a rule package only
# (a rule package stands alone, as a third-party plugin would: dkim and arc each own theirs).
RULES_ONE_IMPORTER = {
    "olefile": {"attachments/content.py"},
    "dkim": {"dkim/verify.py", "arc/chain.py"},  # dkimpy
    "publicsuffixlist": {"dmarc/orgdomain.py"},
}


@pytest.mark.parametrize("library", sorted(RULES_ONE_IMPORTER))
def test_each_rules_library_has_one_importer(library):
    importers = {str(p.relative_to(ROOT / "rules")) for p in (ROOT / "rules").rglob("*.py")
                 if any(m == library or m.startswith(library + ".") for m in imports(p))}
    assert importers == RULES_ONE_IMPORTER[library]
    assert not any(library in imports(p) for p in PRODUCT.rglob("*.py"))


def plugin_files():
    return sorted((ROOT / "rules").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_rules_use_only_the_public_api(path):
    # First-party rules and the example are written exactly as a user's plugin: `smtpgate`
    # itself, `smtpgate.testing` (for their tests) and `smtpgate.cli_api` (for a rule's own
    # command, cli.py), never internal modules.
    public = {"smtpgate.testing"} | ({"smtpgate.cli_api"} if path.name == "cli.py" else set())
    private = {m for m in imports(path) if m.startswith("smtpgate.") and m not in public}
    assert not private, f"{path.name} imports internals: {sorted(private)}"


def test_the_gate_names_no_rule():
    # The gate's own code knows no first-party rule: each brings its command (entry points)
    # and its parts; nothing in smtpgate/ imports smtpgate_rules.
    importers = [str(p.relative_to(PRODUCT)) for p in PRODUCT.rglob("*.py")
                 if any(m == "smtpgate_rules" or m.startswith("smtpgate_rules.") for m in imports(p))]
    assert importers == []


def test_public_api_is_exported():
    import smtpgate
    for name in ("Rule", "Verdict", "Option", "Session", "Transaction", "Message", "Reply",
                 "ConfigError", "PluginError", "StoreError", "sender_key", "client_key"):
        assert hasattr(smtpgate, name), name


def test_every_public_name_is_documented():
    # A docstring on each exported object, and one line for each in the table of
    # docs/writing-rules.md ("The public API"), so the API is what the docs say it is.
    import inspect

    import smtpgate
    doc = (ROOT / "docs" / "writing-rules.md").read_text()
    table = doc[doc.index("## The public API"):]
    for name in smtpgate.__all__:
        obj = getattr(smtpgate, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__), f"{name} has no docstring"
        assert f"`{name}" in table, f"{name} is missing from the table in docs/writing-rules.md"
