"""`smtpgate try` never changes what the running gate remembers."""
import json
import subprocess
import sys


def run(folder, *args):
    return subprocess.run([sys.executable, "-m", "smtpgate", *args, "-c", "gate.yaml"],
                          cwd=folder, capture_output=True, text=True, timeout=60)


def test_try_uses_a_scratch_state(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text(
        "domains: [example.com]\nrules:\n  - greylist: {delay: 5m}\n")
    (tmp_path / "gate.yaml").write_text(
        f"policies: policies\nstate: sqlite://{tmp_path}/state.db\nquarantine: {tmp_path}/q\n")
    (tmp_path / "m.eml").write_bytes(b"Subject: hi\r\n\r\nbody\r\n")
    for _ in range(2):  # a second try would pass if the first had recorded the triplet
        r = run(tmp_path, "try", "m.eml", "--from", "a@sender.test", "--to", "u@example.com",
                "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["reply"].startswith("451 4.7.1")
    r = run(tmp_path, "greylist", "list", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert not (doc.get("entries") if isinstance(doc, dict) else doc)
