#!/usr/bin/env python
"""Whole OPHSD steps (rollout, harness, teacher, student, optimizer, weight sync) on a real task,
this checkout side by side with a baseline commit, in one run.

    python tools/bench_step.py --preset banking77 --steps 2 --baseline-ref 7f9ea38 \\
        --out ophsd/train/bench_results/step_banking77

Each variant is an ordinary trainer run (``python -m ophsd.train``, single rank, the preset's
flags, ``--skip-eval``) into its own run directory; the baseline runs from a ``git worktree`` of
``--baseline-ref`` (the code as it was, not a flag-emulation of it). The per-phase times come
from each run's ``metrics.jsonl``. Runs are sequential, so the variants share the machine
equally; the report names the CPU. Results and notes: ``ophsd/train/BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, next to this file
import bench_common as bc  # noqa: E402  (puts the repository root on sys.path too)

REPO = bc.REPO
DATA = REPO.parent / "shared" / "data"

# The measured configuration (SmolLM2-135M, fp32, one rank): 8 prompts x 2 samples,
# responses <= 32 tokens. Flags both versions understand.
PRESETS = {
    "banking77": ["--task", "banking77", "--harness", "draft_verify",
                  "--data", str(DATA / "banking77" / "train.csv"), "--bank-data", str(DATA / "banking77" / "train.csv"),
                  "--rollout-batch-size", "8", "--n-samples-per-prompt", "2", "--micro-batch-size", "4",
                  "--max-prompt-length", "1024", "--max-response-length", "32"],
    "gsm8k": ["--task", "gsm8k", "--harness", "plan_solve", "--data", str(DATA / "gsm8k" / "train.jsonl"),
              "--rollout-batch-size", "8", "--n-samples-per-prompt", "2", "--micro-batch-size", "4",
              "--max-prompt-length", "1024", "--max-response-length", "128"],
}
PHASES = ["time/rollout", "time/harness", "time/teacher_forward", "time/student_fwd_bwd", "time/sync", "time/step"]


def _worktree(ref: str) -> Path:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ophsd-baseline-{ref}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)
    return path


def _run(name: str, root: Path, flags: list[str], run_dir: Path, log) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    env = dict(os.environ, PYTHONPATH=str(root), **bc.OFFLINE_ENV)
    cmd = [sys.executable, "-m", "ophsd.train", *flags, "--save", str(run_dir), "--skip-eval", "--no-tensorboard"]
    log(f"[bench_step] {name}: {' '.join(cmd)}  (code: {root})")
    with open(run_dir.parent / f"{name}.log", "w") as fh, bc.Stopwatch() as sw:
        r = subprocess.run(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = sw.wall
    if r.returncode != 0:
        raise SystemExit(f"bench_step: {name} failed (exit {r.returncode}); see {run_dir.parent / f'{name}.log'}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in rows if "time/step" in m]
    return {"name": name, "code": str(root), "wall_s": wall, "steps": steps}


def _summary(res: dict) -> dict:
    steps = res["steps"]
    out = {k: statistics.median(m.get(k, 0.0) for m in steps) for k in PHASES}
    out["per_step_s"] = [m["time/step"] for m in steps]
    out["pairs"] = statistics.median(m.get("pairs_kept", 0) for m in steps)
    out["tokens"] = statistics.median(m.get("tokens", 0) for m in steps)
    if all("layout/student_positions_per_token" in m for m in steps):
        out["student_positions_per_token"] = statistics.median(m["layout/student_positions_per_token"] for m in steps)
        out["teacher_positions_per_token"] = statistics.median(m["layout/teacher_positions_per_token"] for m in steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="banking77")
    p.add_argument("--steps", type=int, default=2, help="trainer steps per variant (all reported; median shown)")
    p.add_argument("--baseline-ref", default=None, help="git commit to compare against (a worktree of it runs)")
    p.add_argument("--extra", default="", help="extra trainer flags for the current checkout only, e.g. '--bf16'")
    p.add_argument("--common", default="", help="extra trainer flags for every variant, e.g. "
                                                "'--harness-label-list --max-prompt-length 2048'")
    p.add_argument("--out", required=True, help="directory for run dirs, logs, bench_step.json and bench_step.md")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if not DATA.is_dir():
        p.error(f"the presets read ../shared/data ({DATA}): not found")
    out = Path(a.out).resolve()  # the baseline runs with its worktree as cwd
    out.mkdir(parents=True, exist_ok=True)
    flags = PRESETS[a.preset] + a.common.split() + ["--train-iters", str(a.steps)]
    variants = []
    if a.baseline_ref:
        variants.append((f"baseline@{a.baseline_ref}", _worktree(a.baseline_ref), flags))
    variants.append(("current", REPO, flags + a.extra.split()))
    results = [_run(n, root, f, out / n.replace("@", "_"), print) for n, root, f in variants]
    summ = [dict(name=r["name"], wall_s=r["wall_s"], **_summary(r)) for r in results]
    base = summ[0]
    for s in summ:
        s["speedup"] = base["time/step"] / s["time/step"]
    machine = f"{bc.cpu_cores()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    meta = {"preset": a.preset, "flags": flags, "extra": a.extra, "steps": a.steps, "machine": machine,
            "loadavg_1_5_15": list(os.getloadavg())}
    bc.write_json(out / "bench_step.json", {"meta": meta, "results": summ})
    cols = ["variant", "step s (median)", "per step s", "rollout s", "harness s", "teacher fwd s",
            "student fwd+bwd s", "sync s", "student / teacher positions per loss token", "loss tokens",
            "speed-up"]
    rows = []
    for s in summ:
        pos = (f"{s['student_positions_per_token']:.2f} / {s['teacher_positions_per_token']:.2f}"
               if "student_positions_per_token" in s else "-")
        rows.append([
            s["name"], f"{s['time/step']:.1f}", ", ".join(f"{x:.1f}" for x in s["per_step_s"]),
            f"{s['time/rollout']:.1f}", f"{s['time/harness']:.1f}", f"{s['time/teacher_forward']:.1f}",
            f"{s['time/student_fwd_bwd']:.1f}", f"{s['time/sync']:.1f}", pos, f"{s['tokens']:.0f}",
            f"{s['speedup']:.2f}x"])
    lines = [f"{a.preset}, {a.steps} steps per variant, machine: {machine}. Flags: `{' '.join(flags)}`", ""]
    lines += bc.md_table(cols, rows)
    (out / "bench_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
