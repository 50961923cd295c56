"""The attachments rule in the real gate (a child process) with a capturing downstream:
reject never sends DATA downstream, strip delivers the spliced bytes, quarantine fills the
Maildir (with several workers too) and ``smtpgate quarantine release`` delivers from it."""
from __future__ import annotations

import json
import smtplib

import pytest

from tests.support import attachment_samples as S
from tests.support.waiting import wait_until
from tests.support.constants import CORPUS

EXE = S.part(S.pe(), "invoice.pdf.exe")
RAW = S.multipart(S.text_part(), EXE, S.part(b"%PDF-1.4 fine", "fine.pdf", ctype="application/pdf"))
CLEAN = S.multipart(S.text_part(), S.part(b"%PDF-1.4 fine", "fine.pdf", ctype="application/pdf"))


def policy(options: str) -> dict[str, str]:
    return {"default.yaml": f"domains: [example.com]\nrules:\n  - attachments: {options}\n"}


def send(gate, raw: bytes, rcpts=("user@example.com",)):
    with gate.smtp() as c:
        c.ehlo()
        try:
            c.sendmail("a@sender.test", list(rcpts), raw)
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


def test_reject_never_sends_data_downstream(gate_factory, downstream):
    gate = gate_factory(policies=policy("{action: reject}"))
    code, text = send(gate, RAW)
    assert code == 554 and text.startswith(b"5.7.1 Message refused: attachment invoice.pdf.exe")
    downstream.wait_for_command("RSET")
    assert not any(line.upper().startswith(b"DATA") for line in downstream.transcript)
    assert downstream.messages == []
    assert send(gate, CLEAN)[0] == 250
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == CLEAN


def test_strip_splices_and_keeps_the_rest_byte_identical(gate_factory, downstream):
    gate = gate_factory(policies=policy("{action: strip}"), config={"log": {"format": "json"}})
    assert send(gate, RAW)[0] == 250
    [msg] = downstream.wait_for_messages(1)
    start = RAW.index(EXE)
    tail = RAW[start + len(EXE):]
    assert msg.data.startswith(RAW[:start]) and msg.data.endswith(tail)
    note = msg.data[start:len(msg.data) - len(tail)]
    assert note.startswith(b"Content-Type: text/plain; charset=utf-8\r\n")
    assert b"invoice.pdf.exe" in note and b"TVq" not in note
    assert "stripped invoice.pdf.exe (banned extension .exe" in gate.log_text()


def test_quarantine_then_release(gate_factory, downstream):
    gate = gate_factory(policies=policy("{action: quarantine}"))
    code, text = send(gate, RAW, rcpts=("a@example.com", "b@example.com"))
    assert code == 554 and text.startswith(b"5.7.1 Message held for review")
    assert downstream.messages == []
    new = gate.folder / "quarantine" / "new"
    [held] = list(new.iterdir())
    assert held.read_bytes() == RAW
    out = gate.cli("quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    [item] = json.loads(out.stdout)["messages"]
    assert item["id"] == held.name and item["recipients"] == ["a@example.com", "b@example.com"]
    tx = held.name.split(".")[1]  # the id holds the transaction id the log line shows
    assert f"tx={tx}" in gate.log_text()
    out = gate.cli("quarantine", "show", tx, "--json")
    assert json.loads(out.stdout)["id"] == held.name
    out = gate.cli("quarantine", "release", held.name)
    assert out.returncode == 0, out.stderr + out.stdout
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == RAW and msg.rcpts == ["a@example.com", "b@example.com"]
    assert msg.mail_from == "a@sender.test"
    assert msg.xclient["ADDR"] == "127.0.0.1" and msg.xclient["HELO"] == "client.test"
    out = gate.cli("quarantine", "show", held.name, "--json")
    doc = json.loads(out.stdout)
    assert doc["status"] == "released" and doc["releases"][0]["ok"]


def test_quarantine_and_deliver_the_stripped_copy(gate_factory, downstream):
    gate = gate_factory(policies=policy("{action: quarantine, quarantine_reply: deliver}"))
    assert send(gate, RAW)[0] == 250
    [msg] = downstream.wait_for_messages(1)
    assert b"TVq" not in msg.data and b"invoice.pdf.exe" in msg.data
    [held] = list((gate.folder / "quarantine" / "new").iterdir())
    assert held.read_bytes() == RAW
    meta = json.loads((gate.folder / "quarantine" / "meta" / f"{held.name}.json").read_text())
    assert meta["delivered"] is True


def test_several_workers_share_the_quarantine(gate_factory, downstream):
    gate = gate_factory(policies=policy("{action: quarantine}"), config={"workers": 2})
    for i in range(8):
        raw = RAW.replace(b"Subject: attachments test", b"Subject: n%d" % i)
        assert send(gate, raw)[0] == 554
    new = gate.folder / "quarantine" / "new"
    assert wait_until(lambda: len(list(new.iterdir())) == 8, 10)
    out = gate.cli("quarantine", "list", "--json")
    items = json.loads(out.stdout)["messages"]
    assert len({m["id"] for m in items}) == 8


@pytest.mark.parametrize("name", ["bad-final-boundary.raw", "malformed-base64-attach.raw",
                                  "missing-content-type.raw", "bad-header-wrap.raw"])
def test_low_quality_corpus_passes_the_real_gate(gate_factory, downstream, name):
    import re
    path = CORPUS / "enmime" / "low-quality" / name
    raw = re.sub(rb"(?<!\r)\n", b"\r\n", path.read_bytes())
    raw += b"" if raw.endswith(b"\r\n") else b"\r\n"
    gate = gate_factory(policies=policy("{action: strip}"))
    assert send(gate, raw)[0] == 250
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == raw
