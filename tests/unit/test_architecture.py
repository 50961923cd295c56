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


# Outside libraries first-party rules use, each imported by one module of rules/ only.
RULES_ONE_IMPORTER = {
    "olefile": {"attachments/content.py"},
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
    # itself and `smtpgate.testing` (for their tests), never internal modules.
    private = {m for m in imports(path)
               if m.startswith("smtpgate.") and m != "smtpgate.testing"}
    assert not private, f"{path.name} imports internals: {sorted(private)}"


def test_public_api_is_exported():
    import smtpgate
    for name in ("Rule", "Verdict", "Option", "Session", "Transaction", "Message", "Reply",
                 "ConfigError", "PluginError", "StoreError", "RelayError"):
        assert hasattr(smtpgate, name), name
