"""The example plugin's own tests, written as a plugin author would: through smtpgate.testing."""
import pathlib

from smtpgate.testing import Harness, load_plugin, message, run_rule

# Loaded as the gate loads a file of its plugins: folder, with the same checks.
SubjectWords = load_plugin(pathlib.Path(__file__).with_name("subject_words.py")).SubjectWords


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
