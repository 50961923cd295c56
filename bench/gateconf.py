#!/usr/bin/env python3
"""Write the gate.yaml one benchmarked gate runs with: bench/gate.yaml, its top-level keys
overridden for this run (ports, policies folder, state), into the run's own folder, so the
state database and the quarantine land there and never in the repository.

    gateconf.py bench/gate.yaml OUT/gate.yaml --listen 20030 --sink 20025 \
        --policies bench/policies-real [--state redis://127.0.0.1:6379/13?prefix=P]
"""
import argparse
import os

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--sink", type=int, required=True, help="the downstream's port on 127.0.0.1")
    ap.add_argument("--policies", required=True, help="the policies folder")
    ap.add_argument("--state", help="a state URL (default: the source's, relative to OUT)")
    a = ap.parse_args()
    with open(a.source) as f:
        config = yaml.safe_load(f)
    config["listen"] = [f"127.0.0.1:{a.listen}"]
    config["downstream"] = {**config.get("downstream", {}), "host": "127.0.0.1", "port": a.sink}
    config["policies"] = os.path.abspath(a.policies)
    if a.state:
        config["state"] = a.state
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(f"# Written by bench/gateconf.py from {os.path.abspath(a.source)}; do not edit.\n")
        yaml.safe_dump(config, f, sort_keys=False)


if __name__ == "__main__":
    main()
