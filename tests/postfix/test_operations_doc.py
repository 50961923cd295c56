"""docs/operations.md's "Logs" commands, run as written against the logs of a real gate and a
real Postfix behind it: the gate's transaction id leads to Postfix's queue id and back."""
from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path

from tests.support.gateproc import wait_until
from tests.support.postfixproc import postfix_downstream  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent.parent
DOC = REPO / "docs" / "operations.md"
SENDER = "alice@sender.test"


def logs_block() -> str:
    """The ```sh block of the doc's "## Logs" section."""
    section = DOC.read_text().split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.S)
    return block


def test_the_logs_section_joins_gate_and_postfix_logs(gate_factory, postfix_downstream, tmp_path):
    postfix = postfix_downstream
    gate = gate_factory(downstream_port=postfix.port)
    with smtplib.SMTP(*gate.address, local_hostname="client.test", timeout=20) as c:
        for n in range(2):
            c.sendmail(SENDER, ["user@example.com"], b"Subject: join %d\r\n\r\nbody\r\n" % n)
    lines: list[tuple[str, str]] = []

    def both_logged() -> bool:
        lines[:] = re.findall(r" tx=(\S+) .*queued as (\w+)\"", gate.log_text())
        return len(lines) == 2 and all(f"orig_queue_id={tx}" in postfix.log_text() for tx, _ in lines)

    assert wait_until(both_logged, 20), gate.log_text() + postfix.log_text()
    [(tx, qid), (other_tx, other_qid)] = lines

    block = logs_block()
    example_tx = re.search(r"^tx=(\S+)$", block, re.M).group(1)
    script = (block.replace(f"tx={example_tx}", f"tx={tx}")
              .replace("/var/log/mail.log", str(postfix.log_path))
              .replace("/var/log/smtpgate.log", str(gate.log_path)))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()

    # gate -> Postfix: Postfix's lines for the first message, none of the other's
    postfix_part = [line for line in out if re.search(r"postfix\S*/\w+\[\d+\]:", line)]
    assert any(f"{qid}: client=" in line for line in postfix_part), run.stdout
    assert all(qid in line and other_qid not in line for line in postfix_part), run.stdout
    # Postfix -> gate: the gate's line for that queue id
    assert [line for line in out if " transaction " in line] == \
        [line for line in gate.log_text().splitlines() if f"queued as {qid}\"" in line]
    # the pairs
    assert out[-2:] == [f"{tx} {qid}", f"{other_tx} {other_qid}"]
