"""smtpgate.testing.load_plugin: a plugin's tests load it by path, with the gate's load-time checks."""
import pytest

from smtpgate import PluginError, Rule
from smtpgate.testing import load_plugin, run_rule


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_a_plugin_file_loads_without_sys_path(tmp_path):
    path = write(tmp_path, "tag_all.py", """
from smtpgate import Rule

class TagAll(Rule):
    name = "tag_all"

    async def on_data(self, tx):
        tx.message.prepend_header("X-Tag", "yes")
""")
    module = load_plugin(path)
    assert issubclass(module.TagAll, Rule)
    result = await run_rule(module.TagAll)
    assert result.reply.code == 250


def test_a_misspelt_hook_is_refused_as_the_gate_refuses_it(tmp_path):
    path = write(tmp_path, "typo.py", """
from smtpgate import Rule

class Typo(Rule):
    name = "typo"

    async def on_rcpt_to(self, tx, rcpt):
        return None
""")
    with pytest.raises(PluginError) as e:
        load_plugin(path)
    assert str(path) in str(e.value) and "on_rcpt_to" in str(e.value)


def test_an_import_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "broken.py", "from smtpgate import Rule\n\nraise RuntimeError('boom')\n")
    with pytest.raises(PluginError) as e:
        load_plugin(path)
    assert f"{path}:3" in str(e.value) and "boom" in str(e.value)


def test_the_name_of_an_installed_rule_is_taken(tmp_path):
    path = write(tmp_path, "mine.py", """
from smtpgate import Rule

class MyGreylist(Rule):
    name = "greylist"

    async def on_rcpt(self, tx, rcpt):
        return None
""")
    with pytest.raises(PluginError, match="already taken"):
        load_plugin(path)
