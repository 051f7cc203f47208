"""Rank 0's metric sinks: ``metrics.jsonl``, ``rollouts.jsonl``, TensorBoard, Weights & Biases and
the console line. Every method is a no-op on other ranks (they hold no sink)."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.runtime.memory import worst_phase

if TYPE_CHECKING:
    from ophsd.train.config import TrainConfig


def tail(text: str, n: int = 300) -> str:
    """The last ``n`` characters, with a marker saying how many were cut."""
    return text if len(text) <= n else f"[...{len(text) - n} chars cut...]" + text[-n:]


def _peak_text(m: dict) -> str:
    worst = worst_phase(m)
    return f"  peak rss {worst[1]:.1f} GiB ({worst[0]})" if worst else ""


def drop_rows_after(path: Path, step_num: int) -> int:
    """Keep the JSONL rows of steps <= ``step_num`` (a resumed run logs the later ones again) and
    drop unparsable lines (one cut by a kill); returns how many rows went."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = int(row.get("step", 0)) <= step_num
        except (ValueError, AttributeError, TypeError):
            keep = False
        kept.append(line) if keep else None
        dropped += not keep
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped


def logged_eval_steps(path: Path) -> set[int]:
    """The steps ``metrics.jsonl`` holds an eval row for (a resumed run redoes an interval eval its
    predecessor was killed during)."""
    steps = set()
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "eval/standalone_accuracy" in row and "step" in row:
                steps.add(int(row["step"]))
    return steps


class MetricSinks:
    """Where a run's metrics and sampled rollouts go (rank 0 only).

    ``run_dir``: the run directory (None: console only). ``resumed_at``: the step a resumed run
    continues from (its JSONL rows past that step are dropped: they are re-run).
    """

    def __init__(self, config: TrainConfig, run_dir: Path | None, resumed_at: int | None = None):
        log = config.logging
        self.log_interval, self.train_iters = log.log_interval, config.optim.train_iters
        self.max_rollouts = config.eval.log_rollouts
        self.metrics_file = self.rollouts_file = None
        self.tb = self.wandb = None
        if run_dir and _rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None:
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    if n := drop_rows_after(run_dir / name, resumed_at):
                        _log(f"{name}: dropped {n} rows past step {resumed_at} (they are re-run)")
            self.metrics_file = open(run_dir / "metrics.jsonl", "a")
            if self.max_rollouts:
                self.rollouts_file = open(run_dir / "rollouts.jsonl", "a")
            (run_dir / "args.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
            if log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(run_dir / "tensorboard"))
                except Exception as e:  # noqa: BLE001 - tensorboard is optional
                    _log(f"TensorBoard logging off ({e.__class__.__name__}: {e}); metrics.jsonl still written")
        if log.wandb_project and _rank0():
            try:
                import wandb

                self.wandb = wandb.init(project=log.wandb_project, config=config.to_dict(),
                                        dir=str(run_dir) if run_dir else None)
            except ImportError:
                _log("--wandb-project given but wandb is not installed (pip install wandb); logging to JSONL only")

    def log(self, m: dict, step_num: int) -> None:
        """One metrics row to every sink (``step_num``: TensorBoard's step for a row without ``step``)."""
        if not _rank0():
            return
        m = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        if self.metrics_file:
            self.metrics_file.write(json.dumps(m) + "\n")
            self.metrics_file.flush()
        if self.tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, m.get("step", step_num))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m.get("step"))
        if m.get("step", 0) % max(1, self.log_interval) == 0 and "loss" in m:
            print(f"[ophsd] step {m['step']:>5}/{self.train_iters}  loss {m['loss']:.4f}  "
                  f"grad_norm {m.get('grad_norm', float('nan')):.3f}  lr {m.get('lr', 0):.2e}  "
                  f"pairs {m.get('pairs_kept', 0)}/{m.get('pairs_total', 0)}  tokens {m.get('tokens', 0)}  "
                  f"rollout {m.get('time/rollout', 0):.1f}s harness {m.get('time/harness', 0):.1f}s "
                  f"train {m.get('time/student_fwd_bwd', 0) + m.get('time/teacher_forward', 0):.1f}s "
                  f"sync {m.get('time/sync', 0):.1f}s" + _peak_text(m), flush=True)

    def log_rollouts(self, samples: list, kept: list, step: int, tokenizer) -> None:
        """Up to --log-rollouts of step ``step``'s samples (spread over its prompts) to rollouts.jsonl."""
        n = self.max_rollouts
        if self.rollouts_file is None or not samples or not n:
            return
        kept_ids = {id(s) for s in kept}
        k = min(n, len(samples))
        decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
        for s in (samples[i * len(samples) // k] for i in range(k)):
            row = {"step": step, "example_id": s.meta.get("example_id"),
                   "student_prompt": tail(decode(s.student_prompt)), "response": decode(s.response),
                   "student_reward": s.meta.get("student_reward"), "harness_reward": s.meta.get("harness_reward"),
                   "harness_mode": s.meta.get("mode"), "teacher_context": tail(decode(s.teacher_prompt)),
                   "response_tokens": len(s.response), "student_prompt_tokens": len(s.student_prompt),
                   "teacher_prompt_tokens": len(s.teacher_prompt), "kept": id(s) in kept_ids,
                   "per_token_loss": s.meta.get("per_token_loss")}
            self.rollouts_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rollouts_file.flush()

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.rollouts_file:
            self.rollouts_file.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
