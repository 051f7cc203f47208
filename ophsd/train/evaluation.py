"""Evaluation during training: standalone and harness-attached accuracy on the eval examples (rank
0's engine), the probe divergence on a fixed batch (every rank), eval_predictions/ files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING


from ophsd.runtime.distributed import broadcast_from_rank0
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.runtime.memory import peak_memory, release_free_heap
from ophsd.train.collect import eval_examples
from ophsd.train.metrics import logged_eval_steps

if TYPE_CHECKING:
    from ophsd.train.config import TrainConfig


class Evaluator:
    """Collective evaluation. ``collector``, ``engine`` and ``harness`` are rank 0's (None elsewhere)."""

    def __init__(self, config: TrainConfig, task, run_dir: Path | None, updater, collector, engine, harness):
        self.config, self.task, self.run_dir = config, task, run_dir
        self.updater, self.collector, self.engine, self.harness = updater, collector, engine, harness
        self._probe = None

    def lost_on_resume(self, step_num: int) -> bool:
        """Collective: whether a resumed run's checkpoint step was due an interval eval that never
        reached metrics.jsonl (the checkpoint is saved just before that eval: a kill during it)."""
        c, every = self.config, self.config.eval.eval_interval
        if (self.run_dir is None or c.eval.skip_eval or not every or not 0 < step_num < c.optim.train_iters
                or step_num % every):
            return False
        lost = broadcast_from_rank0(step_num not in logged_eval_steps(self.run_dir / "metrics.jsonl")
                                    if _rank0() else None)
        if lost:
            _log(f"step {step_num}: metrics.jsonl has no eval row for this checkpoint's step (the run stopped "
                 "during that eval): evaluating it now")
        return bool(lost)

    def probe_divergence(self, step_num: int) -> float | None:
        """Divergence on a fixed probe batch: greedy student responses and harness teacher
        contexts, both built once from the initial weights on dev examples. On-policy training
        losses come from a fresh batch each step (noisy); this one is comparable across steps."""
        if not self.updater.objective.distill:
            return None
        if self._probe is None:
            c = self.config
            examples = eval_examples(self.task, c)[: c.rollout.rollout_batch_size] if _rank0() else None
            self._probe = broadcast_from_rank0(self.collector.probe_samples(examples) if _rank0() else None)
        if not self._probe:
            return None
        return self.updater.loss(self._probe, step_num)

    def evaluate(self, tag: str, step_num: int) -> dict | None:
        """Collective: the eval row of step ``step_num`` on rank 0 (None elsewhere)."""
        c = self.config
        mem, peaks = peak_memory(), {}
        mem.mark()
        probe = self.probe_divergence(step_num)  # collective
        if not _rank0():
            return None
        from ophsd.eval import evaluate

        examples = eval_examples(self.task, c)
        harness = self.harness if c.task.harness != "opsd" else None
        if c.eval.eval_harness == "never" or (tag == "interval" and c.eval.eval_harness == "ends"):
            harness = None
        res = evaluate(self.task, examples, self.engine, harness, progress=True, save_responses=bool(self.run_dir),
                       batch_size=c.eval.eval_batch_size)
        if self.run_dir:
            pred_dir = self.run_dir / "eval_predictions"
            pred_dir.mkdir(parents=True, exist_ok=True)
            with open(pred_dir / f"step_{step_num:07d}.jsonl", "w") as f:
                for r in res.pop("responses"):
                    f.write(json.dumps({"step": step_num, "tag": tag, **r}, ensure_ascii=False, default=str) + "\n")
        row = {"step": step_num, "tag": tag,
               "eval/standalone_accuracy": res["standalone"]["accuracy"], "eval/n": res["standalone"]["n"]}
        if (res.get("harness") or {}).get("accuracy") is not None:  # no harness (OPSD): no such metric
            row["eval/harness_accuracy"] = res["harness"]["accuracy"]
        if probe is not None:
            row["eval/probe_divergence"] = probe
        mem.lap("eval", peaks)
        row.update(peaks)
        release_free_heap()  # the eval's KV caches, freed but still resident, would ratchet the run's RSS up
        _log(f"eval ({tag}, step {step_num}): standalone {row['eval/standalone_accuracy']:.1%}"
             + (f", harness-attached {row['eval/harness_accuracy']:.1%}" if "eval/harness_accuracy" in row else "")
             + (f", probe {c.distill.divergence} {probe:.4f}" if probe is not None else "")
             + f" on {row['eval/n']} examples")
        return row
