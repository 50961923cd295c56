"""`make bench`'s moving parts that can break without anyone running it: the gate configs it
builds must stay valid as rules evolve, and its report must compute the ratios issue 13
targets and catch lost messages. No timing is asserted here (house rule): the figures are
made up, only the arithmetic and the checks are tested."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from smtpgate.smtp.datadecoder import DataDecoder
from tests.support.constants import ROOT

BENCH = ROOT / "bench"
TIMEOUT = 60


@pytest.mark.parametrize("policies, state", [
    ("policies", None),
    ("policies-real", None),
    ("policies-real", "redis://127.0.0.1:6379/13?prefix=smtpgate-bench-test:"),
    *((f"policies-rules/{rule}", None) for rule in ("senders", "greylist", "attachments", "rewrite")),
])
def test_the_gate_configs_of_the_bench_pass_check_config(tmp_path, policies, state):
    out = tmp_path / "run" / "gate.yaml"
    cmd = [sys.executable, str(BENCH / "gateconf.py"), str(BENCH / "gate.yaml"), str(out),
           "--listen", "20030", "--sink", "20025", "--policies", str(BENCH / policies)]
    subprocess.run(cmd + (["--state", state] if state else []), check=True, timeout=TIMEOUT)
    check = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(out)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stdout + check.stderr
    text = out.read_text()
    assert f"policies: {BENCH / policies}\n" in text
    # SQLite's file is relative to the written config: it lands in the run's folder
    assert f"state: '{state}'\n" in text if state else "state: sqlite:///./state.db\n" in text


HEADER = "label\tworkload\trun\tnmsg\twall_s\tmsgs_per_s\trc\tsource_cpu%\tcpu%\n"
LAT_HEADER = "label\tmode\tn\tmean_ms\tp50_ms\tp90_ms\tp99_ms\tmax_ms\n"


def write_run(run: pathlib.Path, rates: dict, sink_count: int | None = None, failed: str = "") -> None:
    """A run folder as run.sh leaves it: 100 messages per run, 10 latency messages."""
    run.mkdir(parents=True)
    rows, lat = [HEADER], [LAT_HEADER]
    for label, per_wl in rates.items():
        for wl, rate in per_wl.items():
            rc = "1" if (label, wl) == tuple(failed.split("/")) else "0"
            rows.append(f"{label}\t{wl}\t1\t100\t1.0\t{rate}\t{rc}\t10\tsink=5% {label}=90%\n")
        lat.append(f"{label}\tkeep\t10\t1.0\t{1.0 if label == 'direct' else 2.5}\t1.5\t"
                   f"{2.0 if label == 'direct' else 9.0}\t3.0\n")
    (run / "results.tsv").write_text("".join(rows))
    (run / "latency.tsv").write_text("".join(lat))
    (run / "skipped.tsv").write_text("")
    (run / "probes").write_text("".join(f"{label}\n" for label in rates if label != "direct"))
    expected = sum(100 * len(w) for w in rates.values()) + (len(rates) - 1) + 30 * len(rates)
    (run / "sink-count").write_text(str(expected if sink_count is None else sink_count))
    (run / "load-start").write_text("0.10 0.20 0.30")
    (run / "load-end").write_text("0.40 0.50 0.60")


RATES = {
    "direct": {"par50_keep": 8000, "seq1_keep": 2400},
    "floor": {"par50_keep": 1000, "seq1_keep": 400},
    "haraka-realistic-2n-nd": {"par50_keep": 500, "seq1_keep": 200},
    "gate-empty": {"par50_keep": 2000, "seq1_keep": 600},
    "gate-real-sqlite": {"par50_keep": 1800, "seq1_keep": 300},
}


def report(run: pathlib.Path, results: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BENCH_HOME"}
    env.update(RUNS="1", N_PAR="100", N_SEQ="100")
    return subprocess.run([sys.executable, str(BENCH / "report.py"), str(run), str(results)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def run_report(tmp_path, rates=RATES, **kw):
    run, results = tmp_path / "home" / "runs" / "20260101T000000Z", tmp_path / "results"
    write_run(run, rates, **kw)
    return report(run, results), results


def test_the_report_computes_issue_13s_ratios_and_marks_the_targets(tmp_path):
    proc, results = run_report(tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((results / "latest.json").read_text())
    ratios = {r["name"]: r for r in doc["ratios"]}
    real_haraka = ratios["smtpgate real (SQLite) / Haraka realistic"]
    assert real_haraka["values"] == {"par50_keep": 3.6, "seq1_keep": 1.5}
    assert real_haraka["meets"] == {"par50_keep": True, "seq1_keep": False}
    assert ratios["smtpgate empty / Python floor"]["values"] == {"par50_keep": 2.0, "seq1_keep": 1.5}
    assert ratios["real (SQLite) / empty"]["meets"] == {"par50_keep": True, "seq1_keep": False}
    assert "real (Redis) / empty" not in ratios  # not in this run: no row, not a zero
    latency = {r["system"]: r for r in doc["latency_ratios"]}
    assert (latency["gate-empty"]["p50_ratio"], latency["gate-empty"]["p99_ratio"]) == (2.5, 4.5)
    assert latency["gate-empty"]["meets"] == {"p50": True, "p99": False}
    assert doc["deliveries"]["status"] == "match"
    text = (results / "latest.md").read_text()
    assert text == (results / "20260101T000000Z.md").read_text()
    assert "| smtpgate real (SQLite) / Haraka realistic | – | 3.60 ✓ | – | 1.50 ✗ | ≥ 2.0 |" in text
    assert text in proc.stdout  # what is written is what was printed
    # the interpreter's binary, not only its version: two builds of one version differ a lot
    assert f"({os.path.realpath(sys._base_executable)})" in text


def test_each_rule_alone_is_given_as_a_share_of_the_empty_policy(tmp_path):
    proc, results = run_report(tmp_path, {**RATES, "gate-rule-greylist": {"par50_keep": 1500, "seq1_keep": 480}})
    assert proc.returncode == 0, proc.stderr
    ratios = {r["name"]: r for r in json.loads((results / "latest.json").read_text())["ratios"]}
    assert ratios["greylist alone / empty"]["values"] == {"par50_keep": 0.75, "seq1_keep": 0.8}
    text = (results / "latest.md").read_text()
    assert "| smtpgate, `greylist` alone, SQLite | – | 1500 |" in text
    assert "| greylist alone / empty | – | 0.75 | – | 0.80 | (context) |" in text


def test_a_system_that_was_not_measured_shows_as_such_in_the_ratios(tmp_path):
    rates = {k: v for k, v in RATES.items() if not k.startswith("haraka")}
    run, results = tmp_path / "home" / "runs" / "20260101T000000Z", tmp_path / "results"
    write_run(run, rates)
    (run / "skipped.tsv").write_text("haraka\tnpm or node not found\n")
    proc = report(run, results)
    assert proc.returncode == 0, proc.stderr
    text = (results / "latest.md").read_text()
    assert "| Haraka | not measured: npm or node not found |" in text
    assert "n/a (haraka-realistic-2n-nd not measured)" in text


def test_messages_the_sink_did_not_get_fail_the_report(tmp_path):
    proc, results = run_report(tmp_path, sink_count=5)
    assert proc.returncode == 1
    assert json.loads((results / "latest.json").read_text())["deliveries"]["status"] == "MISMATCH"
    assert "did not receive exactly" in proc.stderr


def test_a_failed_run_has_no_median_and_no_delivery_check(tmp_path):
    proc, results = run_report(tmp_path, failed="gate-empty/seq1_keep", sink_count=5)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((results / "latest.json").read_text())
    assert doc["systems"]["gate-empty"]["throughput"]["seq1_keep"]["median"] is None
    assert "FAILED (0/1)" in (results / "latest.md").read_text()
    assert doc["deliveries"]["expected"] is None


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("dots", [0, 3])
def test_front_profiles_message_has_dot_stuffed_lines_only_when_asked(dots):
    spec = importlib.util.spec_from_file_location("front_profile", BENCH / "front_profile.py")
    front_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(front_profile)
    sent = front_profile.bench_message(2000, dots)
    decoder = DataDecoder()
    assert decoder.feed(sent + b".\r\n") == b""
    body = b"".join(decoder.result()).split(b"\r\n\r\n", 1)[1].split(b"\r\n")[:-1]
    # 80 octets a line on the wire: a stuffed one is "." and 76 X once decoded
    assert len(body) > 10 and all(len(line) == 78 - line.startswith(b".") for line in body)
    assert [i for i, line in enumerate(body) if line.startswith(b".")] == (
        list(range(dots - 1, len(body), dots)) if dots else [])
