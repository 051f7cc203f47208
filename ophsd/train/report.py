"""Turn a run directory's ``metrics.jsonl`` into ``report.md`` (table) and ``curves.png``.

``python -m ophsd.train.report RUN_DIR`` (also ``ophsd report RUN_DIR``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CURVES = ["loss", "grad_norm", "reward/student", "reward/harness", "tokens_per_s", "time/step"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory written with --save?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/standalone_accuracy" in r]
    lines = [f"# OPHSD run report: `{run_dir.name}`", ""]
    if evals:
        lines += ["## Evaluation", "", "Probe divergence: the divergence on a fixed batch of dev pairs built "
                  "from the initial weights (comparable across steps, unlike the on-policy training loss).", "",
                  "| when | step | standalone | harness-attached | n | probe divergence |", "|---|---|---|---|---|---|"]
        for r in evals:
            h, pd = r.get("eval/harness_accuracy"), r.get("eval/probe_divergence")
            lines.append(f"| {r.get('tag', '')} | {r['step']} | {r['eval/standalone_accuracy']:.1%} | "
                         f"{'' if h is None else f'{h:.1%}'} | {r.get('eval/n', '')} | "
                         f"{'' if pd is None else f'{pd:.4f}'} |")
        lines.append("")
    if steps:
        lines += ["## Training steps", "", "| step | loss | grad norm | pairs kept | tokens | step time (s) |",
                  "|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r['step']} | {r['loss']:.4f} | {r.get('grad_norm', float('nan')):.3f} | "
                         f"{r.get('pairs_kept', '')}/{r.get('pairs_total', '')} | {r.get('tokens', '')} | "
                         f"{r.get('time/step', 0):.1f} |")
        first, last = steps[0]["loss"], steps[-1]["loss"]
        lines += ["", f"Loss {first:.4f} -> {last:.4f} over {len(steps)} steps."]
    png = _plot(run_dir, steps)
    if png:
        lines += ["", f"![curves]({png.name})"]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _plot(run_dir: Path, steps: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in CURVES if any(k in r for r in steps)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    axes = [axes] if len(keys) == 1 else axes
    for ax, k in zip(axes, keys):
        xs = [r["step"] for r in steps if k in r]
        ax.plot(xs, [r[k] for r in steps if k in r], marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m ophsd.train.report RUN_DIR   (writes RUN_DIR/report.md and curves.png)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(write_report(argv[0]))
    except FileNotFoundError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
