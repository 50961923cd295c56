"""The pipeline and the conversation, in process through smtpgate.testing (no sockets)."""
import textwrap

from smtpgate import Rule, Verdict
from smtpgate.testing import FakeClock, Harness, message


class Recorder(Rule):
    name = "recorder"

    def setup(self):
        self.calls = []

    async def on_connect(self, session):
        self.calls.append("connect")

    async def on_helo(self, session):
        self.calls.append(f"helo {session.helo}")

    async def on_mail(self, tx):
        self.calls.append(f"mail {tx.sender}")

    async def on_rcpt(self, tx, rcpt):
        self.calls.append(f"rcpt {rcpt.address}")

    async def on_data(self, tx):
        self.calls.append("data")

    async def on_delivered(self, tx, reply):
        self.calls.append(f"delivered {reply.code}")


class Verdicts(Rule):
    """Returns whatever verdict the test put in ``plan[stage]``."""

    name = "verdicts"
    plan: dict = {}

    async def on_mail(self, tx):
        return self.plan.get("mail")

    async def on_rcpt(self, tx, rcpt):
        v = self.plan.get("rcpt")
        return v(rcpt) if callable(v) else v

    async def on_data(self, tx):
        tx.message.prepend_header("X-Verdicts", "ran")
        return self.plan.get("data")


class Crashes(Rule):
    name = "crashes"

    async def on_rcpt(self, tx, rcpt):
        raise RuntimeError("boom")


def verdicts(plan, **attrs):
    rule = Verdicts({}, None)
    rule.plan = plan
    for k, v in attrs.items():
        setattr(rule, k, v)
    return rule


async def test_every_hook_runs_in_order_with_the_trace():
    h = Harness([(Recorder, {})])
    result = await h.send(message(), sender="a@s.test", recipients=["x@example.com"])
    rec = h.runtime.policies.session_policy.rules[0]
    assert rec.calls == ["connect", "helo mail.sender.example", "mail a@s.test", "rcpt x@example.com",
                         "data", "delivered 250"]
    assert [(e.stage, e.action) for e in result.trace] == [
        ("mail", "continue"), ("rcpt", "continue"), ("data", "continue"), ("delivered", "continue")]
    assert result.reply.code == 250


async def test_reject_at_each_stage():
    for stage, want in (("mail", "550 5.7.1 no"), ("rcpt", "550 5.7.1 no"), ("data", "554 5.7.1 no")):
        h = Harness([verdicts({stage: Verdict.reject("no")})])
        result = await h.send()
        assert str(result.reply) == want, stage
        assert h.relayed == []


async def test_accept_skips_later_rules_of_the_stage():
    h = Harness([verdicts({"rcpt": Verdict.accept("whitelisted")}), (Crashes, {})])
    result = await h.send()
    assert result.reply.code == 250
    assert [e.rule for e in result.trace if e.stage == "rcpt"] == ["verdicts"]


async def test_crash_is_451_430_and_on_error_accept_carries_on():
    h = Harness([(Crashes, {})])
    result = await h.send()
    assert str(result.reply) == "451 4.3.0 Local error in processing, try again later"
    assert result.trace[-1].action == "error" and "boom" in result.trace[-1].reason
    crash = Crashes({}, None)
    crash.on_error = "accept"
    h = Harness([crash])
    assert (await h.send()).reply.code == 250


async def test_shadow_logs_but_does_nothing_and_rolls_back_edits():
    rule = verdicts({"data": Verdict.reject("no")}, mode="shadow")
    h = Harness([rule])
    raw = message()
    result = await h.send(raw)
    assert result.reply.code == 250
    assert h.relayed[0].data == raw  # the shadow rule's header edit was undone
    entry = [e for e in result.trace if e.stage == "data"][0]
    assert entry.shadow and entry.action == "reject"


async def test_discard_and_quarantine():
    h = Harness([verdicts({"data": Verdict.discard("drop")})])
    result = await h.send()
    assert result.reply.code == 250 and h.relayed == []
    h = Harness([verdicts({"data": Verdict.quarantine("held")})])
    result = await h.send()
    assert str(result.reply) == "554 5.7.1 held"
    assert len(h.quarantine.held) == 1 and h.relayed == []


async def test_discarded_recipient_is_not_relayed():
    rule = verdicts({"rcpt": lambda r: Verdict.discard() if r.local == "trap" else None})
    h = Harness([rule])
    result = await h.send(recipients=["trap@example.com", "bob@example.com"])
    assert result.reply.code == 250
    assert h.relayed[0].recipients == ["bob@example.com"]


async def test_downstream_replies_pass_through():
    h = Harness(relay_replies={"rcpt:bad@example.com": "550 5.1.1 no such user",
                               "data": "250 2.0.0 Ok: queued as X1"})
    result = await h.send(recipients=["bad@example.com", "good@example.com"])
    assert [str(r) for r in result.replies["rcpt"]] == ["550 5.1.1 no such user", "250 2.1.5 Ok"]
    assert str(result.reply) == "250 2.0.0 Ok: queued as X1"


async def test_postmaster_skips_rcpt_rules():
    h = Harness([verdicts({"rcpt": Verdict.reject("no")})])
    result = await h.send(recipients=["postmaster@example.com"])
    assert result.reply.code == 250
    result = await h.send(recipients=["Postmaster"])
    assert result.reply.code == 250


async def test_rewritten_recipient_is_relay_checked_again():
    def rewrite(rcpt):
        rcpt.address = "victim@evil.test"
    rule = verdicts({"rcpt": rewrite})
    h = Harness([rule])
    result = await h.send(recipients=["bob@example.com"])
    assert str(result.reply) == "554 5.7.1 Relay access denied"
    assert h.relayed == []


def write_gate(tmp_path, policies: dict, plugin: str) -> str:
    (tmp_path / "policies").mkdir()
    (tmp_path / "plugins").mkdir()
    for name, text in policies.items():
        (tmp_path / "policies" / f"{name}.yaml").write_text(textwrap.dedent(text))
    (tmp_path / "plugins" / "rec.py").write_text(textwrap.dedent(plugin))
    (tmp_path / "gate.yaml").write_text("policies: policies\nplugins: [plugins]\n")
    return str(tmp_path / "gate.yaml")


PLUGIN = """
    from smtpgate import Option, Rule, Verdict, string
    CALLS = []

    class Tag(Rule):
        name = "tag"
        label = Option(string, "x")

        async def on_mail(self, tx):
            CALLS.append(("mail", self.label))

        async def on_rcpt(self, tx, rcpt):
            CALLS.append(("rcpt", self.label))
"""


async def test_domain_policy_runs_its_own_on_mail_once_and_inherited_rules_once(tmp_path):
    path = write_gate(tmp_path, {
        "default": "domains: [example.com]\nrules:\n  - tag: {label: base}\n",
        "other": "domains: [other.test]\nextends: default\n",
        "third": "domains: [third.test]\nextends: default\nrules:\n  - tag: {label: third}\n",
    }, PLUGIN)
    h = Harness.from_config(path)
    calls = h.runtime.registry.get("tag").__module__
    import sys
    record = sys.modules[calls].CALLS
    await h.send(recipients=["a@other.test"])
    assert record == [("mail", "base"), ("rcpt", "base")]  # inherited instance: on_mail not twice
    record.clear()
    await h.send(recipients=["a@third.test"])
    assert record == [("mail", "base"), ("mail", "third"), ("rcpt", "third")]


async def test_policy_split_and_clock(tmp_path):
    path = write_gate(tmp_path, {
        "default": "domains: [example.com]\n",
        "other": "domains: [other.test]\n",
    }, PLUGIN)
    h = Harness.from_config(path, clock=FakeClock())
    result = await h.send(recipients=["a@example.com", "b@other.test"])
    assert [str(r) for r in result.replies["rcpt"]][1].startswith("452 4.5.3")
    assert h.relayed[0].recipients == ["a@example.com"]


async def test_trace_of_a_refused_mail_is_kept():
    h = Harness([verdicts({"mail": Verdict.reject("no senders like you")})])
    result = await h.send()
    assert str(result.reply) == "550 5.7.1 no senders like you"
    assert [(e.stage, e.rule, e.action) for e in result.trace] == [("mail", "verdicts", "reject")]
