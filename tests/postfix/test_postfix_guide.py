"""docs/postfix.md, run: its configuration blocks, read out of the page itself, start a private
Postfix (tests/support/postfixproc.py) and configure the real gate; mail goes through from
127.0.0.2 (the gate is 127.0.0.1) and Postfix's log and replies are checked.

What the test changes in the blocks, and only that: private ports for 25, 10025 and 2525,
the instance's own folder for ``/etc/postfix``, chroot off (the tmp folder has no chroot set-up),
and extra lines in the maps naming the test's loopback clients. Everything the page says is
otherwise used as written; a block the test cannot use fails the test (``test_every_block_is_used``).
"""
from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.gateproc import free_port, require_tool
from tests.support.postfixproc import start_postfix

ROOT = Path(__file__).resolve().parent.parent.parent
GUIDE = ROOT / "docs" / "postfix.md"
CLIENT = "127.0.0.2"        # a client whose address differs from the gate's (127.0.0.1)
REFUSED_CLIENT = "127.0.0.3"  # one Postfix's client_access refuses (a line the test adds)
SENDER, RECIPIENT = "alice@sender.test", "user@example.com"
GONE = "former.employee@example.com"  # refused by the guide's recipient_access map
REFUSAL = b"5.1.1 <former.employee@example.com>: Recipient address rejected: Mailbox no longer in use"
BODY = b"Subject: through the guide\r\n\r\nhello\r\n"
_BLOCK = re.compile(r"^```(\w+) ([^\n]*\btitle=[^\n]*)\n(.*?)^```$", re.M | re.S)
# The blocks the tests read (test_every_block_is_used holds the guide to this list).
USED_BY_TESTS = {("A", "gate.yaml"), ("A", "master.cf"), ("A", "main.cf"), ("A", "client_access"),
                 ("A", "recipient_access"), ("B", "gate.yaml"), ("B", "master.cf"), ("B", "main.cf"),
                 ("B", "recipient_access")}


def blocks(layout: str) -> dict[str, str]:
    """The guide's blocks of ``layout``, by title."""
    found = {}
    for _lang, attrs, body in _BLOCK.findall(GUIDE.read_text()):
        fields = dict(w.split("=", 1) for w in attrs.split())
        if fields.get("layout") == layout:
            assert fields["title"] not in found, f"two {fields['title']} blocks for layout {layout}"
            found[fields["title"]] = body
    return found


def block(layout: str, title: str) -> str:
    assert (layout, title) in USED_BY_TESTS
    return blocks(layout)[title]


def gate_config(layout: str, downstream_port: int) -> dict:
    """gate.yaml as the guide writes it, the listener the test's own, its downstream the
    private Postfix."""
    config = yaml.safe_load(block(layout, "gate.yaml"))
    config.pop("listen")
    assert config["downstream"]["port"] == 10025
    config["downstream"]["port"] = downstream_port
    return config


def no_chroot(master_cf: str) -> str:
    """The chroot column (5th) of each service line set to n."""
    out = []
    for line in master_cf.splitlines():
        cols = line.split()
        if line[:1] not in ("", " ", "\t", "#") and len(cols) >= 8:
            cols[4] = "n"
            line = "  ".join(cols)
        out.append(line)
    return "\n".join(out) + "\n"


def local_paths(text: str) -> str:
    return text.replace("/etc/postfix/", "{etc}/")


def postmap(etc: Path, *names: str) -> None:
    require_tool("postmap")
    for name in names:
        subprocess.run(["postmap", "-c", str(etc), f"hash:{etc / name}"], check=True,
                       capture_output=True, timeout=30)


def send(port: int, source: str, recipients: list[str], body: bytes = BODY, tls: bool = False):
    """One transaction from ``source`` (``tls``: after STARTTLS): the RCPT replies and the
    final reply (None when no recipient was accepted)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        if tls:
            assert s.starttls(context=ssl._create_unverified_context())[0] == 220
            s.ehlo("client.test")
        assert s.mail(SENDER)[0] == 250
        replies = [s.rcpt(r) for r in recipients]
        final = s.data(body) if any(code == 250 for code, _ in replies) else None
    return replies, final


@pytest.fixture
def postfix_instances():
    started = []
    yield started
    for pf in started:
        code = pf.stop()
        print(f"--- postfix master pid {pf.pid} exited {code} ---\n{pf.log_text()[-6000:]}")


def test_layout_a_the_gate_on_25_postfix_behind(tmp_path, gate_factory, downstream_factory,
                                                  postfix_instances):
    relay = downstream_factory()
    services = block("A", "master.cf").replace("127.0.0.1:10025", "127.0.0.1:{port}")
    assert "{port}" in services
    files = {"client_access": block("A", "client_access") + f"{REFUSED_CLIENT}/32  REJECT Not this test client\n",
             "recipient_access": block("A", "recipient_access")}
    pf = start_postfix(tmp_path / "postfix", relay_port=relay.port, services=no_chroot(services),
                       main_cf=local_paths(block("A", "main.cf")), files=files,
                       prepare=lambda etc: postmap(etc, "recipient_access"))
    postfix_instances.append(pf)
    gate = gate_factory(config=gate_config("A", pf.port), downstream_port=pf.port)

    # Accepted: Postfix logs the real client (XCLIENT) and the gate's id (XFORWARD IDENT).
    replies, final = send(gate.port, CLIENT, [RECIPIENT, GONE])
    assert replies[0][0] == 250
    # Postfix's own RCPT refusal (its recipient_access map) reaches the client as Postfix says it.
    assert replies[1] == (550, REFUSAL)
    code, text = final
    m = re.match(rb"2\.0\.0 Ok: (?:\d+ bytes )?queued as ([0-9A-F]+)$", text)
    assert code == 250 and m, final
    qid = m.group(1).decode()
    line = pf.wait_for_log(rf"{qid}: client=unknown\[{re.escape(CLIENT)}\]:\d+.*orig_queue_id=(\w+)")
    tx = line.group(1)
    log = gate.wait_for_log(f"tx={tx}")
    assert f"queued as {qid}" in log and f"client={CLIENT}" in log
    [msg] = relay.wait_for_messages(1)
    assert msg.data.endswith(BODY)

    # Postfix's client restriction is about the real client too, not the gate's 127.0.0.1.
    replies, final = send(gate.port, REFUSED_CLIENT, [RECIPIENT])
    assert replies[0][0] == 554 and b"Client host rejected: Not this test client" in replies[0][1]
    assert final is None

    # smtpd_forbid_bare_newline = yes costs nothing behind the gate: bare LFs arrive as CRLF.
    replies, final = send(gate.port, CLIENT, [RECIPIENT], b"Subject: bare\n\nline one\nline two\r\n")
    assert final[0] == 250, final


def test_layout_b_postfix_on_25_the_gate_as_its_proxy_filter(tmp_path, gate_factory, downstream_factory,
                                                              postfix_instances):
    require_tool("openssl")
    relay = downstream_factory()
    back = free_port()
    gate = gate_factory(config=gate_config("B", back), downstream_port=back)
    services = block("B", "master.cf")
    assert re.search(r"^smtp\s+inet\s", services, re.M) and "127.0.0.1:2525" in services
    services = re.sub(r"^smtp(\s+)inet", r"127.0.0.1:{port}\1inet", services, flags=re.M)
    services = services.replace("127.0.0.1:2525", f"127.0.0.1:{gate.port}")
    services = services.replace("127.0.0.1:10025", f"127.0.0.1:{back}")
    services += "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"  # as in Debian's master.cf

    def prepare(etc: Path) -> None:
        postmap(etc, "recipient_access")
        (etc / "tls").mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=postfix.test", "-keyout", str(etc / "tls" / "key.pem"),
                        "-out", str(etc / "tls" / "cert.pem")], check=True, capture_output=True, timeout=60)

    pf = start_postfix(tmp_path / "postfix", relay_port=relay.port, services=no_chroot(services),
                       main_cf=local_paths(block("B", "main.cf")),
                       files={"recipient_access": block("B", "recipient_access")}, prepare=prepare)
    postfix_instances.append(pf)

    replies, final = send(pf.port, CLIENT, [RECIPIENT, GONE], tls=True)
    assert replies[0][0] == 250
    assert replies[1] == (550, REFUSAL)  # the front Postfix's own refusal
    code, text = final
    m = re.match(rb"2\.0\.0 Ok: (?:\d+ bytes )?queued as ([0-9A-F]+)$", text)
    assert code == 250 and m, final
    qid = m.group(1).decode()
    # The second Postfix (behind the gate) logs the real client, not the gate nor the front.
    line = pf.wait_for_log(rf"{qid}: client=unknown\[{re.escape(CLIENT)}\]:\d+.*orig_queue_id=(\w+)")
    log = gate.wait_for_log(f"tx={line.group(1)}")
    assert f"client={CLIENT}" in log and f"queued as {qid}" in log
    pf.wait_for_log(rf"proxy-accept: END-OF-MESSAGE: 250 2\.0\.0 Ok: (?:\d+ bytes )?queued as {qid};.*proto=ESMTP")
    [msg] = relay.wait_for_messages(1)
    assert msg.data.endswith(BODY)


def test_every_block_is_used():
    """The guide has exactly the blocks the tests above read: a new one needs a test."""
    every = sorted((f.get("layout"), f.get("title")) for f in
                   (dict(w.split("=", 1) for w in attrs.split()) for _lang, attrs, _ in _BLOCK.findall(GUIDE.read_text())))
    assert every == sorted(USED_BY_TESTS)
