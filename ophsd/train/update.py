"""The update: the teacher scores, the student's forward/backward, the non-finite skip and the
optimizer (+ scheduler) step on packed micro-batches.

:func:`update_step` is the one function both the trainer (through :class:`Updater`, which adds
the DP share, packing and metric names) and ``tools/bench_train.py`` call, so the benchmark
measures the code that trains.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import comm_device
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.runtime.groups import ParallelGroups
from ophsd.runtime.memory import peak_memory
from ophsd.train import step
from ophsd.train.objective import Objective
from ophsd.train.pairs import MicroBatch, Sample, layout_stats, pack

if TYPE_CHECKING:
    from ophsd.train.config import OptimConfig, TrainConfig


def wrap_ddp(module, use_distributed_optimizer: bool):
    """megatron-core DDP (fp32 grad buffers) with its grad finalisation hooked into the schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer)
    model = DistributedDataParallel(module.config, cfg, module)
    module.config.finalize_model_grads_func = finalize_model_grads
    return model


@dataclass
class OptimizerSettings:
    """The megatron-core optimizer's settings (the trainer's Megatron-named flags)."""

    optimizer: str = "adam"  # adam or sgd
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # 0: no clipping
    bf16: bool = False  # bf16 parameters, fp32 main weights
    use_distributed_optimizer: bool = False  # shard the optimizer state over DP ranks

    @classmethod
    def from_config(cls, config: TrainConfig) -> "OptimizerSettings":
        o, m = config.optim, config.model
        return cls(optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                   adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, bf16=m.bf16,
                   use_distributed_optimizer=m.use_distributed_optimizer)


def build_optimizer(ddp_model, settings: OptimizerSettings):
    """The megatron-core optimizer of ``ddp_model`` (a :func:`wrap_ddp` model)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    s = settings
    cfg = OptimizerConfig(
        optimizer=s.optimizer, lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1, adam_beta2=s.adam_beta2, clip_grad=s.clip_grad, bf16=s.bf16,
        params_dtype=torch.bfloat16 if s.bf16 else torch.float32,
        use_distributed_optimizer=s.use_distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, [ddp_model])


def lr_schedule(optim: OptimConfig) -> dict:
    """The schedule the flags ask for, in megatron-core's ``OptimizerParamScheduler.state_dict()`` names
    plus the two WSD settings it does not save: what a checkpoint records and a resume compares."""
    a = optim
    decay_iters = max(1, a.train_iters - a.lr_warmup_iters) + a.lr_warmup_iters
    wsd = a.lr_decay_style == "WSD"
    return {"max_lr": a.lr, "min_lr": a.min_lr, "lr_warmup_steps": a.lr_warmup_iters,
            "lr_decay_steps": decay_iters, "lr_decay_style": a.lr_decay_style,
            "wsd_decay_steps": a.lr_wsd_decay_iters if wsd else None,
            "lr_wsd_decay_style": a.lr_wsd_decay_style if wsd else None,
            "start_wd": a.weight_decay, "end_wd": a.weight_decay, "wd_incr_steps": decay_iters}


# The flag behind each schedule setting, for the resume check's message.
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                  "lr_decay_style": "--lr-decay-style", "lr_decay_steps": "--train-iters",
                  "wsd_decay_steps": "--lr-wsd-decay-iters", "lr_wsd_decay_style": "--lr-wsd-decay-style",
                  "start_wd": "--weight-decay"}


def schedule_differences(saved: dict, wanted: dict) -> list[str]:
    """The settings (``"--flag: saved -> wanted"``) where a checkpoint's learning-rate schedule and the
    flags' disagree in a way that changes the learning rate. A constant schedule ignores its decay
    length (so extending --train-iters is fine); WSD settings count only when both sides are WSD;
    keys an older checkpoint lacks are not compared."""
    both = {saved.get("lr_decay_style"), wanted["lr_decay_style"]}
    diffs = []
    for key, flag_name in SCHEDULE_FLAGS.items():
        if key not in saved:
            continue
        if key == "lr_decay_steps" and both == {"constant"}:
            continue
        if key in ("wsd_decay_steps", "lr_wsd_decay_style") and both != {"WSD"}:
            continue
        a, b = saved[key], wanted[key]
        same = (math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) if isinstance(a, float) or isinstance(b, float)
                else a == b)
        if not same:
            diffs.append(f"{flag_name}: {a} -> {b}")
    return diffs


def scheduler_state(scheduler) -> dict:
    """What a checkpoint saves of the scheduler: megatron-core's state_dict plus the WSD settings it
    leaves out (the resume check, :func:`schedule_differences`, compares them)."""
    return {**scheduler.state_dict(), "wsd_decay_steps": scheduler.wsd_decay_steps,
            "lr_wsd_decay_style": scheduler.lr_wsd_decay_style}


def build_scheduler(optimizer, optim: OptimConfig):
    """megatron-core's LR scheduler over :func:`lr_schedule`. With --override-opt-param-scheduler a
    resumed run follows these flags from its saved step on; otherwise the trainer refuses a checkpoint
    whose schedule differs (:func:`schedule_differences`) before loading anything."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s = lr_schedule(optim)
    wsd = {"wsd_decay_steps": s["wsd_decay_steps"], "lr_wsd_decay_style": s["lr_wsd_decay_style"]} \
        if s["lr_decay_style"] == "WSD" else {}
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.lr_warmup_iters else optim.lr, max_lr=s["max_lr"], min_lr=s["min_lr"],
        lr_warmup_steps=s["lr_warmup_steps"], lr_decay_steps=s["lr_decay_steps"],
        lr_decay_style=s["lr_decay_style"], start_wd=s["start_wd"], end_wd=s["end_wd"],
        wd_incr_steps=s["wd_incr_steps"], wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not optim.override_opt_param_scheduler,
        override_opt_param_scheduler=optim.override_opt_param_scheduler, **wsd,
    )


@dataclass
class StepResult:
    """What one :func:`update_step` did."""

    loss: float  # the token-weighted mean per-token loss (same on every rank)
    tokens: int
    tokens_weighted: float
    per_token: torch.Tensor | None  # unweighted per-token losses in micro-batch order (last stage)
    skipped: bool = False  # non-finite loss or gradient: no optimizer step
    grad_norm: float = float("nan")
    lr: float | None = None
    times: dict = field(default_factory=dict)  # seconds: teacher, student (forward+backward), optimizer
    peaks: dict = field(default_factory=dict)  # mem/<phase>_peak_gb of the same phases (ophsd.runtime.memory)


def _nothing() -> None:
    pass


def update_step(model, module, optimizer, mbs: list[MicroBatch], objective: Objective, teacher, *,
                groups: ParallelGroups, scheduler=None, step_num: int = 0, teacher_rows: list | None = None,
                full_logits: bool = False, sync: Callable[[], None] = _nothing) -> StepResult:
    """One update of ``model`` (DDP-wrapped ``module``) on this rank's micro-batches: the teacher
    forward (``teacher_rows``: given instead), the token weights and per-token loss of
    ``objective``, the student forward+backward, then the optimizer and ``scheduler`` step unless
    a loss or gradient is non-finite on any rank (then the gradients are dropped: ``skipped``).
    ``groups``: this rank's process groups (the loss's collectives and stage tests).
    ``sync`` is called before each clock reading (the benchmark's CUDA synchronize)."""
    t0, mem, peaks = time.perf_counter(), peak_memory(), {}
    mem.mark()
    if teacher_rows is None:
        teacher_rows = objective.teacher_rows(teacher, mbs, groups, full_logits=full_logits)
    sync()
    t1 = time.perf_counter()
    mem.lap("teacher", peaks)
    token_w = objective.token_weights(mbs, teacher_rows, step_num, groups)
    per_token = objective.per_token_loss(teacher_rows, groups)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    t2 = time.perf_counter()
    res = step.student_pass(model, mbs, per_token, token_w, groups, full_logits=full_logits)
    sync()
    t3 = time.perf_counter()
    mem.lap("student", peaks)
    out = StepResult(res["loss"], res["tokens"], res["tokens_weighted"], res["per_token"])
    if not step.finite_everywhere(out.loss, module):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out.skipped = True
    else:
        ok, grad_norm, _ = optimizer.step()
        if scheduler is not None:
            scheduler.step(increment=1)
        out.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        out.lr = optimizer.param_groups[0]["lr"]
    sync()
    out.times = {"teacher": t1 - t0, "student": t3 - t2, "optimizer": time.perf_counter() - t3}
    mem.lap("optimizer", peaks)
    out.peaks = peaks
    return out


@dataclass
class Packing:
    """How a rank's samples become micro-batches (the trainer's flags)."""

    micro_batch_size: int
    pad_id: int = 0
    packed: bool | Callable[[], bool] = True  # prefix-tree packing (a callable: asked at the first pack)
    max_tokens: int = 4096  # tokens per packed micro-batch


class Updater:
    """The trainer's update role: this DP rank's share of a step's samples, packed, through
    :func:`update_step`; also the forward-only loss of a fixed batch (the probe)."""

    def __init__(self, model, module, optimizer, scheduler, objective: Objective, teacher, packing: Packing,
                 counters: Counter, groups: ParallelGroups, keep_per_token: bool = False):
        """``teacher``: the model that scores (the frozen copy, or ``module`` itself); ``groups``:
        this rank's process groups (its DP share, the loss's collectives);
        ``keep_per_token``: rank 0 gets DP rank 0's per-token losses in ``meta["per_token_loss"]``."""
        self.model, self.module, self.optimizer, self.scheduler = model, module, optimizer, scheduler
        self.objective, self.teacher, self.packing, self.groups = objective, teacher, packing, groups
        self.counters, self.keep_per_token = counters, keep_per_token

    def _share(self, samples: list[Sample], count_remainder: bool) -> list[Sample] | None:
        dp, dp_rank = self.groups.dp_size, self.groups.dp_rank
        per_rank = len(samples) // dp if len(samples) >= dp else 0
        if per_rank == 0:
            return None
        if count_remainder and len(samples) > dp * per_rank:
            # Equal shares keep the DP ranks' schedules in step; the rest (after length filtering) is counted.
            self.counters["skipped/dp_remainder"] += len(samples) - dp * per_rank
        return samples[dp_rank * per_rank: (dp_rank + 1) * per_rank]

    def _pack(self, mine: list[Sample]) -> list[MicroBatch]:
        p = self.packing
        packed = p.packed() if callable(p.packed) else p.packed
        return step.to_device(pack(mine, p.micro_batch_size, pad_id=p.pad_id, packed=packed,
                                   max_tokens=p.max_tokens), comm_device())

    def train(self, samples: list[Sample], step_num: int) -> dict:
        """Teacher forward, student forward/backward and the optimizer step on this rank's share of
        ``samples`` (the same list on every rank); the step's metrics."""
        mine = self._share(samples, count_remainder=True)
        if mine is None:
            return {"skipped_step": 1}
        mbs = self._pack(mine)
        r = update_step(self.model, self.module, self.optimizer, mbs, self.objective, self.teacher,
                        groups=self.groups, scheduler=self.scheduler, step_num=step_num)
        self._attach_per_token(mine, r.per_token)
        result = {**layout_stats(mbs), "loss": r.loss, self.objective.metric: r.loss,
                  "tokens": r.tokens, "tokens_weighted": r.tokens_weighted,
                  "time/teacher_forward": r.times["teacher"], "time/student_fwd_bwd": r.times["student"], **r.peaks}
        if r.skipped:
            self.counters["nonfinite_steps"] += 1
            _log(f"step {step_num + 1}: non-finite loss or gradient, update skipped "
                 f"({self.counters['nonfinite_steps']} so far)")
            result["skipped_step"] = 1
            return result
        result.update(grad_norm=r.grad_norm, lr=r.lr)
        return result

    def loss(self, samples: list[Sample], step_num: int) -> float | None:
        """The weighted mean per-token loss of ``samples`` (forward only, no update); None when
        there are fewer samples than DP ranks."""
        mine = self._share(samples, count_remainder=False)
        if mine is None:
            return None
        mbs = self._pack(mine)
        g = self.groups
        rows = self.objective.teacher_rows(self.teacher, mbs, g)
        token_w = self.objective.token_weights(mbs, rows, step_num, g)
        return step.student_pass(self.model, mbs, self.objective.per_token_loss(rows, g), token_w, g,
                                 forward_only=True)["loss"]

    def _attach_per_token(self, mine: list[Sample], values: torch.Tensor | None) -> None:
        """Rank 0 gets the per-token loss of DP rank 0's samples (``meta["per_token_loss"]``, for
        rollouts.jsonl) from the last pipeline stage of its pipeline."""
        g = self.groups
        if not self.keep_per_token:
            return
        if g.tp_rank != 0 or g.dp_rank != 0:
            return
        if g.pp_size > 1:
            box = [values]
            dist.broadcast_object_list(box, src=dist.get_process_group_ranks(g.pp)[-1], group=g.pp)
            values = box[0]
        if not _rank0() or values is None:
            return
        start = 0
        for s in mine:
            n = len(s.response)
            s.meta["per_token_loss"] = [round(float(x), 5) for x in values[start: start + n]]
            start += n
