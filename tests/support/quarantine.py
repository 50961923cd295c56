"""Quarantine helpers shared by the quarantine, greeting and Postfix tests: a message held in a
real Maildir, a gate.yaml for `smtpgate quarantine`, and that command run in-process."""
from __future__ import annotations

import asyncio
from pathlib import Path

from smtpgate.cli.main import main
from smtpgate.stores.quarantine import MaildirQuarantine
from smtpgate.testing import Harness
from smtpgate_rules.attachments import Attachments
from tests.support import attachment_samples as S
from tests.support.constants import LOOPBACK

RAW = S.multipart(S.text_part(), S.part(S.pe(), "a.exe"))


def hold(folder: Path, raw: bytes = RAW, **send) -> tuple[MaildirQuarantine, str, object]:
    """Send ``raw`` through an attachments rule that quarantines into a real Maildir."""
    store = MaildirQuarantine(str(folder))
    h = Harness([(Attachments, {"action": "quarantine"})])
    h.gate.quarantine = store
    send.setdefault("client_ip", "198.51.100.7")
    send.setdefault("helo", "mail.sender.example")
    result = asyncio.run(h.send(raw, **send))
    assert result.reply.code == 554
    qid = result.trace[-1].reason.removeprefix("held as ")
    return store, qid, result


def write_config(tmp_path: Path, downstream_port: int = 9, xclient: bool = True) -> str:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "default.yaml").write_text("domains: [example.com]\nrules: []\n")
    path = tmp_path / "gate.yaml"
    path.write_text(f"hostname: gate.test\nquarantine: {tmp_path / 'q'}\npolicies: {tmp_path / 'policies'}\n"
                    f"downstream: {{host: {LOOPBACK}, port: {downstream_port}, xclient: {str(xclient).lower()}, timeout: 5s}}\n")
    return str(path)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err
