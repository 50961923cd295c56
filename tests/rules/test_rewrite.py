"""The rewrite rule, in process through smtpgate.testing: maps, header edits, subject tags,
conditions, the trace, shadow mode and header injection from both sides."""
import re
import textwrap

import pytest

from smtpgate import Message, OptionError, Rule
from smtpgate.testing import Harness, run_rule
from smtpgate_rules.rewrite.headers import Unreadable, add_prefix, decode, has_tag, rewrite_addresses
from smtpgate_rules.rewrite.maps import AddressMap
from smtpgate_rules.rewrite import Rewrite
from tests.support.constants import CORPUS

RENAME = {"@old.example": "@new.example"}


def msg(*headers: str, body: str = "Hello.\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


BASIC = msg("Received: from mx.sender.test by gate", "From: Joe Bloggs <joe@old.example>",
            "To: ann@example.com", "Subject: Quarterly figures", "Message-ID: <1@old.example>")


async def send(options, raw=BASIC, sender="joe@old.example", recipients=("ann@example.com",),
               domains=("example.com",), **kw):
    h = Harness([(Rewrite, options)], domains=domains)
    result = await h.send(raw, sender=sender, recipients=list(recipients), **kw)
    return h, result


def headers_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# ---------------------------------------------------------------------------- address maps
@pytest.mark.parametrize("address, expected", [
    ("joe@old.example", "joe@new.example"),          # domain
    ("Joe@OLD.Example", "Joe@new.example"),          # domain case-insensitive, local part kept
    ("boss@old.example", "ceo@new.example"),         # exact address beats the domain
    ("BOSS@old.example", "ceo@new.example"),
    ("x@mail.old.example", "x@new.example"),         # @.domain: every subdomain
    ("ann.lee@legacy.example", "ann_lee@new.example"),  # regex with captures
    ("ann.lee@old.example", "ann-lee@new.example"),     # a regex beats the domain
    ("boss.x@old.example", "boss-x@new.example"),
    ("lee@legacy2.example", "lee@archive.new.example"),  # named group
    ("x@other.example", None),
    ("x@new.example", None),
    ("", None),
])
def test_address_map_lookup(address, expected):
    m = AddressMap({"@old.example": "@new.example", "boss@old.example": "ceo@new.example",
                    "@.old.example": "@new.example",
                    r"/^(\w+)\.(\w+)@old\.example$/": r"\1-\2@new.example",
                    r"/^(\w+)\.(\w+)@legacy\.example$/": r"\1_\g<2>@new.example",
                    r"/^(?P<who>.+)@legacy2\.example$/": r"\g<who>@archive.new.example"})
    assert m.lookup(address) == expected


@pytest.mark.parametrize("given, problem", [
    ({"/(/": "x@new.example"}, "bad regular expression"),
    ({r"/^(.+)@a\.example$/": r"\2@new.example"}, "refers to group 2"),
    ({r"/^(.+)@a\.example$/": r"\g<nope>@new.example"}, "does not name"),
    ({r"/^(.+)@a\.example$/": r"\1\n@new.example"}, "may follow a backslash"),
    ({"/^(.+)@a$/": "\\1\r\nRCPT TO:<x@evil>"}, "control characters"),
    ({"@old.example": "@bad..domain"}, "not a valid address"),
    ({"@old.example": "new@example.com\r\nX: y"}, "control characters"),
    ({"@old.example": "jörg@new.example"}, "ASCII"),
    ({"old.example": "@new.example"}, "expected old@domain"),
    ({"@old.example": 3}, "expected the new address as text"),
])
def test_bad_maps_fail_at_load(given, problem):
    with pytest.raises(OptionError, match=problem):
        Rewrite({"sender_map": given})


# ---------------------------------------------------------------------------- envelope
async def test_sender_and_recipients_are_rewritten_before_the_downstream_sees_them():
    h, r = await send({"sender_map": RENAME, "recipient_map": {"info@example.com": "sales@example.com"}},
                      recipients=["info@example.com", "ann@example.com"])
    assert r.reply.code == 250
    [relayed] = h.relayed
    assert relayed.sender == "joe@new.example"
    assert relayed.recipients == ["sales@example.com", "ann@example.com"]
    assert relayed.data == BASIC  # no header option: the message is byte-identical
    reasons = [(e.stage, e.reason) for e in r.trace if e.rule == "rewrite"]
    assert reasons == [("mail", "sender <joe@old.example> -> <joe@new.example>"),
                       ("rcpt", "recipient <info@example.com> -> <sales@example.com>"),
                       ("rcpt", None), ("data", None)]


async def test_null_sender_is_never_rewritten():
    h, r = await send({"sender_map": {"/^.*$/": "x@new.example"}}, sender="")
    assert h.relayed[0].sender == ""


async def test_recipient_rewritten_to_an_ungoverned_domain_is_relay_denied():
    h, r = await send({"recipient_map": {"@example.com": "@elsewhere.example"}})
    [reply] = r.replies["rcpt"]
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert h.relayed == []
    gate = [e for e in r.trace if e.rule == "gate"]
    assert gate and gate[0].recipient == "ann@elsewhere.example"


@pytest.mark.parametrize("template", [r"\1%\2@example.com", r"\2!\1@example.com", r'"\1@\2"@example.com'])
async def test_regex_rewrite_to_a_relay_spelling_is_denied(template):
    # The client's address is clean; the rewritten one routes elsewhere: the gate's relay
    # check judges the result, not the address the client sent.
    h, r = await send({"recipient_map": {r"/^(.+?)\.(.+)@example\.com$/": template}},
                      recipients=["user.evil.example@example.com"])
    assert (r.replies["rcpt"][0].code, r.replies["rcpt"][0].enhanced) == (554, "5.7.1")
    assert h.relayed == []


async def test_policy_is_chosen_from_the_address_the_client_sent(tmp_path):
    # old.example's policy renames to new.example, which another policy governs: the
    # recipient keeps old.example's policy (its header tag), and the new address is accepted.
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("domains: [new.example]\nrules: []\n")
    (tmp_path / "policies" / "old.yaml").write_text(textwrap.dedent("""\
        domains: [old.example]
        rules:
          - rewrite:
              recipient_map: {"@old.example": "@new.example"}
              add_headers: {X-Policy: old}
        """))
    (tmp_path / "gate.yaml").write_text("policies: policies\n")
    h = Harness.from_config(str(tmp_path / "gate.yaml"))
    r = await h.send(BASIC, recipients=["ann@old.example"])
    assert r.reply.code == 250
    assert r.transaction.policy.name == "old"
    assert h.relayed[0].recipients == ["ann@new.example"]
    assert h.relayed[0].data.startswith(b"X-Policy: old\r\n")
    # A second recipient of the new domain belongs to another policy: sent again separately.
    r = await h.send(BASIC, recipients=["ann@old.example", "bob@new.example"])
    assert [x.code for x in r.replies["rcpt"]] == [250, 452]


async def test_regex_result_that_is_no_address_is_a_tempfail_not_a_relay(caplog):
    h, r = await send({"sender_map": {r"/^(.*)@old\.example$/": r"\1 x@new.example"}})
    assert (r.reply.code, r.reply.enhanced) == (451, "4.3.0")
    assert h.relayed == []
    assert "rewrites to 'joe x@new.example', which is not a valid address" in caplog.text
    h, r = await send({"recipient_map": {r"/^(.*)@example\.com$/": r"<\1>@example.com"}})
    assert (r.reply.code, r.reply.enhanced) == (451, "4.3.0")
    assert any(e.action == "error" and "not a valid address" in e.reason for e in r.trace)


async def test_changes_are_logged_one_by_one_at_debug_only(caplog):
    # At info the transaction's one log line names every change (its trace); the values of
    # each change have lines of their own at debug.
    caplog.set_level("INFO", logger="smtpgate.rule.rewrite")
    h = Harness([(Rewrite, {"sender_map": RENAME, "add_headers": {"X-Seen": "yes"}})])
    r = await h.send(BASIC, sender="joe@old.example", recipients=["ann@example.com"])
    assert [e.reason for e in r.trace if e.rule == "rewrite"] == [
        "sender <joe@old.example> -> <joe@new.example>", None, "add X-Seen"]
    assert not [x for x in caplog.records if x.name == "smtpgate.rule.rewrite"]
    caplog.set_level("DEBUG", logger="smtpgate.rule.rewrite")
    await h.send(BASIC, sender="joe@old.example", recipients=["ann@example.com"])
    said = [x.getMessage() for x in caplog.records if x.name == "smtpgate.rule.rewrite"]
    assert any("sender <joe@old.example> -> <joe@new.example>" in x for x in said)
    assert any("add X-Seen: None -> 'yes'" in x for x in said)


async def test_shadow_mode_names_the_rewrite_and_changes_nothing():
    rule = Rewrite({"sender_map": RENAME, "recipient_map": {"@example.com": "@example.com"},
                    "header_map": RENAME, "subject_prefix": "[EXT] "})
    rule.mode = "shadow"
    h = Harness([rule])
    r = await h.send(BASIC, sender="joe@old.example", recipients=["ann@example.com"])
    assert h.relayed[0].sender == "joe@old.example"
    assert h.relayed[0].data == BASIC
    shadow = [(e.stage, e.reason) for e in r.trace if e.shadow]
    assert shadow[0] == ("mail", "sender <joe@old.example> -> <joe@new.example>")
    assert shadow[-1] == ("data", "edit From; edit Subject")


# ---------------------------------------------------------------------------- header maps
async def test_header_map_keeps_display_names_comments_groups_and_encoded_words():
    raw = msg("Received: from a by b",
              "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@old.example>",
              'To: "Lee, Ann (Sales)" <ann@old.example>, bob@old.example (Bob),',
              "\tTeam: carl@old.example, dora@partner.example;, undisclosed-recipients:;",
              "Cc: joe@old.example <joe@old.example>",
              "Reply-To: <@relay.old.example:help@Old.Example>",
              "Sender: \"x@old.example\"@old.example",
              "Subject: joe@old.example",
              "DKIM-Signature: v=1; d=old.example; h=from:to",
              body="Write to joe@old.example\r\n")
    h, r = await send({"header_map": RENAME}, raw)
    out = h.relayed[0].data
    expected = (raw.replace(b"<joerg@old.example>", b"<joerg@new.example>")
                .replace(b"<ann@old.example>, bob@old.example (Bob)", b"<ann@new.example>, bob@new.example (Bob)")
                .replace(b"carl@old.example", b"carl@new.example")
                .replace(b"joe@old.example <joe@old.example>", b"joe@old.example <joe@new.example>")
                .replace(b"help@Old.Example", b"help@new.example")
                .replace(b'"x@old.example"@old.example', b'"x@old.example"@new.example'))
    assert out == expected
    changes = r.transaction.message.changes
    assert [(c.op, c.header) for c in changes] == [("edit", h_) for h_ in
                                                   ("From", "To", "Cc", "Reply-To", "Sender")]
    assert changes[0].before == "=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@old.example>"
    assert changes[0].after == "=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@new.example>"
    assert [e.reason for e in r.trace if e.stage == "data"] == [
        "edit From; edit To; edit Cc; edit Reply-To; edit Sender"]


async def test_header_map_only_in_the_listed_fields_and_every_instance():
    raw = msg("From: a@old.example", "To: b@old.example", "To: c@old.example", "Cc: d@old.example")
    h, r = await send({"header_map": RENAME, "header_fields": ["to"]}, raw)
    assert h.relayed[0].data == msg("From: a@old.example", "To: b@new.example", "To: c@new.example",
                                    "Cc: d@old.example")


async def test_unreadable_or_unsafe_address_headers_are_left_alone():
    raw = msg('From: "unterminated <a@old.example>', "To: x@old.example\x00y", "Cc: ok@old.example")
    h, r = await send({"header_map": RENAME}, raw)
    assert h.relayed[0].data == raw.replace(b"ok@old", b"ok@new")


def test_address_list_reader():
    lk = lambda a: a.replace("old", "new") if "old" in a else None  # noqa: E731
    assert rewrite_addresses(" a@old.test, (c) <b@old.test>", lk) == (
        " a@new.test, (c) <b@new.test>", [("a@old.test", "a@new.test"), ("b@old.test", "b@new.test")])
    assert rewrite_addresses(" x@[192.0.2.1], y@z.test, group:;", lk) == (None, [])
    for broken in (' "a <a@old.test>', " (a <a@old.test>", " <<a@old.test>>", " a@old.test>"):
        with pytest.raises(Unreadable):
            rewrite_addresses(broken, lk)


# ---------------------------------------------------------------------------- subject tag
@pytest.mark.parametrize("subject, prefix, expected, shown", [
    (" Hello", "[EXT] ", " [EXT] Hello", "[EXT] Hello"),
    (" =?utf-8?b?SMOkbGxv?=", "[EXT] ", " [EXT] =?utf-8?b?SMOkbGxv?=", "[EXT] Hällo"),
    (" =?utf-8?b?SMOkbGxv?=", "[EXT]", " =?utf-8?q?[EXT]?= =?utf-8?b?SMOkbGxv?=", "[EXT]Hällo"),
    (" Hello", "[Extern] ", " [Extern] Hello", "[Extern] Hello"),
    (" Hello", "[Внешн] ", " =?utf-8?q?[=D0=92=D0=BD=D0=B5=D1=88=D0=BD]?= Hello", "[Внешн] Hello"),
    (" =?iso-8859-1?q?caf=E9?=", "[Внешн] ",
     " =?utf-8?q?[=D0=92=D0=BD=D0=B5=D1=88=D0=BD]_?= =?iso-8859-1?q?caf=E9?=", "[Внешн] café"),
    ("\r\n Hello", "[EXT] ", " [EXT] Hello", "[EXT] Hello"),
    ("", "[EXT] ", " [EXT]", "[EXT]"),
])
def test_add_prefix(subject, prefix, expected, shown):
    assert add_prefix(subject, prefix) == expected
    assert decode(expected) == shown


def test_add_prefix_folds_a_line_that_would_be_too_long():
    long = " " + "x" * 990
    out = add_prefix(long, "[EXT] ")
    assert out == " [EXT]\r\n " + "x" * 990
    assert decode(out) == "[EXT] " + "x" * 990


@pytest.mark.parametrize("subject", ["[EXT] hi", "[ext]hi", "Re: [EXT] hi", "AW: Fwd: [EXT] hi",
                                     "RE[2]: [EXT] hi", "  [EXT]"])
def test_tag_is_seen(subject):
    assert has_tag(subject, "[EXT]")


@pytest.mark.parametrize("subject", ["hi [EXT]", "Re: hi", "", "[EX] hi"])
def test_tag_is_not_seen(subject):
    assert not has_tag(subject, "[EXT]")


@pytest.mark.parametrize("subject", ["Subject: [EXT] Hello", "Subject: Re: [EXT] Hello",
                                     "Subject: =?utf-8?q?=5BEXT=5D_H=C3=A4llo?=",
                                     "Subject: =?utf-8?b?W0VYVF0gSMOkbGxv?="])
async def test_prefix_is_added_once_only(subject):
    raw = msg("From: a@sender.test", subject)
    h, r = await send({"subject_prefix": "[EXT] "}, raw)
    assert h.relayed[0].data == raw
    assert r.transaction.message.changes == []


async def test_prefix_goes_on_the_first_subject_only_and_twice_through_is_once():
    raw = msg("From: a@sender.test", "Subject: =?utf-8?b?SMOkbGxv?=", "Subject: second")
    h, r = await send({"subject_prefix": "[EXT] "}, raw)
    once = h.relayed[0].data
    assert once == msg("From: a@sender.test", "Subject: [EXT] =?utf-8?b?SMOkbGxv?=", "Subject: second")
    h, r = await send({"subject_prefix": "[EXT] "}, once)
    assert h.relayed[0].data == once


async def test_prefix_on_a_message_without_subject_adds_one():
    raw = msg("From: a@sender.test")
    h, r = await send({"subject_prefix": "[EXT] "}, raw)
    assert h.relayed[0].data == b"Subject: [EXT]\r\n" + raw


# ---------------------------------------------------------------------------- header operations
async def test_add_remove_replace_are_surgical_and_in_order():
    raw = msg("Received: one", "X-Spam-Flag: YES", "From: a@sender.test", "x-spam-score: 9",
              "Subject: hi", "X-Mailer: A", "X-Mailer: B", "X-Keep: 1")
    h, r = await send({"remove_headers": ["X-Spam-*", "Received"],
                       "replace_headers": {"X-Mailer": "smtpgate", "X-Absent": "now"},
                       "add_headers": {"X-First": "1", "X-Second": 2}}, raw)
    assert h.relayed[0].data == msg("X-First: 1", "X-Second: 2", "X-Absent: now", "From: a@sender.test",
                                    "Subject: hi", "X-Mailer: smtpgate", "X-Keep: 1")
    ops = [(c.op, c.header) for c in r.transaction.message.changes]
    assert ops == [("remove", "x-spam-flag"), ("remove", "x-spam-score"), ("remove", "Received"),
                   ("replace", "X-Mailer"), ("add", "X-Absent"), ("add", "X-Second"), ("add", "X-First")]
    [reason] = [e.reason for e in r.trace if e.stage == "data"]
    assert reason == ("remove x-spam-flag; remove x-spam-score; remove Received; replace X-Mailer; "
                      "add X-Absent; add X-Second; add X-First")


async def test_non_ascii_configured_values_go_in_as_encoded_words():
    h, r = await send({"add_headers": {"X-Hinweis": "Externe E-Mail – Vorsicht"}})
    first = h.relayed[0].data.split(b"\r\n", 1)[0]
    assert first.isascii() and first.startswith(b"X-Hinweis: =?utf-8?q?")
    assert decode(first.split(b": ", 1)[1].decode()) == "Externe E-Mail – Vorsicht"


async def test_unchanged_message_is_byte_identical_with_only_envelope_options():
    raw = msg("From: a@sender.test", "Subject: x", body="caf\xe9 \r\n.\r\n..\r\n")
    h, r = await send({"sender_map": RENAME}, raw)
    assert h.relayed[0].data == raw


# ---------------------------------------------------------------------------- no header injection
@pytest.mark.parametrize("options", [
    {"add_headers": {"X-A": "a\r\nBcc: victim@example.com"}},
    {"add_headers": {"X-A": "a\nb"}},
    {"add_headers": {"X-A": "a\x00b"}},
    {"add_headers": {"X-A\r\nBcc": "x"}},
    {"add_headers": {"Bad Name": "x"}},
    {"replace_headers": {"Subject": "hi\rthere"}},
    {"remove_headers": ["X-A\r\nB"]},
    {"remove_headers": ["*"]},
    {"subject_prefix": "[EXT]\r\nBcc: victim@example.com "},
    {"subject_prefix": "\x00"},
    {"subject_prefix": "   "},
    {"header_map": {"@old.example": "x@new.example\nBcc: y@z.example"}},
])
def test_injection_from_configuration_is_refused_at_load(options):
    with pytest.raises(OptionError):
        Rewrite(options)


async def test_injection_from_the_message_never_makes_a_header_line():
    # A header map fed by the message: the capture holds a bare LF, a CR and a NUL
    # (a message handed over by a rule, not normalised by the front).
    raw = (b"From: Joe <joe\nBcc: victim@example.com@old.example>\r\n"
           b"To: x\rBcc: y@old.example\r\nCc: a\x00b@old.example\r\nReply-To: z@old.example\r\n"
           b"Subject: hi\nBcc: v@example.com\r\n\r\nbody\r\n")
    h, r = await send({"header_map": {r"/^(.*)@old\.example$/": r"\1@new.example"},
                       "subject_prefix": "[EXT] "}, raw)
    out = h.relayed[0].data
    # Only the clean field changed; the others kept their bytes as they were.
    assert out == raw.replace(b"z@old.example", b"z@new.example")
    assert [(c.op, c.header) for c in r.transaction.message.changes] == [("edit", "Reply-To")]


async def test_quoted_local_parts_survive_a_regex_rewrite():
    h, r = await send({"sender_map": {r"/^(.*)@old\.example$/": r"\1@new.example"}},
                      sender='"a\\\\b"@old.example')
    assert h.relayed[0].sender == '"a\\\\b"@new.example'


# ---------------------------------------------------------------------------- conditions
TAG_EXTERNAL = {"subject_prefix": "[EXT] ", "add_headers": {"X-External": "yes"},
                "unless": {"client": ["10.0.0.0/8", "2001:db8::/32"]}}


@pytest.mark.parametrize("client, tagged", [("192.0.2.1", True), ("10.1.2.3", False),
                                            ("2001:db8::5", False), ("2001:db9::5", True)])
async def test_unless_client_network(client, tagged):
    h, r = await send(TAG_EXTERNAL, client_ip=client)
    assert h.relayed[0].data.startswith(b"X-External: yes\r\n") is tagged
    assert (b"Subject: [EXT] Quarterly" in h.relayed[0].data) is tagged


@pytest.mark.parametrize("when, tagged", [
    ({"sender": "@old.example"}, True),
    ({"sender": ["@partner.example", "joe@OLD.example"]}, True),
    ({"sender": "@.old.example"}, False),
    ({"sender": "@.example"}, True),
    ({"sender": r"/^j.e@.*$/"}, True),
    ({"sender": "<>"}, False),
    ({"recipient": "ann@example.com"}, True),
    ({"recipient": "@other.example"}, False),
    ({"client": "192.0.2.0/24"}, True),
    ({"authenticated": False}, True),
    ({"authenticated": True}, False),   # the gate has no AUTH: every session is unauthenticated
    ({"header": {"Subject": "(?i)quarterly"}}, True),
    ({"header": {"Subject": "^Weekly", "X-Absent": "."}}, False),
    ({"header": {"Subject": "^Weekly", "Message-ID": "old\\.example"}}, True),  # any entry
    ({"sender": "@old.example", "client": "198.51.100.0/24"}, False),            # every key
])
async def test_when(when, tagged):
    h, r = await send({"add_headers": {"X-T": "1"}, "when": when})
    assert h.relayed[0].data.startswith(b"X-T: 1\r\n") is tagged


async def test_header_condition_reads_decoded_subjects():
    raw = msg("From: a@sender.test", "Subject: =?utf-8?b?UmVjaG51bmcgZsO8ciBTaWU=?=")
    h, r = await send({"add_headers": {"X-T": "1"}, "when": {"header": {"Subject": "Rechnung für"}}}, raw)
    assert h.relayed[0].data.startswith(b"X-T: 1\r\n")


async def test_conditions_see_the_envelope_as_the_client_sent_it():
    h, r = await send({"sender_map": RENAME, "recipient_map": {"ann@example.com": "bob@example.com"},
                       "steps": [{"when": {"sender": "@old.example", "recipient": "ann@example.com"},
                                  "add_headers": {"X-Was-Old": "yes"}}]})
    assert h.relayed[0].sender == "joe@new.example"
    assert h.relayed[0].data.startswith(b"X-Was-Old: yes\r\n")


async def test_steps_have_their_own_conditions_inside_the_entrys():
    options = {"sender_map": RENAME, "header_map": RENAME,
               "steps": [{"unless": {"client": "10.0.0.0/8"}, "subject_prefix": "[EXT] "},
                         {"when": {"header": {"X-Spam-Flag": "YES"}}, "subject_prefix": "[SPAM] ",
                          "remove_headers": ["X-Spam-Flag"]}]}
    h, r = await send(options, BASIC, client_ip="10.0.0.9")
    assert h.relayed[0].sender == "joe@new.example"
    assert h.relayed[0].data == BASIC.replace(b"<joe@old.example>", b"<joe@new.example>")
    spam = BASIC.replace(b"Subject:", b"X-Spam-Flag: YES\r\nSubject:")
    h, r = await send(options, spam)
    assert b"Subject: [SPAM] [EXT] Quarterly figures\r\n" in h.relayed[0].data
    assert b"X-Spam-Flag" not in h.relayed[0].data
    h, r = await send({**options, "when": {"sender": "@nobody.example"}}, spam)
    assert h.relayed[0].data == spam  # the entry's condition holds for its steps too


@pytest.mark.parametrize("options, problem", [
    ({"sender_map": RENAME, "when": {"recipient": "@example.com"}}, "sender_map is decided at MAIL"),
    ({"sender_map": RENAME, "unless": {"header": {"Subject": "x"}}}, "sender_map is decided at MAIL"),
    ({"recipient_map": RENAME, "when": {"header": {"Subject": "x"}}}, "recipient_map is decided at RCPT"),
    ({"when": {"header": {"Subject": "(unclosed"}}}, "bad regular expression"),
    ({"when": {"sender": "/[/"}}, "bad regular expression"),
    ({"when": {"client": "10.0.0.300"}}, "IP address or network"),
    ({"when": {"authenticated": "yes"}}, "true or false"),
    ({"when": {"sender": "nodomain"}}, "expected <>"),
    ({"when": {"spf": "pass"}}, "unknown condition"),
    ({"when": {}}, "expected a mapping"),
    ({"steps": [{"steps": []}]}, "unknown option"),
    ({"steps": [{"subject_prefix": 5}]}, r"steps\[0\].subject_prefix"),
    ({"steps": [{"when": {"header": {"S": "x"}}, "recipient_map": RENAME}]}, r"steps\[0\]"),
    ({"header_fields": ["Subject"]}, "not an address header"),
])
def test_bad_conditions_and_steps_fail_at_load(options, problem):
    with pytest.raises(OptionError, match=problem):
        Rewrite(options)


# ---------------------------------------------------------------------------- with other rules
class After(Rule):
    name = "after"

    async def on_data(self, message, results):
        results.add(self, msg=message.get("Subject"))


async def test_later_rules_see_the_edited_message_and_run():
    h = Harness([(Rewrite, {"subject_prefix": "[EXT] "}), (After, {})])
    r = await h.send(BASIC)
    assert r.transaction.results.get("after").msg == ["[EXT] Quarterly figures"]
    assert [e.rule for e in r.trace if e.stage == "data"] == ["rewrite", "after"]


async def test_run_rule_helper():
    r = await run_rule(Rewrite, {"add_headers": {"X-A": "1"}}, BASIC)
    assert r.message.startswith(b"X-A: 1\r\n" + BASIC[:20])


# ---------------------------------------------------------------------------- the pipeline's part
class RewritesThenCrashes(Rule):
    name = "crashy"

    async def on_mail(self, tx):
        tx.sender = "hijacked@new.example"
        raise RuntimeError("boom")

    async def on_data(self, tx):
        tx.message.prepend_header("X-Half", "done")
        raise RuntimeError("boom")


async def test_a_crashing_rule_leaves_neither_envelope_nor_message_changed():
    rule = RewritesThenCrashes({}, None)
    rule.on_error = "accept"
    h = Harness([rule])
    r = await h.send(BASIC, sender="joe@old.example")
    assert h.relayed[0].sender == "joe@old.example"
    assert h.relayed[0].data == BASIC
    assert [e.action for e in r.trace] == ["error", "error"]


async def test_any_rule_that_edits_gets_its_changes_named_in_the_trace():
    class Tagger(Rule):
        name = "tagger"

        async def on_data(self, tx):
            tx.message.prepend_header("X-Seen", "1")

    h = Harness([(Tagger, {})])
    r = await h.send(BASIC)
    assert [(e.rule, e.action, e.reason) for e in r.trace] == [("tagger", "continue", "add X-Seen")]


# ---------------------------------------------------------------------------- the test corpus
CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file()
                      and not p.name.upper().startswith(("LICENSE", "README"))) if CORPUS.is_dir() else []
EDITED = {"from", "to", "cc", "reply-to", "sender", "subject"}


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[str(p.relative_to(CORPUS)) for p in CORPUS_FILES])
async def test_corpus_messages_change_only_the_headers_they_should(path):
    raw = re.sub(rb"(?<!\r)\n", b"\r\n", path.read_bytes())
    raw += b"" if raw.endswith(b"\r\n") else b"\r\n"
    options = {"header_map": {r"/^(.+)@([^@]+)$/": r"\1@rewritten.example"}, "subject_prefix": "[EXT] ",
               "remove_headers": ["Received"], "add_headers": {"X-Rewritten": "yes"}}
    h, r = await send(options, raw, sender="a@sender.example")
    assert r.reply.code == 250
    before, after = Message(raw), Message(h.relayed[0].data)
    assert after.raw[after.header_end():] == before.raw[before.header_end():]  # the body
    kept = [(f.name, before.raw[f.start:f.end]) for f in before.fields if f.name.lower() != "received"]
    got = [(f.name, after.raw[f.start:f.end]) for f in after.fields]
    added = [("X-Rewritten",)] + ([("Subject",)] if before.get("Subject") is None else [])
    assert [n for n, _ in got] == [a[0] for a in added] + [n for n, _ in kept]
    for (name, old), (_, new) in zip(kept, got[len(added):]):
        if name.lower() not in EDITED:
            assert new == old, name
        else:  # an edited field stays one field, with folding only
            assert new.count(b"\r\n") == old.count(b"\r\n") or name.lower() == "subject"
    subject = after.get("Subject")
    if subject is not None and "\x00" not in subject and not re.search(r"(?<!\r)\n|\r(?!\n)", subject):
        assert has_tag(decode(subject), "[EXT]")
