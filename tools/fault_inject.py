#!/usr/bin/env python
"""Fault injection, with figures: what survives kills, corruption and hostile input.

    python tools/fault_inject.py checkpoint --kills 6      # kill -9 during saves/resumes; truncations, bit flips
    python tools/fault_inject.py http                      # fuzzed /generate, /abort_request bodies on 127.0.0.1
    python tools/fault_inject.py inputs                    # bad YAML configs, data files, flags
    python tools/fault_inject.py all --out faults.json

Each suite lives in ``tools/faults/<name>.py`` and exposes ``add_args(parser)`` and
``run(args) -> dict`` (its figures: how many faults were injected, how many were survived or
detected, and every failure with its reproducer). The pytest side is ``tests/test_faults_*.py``;
this script is for the figures quoted in issue notes. Exit code 1 when any fault was not handled.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

SUITES = ("checkpoint", "http", "inputs")


def _suite(name: str):
    return importlib.import_module(f"faults.{name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        mod = _suite(name)
        p = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        mod.add_args(p)
    p_all = sub.add_parser("all", help="every suite with its defaults")
    p_all.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args(argv)
    names = SUITES if a.suite == "all" else (a.suite,)
    figures, failed = {}, 0
    for name in names:
        mod = _suite(name)
        if a.suite == name:
            args = a
        else:
            defaults = argparse.ArgumentParser()
            mod.add_args(defaults)
            args = defaults.parse_args([])
        res = mod.run(args)
        figures[name] = res
        failed += len(res.get("failures", []))
        print(f"[{name}] " + ", ".join(f"{k} {v}" for k, v in res.items() if k != "failures"))
        for f in res.get("failures", []):
            print(f"[{name}]   NOT HANDLED: {f}")
    if getattr(a, "out", None):
        Path(a.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
