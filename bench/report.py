#!/usr/bin/env python3
"""The table at the end of `make bench`: figures per system, then the ratios issue 13 sets
targets for, printed and written to RESULTS/<run>.md and .json (and latest.md/.json).

    report.py RUN_DIR RESULTS_DIR

RUN_DIR is what bench/run.sh wrote: results.tsv (drive.py), latency.tsv (lat.py),
skipped.tsv, probes, sink-count, knobs.tsv, load-start, load-end. Throughput is the median messages/s of the runs that
succeeded; a cell shows "(k/n ok)" when some runs failed. Ratios divide medians of this one
run: figures from different runs, or machines, are not comparable.
"""
import collections
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata

WORKLOADS = ["par50_conn", "par50_keep", "seq1_conn", "seq1_keep"]
TITLES = {
    "direct": "smtp-sink directly (the limit)",
    "floor": "Python floor: bare aiosmtpd -> aiosmtplib, uvloop, 2 processes",
    "gate-empty": "smtpgate, empty policy",
    "gate-real-sqlite": "smtpgate, `real` policy, SQLite",
    "gate-real-redis": "smtpgate, `real` policy, Redis",
}
KNOBS = ("SYSTEMS", "WORKLOADS", "RUNS", "N_PAR", "N_SEQ", "LAT_N", "LAT_MODES", "HARAKA_VARIANTS")
HARAKA_REALISTIC = "haraka-realistic-2n-nd"
# (name, numerator, denominator, minimum the ratio should reach) — issue 13's targets
THROUGHPUT_RATIOS = [
    ("smtpgate real (SQLite) / Haraka realistic", "gate-real-sqlite", HARAKA_REALISTIC, 2.0),
    ("smtpgate real (Redis) / Haraka realistic", "gate-real-redis", HARAKA_REALISTIC, 2.0),
    ("smtpgate empty / Haraka realistic", "gate-empty", HARAKA_REALISTIC, None),
    ("smtpgate empty / Python floor", "gate-empty", "floor", 1.25),
    ("real (SQLite) / empty", "gate-real-sqlite", "gate-empty", 0.85),
    ("real (Redis) / empty", "gate-real-redis", "gate-empty", 0.85),
    ("smtpgate empty / direct", "gate-empty", "direct", None),
]
# latency of a system over direct's, one connection, one message at a time: at most
LATENCY_TARGETS = {"gate-empty": (3.0, 4.0), "gate-real-sqlite": (3.0, 4.0), "gate-real-redis": (3.0, 4.0)}


def title(label: str) -> str:
    if label in TITLES:
        return TITLES[label]
    if label.startswith("gate-rule-"):
        return f"smtpgate, `{label[len('gate-rule-'):]}` alone, SQLite"
    if label.startswith("haraka-"):
        set_, nodes, *nd = label[len("haraka-"):].split("-")
        return (f"Haraka, {nodes[:-1]} node(s), {'TCP_NODELAY' if nd else 'stock (no TCP_NODELAY)'}, "
                f"{set_} plugins")
    return label


def read_tsv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def command_output(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine() -> dict:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            # which build: the same version from two builds (a distribution's, optimised with
            # PGO/LTO, and a plain source build) differed by 15-40% on this box's Python figures
            "python_binary": os.path.realpath(getattr(sys, "_base_executable", sys.executable))}


def versions(bench_home: str) -> dict:
    out = {}
    for dist in ("aiosmtpd", "aiosmtplib", "uvloop", "redis"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = command_output("git", "-C", root, "describe", "--always", "--dirty")
    out["smtpgate"] = f"{metadata.version('smtpgate')} ({rev})" if rev else metadata.version("smtpgate")
    out["postfix"] = command_output("dpkg-query", "-W", "-f=${Version}", "postfix")
    haraka = os.path.join(bench_home, "haraka", "node_modules", "Haraka", "package.json")
    if os.path.exists(haraka):
        with open(haraka) as f:
            out["haraka"] = json.load(f).get("version")
        out["node"] = command_output("node", "--version")
    return {k: v for k, v in out.items() if v}


def collect(run_dir: str) -> tuple[list[str], dict]:
    """(labels in the order measured, {label: {"throughput": ..., "latency": ...}})."""
    order: list[str] = []
    systems: dict = collections.defaultdict(lambda: {"throughput": {}, "latency": {}})
    runs = collections.defaultdict(list)
    for row in read_tsv(os.path.join(run_dir, "results.tsv")):
        if row["label"] not in order:
            order.append(row["label"])
        runs[(row["label"], row["workload"])].append(row)
    for (label, wl), rows in runs.items():
        ok = [r for r in rows if r["rc"] == "0"]
        rates = [float(r["msgs_per_s"]) for r in ok]
        cpu = collections.defaultdict(list)
        for r in ok:
            cpu["smtp-source"].append(float(r["source_cpu%"]))
            for kv in r["cpu%"].split():
                name, value = kv.rsplit("=", 1)
                cpu[name].append(float(value.rstrip("%")))
        systems[label]["throughput"][wl] = {
            "median": round(statistics.median(rates), 1) if rates else None,
            "runs": rates, "ok": len(ok), "total": len(rows), "messages": int(rows[0]["nmsg"]),
            "cpu_percent": {k: round(statistics.median(v)) for k, v in cpu.items()},
        }
    for row in read_tsv(os.path.join(run_dir, "latency.tsv")):
        if row["label"] not in order:
            order.append(row["label"])
        systems[row["label"]]["latency"][row["mode"]] = {
            "n": int(row["n"]), **{k[:-3]: float(row[k]) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}}
    return order, dict(systems)


def skip_reason(skipped: dict, label: str) -> str | None:
    """Why run.sh skipped ``label`` (Haraka's variants are skipped together as "haraka")."""
    return skipped.get(label) or (skipped.get("haraka") if label.startswith("haraka-") else None)


def median_of(systems: dict, label: str, wl: str) -> float | None:
    return systems.get(label, {}).get("throughput", {}).get(wl, {}).get("median")


def build(run_dir: str) -> dict:
    order, systems = collect(run_dir)
    skipped = {}
    for line in (read_text(os.path.join(run_dir, "skipped.tsv")) or "").splitlines():
        label, _, reason = line.partition("\t")
        skipped[label] = reason
    ratios = []
    # each rule of `real` alone (gate-rule-NAME) as a share of the empty policy, for context
    alone = [(f"{label[len('gate-rule-'):]} alone / empty", label, "gate-empty", None)
             for label in order if label.startswith("gate-rule-")]
    for name, num, den, target in THROUGHPUT_RATIOS + alone:
        if num not in systems or den not in systems:
            # a ratio of systems this run chose but could not measure: say so, not nothing
            why = {x: skip_reason(skipped, x) for x in (num, den) if x not in systems}
            if all(why.values()):
                ratios.append({"name": name, "numerator": num, "denominator": den, "target_min": target,
                               "values": {}, "meets": {},
                               "missing": "; ".join(f"{x} not measured" for x in why)})
            continue
        values, meets = {}, {}
        for wl in WORKLOADS:
            a, b = median_of(systems, num, wl), median_of(systems, den, wl)
            if a is not None and b:
                values[wl] = round(a / b, 2)
                if target is not None:
                    meets[wl] = values[wl] >= target
        ratios.append({"name": name, "numerator": num, "denominator": den,
                       "target_min": target, "values": values, "meets": meets})
    latency = []
    direct = systems.get("direct", {}).get("latency", {})
    for label in order:
        if label == "direct":
            continue
        for mode, lat in systems[label]["latency"].items():
            base = direct.get(mode)
            if not base or not base["p50"] or not base["p99"]:
                continue
            entry = {"system": label, "mode": mode, "p50_ratio": round(lat["p50"] / base["p50"], 2),
                     "p99_ratio": round(lat["p99"] / base["p99"], 2)}
            if mode == "keep" and label in LATENCY_TARGETS:
                p50_max, p99_max = LATENCY_TARGETS[label]
                entry.update(p50_max=p50_max, p99_max=p99_max,
                             meets={"p50": entry["p50_ratio"] <= p50_max, "p99": entry["p99_ratio"] <= p99_max})
            latency.append(entry)
    return {"order": order, "systems": systems, "skipped": skipped,
            "ratios": ratios, "latency_ratios": latency}


LATENCY_WARMUP = 20  # untimed messages lat.py sends before the timed ones


def deliveries(run_dir: str) -> dict:
    """What smtp-sink counted against what the systems accepted: every accepted message must
    reach the sink once (a relay answering 250 without delivering, or delivering twice,
    shows here). Not checkable after a failed run: it delivered an unknown part."""
    rows = read_tsv(os.path.join(run_dir, "results.tsv"))
    sink = read_text(os.path.join(run_dir, "sink-count"))
    doc = {"sink": int(sink) if sink and sink.isdigit() else None}
    if any(r["rc"] != "0" for r in rows) or doc["sink"] is None:
        doc["expected"] = None
        doc["status"] = "not checked (a failed run delivered an unknown part of its messages)"
        return doc
    probes = (read_text(os.path.join(run_dir, "probes")) or "").split()
    lat = read_tsv(os.path.join(run_dir, "latency.tsv"))
    doc["expected"] = (sum(int(r["nmsg"]) for r in rows) + len(probes)
                       + sum(int(r["n"]) + LATENCY_WARMUP for r in lat))
    doc["status"] = "match" if doc["expected"] == doc["sink"] else "MISMATCH"
    return doc


def busy_warning(doc: dict) -> str | None:
    """A line saying the machine was busy: with a 1-minute load average past half the cores
    before the run, other work took a share of the cores the run was measuring."""
    try:
        load = max(float((doc["load"][k] or "0").split()[0]) for k in ("start", "end"))
    except (ValueError, IndexError):
        return None
    cores = doc["machine"]["cores"] or 1
    if load <= cores / 2:
        return None
    return (f"**Warning: the machine was busy** (load average {load:.1f} on {cores} cores): other "
            "work shared the cores, these figures and ratios are not reliable; run again on a quiet machine.")


def mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def markdown(doc: dict) -> str:
    systems, order = doc["systems"], doc["order"]
    modes = sorted({m for s in systems.values() for m in s["latency"]}, key=["keep", "conn"].index)
    k = doc["knobs"]
    lines = [f"# smtpgate bench {doc['run']}", "",
             f"Messages/s, median of {k['RUNS']} run(s) (N_PAR={k['N_PAR']}, N_SEQ={k['N_SEQ']}); "
             f"latency over {k['LAT_N']} messages, one client, one message at a time "
             "(keep: one connection; conn: a connection per message).", ""]
    busy = busy_warning(doc)
    if busy:
        lines += [busy, ""]
    head = ["system", *WORKLOADS] + [f"{m} p50 / p99 ms" for m in modes]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label in order:
        cells = []
        for wl in WORKLOADS:
            t = systems[label]["throughput"].get(wl)
            if t is None:
                cells.append("–")
            elif t["median"] is None:
                cells.append(f"FAILED (0/{t['total']})")
            else:
                cells.append(f"{t['median']:.0f}" + ("" if t["ok"] == t["total"] else f" ({t['ok']}/{t['total']} ok)"))
        for m in modes:
            lat = systems[label]["latency"].get(m)
            cells.append(f"{lat['p50']:.2f} / {lat['p99']:.2f}" if lat else "–")
        lines.append(f"| {title(label)} | " + " | ".join(cells) + " |")
    for label, reason in doc["skipped"].items():
        lines.append(f"| {title(label) if label != 'haraka' else 'Haraka'} | not measured: {reason} |"
                     + " |" * (len(head) - 2))

    lines += ["", "## Ratios (✓ meets issue 13's target, ✗ misses it)", ""]
    if doc["ratios"]:
        lines += ["| ratio | " + " | ".join(WORKLOADS) + " | target |", "|---|" + "---:|" * (len(WORKLOADS) + 1)]
        for r in doc["ratios"]:
            if r.get("missing"):
                cells = [f"n/a ({r['missing']})"] + [""] * (len(WORKLOADS) - 1)
            else:
                cells = [f"{r['values'][wl]:.2f}{mark(r['meets'].get(wl))}" if wl in r["values"] else "–"
                         for wl in WORKLOADS]
            target = f"≥ {r['target_min']}" if r["target_min"] is not None else "(context)"
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {target} |")
    else:
        lines.append("(no pair of systems to compare in this run)")
    if doc["latency_ratios"]:
        lines += ["", "| latency vs direct | mode | p50 ratio | p99 ratio | target |", "|---|---|---:|---:|---|"]
        for r in doc["latency_ratios"]:
            meets = r.get("meets", {})
            target = f"p50 ≤ {r['p50_max']}×, p99 ≤ {r['p99_max']}×" if "p50_max" in r else "(context)"
            lines.append(f"| {title(r['system'])} | {r['mode']} | {r['p50_ratio']:.2f}{mark(meets.get('p50'))} "
                         f"| {r['p99_ratio']:.2f}{mark(meets.get('p99'))} | {target} |")

    lines += ["", "## CPU during the runs (median; 100% = one core busy)", "",
              "| system | workload | CPU |", "|---|---|---|"]
    for label in order:
        for wl, t in systems[label]["throughput"].items():
            if t["cpu_percent"]:
                lines.append(f"| {label} | {wl} | " + ", ".join(f"{n} {v}%" for n, v in t["cpu_percent"].items()) + " |")

    d = doc["deliveries"]
    lines += ["", f"Deliveries: smtp-sink received {d['sink']} message(s)"
              + (f", the systems accepted {d['expected']}: {d['status']}." if d["expected"] is not None
                 else f"; {d['status']}.")]

    m, v = doc["machine"], doc["versions"]
    lines += ["", "## Machine", "",
              f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']} "
              f"({m.get('python_binary', 'binary not recorded')}); "
              f"load average {doc['load']['start']} at the start, {doc['load']['end']} at the end "
              "(other work on the machine skews every figure: compare ratios within one run).",
              "", "Versions: " + ", ".join(f"{name} {ver}" for name, ver in v.items()) + ".",
              "", "Knobs: " + " ".join(f"{name}={value}" for name, value in k.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, results = sys.argv[1], sys.argv[2]
    doc = {"run": os.path.basename(os.path.normpath(run_dir)),
           "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    doc.update(build(run_dir))
    doc["deliveries"] = deliveries(run_dir)
    bench_home = os.environ.get("BENCH_HOME", os.path.dirname(os.path.dirname(os.path.abspath(run_dir))))
    doc["machine"] = machine()
    doc["load"] = {"start": read_text(os.path.join(run_dir, "load-start")),
                   "end": read_text(os.path.join(run_dir, "load-end"))}
    doc["versions"] = versions(bench_home)
    redis_version = read_text(os.path.join(run_dir, "redis-version"))
    if redis_version:
        doc["versions"]["redis-server"] = redis_version
    doc["knobs"] = {name: os.environ.get(name, "") for name in KNOBS}
    for line in (read_text(os.path.join(run_dir, "knobs.tsv")) or "").splitlines():
        name, _, value = line.partition("\t")
        doc["knobs"][name] = value
    if not doc["order"] and not doc["skipped"]:
        print("report.py: nothing was measured in " + run_dir, file=sys.stderr)
        return 1
    text = markdown(doc)
    os.makedirs(results, exist_ok=True)
    base = os.path.join(results, doc["run"])
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for ext in (".md", ".json"):
        shutil.copyfile(base + ext, os.path.join(results, "latest" + ext))
    print(text)
    print(f"written: {base}.md, {base}.json (and latest.md, latest.json in {results})")
    if doc["deliveries"]["status"] == "MISMATCH":
        print("report.py: smtp-sink did not receive exactly the messages the systems accepted",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
