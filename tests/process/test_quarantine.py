"""The Maildir quarantine (several processes at once) and ``smtpgate quarantine`` list, show,
release and delete — release against a real SMTP downstream, with XCLIENT."""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from tests.support.quarantine import RAW, cli, hold, write_config

from smtpgate import StoreError  # noqa: E402
from smtpgate.cli.main import main  # noqa: E402
from smtpgate.stores.quarantine import MaildirQuarantine  # noqa: E402
from smtpgate.testing import Harness  # noqa: E402
from smtpgate_rules.attachments import Attachments  # noqa: E402

# --- the store --------------------------------------------------------------------------------
def test_put_writes_original_bytes_and_a_sidecar(tmp_path):
    store, qid, result = hold(tmp_path / "q", recipients=["a@example.com", "b@example.com"])
    assert (tmp_path / "q" / "new" / qid).read_bytes() == RAW
    meta = json.loads((tmp_path / "q" / "meta" / f"{qid}.json").read_text())
    assert meta["sender"] == "sender@sender.example"
    assert meta["recipients"] == ["a@example.com", "b@example.com"]
    assert meta["client_ip"] == "198.51.100.7" and meta["helo"] == "mail.sender.example"
    assert meta["verdict"]["code"] == 554 and "a.exe" in meta["reason"]
    assert [e["rule"] for e in meta["trace"]][-1] == "attachments"
    assert meta["size"] == len(RAW) and not meta["delivered"]
    assert not list((tmp_path / "q" / "tmp").iterdir())


def test_find_by_id_prefix_or_transaction(tmp_path):
    store, qid, result = hold(tmp_path / "q")
    assert store.find(qid) == qid
    assert store.find(result.transaction.id) == qid
    assert store.find(qid[:12]) == qid
    for bad in ("nope", "../../etc/passwd", "", "a/b"):
        with pytest.raises(KeyError):
            store.find(bad)


def test_release_record_moves_to_cur_and_delete(tmp_path):
    store, qid, _ = hold(tmp_path / "q")
    store.record_release(qid, {"ok": False, "reply": "451 later"})
    assert store.list()[0]["status"] == "held"
    store.record_release(qid, {"ok": True, "reply": "250 ok"})
    [item] = store.list()
    assert item["status"] == "released" and len(item["releases"]) == 2
    assert (tmp_path / "q" / "cur" / f"{qid}:2,PS").exists()
    store.delete(qid)
    assert store.list() == [] and not list((tmp_path / "q" / "meta").iterdir())


def test_lock_is_exclusive(tmp_path):
    store, qid, _ = hold(tmp_path / "q")
    with store.lock(qid):
        with pytest.raises(StoreError, match="busy"):
            with MaildirQuarantine(str(tmp_path / "q")).lock(qid):
                pass
    with store.lock(qid):
        pass


def _put_many(folder: str, n: int, worker: int) -> None:
    from smtpgate import Session, Transaction, Verdict
    store = MaildirQuarantine(folder)
    session = Session(f"S{worker}", "192.0.2.1")
    for i in range(n):
        tx = Transaction(f"W{worker}T{i}", session, "s@sender.example")
        store.put(tx, b"Subject: %d/%d\r\n\r\nx\r\n" % (worker, i), Verdict.quarantine("held"))


def test_several_processes_at_once(tmp_path):
    folder = str(tmp_path / "q")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_many, args=(folder, 25, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    items = MaildirQuarantine(folder).list()
    assert len(items) == 100 and len({m["id"] for m in items}) == 100
    assert all(m.get("tx") for m in items)  # every sidecar complete


def test_unwritable_quarantine_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    store = MaildirQuarantine(str(tmp_path / "file" / "q"))
    from smtpgate import Session, Transaction, Verdict
    with pytest.raises(StoreError):
        store.put(Transaction("T", Session("S", "192.0.2.1"), ""), b"x", Verdict.quarantine())


# --- the commands -----------------------------------------------------------------------------
def test_list_show_delete(tmp_path, capsys):
    config = write_config(tmp_path)
    code, out, _ = cli(capsys, "quarantine", "list", "--json", "-c", config)
    assert code == 0 and json.loads(out)["messages"] == []
    _, qid, result = hold(tmp_path / "q")
    code, out, _ = cli(capsys, "-c", config, "quarantine", "list", "--json")
    [item] = json.loads(out)["messages"]
    assert item["id"] == qid and item["status"] == "held" and item["sender"] == "sender@sender.example"
    assert item["stored"].endswith("Z")
    code, out, _ = cli(capsys, "quarantine", "list", "-c", config)
    assert code == 0 and qid in out and "REASON" in out
    code, out, _ = cli(capsys, "quarantine", "list", "--released", "--json", "-c", config)
    assert json.loads(out)["messages"] == []
    code, out, _ = cli(capsys, "quarantine", "show", result.transaction.id, "--json", "--message", "-c", config)
    doc = json.loads(out)
    assert code == 0 and doc["id"] == qid and doc["message"].encode() == RAW and doc["trace"]
    code, out, _ = cli(capsys, "quarantine", "show", qid, "-c", config)
    assert "trace:" in out and "attachments" in out and "a.exe" in out
    code, out, _ = cli(capsys, "quarantine", "delete", qid, "--json", "-c", config)
    assert code == 0 and json.loads(out) == {"id": qid, "deleted": True}
    code, _, err = cli(capsys, "quarantine", "show", qid, "-c", config)
    assert code == 1 and "no held message" in err


def test_release_relays_the_original_as_the_original_client(tmp_path, capsys, downstream):
    config = write_config(tmp_path, downstream.port)
    _, qid, result = hold(tmp_path / "q", sender="orig@sender.example",
                          recipients=["a@example.com", "b@example.com"])
    code, out, err = cli(capsys, "quarantine", "release", qid, "--json", "-c", config)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["reply"].startswith("250")
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == RAW
    assert msg.mail_from == "orig@sender.example" and msg.rcpts == ["a@example.com", "b@example.com"]
    assert msg.xclient["ADDR"] == "198.51.100.7"
    assert msg.xclient["HELO"] == "mail.sender.example"
    assert msg.xforward.get("IDENT") in (None, result.transaction.id)
    code, out, _ = cli(capsys, "quarantine", "list", "--json", "-c", config)
    [item] = json.loads(out)["messages"]
    assert item["status"] == "released"
    # once is enough, unless forced
    code, _, err = cli(capsys, "quarantine", "release", qid, "-c", config)
    assert code == 1 and "released already" in err
    code, out, _ = cli(capsys, "quarantine", "release", qid, "-c", config, "--force")
    assert code == 0 and "released" in out
    downstream.wait_for_messages(2)


def test_release_drops_authentication_results_forged_with_our_id(tmp_path, capsys, downstream):
    config = write_config(tmp_path, downstream.port)  # hostname: gate.test
    forged = b"Authentication-Results: gate.test; spf=pass smtp.mailfrom=bank.example\r\n"
    other = b"Authentication-Results: mx.other.example; spf=fail\r\n"
    store, qid, _ = hold(tmp_path / "q", raw=forged + other + RAW)
    assert store.get(qid)[1] == forged + other + RAW  # held as received
    code, _, err = cli(capsys, "quarantine", "release", qid, "-c", config)
    assert code == 0, err
    [msg] = downstream.wait_for_messages(1)
    assert msg.data == other + RAW


def test_release_refused_or_unreachable_keeps_the_message(tmp_path, capsys, downstream, free_port):
    config = write_config(tmp_path, downstream.port)
    _, qid, _ = hold(tmp_path / "q")
    downstream.replies["RCPT"] = "550 5.1.1 no such user"
    code, out, err = cli(capsys, "quarantine", "release", qid, "--json", "-c", config)
    assert code == 1 and "not released" in err
    assert json.loads(out)["recipients"] == {"rcpt@example.com": "550 5.1.1 no such user"}
    assert downstream.messages == []
    config = write_config(tmp_path, free_port())
    code, _, err = cli(capsys, "quarantine", "release", qid, "-c", config)
    assert code == 1 and "451" in err
    store = MaildirQuarantine(str(tmp_path / "q"))
    [item] = store.list()
    assert item["status"] == "held" and [r["ok"] for r in item["releases"]] == [False, False]


def test_bad_config_is_exit_2(tmp_path, capsys):
    path = tmp_path / "gate.yaml"
    path.write_text("quarantine: [1, 2]\nnonsense: 1\n")
    code, _, err = cli(capsys, "quarantine", "list", "-c", str(path))
    assert code == 2 and "gate.yaml" in err


def test_unknown_id_is_exit_1(tmp_path, capsys):
    config = write_config(tmp_path)
    os.makedirs(tmp_path / "q" / "new")
    for command in ("show", "release", "delete"):
        code, _, err = cli(capsys, "quarantine", command, "nope", "-c", config)
        assert code == 1 and "no held message" in err


# --- file modes, fsync off the event loop, retention -----------------------------------------
DAY = 86400
HOLD_POLICY = "domains: [example.com]\nrules:\n  - attachments: {action: quarantine}\n"


def _modes(folder: Path) -> dict[str, int]:
    """The permission bits of the Maildir's folders and of every file in new/ and meta/."""
    out = {sub: os.stat(folder / sub).st_mode & 0o777 for sub in ("", "tmp", "new", "cur", "meta")}
    for sub in ("new", "meta"):
        for f in (folder / sub).iterdir():
            out[f"{sub}/{'sidecar' if f.name.endswith('.json') else 'message'}"] = os.stat(f).st_mode & 0o777
    return out


@pytest.mark.parametrize("config, file_mode, folder_mode", [
    ({}, 0o600, 0o700),
    ({"quarantine_mode": 0o640}, 0o640, 0o750),
])
def test_a_real_gate_holds_messages_with_private_modes_whatever_the_umask(
        gate_factory, downstream, config, file_mode, folder_mode):
    old = os.umask(0)  # the gate inherits it: the modes must come from the gate, not the umask
    try:
        gate = gate_factory(policies={"default.yaml": HOLD_POLICY}, config=config)
    finally:
        os.umask(old)
    with gate.smtp() as c:
        c.ehlo()
        code, _ = c.docmd("MAIL FROM:<a@sender.example>")
        assert code == 250
        assert c.docmd("RCPT TO:<user@example.com>")[0] == 250
        assert c.data(RAW)[0] == 554
    folder = gate.folder / "quarantine"
    assert _modes(folder) == {"": folder_mode, "tmp": folder_mode, "new": folder_mode,
                              "cur": folder_mode, "meta": folder_mode,
                              "new/message": file_mode, "meta/sidecar": file_mode}
    assert downstream.messages == []


def test_the_gate_stores_in_a_thread_not_on_the_event_loop():
    import threading

    from smtpgate.testing import FakeQuarantine

    class Recording(FakeQuarantine):
        def put(self, tx, raw, verdict):
            self.thread = threading.get_ident()
            return super().put(tx, raw, verdict)

    h = Harness([(Attachments, {"action": "quarantine"})])
    h.gate.quarantine = store = Recording()
    result = asyncio.run(h.send(RAW))
    assert result.reply.code == 554 and store.held
    assert store.thread != threading.get_ident()  # asyncio.run's loop runs in this thread


def _aged(folder: Path, ages_in_days: list[float]) -> list[str]:
    """Hold one message per age and backdate its file (the retention goes by its mtime)."""
    ids = []
    for days in ages_in_days:
        store, qid, _ = hold(folder)
        path = store.path(qid)
        when = time.time() - days * DAY
        os.utime(path, (when, when))
        ids.append(qid)
    return ids


def test_purge_command_by_retention_and_older_than(tmp_path, capsys):
    config = write_config(tmp_path)
    old, month, week, fresh = _aged(tmp_path / "q", [90, 31, 8, 0.01])
    store = MaildirQuarantine(str(tmp_path / "q"))
    store.record_release(month, {"ok": True, "at": time.time()})  # released ones go too
    (tmp_path / "q" / "tmp" / "left.by.a.crash").write_bytes(b"x")
    os.utime(tmp_path / "q" / "tmp" / "left.by.a.crash", (time.time() - 40 * DAY,) * 2)

    code, out, _ = cli(capsys, "quarantine", "purge", "--dry-run", "-c", config)
    assert (code, out.strip()) == (0, f"would purge 2 messages older than 30d from {tmp_path / 'q'}")
    assert set(store._files()) == {old, month, week, fresh}

    code, out, _ = cli(capsys, "quarantine", "purge", "--json", "-c", config)
    doc = json.loads(out)
    assert code == 0 and doc["purged"] == 2 and sorted(doc["ids"]) == sorted([old, month])
    assert set(store._files()) == {week, fresh}
    assert not (tmp_path / "q" / "meta" / f"{old}.json").exists()
    assert not (tmp_path / "q" / "tmp" / "left.by.a.crash").exists()

    code, out, _ = cli(capsys, "quarantine", "purge", "--older-than", "7d", "-c", config)
    assert (code, out.strip()) == (0, f"purged 1 message older than 7d from {tmp_path / 'q'}")
    assert set(store._files()) == {fresh}

    with pytest.raises(SystemExit) as e:  # argparse: usage and exit 2
        main(["quarantine", "purge", "--older-than", "soon", "-c", config])
    assert e.value.code == 2 and "expected a duration" in capsys.readouterr().err


def test_purge_leaves_a_message_another_command_holds(tmp_path):
    [qid] = _aged(tmp_path / "q", [60])
    store = MaildirQuarantine(str(tmp_path / "q"))
    with store.lock(qid):
        assert store.purge(30 * DAY) == []
    assert store.purge(30 * DAY) == [qid]


def test_keep_for_ever(tmp_path, capsys):
    config = write_config(tmp_path)
    with open(config, "a") as f:
        f.write("quarantine_keep: 0\n")
    [qid] = _aged(tmp_path / "q", [400])
    code, out, _ = cli(capsys, "quarantine", "purge", "-c", config)
    assert code == 0 and "nothing purged" in out
    assert MaildirQuarantine(str(tmp_path / "q"))._files().keys() == {qid}


@pytest.mark.parametrize("text, problem", [
    ("quarantine_mode: 0644", "expected a file mode 0600, 0640 or 0660, got 0o644"),
    ("quarantine_mode: '0777'", "expected a file mode 0600, 0640 or 0660, got '0777'"),
    ("quarantine_keep: -1d", 'expected a duration like "5m"'),
])
def test_bad_quarantine_settings_name_file_and_line(tmp_path, text, problem):
    from smtpgate.config import load_gate_config
    from smtpgate.errors import ConfigError
    path = tmp_path / "gate.yaml"
    path.write_text(f"hostname: gate.test\n{text}\n")
    with pytest.raises(ConfigError) as e:
        load_gate_config(str(path))
    assert f"{path}:2" in str(e.value) and problem in str(e.value)


def test_the_gate_purges_at_start_up(gate_factory, downstream, tmp_path):
    folder = tmp_path / "held"
    old, recent = _aged(folder, [45, 2])
    gate = gate_factory(config={"quarantine": str(folder), "quarantine_keep": "30d"})
    gate.wait_for_log("quarantine: purged 1 message(s) older than 30d")
    assert set(MaildirQuarantine(str(folder))._files()) == {recent}
