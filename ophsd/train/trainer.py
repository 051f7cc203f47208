"""The OPHSD trainer: the composition root and the loop over one object per role.

One step (:meth:`Trainer.train_step`) is the algorithm: collect samples (rank 0's student
rollouts + the harness's teacher contexts, :mod:`ophsd.train.collect`) -> the teacher scores them
-> the objective turns that into per-token losses and token weights (:mod:`ophsd.train.objective`)
-> one update (:mod:`ophsd.train.update`) -> weight sync to the rollout engine
(:mod:`ophsd.train.sync`). Run-directory checkpoints live in :mod:`ophsd.train.checkpointing`, the
metric sinks in :mod:`ophsd.train.metrics`.

Rank 0 drives generation (it owns the engine, the harness and the data stream) and broadcasts
each step's token ids; every rank runs the Megatron model stage it holds. Teacher logits stay
where the last pipeline stage produced them (vocab-parallel shards, never gathered, never
moved), and the loss is :func:`ophsd_kernels.vocab_parallel_divergence` over those shards.
"""
from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import comm_device
from ophsd.runtime.distributed import broadcast_from_rank0
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.runtime.groups import ParallelGroups
from ophsd.runtime.memory import peak_memory, release_free_heap
from ophsd.tasks.base import TaskDataError
from ophsd.train.build import build_engine, build_models
from ophsd.train.checkpointing import (CheckpointContents, RunCheckpoints, find_checkpoint, read_trainer_state,
                                       restore_optimizer_and_rng)
from ophsd.train.collect import Collector, ExampleStream, dev_size, eval_examples
from ophsd.train.errors import TrainingError
from ophsd.train.evaluation import Evaluator
from ophsd.train.metrics import MetricSinks
from ophsd.train.objective import Objective, needs_frozen_teacher
from ophsd.train.pairs import Sample
from ophsd.train.sync import WeightSync
from ophsd.train.update import (OptimizerSettings, Packing, Updater, build_optimizer, build_scheduler,
                                scheduler_state, wrap_ddp)

if TYPE_CHECKING:
    from ophsd.train.config import TrainConfig


class Trainer:
    """Builds the roles from the run's :class:`~ophsd.train.config.TrainConfig` and runs the loop.

    Public seams: :meth:`train_step` (one step), :meth:`collect_samples`, :meth:`update_on`,
    :meth:`sync_weights`, :meth:`evaluate`, :meth:`save_checkpoint`, :meth:`run`, :meth:`close`;
    the roles themselves: ``collector`` (rank 0), ``objective``, ``updater``, ``weight_sync``,
    ``evaluator``, ``checkpoints``, ``sinks``; ``groups``: the process groups (built once, after
    megatron's parallel init) that the updater, the objective and the weight sync are given.
    """

    def __init__(self, config: TrainConfig):
        from ophsd.runtime import distributed

        self.config = c = config
        m = c.model
        distributed.initialize(m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.seed)
        self.groups = ParallelGroups.from_parallel_state()  # passed to the roles: none of them reads the globals
        self.dtype = torch.bfloat16 if m.bf16 else torch.float32
        self.step_num, self.data_position = 0, 0
        self.counters: Counter = Counter()
        self.stop_requested = False
        self.run_dir = Path(c.logging.save) if c.logging.save else None
        self.checkpoints = RunCheckpoints(self.run_dir)
        resume_dir = find_checkpoint(m.load, log=_log) if m.load else None
        model_dir = resume_dir or (m.load if m.load else None)
        resume_state = read_trainer_state(resume_dir, m.use_distributed_optimizer, c.optim) if resume_dir else None
        self._load_data()
        self._build_models(model_dir, verified=resume_dir is not None)
        self._build_update()
        self._build_generation()
        if c.rollout.max_prompt_length is None:  # the collector reads it from the same config
            c.rollout.max_prompt_length = broadcast_from_rank0(self.collector.derived_max_prompt_length() if _rank0() else None)
        if resume_dir:
            self._load_trainer_state(resume_dir, resume_state)
        self.resumed = resume_dir is not None
        self.sinks = MetricSinks(c, self.run_dir, resumed_at=self.step_num if resume_dir else None)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # ------------------------------------------------------------------------------ building
    def _build_models(self, model_dir, verified: bool = False):
        """``verified``: ``model_dir`` is a checkpoint :func:`find_checkpoint` checked whole."""
        c = self.config
        m = build_models(c.model, model_dir, self.dtype, needs_frozen_teacher(c), verified=verified)
        self.spec, self.tokenizer, self.source, self.hf_files = m.spec, m.tokenizer, m.source, m.hf_files
        self.teacher, self.module = m.teacher, m.student
        self.model = wrap_ddp(m.student, c.model.use_distributed_optimizer)

    def _build_update(self):
        """The optimizer, the LR scheduler, the objective and the update role over them."""
        c = self.config
        self.optimizer = build_optimizer(self.model, OptimizerSettings.from_config(c))
        self.scheduler = build_scheduler(self.optimizer, c.optim)
        self.objective = Objective.from_config(c, self.spec.vocab_size)
        packing = Packing(c.model.micro_batch_size, pad_id=self.tokenizer.pad_token_id or 0, packed=self._packed,
                          max_tokens=c.model.max_tokens_per_micro_batch)
        self.updater = Updater(self.model, self.module, self.optimizer, self.scheduler, self.objective,
                               self.teacher if self.teacher is not None else self.module, packing, self.counters,
                               self.groups, keep_per_token=bool(c.eval.log_rollouts and self.run_dir))

    def _load_data(self):
        """Rank 0 reads the training (and eval) data before any model is built: a bad file fails in seconds."""
        from ophsd.tasks import get_task

        c = self.config
        self.task = get_task(c.task.task)
        self.stream, error = None, None
        if _rank0():
            try:
                self.stream = ExampleStream(self.task, c.task.data, c.model.seed, dev_size=dev_size(c))
                if c.eval.eval_data and not c.eval.skip_eval and not eval_examples(self.task, c):
                    error = f"--eval-data {c.eval.eval_data}: no usable examples"
            except (ValueError, TrainingError) as e:  # TaskDataError is a ValueError
                error = str(e)
        error = broadcast_from_rank0(error)
        if error:  # a bad --data/--eval-data file: the user's to fix (exit 2 in main)
            raise TaskDataError(error)

    def _build_generation(self):
        """Rank 0 owns the engine, the harness and the data stream (the collector over them)."""
        c = self.config
        self.engine = self.harness = self.collector = self.batch = None
        if _rank0():
            from ophsd.harness import get_harness
            from ophsd.harness.options import HarnessContext

            kwargs = c.task.harness_options().harness_kwargs(HarnessContext(self.task, log=_log))
            self.harness = get_harness(c.task.harness, self.task, seed=c.model.seed, **kwargs)
            self.engine = build_engine(c.rollout, c.model.seed, self.source, self.tokenizer, self.dtype)
            self.collector = Collector(c, self.task, self.engine, self.harness, self.tokenizer, self.stream,
                                       self.objective)
        self.weight_sync = WeightSync(self.module, self.engine, self.groups)
        self.evaluator = Evaluator(c, self.task, self.run_dir, self.updater, self.collector, self.engine, self.harness)
        self.sync_weights(version=0)  # collective: every rank takes part in the gather

    # ------------------------------------------------------------------------- weight sync
    def sync_weights(self, version: int | None = None) -> float:
        """Collective: push the student's weights to rank 0's engine as ``version`` (default: the
        current step); returns the seconds it took."""
        return self.weight_sync.push(self.step_num if version is None else version)

    # ---------------------------------------------------------------------------------- a step
    def train_step(self) -> dict:
        """One step of the algorithm; collective. Returns the step's metrics."""
        t_step = time.perf_counter()
        kept, stats = self.collect_samples()  # rank 0's rollouts + harness -> pairs, on every rank
        result = self.update_on(kept)  # teacher scores -> objective (per-token loss, token weights) -> update
        self._log_step_rollouts()
        self.step_num += 1
        self.data_position += self.config.rollout.rollout_batch_size
        with peak_memory().phase("sync", result):
            result["time/sync"] = self.sync_weights()  # the new weights to the rollout engine
        if self.collector is not None:
            self.collector.end_step(self.batch)  # the harness learns from the step's examples
        release_free_heap()  # what the step freed leaves the RSS instead of raising it for good
        return self._step_metrics(result, stats, t_step)

    def collect_samples(self) -> tuple[list[Sample], dict]:
        """Collective: rank 0 collects this step's pairs (:meth:`Collector.collect`); every rank gets
        the kept ones and their stats. When the rollouts fail three times in a row, or every pair
        is skipped, saves a checkpoint and raises TrainingError."""
        payload = None
        if _rank0():
            self.batch = self.collector.collect(self.step_num, self.data_position)
            if self.batch is not None:
                payload = self.batch.problem or (self.batch.kept, self.batch.stats)
        payload = broadcast_from_rank0(payload)
        if payload is None:
            self.save_checkpoint(reason="rollout failure")
            raise TrainingError("rollouts failed for a whole batch three times in a row; checkpoint saved")
        if isinstance(payload, str):  # every pair skipped: nothing to learn from, and the next step would be the same
            self._log_step_rollouts()
            if self.step_num > 0:
                self.save_checkpoint(reason="every pair skipped")
            raise TrainingError(payload)
        kept, stats = payload
        for k in ("skipped/empty_response", "skipped/too_long", "dropped/rollout_failed"):
            self.counters[k] += stats.get(k, 0)
        return kept, stats

    # ------------------------------------------------------------------------------ the update
    def _packed(self) -> bool:
        """Prefix-tree packing when asked for and the core attention takes a tree mask."""
        if not self.config.model.pack_sequences:
            return False
        if not hasattr(self, "_tree_backend"):
            self._tree_backend = self.module.ophsd_inputs.tree_backend  # chosen when the model was built
            if self._tree_backend is None:
                _log("--pack-sequences: the transformer-engine core attention cannot take a prefix-tree mask; "
                     "training on right-padded rows (use the local spec for packing)")
            else:
                _log(f"packing micro-batches as prefix trees ({self._tree_backend} tree attention)")
        return self._tree_backend is not None

    def update_on(self, samples: list[Sample]) -> dict:
        """Collective: teacher scores, the objective and one update on ``samples`` (the same list on
        every rank; each DP rank trains on its share); the step's metrics."""
        return self.updater.train(samples, self.step_num)

    def _log_step_rollouts(self) -> None:
        """Rank 0: this step's sampled rollouts (with their per-token losses once updated) to rollouts.jsonl."""
        if self.batch is not None:
            self.sinks.log_rollouts(self.batch.samples, self.batch.kept, step=self.step_num + 1,
                                    tokenizer=self.tokenizer)

    def _step_metrics(self, result: dict, stats: dict, t_step: float) -> dict:
        result.update(stats)
        result["time/step"] = time.perf_counter() - t_step
        result["tokens_per_s"] = result.get("tokens", 0) / max(result["time/step"], 1e-9)
        result["step"] = self.step_num
        result.update({f"total/{k}": v for k, v in self.counters.items()})
        return result

    # ------------------------------------------------------------------------------ metrics
    def log_metrics(self, m: dict) -> None:
        self.sinks.log(m, self.step_num)

    # ------------------------------------------------------------------------------ eval
    def evaluate(self, tag: str) -> dict | None:
        """Collective: evaluate the current weights (:class:`Evaluator`) and log the row; None with --skip-eval."""
        if self.config.eval.skip_eval:
            return None
        row = self.evaluator.evaluate(tag, self.step_num)  # on rank 0
        if row is not None:
            self.log_metrics(row)
        dist.barrier()
        return row

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, reason: str = "interval") -> Path | None:
        """A checkpoint of this step in the run directory (see :meth:`RunCheckpoints.save`); None without --save."""
        return self.checkpoints.save(self._checkpoint_contents(), reason)

    def _checkpoint_contents(self) -> CheckpointContents:
        def trainer_state():  # rank 0
            return {"step": self.step_num, "data_position": self.data_position, "counters": dict(self.counters),
                    "harness": self.harness.state_dict(), "scheduler": scheduler_state(self.scheduler),
                    "layout": self.groups.layout,
                    "distributed_optimizer": self.config.model.use_distributed_optimizer,
                    "args": self.config.to_dict()}

        return CheckpointContents(self.module, self.teacher, self.optimizer, self.spec, self.dtype, self.step_num,
                                  trainer_state, self.hf_files, self.source, self.tokenizer)

    def _load_trainer_state(self, ckpt: Path, state: dict) -> None:
        """Model and optimizer reshard to any TP/PP/DP; RNG streams return only on the same layout."""
        restore_optimizer_and_rng(ckpt, state, self.optimizer, self.module, self.scheduler, self.groups.layout)
        self.step_num, self.data_position = state["step"], state["data_position"]
        self.counters.clear()  # the object the updater counts in
        self.counters.update(state["counters"])
        if _rank0():
            self.harness.load_state_dict(state["harness"])
        self.sync_weights()
        _log(f"resumed from {ckpt} at step {self.step_num}")

    def _on_sigterm(self, signum, frame):
        _log("SIGTERM: finishing this step, saving a checkpoint and exiting")
        self.stop_requested = True

    # ---------------------------------------------------------------------------------- run
    def run(self) -> int:
        c = self.config
        train_iters, save_interval, eval_interval = c.optim.train_iters, c.logging.save_interval, c.eval.eval_interval
        if self.step_num == 0 and not c.eval.skip_eval_before:
            self.evaluate("before")
        if self.resumed and self.evaluator.lost_on_resume(self.step_num):
            self.evaluate("interval")
        while self.step_num < train_iters:
            stop = torch.tensor(1.0 if self.stop_requested else 0.0, device=comm_device())
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                self.save_checkpoint(reason="SIGTERM")
                return 0
            m = self.train_step()
            self.log_metrics(m)
            if save_interval and self.step_num % save_interval == 0 and self.step_num < train_iters:
                self.save_checkpoint()
            if eval_interval and self.step_num % eval_interval == 0 and self.step_num < train_iters:
                self.evaluate("interval")
        self.evaluate("after")
        if self.run_dir:
            self.save_checkpoint(reason="end of training")
            if _rank0():
                from ophsd.train.report import write_report

                write_report(self.run_dir)
        return 0

    def close(self):
        self.sinks.close()
        if self.engine is not None:
            self.engine.close()
