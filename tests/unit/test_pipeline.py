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


# --- hook arguments by name -------------------------------------------------------------------

class ByName(Rule):
    """Hooks that name a subset of their arguments, in their own order."""

    name = "by_name"

    def setup(self):
        self.got = []

    async def on_connect(self):
        self.got.append(("connect",))

    async def on_helo(self, results, session):
        self.got.append(("helo", session.helo, results is session.results))

    async def on_rcpt(self, rcpt, session):
        self.got.append(("rcpt", rcpt.address, session.client_ip))

    async def on_data(self, message, tx=None):
        self.got.append(("data", message is tx.message))

    async def on_end(self, reply):
        self.got.append(("end", reply.code))


async def test_hooks_get_only_the_arguments_they_name():
    h = Harness([(ByName, {})])
    result = await h.send(recipients=["x@example.com"], client_ip="192.0.2.9")
    rule = h.runtime.policies.session_policy.rules[0]
    assert result.reply.code == 250
    assert rule.got == [("connect",), ("helo", "mail.sender.example", True),
                        ("rcpt", "x@example.com", "192.0.2.9"), ("data", True), ("end", 250)]


async def test_a_rule_without_a_name_is_named_after_its_module():
    class Unnamed(Rule):
        async def on_mail(self, results):
            results.add(self, pass_="ran")

    assert Unnamed.name == "test_pipeline"
    result = await Harness([(Unnamed, {})]).send()
    assert result.transaction.results.get("test_pipeline").pass_ == ["ran"]


# --- the results channel ----------------------------------------------------------------------

class Reports(Rule):
    """Reports at each stage; a later rule reads what an earlier one reported."""

    name = "reports"

    async def on_connect(self, session):
        session.results.add(self, msg="connected")

    async def on_mail(self, tx):
        tx.results.add(self, pass_="sender ok", data={"score": 1})

    async def on_rcpt(self, tx, rcpt):
        tx.results.add(self, fail=f"{rcpt.address} looks odd", data={"score": 2})
        tx.results.event(self, "greylisted", why="a test")


class Reads(Rule):
    name = "reads"

    async def on_data(self, tx):
        earlier = tx.results.get("reports")
        tx.results.add(self, msg=f"reports said {earlier.outcome} with score {earlier.data['score']}")


async def test_results_are_read_by_later_rules_and_written_into_the_trace():
    result = await Harness([(Reports, {}), (Reads, {})]).send()
    tx = result.transaction
    record = tx.results.get("reports")
    assert (record.pass_, record.fail, record.data, record.events, record.outcome) == (
        ["sender ok"], ["rcpt@example.com looks odd"], {"score": 2}, ["greylisted"], "fail")
    assert tx.results.get("reads").msg == ["reports said fail with score 2"]
    assert tx.session.results.get("reports").msg == ["connected"]
    assert [(e.stage, e.rule, e.result) for e in result.trace if e.stage in ("mail", "rcpt", "data")] == [
        ("mail", "reports", "pass: sender ok"),
        ("rcpt", "reports", "fail: rcpt@example.com looks odd; event greylisted"),
        ("data", "reads", "msg: reports said fail with score 2")]
    assert [(e.name, e.rule, e.why) for e in tx.results.events] == [
        ("greylisted", "reports", "a test"), ("delivered", "downstream", "250 2.0.0 Ok: queued")]
    assert tx.results.as_dict()["reports"] == {
        "fail": ["rcpt@example.com looks odd"], "pass": ["sender ok"], "data": {"score": 2},
        "events": ["greylisted"]}


async def test_results_of_a_shadow_rule_are_marked_and_its_events_and_skips_are_not_done():
    class Skipper(Rule):
        name = "skipper"

        async def on_mail(self, tx):
            tx.skip("verdicts", "the skipper says so")

    reports, skipper = Reports({}, None), Skipper({}, None)
    reports.mode = skipper.mode = "shadow"
    h = Harness([reports, skipper, verdicts({"rcpt": Verdict.reject("no")})])
    result = await h.send()
    assert str(result.reply).startswith("550")  # the shadow skip did not skip verdicts
    record = result.transaction.results.get("reports")
    assert record.shadow and record.events == ["greylisted"]
    assert [e.name for e in result.transaction.results.events] == ["rejected"]
    assert result.transaction.results.summary() == "reports:shadow-fail"


def test_results_add_keeps_each_text_once_on_one_line():
    from smtpgate import Results
    results = Results()
    results.add("r", msg="two\r\nlines")
    results.add("r", msg="two lines", err="x" * 300)
    record = results.get("r")
    assert record.msg == ["two lines"] and len(record.err[0]) == 200
    assert "r" in results and results.get("other") is None and len(results) == 1


def test_the_text_log_line_sums_up_each_rule_s_result():
    import logging
    from smtpgate.logs import TextFormatter
    record = logging.LogRecord("smtpgate.transaction", logging.INFO, __file__, 1, "transaction", (), None)
    record.fields = {"tx": "T1", "results": {"spf": {"pass": ["mailfrom a.example: pass"]},
                                             "dnsbl": {"fail": ["listed: zen"], "shadow": True},
                                             "senders": {"data": {"key": "a@a.example"}}}}
    assert TextFormatter().format(record).endswith("transaction tx=T1 results=spf:pass,dnsbl:shadow-fail")


def test_the_text_log_line_names_each_trace_entry():
    from smtpgate.mail.session import TraceEntry, TraceLog
    trace = [TraceEntry("mail", "senders", "continue", None, None, 0.1, False, None),
             TraceEntry("data", "rejector", "reject", "no", "550 no", 0.2, True, None)]
    assert TraceLog(trace).text() == "senders:mail:continue,rejector:data:shadow-reject"
    assert TraceLog([]).text() == ""


def test_the_harness_refuses_a_hook_argument_the_gate_would_refuse():
    import pytest
    from smtpgate import PluginError

    class Wrong(Rule):
        name = "wrong"

        async def on_mail(self, tx, rcpt):  # no recipient at MAIL
            return None

    with pytest.raises(PluginError, match=r"test_pipeline.py: .*Wrong: hook on_mail has no argument 'rcpt'"):
        Harness([(Wrong, {})])


async def test_the_transaction_line_renders_the_trace_and_results_for_its_format(caplog):
    # The rules and results fields are rendered by the formatter that writes the line: the
    # text one sums them up, the JSON one carries every trace entry and record in full.
    import json
    from smtpgate.logs import JsonFormatter, TextFormatter

    class Reports(Rule):
        name = "reports"

        async def on_rcpt(self, tx, rcpt):
            tx.results.add(self, pass_=f"{rcpt.address}: fine", data={"n": 1})

    caplog.set_level("INFO", logger="smtpgate.transaction")
    await Harness([(Reports, {})]).send()
    [record] = [r for r in caplog.records if r.getMessage() == "transaction"]
    text = TextFormatter().format(record)
    assert " rules=reports:rcpt:continue results=reports:pass " in text
    line = json.loads(JsonFormatter().format(record))
    [entry] = line["rules"]
    entry.pop("ms", None)  # a duration (left out when 0.0)
    assert entry == {"stage": "rcpt", "rule": "reports", "action": "continue",
                     "recipient": "rcpt@example.com", "result": "pass: rcpt@example.com: fine"}
    assert line["results"] == {"reports": {"pass": ["rcpt@example.com: fine"], "data": {"n": 1}}}


def test_the_text_line_quotes_a_value_exactly_as_json_would():
    # The text formatter wraps plain printable ASCII in quotes itself (no JSON encoder per
    # field); anything with a quote, a backslash, a control character or non-ASCII text
    # still goes through json.dumps: the line is the same either way.
    import json
    import logging
    from smtpgate.logs import TextFormatter
    values = ["250 2.0.0 Ok: queued", "", " ", 'say "hi" there', "back\\slash here", "tab\there x",
              "nul\x00 x", "del\x7f x", "caf\u00e9 au lait", "\u2028 sep", "no-space", "x" * 300 + " y"]
    record = logging.LogRecord("smtpgate.transaction", logging.INFO, __file__, 1, "transaction", (), None)
    record.fields = {f"k{i}": v for i, v in enumerate(values)}
    line = TextFormatter().format(record)
    expected = " ".join(f"k{i}={json.dumps(v) if (' ' in v or not v) else v}" for i, v in enumerate(values))
    assert line.endswith(f" transaction {expected}")


def test_the_text_line_writes_every_kind_of_value_as_before():
    import logging
    from smtpgate.logs import LogField, TextFormatter

    class Field(LogField):
        def __init__(self, text):
            self._text = text

        def text(self):
            return self._text

    record = logging.LogRecord("smtpgate.transaction", logging.INFO, __file__, 1, "transaction", (), None)
    record.fields = {"none": None, "empty_list": [], "to": ["a@x.test", "b@x.test"], "size": 10,
                     "ms": 1.5, "tls": False, "field": Field("a b"), "blank": Field(""),
                     "rules": [{"rule": "r", "stage": "data", "action": "continue"}], "results": {}}
    line = TextFormatter().format(record)
    assert line.endswith(' transaction to=a@x.test,b@x.test size=10 ms=1.5 tls=False field="a b" '
                         'rules=r:data:continue')
    record.fields = {}
    assert TextFormatter().format(record).endswith(" transaction ")


async def test_a_hook_set_on_one_instance_gets_the_arguments_it_names():
    # Argument names are looked up per hook function: a hook put on one instance (not its
    # class) is called by its own signature, and the class's hook on other instances by theirs.
    import types

    seen = []

    async def data_hook(self, message, results):
        seen.append(("instance", message is not None, results is not None))

    class Plain(Rule):
        name = "plain"

        async def on_data(self, tx):
            seen.append(("class", tx.message is not None))

    # (a policy reads its rules' hooks when it is made, as the gate makes it after each
    # rule's setup: each instance here gets its hook before its Harness is built)
    await Harness([(Plain, {})]).send()
    rule = Plain({})
    rule.on_data = types.MethodType(data_hook, rule)
    await Harness([rule]).send()
    rule = Plain({})
    rule.on_data = lambda tx: seen.append(("plain function", tx.id)) or _none()
    await Harness([rule]).send()
    del rule.on_data
    await Harness([rule]).send()
    assert [s[0] for s in seen] == ["class", "instance", "plain function", "class"]
    assert seen[1] == ("instance", True, True)


async def _none():
    return None


def test_a_trace_entry_and_a_record_as_dicts_keep_their_fields_order_and_omissions():
    # Both are written out field by field (the JSON log line builds one per entry and per
    # record): the same dicts as the generic rule, "every field, in order, but None and False".
    import itertools
    from smtpgate.mail.session import TraceEntry
    from smtpgate.pipeline.results import OUTCOMES, RuleResult

    for reason, reply, ms, shadow, recipient, result in itertools.product(
            (None, "", "why"), (None, "550 5.7.1 no"), (0.0, 0, 1.25), (False, True),
            (None, "a@x.test"), (None, "pass: ok")):
        entry = TraceEntry("rcpt", "r", "reject", reason, reply, ms, shadow, recipient, result)
        generic = {k: v for k in TraceEntry.__slots__ if (v := getattr(entry, k)) not in (None, False)}
        assert entry.as_dict() == generic and list(entry.as_dict()) == list(generic)
    record = RuleResult("r", pass_=["p"], fail=["f"], skip=["s"], err=["e"], msg=["m"], data={"n": 1},
                        events=["x"], shadow=True)
    assert list(record.as_dict()) == [*OUTCOMES, "data", "events", "shadow"]
    assert record.as_dict()["pass"] == ["p"] and record.as_dict()["pass"] is not record.pass_
    assert RuleResult("r", msg=["m"]).as_dict() == {"msg": ["m"]} and RuleResult("r").as_dict() == {}
    # a record Results makes (every field given by position) is the default one, fresh lists
    from smtpgate.pipeline.results import Results
    for shadow in (False, True):
        results = Results()
        results._current = ("r", shadow)
        made = results._record("r")
        assert vars(made) == vars(RuleResult("r", shadow=shadow)) and list(vars(made)) == list(vars(RuleResult("r")))
        assert len({id(v) for v in vars(made).values() if isinstance(v, (list, dict))}) == 8
    for kinds in itertools.product((False, True), repeat=4):
        lists = {k: ["t"] if on else [] for k, on in zip(("fail", "err", "pass_", "skip"), kinds)}
        expected = next((k for k, on in zip(("fail", "err", "pass", "skip"), kinds) if on), None)
        assert RuleResult("r", **lists).outcome == expected


async def test_a_rules_hooks_are_read_once_when_its_policy_is_made():
    # (docs/writing-rules.md) A hook cleared in setup is never called; one set or cleared on a
    # running rule afterwards changes nothing: the policy prepared its hooks after setup.
    seen = []

    class Quiet(Rule):
        name = "quiet"

        def setup(self):
            self.on_rcpt = None

        async def on_rcpt(self, tx, rcpt):
            seen.append("rcpt")

        async def on_data(self, tx):
            seen.append("data")

    rule = Quiet({})
    h = Harness([rule])
    await h.send()
    assert seen == ["data"]

    async def late(tx):
        seen.append("late")
    rule.on_mail = late
    rule.on_data = None
    await h.send()
    assert seen == ["data", "data"]
