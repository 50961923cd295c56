"""The example plugin's own tests, written as a plugin author would: through smtpgate.testing."""
import json
import pathlib

from smtpgate.testing import Harness, load_plugin, message, run_command, run_rule

# Loaded as the gate loads a file of its plugins: folder, with the same checks.
plugin = load_plugin(pathlib.Path(__file__).with_name("subject_words.py"))
SubjectWords = plugin.SubjectWords


async def test_rejects_a_listed_phrase():
    result = await run_rule(SubjectWords, {"words": ["Wire Transfer"], "action": "reject"},
                            message("URGENT wire transfer needed"))
    assert result.reply.code == 554
    assert result.trace[-1].rule == "subject_words"
    assert result.trace[-1].action == "reject"


async def test_tags_and_leaves_the_rest_byte_identical():
    raw = message("invoice overdue")
    h = Harness([(SubjectWords, {"words": ["invoice overdue"]})])
    result = await h.send(raw)
    assert result.reply.code == 250
    [relayed] = h.relayed
    assert relayed.data == b"X-Subject-Words: invoice overdue\r\n" + raw


async def test_other_mail_passes_untouched():
    raw = message("lunch?")
    h = Harness([(SubjectWords, {"words": ["invoice overdue"], "action": "reject"})])
    result = await h.send(raw)
    assert result.reply.code == 250
    assert h.relayed[0].data == raw


async def test_reports_what_it_found_for_later_rules():
    h = Harness([(SubjectWords, {"words": ["invoice overdue"]})])
    found = (await h.send(message("invoice overdue"))).transaction.results.get("subject_words")
    assert (found.outcome, found.fail) == ("fail", ["subject has 'invoice overdue'"])
    clean = (await h.send(message("lunch?"))).transaction.results.get("subject_words")
    assert clean.outcome == "pass"


def test_its_command_lists_what_each_policy_looks_for(tmp_path):
    """The command as `smtpgate subject-words` runs it once a package registers add_parser."""
    here = pathlib.Path(__file__).parent
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        'domains: [example.com]\nrules:\n  - subject_words: {words: ["wire transfer"], action: reject}\n')
    (tmp_path / "gate.yaml").write_text(
        f"policies: policies\nplugins: [{json.dumps(str(here))}]\nstate: sqlite:///./state.db\n")
    ran = run_command(["subject-words", "--json", "-c", str(tmp_path / "gate.yaml")],
                      {"subject-words": plugin.add_parser})
    assert ran.code == 0, ran.stderr
    assert json.loads(ran.stdout) == {
        "policies": [{"policy": "default", "words": ["wire transfer"], "action": "reject"}]}
