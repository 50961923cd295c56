"""The seal stage (``on_seal``): after every ``on_data``, on the final message; a hook stages
header fields that the pipeline prepends all or none, and may not edit the message itself."""
import pytest

from smtpgate import PluginError, Rule, Verdict
from smtpgate.pipeline.rule import check_rule_class
from smtpgate.testing import Harness, message
from smtpgate.mail.message import Message

SET = [("X-Seal", "i=1; first"), ("X-Seal-Sig", "i=1; b=abc\r\n\tdef"), ("X-Seal-Res", "i=1")]


class Sealer(Rule):
    """Stages SET (seeing what on_data left); ``then`` decides what happens after staging."""

    name = "sealer"
    then = None

    async def on_seal(self, tx, seal):
        seal.prepend("X-Seen-Subject", tx.message.get("Subject"))
        for name, value in SET:
            seal.prepend(name, value)
        if self.then == "raise":
            raise RuntimeError("signing failed half-way")
        if self.then == "edit":
            tx.message.prepend_header("X-Sneaky", "1")
        if self.then == "reject":
            return Verdict.reject("not today")
        return None


class Tagger(Rule):
    name = "tagger"

    async def on_data(self, tx):
        tx.message.edit_header("Subject", lambda v: " [tag]" + v)


def sealer(**attrs):
    rule = Sealer({}, None)
    for k, v in attrs.items():
        setattr(rule, k, v)
    return rule


async def test_seal_runs_after_every_on_data_and_prepends_the_set_in_order():
    raw = message("hello")
    h = Harness([sealer(), (Tagger, {})])  # the sealer comes first in the policy, yet sees the tag
    result = await h.send(raw)
    assert result.reply.code == 250
    [got] = h.relayed
    assert got.data.startswith(
        b"X-Seen-Subject: [tag] hello\r\nX-Seal: i=1; first\r\nX-Seal-Sig: i=1; b=abc\r\n\tdef\r\n"
        b"X-Seal-Res: i=1\r\nFrom: ")
    assert [(e.stage, e.rule) for e in result.trace if e.stage in ("data", "seal")] == [
        ("data", "tagger"), ("seal", "sealer")]
    seal_entry = [e for e in result.trace if e.stage == "seal"][0]
    assert seal_entry.action == "continue"
    assert seal_entry.reason == "add X-Seen-Subject; add X-Seal; add X-Seal-Sig; add X-Seal-Res"


@pytest.mark.parametrize("on_error, code", [("tempfail", 451), ("accept", 250)])
async def test_a_hook_that_raises_leaves_no_part_of_its_set(on_error, code):
    raw = message()
    h = Harness([sealer(then="raise", on_error=on_error)])
    result = await h.send(raw)
    assert result.reply.code == code
    entry = [e for e in result.trace if e.stage == "seal"][0]
    assert entry.action == "error" and "half-way" in entry.reason
    if code == 250:
        assert h.relayed[0].data == raw  # byte-identical: nothing of the set
    else:
        assert h.relayed == []


async def test_a_shadow_sealer_s_fields_are_never_applied():
    raw = message()
    h = Harness([sealer(mode="shadow")])
    result = await h.send(raw)
    assert result.reply.code == 250 and h.relayed[0].data == raw
    entry = [e for e in result.trace if e.stage == "seal"][0]
    assert entry.shadow and "add X-Seal" in entry.reason


async def test_a_shadow_sealer_that_raises_or_refuses_changes_nothing():
    for then in ("raise", "reject"):
        raw = message()
        h = Harness([sealer(mode="shadow", then=then)])
        assert (await h.send(raw)).reply.code == 250
        assert h.relayed[0].data == raw


async def test_editing_the_message_at_seal_is_an_error_and_undone():
    raw = message()
    h = Harness([sealer(then="edit", on_error="accept")])
    result = await h.send(raw)
    assert result.reply.code == 250 and h.relayed[0].data == raw
    entry = [e for e in result.trace if e.stage == "seal"][0]
    assert entry.action == "error" and "seal.prepend" in entry.reason


async def test_a_verdict_at_seal_still_refuses_and_applies_nothing():
    h = Harness([sealer(then="reject")])
    result = await h.send()
    assert str(result.reply) == "554 5.7.1 not today"
    assert h.relayed == []


async def test_a_refusal_at_data_means_no_seal_stage():
    class Refuser(Rule):
        name = "refuser"

        async def on_data(self, tx):
            return Verdict.reject("no")

    h = Harness([(Refuser, {}), sealer()])
    result = await h.send()
    assert result.reply.code == 554
    assert [e.stage for e in result.trace if e.stage == "seal"] == []


async def test_a_bad_staged_value_fails_the_hook_at_once():
    class Injector(Rule):
        name = "injector"

        async def on_seal(self, seal):
            seal.prepend("X-Ok", "fine")
            seal.prepend("X-Bad", "x\r\nBcc: victim@example.org")

    raw = message()
    injector = Injector({}, None)
    injector.on_error = "accept"
    h = Harness([injector])
    result = await h.send(raw)
    assert result.reply.code == 250 and h.relayed[0].data == raw
    assert "outside folding" in [e for e in result.trace if e.stage == "seal"][0].reason


async def test_seal_hooks_take_their_arguments_by_name():
    class ByName(Rule):
        name = "by_name"

        async def on_seal(self, message, seal, results):
            results.add(self, msg=f"{len(message.raw)} bytes")
            seal.prepend("X-Size", str(message.size))

    raw = message()
    h = Harness([(ByName, {})])
    result = await h.send(raw)
    assert h.relayed[0].data == f"X-Size: {len(raw)}\r\n".encode() + raw
    assert result.transaction.results.get("by_name").msg == [f"{len(raw)} bytes"]


def test_a_seal_hook_with_an_unknown_argument_is_refused_at_load():
    class Wrong(Rule):
        name = "wrong"

        async def on_seal(self, tx, rcpt):
            return None

    with pytest.raises(PluginError, match="hook on_seal has no argument 'rcpt'"):
        check_rule_class(Wrong, "wrong.py")


def test_prepend_fields_is_all_or_none_and_allows_only_folding():
    raw = b"From: a@b.example\r\n\r\nbody\r\n"
    m = Message(raw)
    for bad in ("x\r\ny", "x\ny", "x\r\n", "x\r\n\r\n y", "x\x00", "x\ry"):
        with pytest.raises(ValueError):
            m.prepend_fields([("X-Good", "1"), ("X-Bad", bad)])
        assert m.raw == raw and not m.changes
    with pytest.raises(ValueError):
        m.prepend_fields([("Bad Name", "1")])
    m.prepend_fields([("X-A", "1;\r\n 2"), ("X-B", "3")])
    assert m.raw == b"X-A: 1;\r\n 2\r\nX-B: 3\r\n" + raw
    assert [(c.op, c.header, c.after) for c in m.changes] == [("add", "X-A", "1; 2"), ("add", "X-B", "3")]
    assert m.get("X-A") == "1;\r\n 2"


async def test_the_staged_fields_are_the_rule_s_changes():
    result = await Harness([sealer()]).send()
    changes = result.transaction.message.changes
    assert [(c.op, c.header, c.rule) for c in changes] == [
        ("add", "X-Seen-Subject", "sealer"), ("add", "X-Seal", "sealer"), ("add", "X-Seal-Sig", "sealer"),
        ("add", "X-Seal-Res", "sealer")]


async def test_accept_at_seal_keeps_the_rule_s_fields_and_skips_later_sealers():
    class Accepts(Rule):
        name = "accepts"

        async def on_seal(self, seal):
            seal.prepend("X-First", "1")
            return Verdict.accept("done sealing")

    raw = message()
    h = Harness([(Accepts, {}), sealer()])
    result = await h.send(raw)
    assert result.reply.code == 250
    assert h.relayed[0].data == b"X-First: 1\r\n" + raw
    assert [e.rule for e in result.trace if e.stage == "seal"] == ["accepts"]
