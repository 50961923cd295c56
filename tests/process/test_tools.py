"""The gate with real outside tools: swaks as the client, Postfix's smtp-sink as the downstream
and smtp-source as a load generator. Under CI=true a missing tool is a failure (require_tool)."""

from __future__ import annotations

import subprocess

MSG = b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: %d\r\n\r\nmessage number %d\r\n"


def swaks(path: str, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([path, "--server", f"127.0.0.1:{port}", "--timeout", "10", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_swaks_delivers_through_the_gate(require_tool, gate, downstream):
    path = require_tool("swaks")
    run = swaks(path, gate.port, "--from", "a@sender.test", "--to", "user@example.com",
                "--helo", "swaks.client.test", "--header", "Subject: via swaks")
    assert run.returncode == 0, run.stdout + run.stderr
    [msg] = downstream.wait_for_messages(1)
    assert msg.mail_from == "a@sender.test"
    assert msg.rcpts == ["user@example.com"]
    assert msg.xclient["HELO"] == "swaks.client.test"
    parsed = msg.message()
    assert parsed["Subject"] == "via swaks"
    assert "swaks" in (parsed["X-Mailer"] or "")
    assert msg.reply.startswith("250 ")
    assert f"<-  {msg.reply}" in run.stdout  # swaks saw the downstream's own final reply


def test_swaks_relay_denied(require_tool, gate, downstream):
    path = require_tool("swaks")
    run = swaks(path, gate.port, "--from", "a@sender.test", "--to", "user@evil.test")
    assert run.returncode != 0
    assert "554 5.7.1" in run.stdout, run.stdout + run.stderr
    assert not any(b"evil.test" in line for line in downstream.transcript)
    assert downstream.messages == []


def test_relay_to_smtp_sink(gate_factory, smtp_sink):
    gate = gate_factory(downstream_port=smtp_sink.port)
    with gate.smtp() as c:
        for n in range(20):
            assert c.sendmail("a@sender.test", ["user@example.com"], MSG % (n, n)) == {}
    counts = smtp_sink.wait_for_messages(20)
    assert counts["mesg"] == 20


def test_smtp_source_through_the_gate_to_smtp_sink(require_tool, gate_factory, smtp_sink):
    source = require_tool("smtp-source")
    gate = gate_factory(downstream_port=smtp_sink.port)
    run = subprocess.run([source, "-c", "-m", "50", "-s", "5", "-l", "2000", "-f", "a@sender.test",
                          "-t", "user@example.com", f"127.0.0.1:{gate.port}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr + gate.log_text()[-3000:]
    counts = smtp_sink.wait_for_messages(50)
    assert counts["mesg"] == 50
    assert "451 " not in gate.log_text()
