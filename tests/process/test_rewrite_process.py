"""The rewrite rule in the real gate process: what the downstream receives byte for byte, the
relay check on rewritten recipients, check-config and ``smtpgate try`` (docs/rules/rewrite.md's
example is the policy under test)."""
import json
import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.constants import ROOT

DEFAULT = "domains: [example.com]\nrules: []\n"


def documented_policy() -> str:
    """The example policy of docs/rules/rewrite.md, exactly as users read it."""
    doc = (ROOT / "docs" / "rules" / "rewrite.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    [policy] = [b for b in blocks if b.startswith("# policies/new.example.yaml")]
    return policy


MESSAGE = (b"Received: from mx.partner.example by mx.partner.example\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=partner.example; h=from:subject;\r\n"
           b"\tb=AAAA\r\n"
           b"From: =?utf-8?q?J=C3=B6rg?= <joerg@partner.example>\r\n"
           b'To: "Last, First" <first.last@old.example>\r\n'
           b"Cc: team@old.example (Team),\r\n ceo@old.example\r\n"
           b"X-External: no, trust me\r\n"
           b"Subject: =?utf-8?b?UXVhcnRhbHN6YWhsZW4=?=\r\n"
           b"Message-ID: <42@partner.example>\r\n"
           b"\r\n"
           b"Hello,\r\n.leading dot\r\ncaf\xc3\xa9\r\n")


def expected_message() -> bytes:
    return (b"X-External: yes\r\n" + MESSAGE
            .replace(b"<first.last@old.example>", b"<first-last@new.example>")
            .replace(b"team@old.example (Team),\r\n ceo@old.example",
                     b"team@new.example (Team),\r\n office-of-the-ceo@new.example")
            .replace(b"X-External: no, trust me\r\n", b"")
            .replace(b"Subject: =?utf-8", b"Subject: [EXT] =?utf-8"))


@pytest.fixture
def renamed(gate_factory):
    return gate_factory(policies={"default.yaml": DEFAULT, "new.example.yaml": documented_policy()},
                        config={"log": {"format": "json", "level": "info"}})


def test_documented_example_through_the_real_gate(renamed, downstream):
    with renamed.smtp() as c:
        c.ehlo()
        refused = c.sendmail("app@old.example", ["first.last@old.example", "ceo@old.example"], MESSAGE)
        assert refused == {}
    [got] = downstream.wait_for_messages(1)
    assert got.mail_from == "app@new.example"
    assert got.rcpts == ["first-last@new.example", "office-of-the-ceo@new.example"]
    assert got.data == expected_message()  # only the changed headers' lines differ
    # The transaction's log line names every change.
    line = next(json.loads(x) for x in renamed.wait_for_log('"msg": "transaction"').splitlines()
                if '"msg": "transaction"' in x)
    reasons = [r.get("reason") for r in line["rules"] if r["rule"] == "rewrite"]
    assert reasons == ["sender <app@old.example> -> <app@new.example>",
                       "recipient <first.last@old.example> -> <first-last@new.example>",
                       "recipient <ceo@old.example> -> <office-of-the-ceo@new.example>",
                       "remove X-External; edit To; edit Cc; edit Subject; add X-External"]


def test_tagged_reply_is_not_tagged_twice_and_new_domain_mail_is_untouched(renamed, downstream):
    reply = (b"From: joerg@partner.example\r\nTo: first-last@new.example\r\n"
             b"Subject: Re: [EXT] =?utf-8?b?UXVhcnRhbHN6YWhsZW4=?=\r\n\r\nThanks\r\n")
    with renamed.smtp() as c:
        c.ehlo()
        c.sendmail("joerg@partner.example", ["first-last@new.example"], reply)
    [got] = downstream.wait_for_messages(1)
    assert got.mail_from == "joerg@partner.example"
    assert got.data == b"X-External: yes\r\n" + reply


def test_rewrite_to_a_domain_no_policy_governs_is_refused(gate_factory, downstream):
    policy = ("domains: [example.com]\nrules:\n  - rewrite:\n      recipient_map:\n"
              "        'info@example.com': 'info@elsewhere.example'\n")
    gate = gate_factory(policies={"default.yaml": policy})
    with gate.smtp() as c:
        c.ehlo()
        c.mail("a@sender.example")
        code, text = c.rcpt("info@example.com")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert c.rcpt("ann@example.com")[0] == 250
        c.data(b"Subject: x\r\n\r\nx\r\n")
    [got] = downstream.wait_for_messages(1)
    assert got.rcpts == ["ann@example.com"]
    assert not any(b"elsewhere" in line for line in downstream.transcript)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SMTPGATE_CONFIG"}
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def write_config(folder: Path, policies: dict[str, str]) -> None:
    (folder / "policies").mkdir()
    for name, text in policies.items():
        (folder / "policies" / name).write_text(text)
    (folder / "gate.yaml").write_text(f"policies: {folder / 'policies'}\nstate: sqlite://{folder / 'state.db'}\n")


def test_check_config_names_the_bad_regex_with_file_and_line(tmp_path):
    write_config(tmp_path, {"default.yaml": DEFAULT + "", "bad.yaml": (
        "domains: [bad.example]\n"
        "rules:\n"
        "  - rewrite:\n"
        "      sender_map: {'@old.example': '@new.example'}\n"
        "      recipient_map:\n"
        "        '/^(.+@old\\.example$/': '\\1@new.example'\n"
        "      steps:\n"
        "        - when: {header: {Subject: '(?P<x'}}\n"
        "          subject_prefix: '[X] '\n")})
    r = cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    bad = str(tmp_path / "policies" / "bad.yaml")
    assert re.search(re.escape(bad) + r":6:\d+: rules\[0\]\.rewrite\.recipient_map: .*bad regular expression", out), out
    # check-config reports the first problem of an entry; fixed, the next one shows, with its line
    text = (tmp_path / "policies" / "bad.yaml").read_text().replace("'/^(.+@", "'/^(.+)@")
    (tmp_path / "policies" / "bad.yaml").write_text(text)
    out = cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert re.search(re.escape(bad) + r":8:\d+: rules\[0\]\.rewrite\.steps: steps\[0\]\.when: "
                     r"header\.Subject: bad regular expression", out.stdout + out.stderr), out


def test_check_config_accepts_the_documented_example(tmp_path):
    write_config(tmp_path, {"default.yaml": DEFAULT, "new.example.yaml": documented_policy()})
    r = cli("check-config", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_try_json_shows_the_changes(tmp_path):
    write_config(tmp_path, {"default.yaml": DEFAULT, "new.example.yaml": documented_policy()})
    (tmp_path / "msg.eml").write_bytes(MESSAGE)
    r = cli("try", "msg.eml", "--from", "app@old.example", "--to", "first.last@old.example",
            "--client-ip", "203.0.113.5", "--json", "--show-message", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["policy"] == "new.example"
    rewrite = [e for e in doc["trace"] if e["rule"] == "rewrite"]
    assert rewrite[0]["reason"] == "sender <app@old.example> -> <app@new.example>"
    assert rewrite[-1]["reason"] == "remove X-External; edit To; edit Cc; edit Subject; add X-External"
    changes = {(c["op"], c["header"]): c for c in doc["changes"]}
    assert changes["edit", "To"] == {"op": "edit", "header": "To", "rule": "rewrite",
                                     "before": '"Last, First" <first.last@old.example>',
                                     "after": '"Last, First" <first-last@new.example>'}
    assert changes["remove", "X-External"]["before"] == "no, trust me"
    assert changes["add", "X-External"]["after"] == "yes"
    assert doc["message"].encode("utf-8", "surrogateescape") == expected_message()
    # internal client: no tag, and the readable table lists each change
    r = cli("try", "msg.eml", "--from", "app@old.example", "--to", "first.last@old.example",
            "--client-ip", "10.1.2.3", "-c", "gate.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "change by rewrite: edit To: " in r.stdout
    assert "edit Subject" not in r.stdout
