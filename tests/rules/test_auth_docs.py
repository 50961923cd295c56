"""The policy examples of docs/rules/dkim.md, dmarc.md and arc.md load as written
(`smtpgate check-config` finds no problem), so a page cannot drift from the options."""
import re

import pytest

from smtpgate.config import check_config
from tests.support.constants import ROOT
from tests.support.dkimkeys import rsa_key

PAGES = ("dkim", "dmarc", "arc")


def examples(page: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs" / "rules" / f"{page}.md").read_text(), re.M | re.S)


@pytest.mark.parametrize("page", PAGES)
def test_each_policy_example_on_the_page_loads(page, tmp_path):
    from tests.support.gateproc import require_tool
    key = tmp_path / "arc.pem"
    key.write_bytes(rsa_key(require_tool("openssl")).private)
    (tmp_path / "policies").mkdir()
    (tmp_path / "gate.yaml").write_text("policies: policies\n")
    found = examples(page)
    assert found, f"docs/rules/{page}.md has no policy example"
    for text in found:
        text = text.replace("/etc/smtpgate/arc.pem", str(key))
        if not re.search(r"^domains:", text, re.M):  # a page shows the rules list alone
            text = "domains: [example.com]\n" + text
        (tmp_path / "policies" / "default.yaml").write_text(text)
        assert [str(p) for p in check_config(str(tmp_path / "gate.yaml"))] == [], text
