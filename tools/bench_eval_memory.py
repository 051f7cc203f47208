#!/usr/bin/env python
"""Peak memory and time of the trainer's standalone eval at several ``--eval-batch-size`` values.

    python tools/bench_eval_memory.py --data ../shared/data/banking77/train.csv --limit 64 --batch-sizes 64,16

One process, one embedded engine (the trainer's CPU dtype, fp32), the same examples (a seeded,
label-stratified sample of ``--data``, BANKING77's student prompts with the intent list), the
function the trainer's :class:`~ophsd.train.evaluation.Evaluator` calls (``ophsd.eval.evaluate``,
standalone, greedy), one batch size after the other. Before the first, an untimed eval of two
examples warms the engine and its prefix cache (the shared intent list), as a training run's
rollouts have. Per batch size:
the peak RSS during the eval (``ophsd.runtime.memory``; freed heap is released between sizes),
wall and process CPU seconds (CPU seconds are the steadier reading on a shared machine), and a
hash of every answer, so that the sizes are shown to decode the same answers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, next to this file
import bench_common as bc  # noqa: E402  (puts the repository root on sys.path too)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="banking77")
    ap.add_argument("--data", required=True, help="the task's labelled data file (e.g. ../shared/data/banking77/train.csv)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=64, help="eval examples (default: %(default)s)")
    ap.add_argument("--batch-sizes", default="64,16", help="comma-separated --eval-batch-size values")
    ap.add_argument("--out-dir", default="bench_results/eval_memory")
    args = ap.parse_args(argv)
    bc.offline()

    from ophsd.eval import evaluate
    from ophsd.harness.base import call_isolated
    from ophsd.rollout import SamplingParams
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.runtime.memory import PeakMemory, release_free_heap
    from ophsd.tasks import get_task

    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or min(sizes) < 1:
        ap.error("--batch-sizes needs whole numbers >= 1")
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    task = get_task(args.task)
    examples = list(task.sample(task.dataset(args.data, split="all"), args.limit, 0))
    engine = EmbeddedEngine(args.model, seed=0)
    call_isolated(engine, [task.student_messages(examples[0])], SamplingParams(temperature=0.0, max_new_tokens=4))
    evaluate(task, examples[:2], engine, None, batch_size=2, progress=False)  # first-batch costs, untimed
    mem = PeakMemory()
    rows = []
    for b in sizes:
        release_free_heap()
        peaks: dict = {}
        mem.mark()
        t, c = time.perf_counter(), time.process_time()
        res = evaluate(task, examples, engine, None, batch_size=b, progress=False, save_responses=True)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        mem.lap("eval", peaks)
        answers = [r["standalone"] for r in res["responses"]]
        rows.append({"eval_batch_size": b, "peak_rss_gib": peaks["mem/eval_peak_gb"], "wall_s": round(wall, 1),
                     "cpu_s": round(cpu, 1), "accuracy": res["standalone"]["accuracy"],
                     "answers_sha1": hashlib.sha1(json.dumps(answers).encode()).hexdigest()[:12]})
        print(json.dumps(rows[-1]), flush=True)
    same = len({r["answers_sha1"] for r in rows}) == 1
    machine = bc.cpu_cores()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# eval memory: {args.task}, {len(examples)} examples, {args.model} fp32, {machine}",
             f"peak RSS reset per eval: {mem.per_phase}; every size decoded the same answers: {same}", ""]
    lines += bc.md_table(list(rows[0]), [list(r.values()) for r in rows])
    (out / "eval_memory.md").write_text("\n".join(lines) + "\n")
    bc.write_json(out / "eval_memory.json", {"machine": machine, "versions": bc.versions(()), "same_answers": same,
                                             "rows": rows})
    print("\n".join(lines))
    bc.wrote(out / "eval_memory.md", out / "eval_memory.json")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
