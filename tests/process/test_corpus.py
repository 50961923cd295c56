"""Bytes stay bytes: every third-party message in the test corpus passes unchanged.

Each file under tests/data/corpus/ (LICENSE and README files skipped), with its line ends
made CRLF (as they are on the wire), goes

- through the real gate (one child process for the module) into the CapturingDownstream,
  once without and once with CHUNKING offered (DATA, then BDAT), and must arrive
  byte-identical (un-dot-stuffed ``data`` == what was sent, and the raw wire data == what
  was sent, dot-stuffed after DATA, as is after BDAT);
- through ``smtpgate.testing.Harness`` in-process with the example plugin
  ``examples/plugins/subject_words.py`` loaded (a word that matches nothing), and
  ``result.message`` must be byte-identical.

Parametrized by file name, so a failure names the message.
"""

from __future__ import annotations

import importlib.util
import re
import smtplib
from pathlib import Path

import pytest

from tests.support.downstream import CapturingDownstream
from tests.support.constants import CORPUS, EXAMPLE_PLUGIN
from tests.support.gateproc import start_gate
from smtpgate.testing import Harness

NO_MATCH = "zq-no-subject-holds-this-phrase-qz"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*")
                  if p.is_file() and not p.name.upper().startswith(("LICENSE", "README")))


FILES = corpus_files()
IDS = [str(p.relative_to(CORPUS)) for p in FILES]


def wire_bytes(path: Path) -> bytes:
    """The file's bytes with every bare LF made CRLF, ending with CRLF."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", path.read_bytes())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def stuff(data: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", data)


def test_corpus_is_there():
    assert len(FILES) >= 100, f"expected the corpus under {CORPUS}, found {len(FILES)} files"


# ---------------------------------------------------------------------------- the real gate
@pytest.fixture(scope="module", params=["DATA", "BDAT"])
def corpus_gate(tmp_path_factory, request):
    ds = CapturingDownstream(chunking=request.param == "BDAT").start()
    gate = start_gate(tmp_path_factory.mktemp("corpus") / "gate", downstream_port=ds.port)
    yield gate, ds
    code = gate.stop()
    print(f"--- gate pid {gate.pid} exited {code} ---\n{gate.log_text()[-6000:]}")
    ds.stop()


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_corpus_message_passes_the_gate_byte_identical(corpus_gate, path):
    gate, ds = corpus_gate
    problem = gate.unhealthy()  # else every test of the module fails alike, and not why
    assert problem is None, problem
    raw = wire_bytes(path)
    # only messages recorded after this mark count: an earlier client may have had the same
    # port (loopback reuses ports in TIME_WAIT), and the downstream records a message just
    # after its 250, so an earlier one could be found first
    since = ds.mark()
    with gate.smtp() as c:
        port = c.sock.getsockname()[1]  # the gate passes it downstream as XCLIENT PORT=
        assert c.ehlo()[0] == 250
        code, text = c.mail("a@sender.test")
        assert code == 250, text
        code, text = c.rcpt("user@example.com")
        assert code == 250, text
        code, text = c.data(raw)  # smtplib dot-stuffs and sends the final dot
        assert code == 250, f"{path.name}: {code} {text!r}\n{gate.log_text()[-2000:]}"
        assert text.startswith(b"2.0.0"), text

    # by the message's own XCLIENT record: one downstream session serves many clients (the pool)
    [msg] = ds.wait_for_messages_from(port, since, timeout=10)
    assert msg.rcpts == ["user@example.com"]
    assert msg.data == raw, f"{path.name} changed on its way through the gate"
    assert msg.data_raw == (raw if ds.chunking_enabled else stuff(raw))
    assert msg.bdat == ds.chunking_enabled


# ---------------------------------------------------------------------------- the Harness
def _load_example_rule():
    spec = importlib.util.spec_from_file_location("smtpgate_example_subject_words", EXAMPLE_PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SubjectWords


@pytest.fixture(scope="module")
def subject_words():
    return _load_example_rule()


@pytest.mark.parametrize("path", FILES, ids=IDS)
async def test_corpus_message_passes_the_harness_byte_identical(subject_words, path):
    raw = wire_bytes(path)
    h = Harness([(subject_words, {"words": [NO_MATCH]})], domains=["example.com"])
    result = await h.send(raw, sender="a@sender.test", recipients=["user@example.com"])
    assert result.reply.code == 250, f"{path.name}: {result.reply} trace={result.trace}"
    assert [e.rule for e in result.trace if e.rule == "subject_words"], result.trace  # it ran
    assert result.message == raw, f"{path.name} changed in the pipeline"
    [relayed] = h.relayed
    assert relayed.data == raw
    assert relayed.recipients == ["user@example.com"]
