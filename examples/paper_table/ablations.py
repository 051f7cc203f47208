#!/usr/bin/env python
"""Learning curves of single runs side by side: the ablations of the paper table (learning rate,
steps, divergence, teacher context), read from their run directories alone.

    python examples/paper_table/ablations.py                     # the ABLATIONS below
    python examples/paper_table/ablations.py --out-dir /tmp/abl  # elsewhere

Writes ``ablations.md`` (one row per run: what changed, standalone accuracy at every evaluated
step, the last eval's answer-level diagnosis, samples seen, wall time), ``ablations.png``
(standalone accuracy vs step) and ``ablations_diagnosis.json`` (the diagnosis counts), next to
``RESULTS.md``. A run still going shows the points it has; a missing one says so.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_table as bt  # noqa: E402

RUNS = HERE / "runs"
# (label, run directory under runs/, what differs from the table's CPU preset)
ABLATIONS = [
    ("OPHSD, 12 steps (table)", "cpu/banking77/ophsd/seed1", "the table's run: lr 5e-5, 12 steps"),
    ("OPHSD", "cpu-steps36-lr1e-4/banking77/ophsd/seed0", "lr 1e-4, 36 steps"),
    ("OPHSD", "cpu-steps72-lr1e-4/banking77/ophsd/seed1", "lr 1e-4, 72 steps"),
    ("OPHSD, label list in the teacher", "cpu-steps36-lr1e-4-labellist/banking77/ophsd/seed0",
     "lr 1e-4, 36 steps, --harness-label-list"),
    ("OPHSD, label list in the teacher", "cpu-steps36-lr1e-4-labellist/banking77/ophsd/seed1",
     "lr 1e-4, 36 steps, --harness-label-list"),
    ("OPHSD, label list in the teacher", "cpu-steps120-lr1e-4-labellist/banking77/ophsd/seed0",
     "lr 1e-4, 120 steps, --harness-label-list"),
    ("OPHSD, label list in the teacher", "cpu-steps120-lr1e-4-labellist/banking77/ophsd/seed1",
     "lr 1e-4, 120 steps, --harness-label-list"),
    ("OPHSD, label list, then a WSD decay", "cpu-steps160-lr1e-4-labellist-wsd40/banking77/ophsd/seed0",
     "the 120-step run above (seed 0), resumed to 160 steps with --lr-decay-style WSD "
     "--lr-wsd-decay-iters 40 (lr 1e-4 -> 0 linearly over steps 121-160)"),
    ("OPHSD, label list, then a WSD decay", "cpu-steps160-lr1e-4-labellist-wsd40/banking77/ophsd/seed1",
     "the 120-step run above (seed 1), resumed to 160 steps with --lr-decay-style WSD "
     "--lr-wsd-decay-iters 40 (lr 1e-4 -> 0 linearly over steps 121-160)"),
    ("OPHSD, 16 prompts x 1 sample, label list", "cpu-steps72-lr1e-4-labellist-16x1/banking77/ophsd/seed0",
     "lr 1e-4, 72 steps, --harness-label-list, --rollout-batch-size 16 --n-samples-per-prompt 1 "
     "(twice the distinct prompts per step, the same samples)"),
    ("OPHSD, rollout temperature 0.7, label list", "cpu-steps36-lr1e-4-labellist-t0.7/banking77/ophsd/seed0",
     "lr 1e-4, 36 steps, --harness-label-list, --rollout-temperature 0.7"),
    ("OPHSD, JSD (beta 0.5), label list", "cpu-steps36-lr1e-4-labellist-jsd/banking77/ophsd_jsd/seed0",
     "lr 1e-4, 36 steps, --harness-label-list, --divergence jsd"),
    ("OPHSD, teacher = current weights, label list", "cpu-steps36-lr1e-4-labellist-current/banking77/ophsd/seed0",
     "lr 1e-4, 36 steps, --harness-label-list, --teacher current"),
    ("off-policy SFT, 12 steps (table)", "cpu/banking77/offpolicy_sft/seed1", "the table's run: lr 5e-5, 12 steps"),
    ("off-policy SFT", "cpu-steps36-lr1e-4/banking77/offpolicy_sft/seed0", "lr 1e-4, 36 steps"),
    *[("off-policy SFT, label list in the harness", f"cpu-steps72-lr1e-4-labellist/banking77/offpolicy_sft/seed{k}",
       "lr 1e-4, 72 steps, --harness-label-list (the harness OPHSD's label-list runs distil)") for k in (0, 1, 2)],
]


def curve(run: dict) -> list[tuple[int, float]]:
    """(step, standalone accuracy %) of every eval row (the plot adds the base model's at step 0
    to runs that skipped their own before-eval: every run here starts from the same weights)."""
    return [(int(r["step"]), 100.0 * r["eval/standalone_accuracy"]) for r in run["evals"]]


def last_predictions(run_dir: Path) -> tuple[int, list[dict]] | None:
    """(step, rows) of the run's last ``eval_predictions/`` file, read once for every column."""
    files = sorted((run_dir / "eval_predictions").glob("step_*.jsonl"))
    if not files:
        return None
    rows = [json.loads(ln) for ln in files[-1].read_text().splitlines() if ln.strip()]
    return int(files[-1].stem.split("_")[-1]), rows


def label_answers(rows: list[dict]) -> tuple[int, int, int]:
    """(answers that are one of the labels, of those correct, n) among one eval's predictions:
    tells a student that answers with the wrong label from one that invents label names (the
    standalone score counts an exact label only)."""
    valid = [r for r in rows if r.get("standalone_answer") is not None]
    return len(valid), sum(bool(r.get("standalone_correct")) for r in valid), len(rows)


def near_copy_correct(rows: list[dict], labels: list[str]) -> int:
    """Correct answers if a near-copy of the gold label also counted (the rule the draft-verify
    harness applies to the labels it shows: ``rewards.closest_label``, ratio >= 0.8, here over the
    whole label set). A second reading of the same answers, not the score."""
    from ophsd.tasks.rewards import closest_label

    return sum(bool(r.get("standalone_correct")) or (
        r.get("standalone_answer") is None and closest_label(r.get("standalone"), labels) == r.get("gold"))
        for r in rows)


def most_common_answer(rows: list[dict]) -> tuple[int, int]:
    """(how many answers are the single most common one, distinct answers) in one eval: a student
    that collapses to one output (every message gets the same label) shows here, not in accuracy."""
    from collections import Counter

    c = Counter((r.get("standalone") or "").strip() for r in rows)
    return (c.most_common(1)[0][1] if c else 0), len(c)


DIAGNOSIS = "ablations_diagnosis.json"


def diagnose(runs: Path, rel: str, last_step: int | None, cached: dict) -> dict:
    """The answer-level columns of one run: computed from its ``eval_predictions/`` where this
    machine has them; else the counts saved by the last rebuild that had them (the per-example
    files quote the data and stay out of git; the counts carry no text, so they are tracked in
    ``ablations_diagnosis.json``), provided they were taken at the same eval step."""
    last = last_predictions(runs / rel)
    if last is not None:
        step, rows = last
        return {"eval_step": step, "label_answers": list(label_answers(rows)),
                "near_copy": near_copy_correct(rows, task_labels(runs, rel)),
                "most_common": list(most_common_answer(rows))}
    old = cached.get(rel)
    if old and old.get("eval_step") == last_step:
        return old
    return {"eval_step": None, "label_answers": None, "near_copy": None, "most_common": None}


def task_labels(runs: Path, rel: str) -> list[str]:
    """The label set the run's split was written with (``<runs root>/data/<task>/categories.json``)."""
    root, task = rel.split("/")[:2]
    path = runs / root / "data" / task / "categories.json"
    return json.loads(path.read_text()) if path.is_file() else []


def std_error(pct: float, n: int) -> float:
    """Binomial standard error in points: how far one n-message eval moves by sampling alone."""
    p = pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def samples_per_step(run: dict) -> int | None:
    a = run["args"]
    if not a:
        return None
    return int(a.get("rollout_batch_size", 0)) * int(a.get("n_samples_per_prompt", 0))


def table(rows: list[dict]) -> str:
    steps = sorted({s for r in rows for s, _ in r["curve"]})
    head = ["run", "seed", "what differs", *[f"step {s}" for s in steps], "last: ± s.e.",
            "last: label answers (right)", "last: near-copies too", "last: most common answer (distinct)",
            "samples / step", "wall time", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = dict(r["curve"])
        cells = [f"{acc[s]:.1f}" if s in acc else "" for s in steps]
        wall = f"{r['wall'] / 60:.0f} min" if r["wall"] else "-"
        la = r["label_answers"]
        se = f"± {std_error(r['curve'][-1][1], la[2]):.1f}" if la and r["curve"] else ""
        valid = f"{la[0]}/{la[2]} ({la[1]})" if la else ""
        near = f"{100.0 * r['near_copy'] / la[2]:.1f}" if la and r["near_copy"] is not None else ""
        mc = r.get("most_common")
        top = f"{mc[0]}/{la[2]} ({mc[1]})" if la and mc else ""
        out.append("| " + " | ".join([r["label"], str(r["seed"]), r["what"], *cells, se, valid, near, top,
                                       str(r["per_step"] or "-"), wall, r["status"]]) + " |")
    return "\n".join(out)


def plot(rows: list[dict], base: float | None, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ablations: matplotlib is not installed: ablations.png skipped")
        return None
    fig, ax = plt.subplots(figsize=(11, 4.6))
    for r in rows:
        pts = ([(0, base)] if base is not None and r["curve"] and r["curve"][0][0] > 0 else []) + r["curve"]
        if pts:
            ax.plot(*zip(*pts), marker="o", ls="--" if "SFT" in r["label"] else "-",
                    label=f"{r['label']} ({r['what']}, seed {r['seed']})")
    if base is not None:
        ax.axhline(base, color="grey", ls=":", lw=1, label=f"base {base:.1f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("standalone accuracy % (BANKING77 dev, n=300)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", type=Path, default=RUNS, help="runs directory the ABLATIONS paths are under")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    a = ap.parse_args(argv)
    base_run = bt.read_run(a.runs / "cpu/banking77/ophsd/seed0")
    base = 100.0 * base_run["before"]["eval/standalone_accuracy"] if base_run["before"] else None
    cache_path = a.out_dir / DIAGNOSIS
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows, diagnosis = [], {}
    for label, rel, what in ABLATIONS:
        run = bt.read_run(a.runs / rel)
        wall, _ = bt._wall_time(run)
        seed = run["args"].get("seed", rel.rsplit("seed", 1)[-1])
        crv = curve(run)
        diagnosis[rel] = diagnose(a.runs, rel, crv[-1][0] if crv else None, cached)
        rows.append({"label": label, "what": what, "seed": seed, "curve": crv, "per_step": samples_per_step(run),
                     "wall": wall, "status": run["status"] if run["exists"] else "missing", "dir": rel,
                     "label_answers": diagnosis[rel]["label_answers"], "near_copy": diagnosis[rel]["near_copy"],
                     "most_common": diagnosis[rel].get("most_common")})
    a.out_dir.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(diagnosis, indent=1) + "\n")
    md = ["# Ablations: OPHSD on BANKING77 (CPU budget), single runs",
          "",
          f"Standalone accuracy % on the table's 300 dev messages (greedy, exact label) at each evaluated step; "
          f"base (step 0, deterministic): {base:.1f}. Every run: 8 prompts per step, responses <= 24 tokens, "
          "teacher = initial weights inside draft-verify unless stated; 'samples / step' counts on-policy "
          "samples (SFT: harness answers). 'last: ± s.e.' is the binomial standard error of the last "
          "eval (sampling noise of n=300 messages alone); 'label answers (right)' counts the last eval's "
          "answers that are one of the 77 labels, and how many of those are the gold one; 'near-copies too' "
          "re-reads the last eval's answers counting a near-copy of the gold label as right (the harness's "
          "own parse rule, `rewards.closest_label`), a second reading, not the score; 'most common answer "
          "(distinct)' counts the last eval's most frequent answer and the distinct answers (300/300 (1): "
          "the model gives every message the same answer). Rebuilt by `python examples/paper_table/ablations.py` from:"
          if base is not None else "Base evaluation missing.",
          "",
          *[f"- {r['label']} ({r['what']}): `runs/{r['dir']}`" for r in rows],
          "",
          table(rows),
          ""]
    (a.out_dir / "ablations.md").write_text("\n".join(md))
    png = plot(rows, base, a.out_dir / "ablations.png")
    print(f"wrote {a.out_dir / 'ablations.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
