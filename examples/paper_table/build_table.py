#!/usr/bin/env python
"""Rebuild the paper table purely from run directories.

    python examples/paper_table/build_table.py [--runs-root examples/paper_table/runs/cpu] [--out-dir examples/paper_table]

Reads ``RUNS_ROOT/<task>/<method>/seed<k>/`` (ordinary trainer run directories: ``metrics.jsonl``,
``args.json``, and the ``paper_table_run.json`` record that ``run.py`` adds) and writes, in
``--out-dir``:

* ``results.json``: per task, per row (method): per-seed accuracy, n, split, steps, samples
  seen, wall time, machine; mean and sample std over the finished seeds; missing seeds;
* ``RESULTS.md``: the Markdown table, a status paragraph that says which runs are missing or
  incomplete, mechanical checks of the paper's claims, and a hand-written outcome section
  (kept across rebuilds between the ``outcome:begin``/``outcome:end`` markers);
* ``curves.png``: standalone accuracy vs step per method, mean line and min-max band over seeds
  (skipped with a message when matplotlib is missing).

A missing or unfinished run is reported as such, never as a zero.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RECORD = "paper_table_run.json"  # written by run.py into each run directory
REQUESTED = "requested.json"  # written by run.py into each task directory: the rows and seeds asked for
DEFAULT_SEEDS = (0, 1, 2)
TASK_ORDER = ("banking77", "arith", "gsm8k")

# Rows of the table. ``run``: the run directory (method) the number comes from; ``tag``: the
# trainer's eval row ("before" = step 0, the untrained model; "after" = the end of training);
# ``metric``: which accuracy of that row. Base rows are read from the "before" eval of a trained
# run of the same seed (the first of ``run`` that has one): the same model, examples and bank.
ROWS: dict[str, dict] = {
    "base": {"run": ("ophsd", "offpolicy_sft", "ophsd_jsd", "opsd"), "tag": "before", "metric": "standalone",
             "what": "the untrained model, bare prompt (no harness)"},
    "base+harness": {"run": ("ophsd", "offpolicy_sft", "ophsd_jsd"), "tag": "before", "metric": "harness",
                     "what": "the untrained model inside the task's harness (no privileged information)"},
    "opsd": {"run": ("opsd",), "tag": "after", "metric": "standalone",
             "what": "OPSD: on-policy distillation, teacher context = problem + ground truth"},
    "offpolicy_sft": {"run": ("offpolicy_sft",), "tag": "after", "metric": "standalone",
                      "what": "off-policy SFT: cross-entropy on the harness's final responses"},
    "ophsd": {"run": ("ophsd",), "tag": "after", "metric": "standalone",
              "what": "OPHSD: on-policy reverse KL to the same model inside the harness"},
    "ophsd+harness": {"run": ("ophsd",), "tag": "after", "metric": "harness",
                      "what": "the OPHSD model with the harness re-attached"},
    "ophsd_jsd": {"run": ("ophsd_jsd",), "tag": "after", "metric": "standalone",
                  "what": "OPHSD with JSD (beta 0.5) instead of reverse KL"},
}
DEFAULT_ROWS = ("base", "base+harness", "opsd", "offpolicy_sft", "ophsd", "ophsd+harness")
METRIC_KEY = {"standalone": "eval/standalone_accuracy", "harness": "eval/harness_accuracy"}


# ----------------------------------------------------------------------------- run directories

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run(run_dir: str | Path) -> dict:
    """What a run directory holds: status, de-duplicated eval and training rows, args, record.

    A resumed run appends to ``metrics.jsonl``: the steps after its checkpoint are logged twice;
    the last row per step (per ``(tag, step)`` for eval rows) wins.
    """
    run_dir = Path(run_dir)
    out = {"dir": str(run_dir), "exists": run_dir.is_dir(), "evals": [], "steps": [], "after": None,
           "before": None, "last_step": 0,
           "args": _read_json(run_dir / "args.json") or {}, "record": _read_json(run_dir / RECORD) or {}}
    if not out["exists"]:
        out["status"] = "missing"
        return out
    evals, steps = {}, {}
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if not isinstance(row, dict) or "step" not in row:
                continue
            if "eval/standalone_accuracy" in row:
                evals[(row.get("tag", ""), row["step"])] = row
            elif "loss" in row or "time/step" in row:
                steps[row["step"]] = row
    out["evals"] = sorted(evals.values(), key=lambda r: (r["step"], r.get("tag") != "before"))
    out["steps"] = [steps[k] for k in sorted(steps)]
    after = [r for r in out["evals"] if r.get("tag") == "after"]
    out["after"] = after[-1] if after else None
    before = [r for r in out["evals"] if r.get("tag") == "before"]
    out["before"] = before[0] if before else None
    out["status"] = "finished" if out["after"] is not None else "incomplete"
    out["last_step"] = max([r["step"] for r in out["steps"]] + [r["step"] for r in out["evals"]], default=0)
    return out


def _wall_time(run: dict) -> tuple[float | None, str | None]:
    attempts = (run.get("record") or {}).get("attempts") or []
    secs = [a.get("elapsed_s") for a in attempts if isinstance(a.get("elapsed_s"), (int, float))]
    if secs:
        return round(sum(secs), 1), "run.py process wall time, all attempts (training + evals + start-up)"
    if run["steps"] and any("time/step" in r for r in run["steps"]):
        return round(sum(r.get("time/step", 0.0) for r in run["steps"]), 1), \
            "sum of metrics time/step (training steps only: evals and start-up not timed)"
    return None, None


def _machine(run: dict) -> str | None:
    attempts = (run.get("record") or {}).get("attempts") or []
    names = list(dict.fromkeys(a["machine"] for a in attempts if a.get("machine")))
    return "; ".join(names) if names else None


def _split(run: dict, task: str) -> str | None:
    rec = run.get("record") or {}
    if rec.get("split"):
        return rec["split"]
    a = run.get("args") or {}
    if not a:
        return None
    if a.get("eval_data"):
        return f"--eval-data {Path(a['eval_data']).name} (--eval-limit {a.get('eval_limit')})"
    if a.get("data"):
        return f"dev split of --eval-limit {a.get('eval_limit')} carved from {Path(a['data']).name} with --seed {a.get('seed')}"
    return f"{task} generated dev stream, --eval-limit {a.get('eval_limit')}"


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------- collecting

def _seed_dirs(task_dir: Path) -> set[int]:
    seeds = set()
    if task_dir.is_dir():
        for m in task_dir.iterdir():
            if m.is_dir():
                for s in m.glob("seed*"):
                    if s.is_dir() and s.name[4:].isdigit():
                        seeds.add(int(s.name[4:]))
    return seeds


def discover_tasks(runs_root: Path) -> list[str]:
    found = [p.name for p in runs_root.iterdir() if p.is_dir() and p.name != "data"] if runs_root.is_dir() else []
    found = [t for t in found if any((runs_root / t / m).is_dir() for m in _run_methods())]
    return sorted(found, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def read_requested(task_dir: Path) -> dict:
    """The rows and seeds run.py was asked for on this task (the union over its invocations); {} if none.
    A row nobody asked for is left out of the table rather than reported as missing."""
    return _read_json(Path(task_dir) / REQUESTED) or {}


def record_requested(task_dir: Path, rows, seeds) -> dict:
    old = read_requested(task_dir)
    rows = set(old.get("rows") or ()) | set(rows)
    rec = {"rows": [r for r in ROWS if r in rows], "seeds": sorted(set(old.get("seeds") or ()) | set(seeds))}
    Path(task_dir).mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(task_dir) / REQUESTED, json.dumps(rec, indent=1) + "\n")
    return rec


def _run_methods() -> list[str]:
    return list(dict.fromkeys(m for r in ROWS.values() for m in r["run"]))


def row_entry(runs_root: Path, task: str, row: str, seed: int, cache: dict) -> dict:
    """One cell: the number for (task, row, seed), or why there is none."""
    spec = ROWS[row]
    key = METRIC_KEY[spec["metric"]]
    runs = []
    for m in spec["run"]:
        d = runs_root / task / m / f"seed{seed}"
        if d not in cache:
            cache[d] = read_run(d)
        runs.append((m, cache[d]))
    chosen = None
    for m, run in runs:
        ev = run.get(spec["tag"])
        if ev is not None and ev.get(key) is not None:
            chosen = (m, run, ev)
            break
    if chosen is None:
        m, run = runs[0]
        if spec["tag"] == "before" and not any(r["exists"] for _, r in runs):
            status = "missing"
        elif spec["tag"] == "before":
            status = "incomplete"  # a run exists but has no usable before-eval yet
        else:
            status = run["status"] if run["status"] != "finished" else "no_metric"
        e = {"seed": seed, "status": status, "accuracy": None, "source_run": f"{task}/{m}/seed{seed}"}
        if run["exists"]:
            e["last_step"] = run.get("last_step", 0)
        return e
    m, run, ev = chosen
    a = run.get("args") or {}
    trained = spec["tag"] == "after"
    steps = int(ev["step"]) if trained else 0
    rb, ns = a.get("rollout_batch_size"), a.get("n_samples_per_prompt")
    wall, wall_src = _wall_time(run) if trained else (None, f"not a separate run (the before-eval of {m})")
    e = {
        "seed": seed, "status": "finished", "accuracy": float(ev[key]), "n": ev.get("eval/n"),
        "split": _split(run, task), "steps": steps,
        "samples_seen": (steps * rb * ns) if (trained and rb and ns) else (0 if not trained else None),
        "pairs_trained": sum(int(r.get("pairs_kept", 0)) for r in run["steps"] if r["step"] <= steps) if trained else 0,
        "wall_time_s": wall, "wall_time_source": wall_src, "machine": _machine(run),
        "source_run": f"{task}/{m}/seed{seed}", "eval_tag": spec["tag"], "eval_step": int(ev["step"]),
    }
    if trained:
        e["train_time_s"] = round(sum(r.get("time/step", 0.0) for r in run["steps"] if r["step"] <= steps), 1)
    if a.get("lr") is not None:
        e["lr"] = a["lr"]
    return e


def collect(runs_root: str | Path, tasks=None, rows=None, seeds=None) -> dict:
    """The machine-readable table (what ``results.json`` holds)."""
    runs_root = Path(runs_root)
    tasks = list(tasks) if tasks else (discover_tasks(runs_root) or ["banking77", "arith"])
    cache: dict = {}
    out = {"schema": "ophsd-paper-table/1", "generated_at": _dt.datetime.now().isoformat(timespec="seconds"),
           "runs_root": _rel(runs_root), "tasks": {}}
    for task in tasks:
        tdir = runs_root / task
        req = read_requested(tdir)
        task_seeds = sorted(set(seeds) if seeds else set(req.get("seeds") or DEFAULT_SEEDS) | _seed_dirs(tdir))
        task_rows = list(rows) if rows else [r for r in ROWS if r in set(req.get("rows") or DEFAULT_ROWS)]
        if not rows and "ophsd_jsd" not in task_rows and (tdir / "ophsd_jsd").is_dir():
            task_rows.append("ophsd_jsd")
        methods = {}
        for row in task_rows:
            per_seed = [row_entry(runs_root, task, row, s, cache) for s in task_seeds]
            done = [e for e in per_seed if e["status"] == "finished"]
            deterministic = ROWS[row]["tag"] == "before"
            if deterministic and done:
                # Greedy decoding of the same initial weights on the same examples: the seed does not
                # enter, so one evaluation stands for every seed (run.py evaluates it once).
                for e in per_seed:
                    if e["status"] != "finished":
                        e.update(status="shared", accuracy=done[0]["accuracy"], evaluated_by_seed=done[0]["seed"])
            accs = [e["accuracy"] for e in done]
            mean, std = _mean_std(accs)
            ns = sorted({e["n"] for e in done if e.get("n") is not None})
            steps = sorted({e["steps"] for e in done})
            walls = [e["wall_time_s"] for e in done if e.get("wall_time_s") is not None]
            methods[row] = {
                "what": ROWS[row]["what"], "metric": ROWS[row]["metric"], "eval_tag": ROWS[row]["tag"],
                "seeds_requested": task_seeds, "seeds_finished": [e["seed"] for e in done],
                "missing_seeds": [e["seed"] for e in per_seed if e["status"] not in ("finished", "shared")],
                "n_seeds": len(done), "accuracies": accs, "mean": mean, "std": std,
                "std_kind": "sample (ddof=1)" if not deterministic else
                "deterministic (greedy, seed-independent): evaluated once, std 0 by construction",
                "deterministic": deterministic,
                "n": ns[0] if len(ns) == 1 else (ns or None),
                "steps": steps[0] if len(steps) == 1 else (steps or None),
                "samples_seen": _one([e.get("samples_seen") for e in done]),
                "wall_time_s": walls, "wall_time_s_total": round(sum(walls), 1) if walls else None,
                "machine": _one([e.get("machine") for e in done]),
                "split": _one([e.get("split") for e in done]),
                "per_seed": per_seed,
            }
        split = _one([m["split"] for m in methods.values() if m["split"]])
        budgets = {((cache.get(d) or {}).get("record") or {}).get("budget") for d in cache if d.parent.parent == tdir}
        out["tasks"][task] = {"split": split, "budget": _one(sorted(b for b in budgets if b)),
                              "seeds_requested": task_seeds, "methods": methods,
                              "rows_not_requested": [r for r in DEFAULT_ROWS if r not in task_rows],
                              "curves": _curves(runs_root, task, task_rows, task_seeds, cache)}
    return out


def _one(values):
    """The single distinct value, a list when they differ, None when there is none."""
    vals = []
    for v in values:
        if v is not None and v not in vals:
            vals.append(v)
    return None if not vals else vals[0] if len(vals) == 1 else vals


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _curves(runs_root: Path, task: str, rows, seeds, cache) -> dict:
    """Per trained method: accuracy at each evaluated step, per seed (standalone; harness for ophsd)."""
    out = {}
    for row in rows:
        spec = ROWS[row]
        if spec["tag"] != "after":
            continue
        m = spec["run"][0]
        key = METRIC_KEY[spec["metric"]]
        per_seed = {}
        for s in seeds:
            d = runs_root / task / m / f"seed{s}"
            run = cache.get(d) or read_run(d)
            cache[d] = run
            pts = [(int(r["step"]), float(r[key])) for r in run["evals"] if r.get(key) is not None]
            if pts:
                per_seed[str(s)] = pts
        if per_seed:
            out[row] = per_seed
    return out


# ----------------------------------------------------------------------------- writing

def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _fmt_time(s) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cell(m: dict) -> str:
    if m["mean"] is None:
        return "**no finished run**"
    if m.get("deterministic"):
        return f"{_pct(m['mean'])} (deterministic)"
    std = "n/a (1 seed)" if m["std"] is None else _pct(m["std"])
    return f"{_pct(m['mean'])} ± {std}"


def _per_seed_cell(m: dict) -> str:
    parts = []
    for e in m["per_seed"]:
        if e["status"] == "finished":
            parts.append(f"s{e['seed']}: {_pct(e['accuracy'])}")
        elif e["status"] == "shared":
            parts.append(f"s{e['seed']}: = s{e['evaluated_by_seed']}")
        else:
            extra = f" at step {e['last_step']}" if e["status"] == "incomplete" and e.get("last_step") else ""
            parts.append(f"s{e['seed']}: *{e['status']}{extra}*")
    return ", ".join(parts)


def _gap_noise(a: dict, b: dict) -> float | None:
    """Binomial standard error of the difference of two accuracies on the same n examples (the base
    rows are one evaluation each, so their seeds give no error bar)."""
    n = a.get("n") if a.get("n") == b.get("n") else None
    if not isinstance(n, int) or n < 1:
        return None
    return math.sqrt(sum(p * (1 - p) for p in (a["mean"], b["mean"])) / n)


def _claims(t: dict) -> list[str]:
    ms = t["methods"]

    def get(r):
        return ms.get(r) if ms.get(r) and ms[r]["mean"] is not None else None

    lines = []
    oph = get("ophsd")
    if oph is None:
        return ["- No finished OPHSD run: none of the paper's claims can be checked yet."]
    for other in ("base", "opsd", "offpolicy_sft"):
        o = get(other)
        if other not in ms:
            lines.append(f"- OPHSD vs {other}: not run for this task.")
            continue
        if o is None:
            lines.append(f"- OPHSD vs {other}: not checkable ({other} has no finished run).")
            continue
        diff = oph["mean"] - o["mean"]
        o_std = 0.0 if o.get("deterministic") else o["std"]
        if oph["std"] is None or o_std is None:
            verdict = "fewer than 2 seeds on one side: no error bar"
        else:
            thr = 2 * max(oph["std"], o_std)
            verdict = f"2 x the larger std = {100 * thr:.1f} points: {'clears it' if diff > thr else 'does NOT clear it'}"
        lines.append(f"- OPHSD − {other}: {100 * diff:+.1f} points ({verdict}).")
    h = get("ophsd+harness")
    if h is not None:
        lines.append(f"- Harness re-attached to OPHSD − OPHSD standalone: {100 * (h['mean'] - oph['mean']):+.1f} points.")
    bh, base = get("base+harness"), get("base")
    noise = _gap_noise(bh, base) if bh is not None and base is not None else None
    if noise is not None and abs(bh["mean"] - base["mean"]) <= 2 * noise:
        lines.append(f"- Harness gap: base+harness − base = {100 * (bh['mean'] - base['mean']):+.1f} points, within 2 "
                     f"binomial standard errors (±{200 * noise:.1f} points at n={base['n']}): the harness adds "
                     "nothing measurable here, so there is no gap for OPHSD to close.")
    elif bh is not None and base is not None and bh["mean"] != base["mean"]:
        closed = (oph["mean"] - base["mean"]) / (bh["mean"] - base["mean"])
        lines.append(f"- Harness gap closed by OPHSD: {100 * closed:.0f}% (base {_pct(base['mean'])} -> OPHSD "
                     f"{_pct(oph['mean'])}, base+harness {_pct(bh['mean'])}).")
    return lines


OUTCOME_BEGIN, OUTCOME_END = "<!-- outcome:begin -->", "<!-- outcome:end -->"
OUTCOME_PLACEHOLDER = (
    "_Not written yet._ Once every run above has finished, write here, whichever way it went: "
    "does OPHSD standalone beat base, OPSD and off-policy SFT by more than two standard deviations, "
    "and does re-attaching the harness add anything? If not, what was tried (learning rate, steps, "
    "divergence, teacher initial/current) and why you think it failed. This section is kept when "
    "the table is rebuilt.")


def render_markdown(res: dict, previous: str | None = None) -> str:
    outcome = OUTCOME_PLACEHOLDER
    if previous and OUTCOME_BEGIN in previous and OUTCOME_END in previous:
        outcome = previous.split(OUTCOME_BEGIN, 1)[1].split(OUTCOME_END, 1)[0].strip() or OUTCOME_PLACEHOLDER
    L = ["# Paper table: OPHSD vs baselines", "",
         f"Rebuilt by `python examples/paper_table/build_table.py --runs-root {res['runs_root']}` "
         f"({res['generated_at']}) from the run directories alone; machine-readable: `results.json`, "
         "plot: `curves.png`. Accuracy in %, mean ± sample standard deviation (ddof=1) over the seeds "
         "that finished; every row states how many did. *missing* = no run directory, *incomplete* = "
         "started but no final evaluation yet: neither counts as a zero. The base rows are *deterministic*: "
         "greedy decoding of the untrained weights on the same examples does not depend on the seed, so they "
         "are evaluated once (by the lowest seed's run) and stand for every seed (`= s0`).", ""]
    missing_all = []
    for task, t in res["tasks"].items():
        dagger = False
        L += [f"## {task}", ""]
        L.append(f"- Split: {t['split'] or 'unknown (no finished run)'}")
        machines = _one([m["machine"] for m in t["methods"].values() if m["machine"]])
        L.append(f"- Machine: {machines if isinstance(machines, str) else '; '.join(machines or ['not recorded'])}")
        if t.get("budget"):
            L.append(f"- Budget preset: `{t['budget']}`")
        L.append(f"- Seeds requested: {', '.join(map(str, t['seeds_requested']))}")
        if t.get("rows_not_requested"):
            L.append(f"- Not run for this task (not requested of run.py): {', '.join(t['rows_not_requested'])}")
        L += ["", "| method | accuracy % (mean ± std) | seeds | per seed | n eval | steps | samples seen | wall time / seed |",
              "|---|---|---|---|---|---|---|---|"]
        for row, m in t["methods"].items():
            walls = m["wall_time_s"]
            wall = _fmt_time(sum(walls) / len(walls)) if walls else "–"
            if any(e.get("wall_time_source", "").startswith("sum of") for e in m["per_seed"]):
                wall += " †"
                dagger = True
            if ROWS[row]["tag"] == "before":
                wall = "(before-eval of a trained run, once)"
            elif row == "ophsd+harness":
                wall = "(same runs as ophsd)"
            L.append(f"| {row} | {_cell(m)} | {m['n_seeds']}/{len(m['seeds_requested'])} | {_per_seed_cell(m)} | "
                     f"{_list(m['n'])} | {_list(m['steps'])} | {_list(m['samples_seen'])} | {wall} |")
            for e in m["per_seed"]:
                if e["status"] not in ("finished", "shared"):
                    missing_all.append(f"{task}/{row}/seed{e['seed']} ({e['status']}, run dir {e['source_run']})")
        if dagger:
            L += ["", "† some seeds have no run.py record: their wall time is the sum of the trainer's "
                  "`time/step` (training steps only, evaluations and start-up not included)."]
        L += ["", "Rows: " + "; ".join(f"**{r}**: {ROWS[r]['what']}" for r in t["methods"]) + ".", ""]
        L += ["Mechanical checks of the paper's claims (from the numbers above):", ""] + _claims(t) + [""]
    L += ["## Status", ""]
    if missing_all:
        L += [f"**The table is incomplete: {len(missing_all)} cell(s) have no finished run.** "
              "Until they finish, the claims cannot be judged from this table. Missing or incomplete:", ""]
        L += [f"- {x}" for x in missing_all] + [""]
    else:
        L += ["Every requested run finished.", ""]
    L += ["## Outcome", "", OUTCOME_BEGIN, outcome, OUTCOME_END, ""]
    return "\n".join(L)


def _list(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return "/".join(map(str, v))
    return str(v)


def plot_curves(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("build_table: matplotlib is not installed: curves.png skipped (pip install matplotlib)")
        return None
    tasks = [t for t in res["tasks"] if res["tasks"][t]["curves"]]
    if not tasks:
        print("build_table: no evaluation rows yet: curves.png skipped")
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    colors = {}
    for ax, task in zip(axes[0], tasks):
        t = res["tasks"][task]
        for row, per_seed in t["curves"].items():
            steps = sorted({s for pts in per_seed.values() for s, _ in pts})
            mean, lo, hi, xs = [], [], [], []
            for s in steps:
                vals = [v for pts in per_seed.values() for st, v in pts if st == s]
                if vals:
                    xs.append(s)
                    mean.append(100 * sum(vals) / len(vals))
                    lo.append(100 * min(vals))
                    hi.append(100 * max(vals))
            c = colors.setdefault(row.split("+")[0], f"C{len(colors)}")
            ls = "--" if row.endswith("+harness") else "-"
            ax.plot(xs, mean, ls, color=c, marker="o", ms=3, label=f"{row} (n_seeds={len(per_seed)})")
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, linewidth=0)
        for row, ls in (("base", ":"), ("base+harness", "-.")):
            m = t["methods"].get(row)
            if m and m["mean"] is not None:
                ax.axhline(100 * m["mean"], color="grey", ls=ls, lw=1, label=f"{row} ({100 * m['mean']:.1f})")
        ax.set_title(f"{task}: standalone (solid) and harness-attached (dashed)\n"
                     "accuracy vs step, mean and min-max over seeds", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: dict, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "RESULTS.md"}
    _atomic_write(paths["json"], json.dumps(res, indent=2) + "\n")
    prev = paths["md"].read_text() if paths["md"].is_file() else None
    _atomic_write(paths["md"], render_markdown(res, prev))
    png = plot_curves(res, out_dir / "curves.png")
    if png:
        paths["png"] = png
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build(runs_root, out_dir, tasks=None, rows=None, seeds=None) -> dict:
    res = collect(runs_root, tasks, rows, seeds)
    paths = write_outputs(res, out_dir)
    for task, t in res["tasks"].items():
        for row, m in t["methods"].items():
            print(f"  {task:10s} {row:15s} {_cell(m).replace('**', ''):22s} seeds {m['n_seeds']}/{len(m['seeds_requested'])}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs-root", default=str(HERE / "runs" / "cpu"))
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--tasks", nargs="+", help="default: every task directory under --runs-root")
    ap.add_argument("--methods", nargs="+", choices=list(ROWS), help=f"default: {' '.join(DEFAULT_ROWS)} (+ ophsd_jsd when present)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds expected (default: 0 1 2 and any found)")
    a = ap.parse_args(argv)
    build(a.runs_root, a.out_dir, a.tasks, a.methods, a.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
