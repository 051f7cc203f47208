"""The training objective: what the teacher scores, the per-token loss and the token weights.

``distill`` (OPHSD): student samples scored by a teacher (the frozen initial student, or the
current one) that reads the harness's context; the per-token loss is a divergence between their
vocab-parallel distributions. ``offpolicy`` (the SFT baseline): the harness's final responses are
the targets; the per-token loss is their negative log-likelihood, and there is no teacher
forward. Every ``objective == "distill"`` decision of the trainer is made here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ophsd.runtime.groups import ParallelGroups
from ophsd.train import step
from ophsd.train.pairs import MicroBatch

if TYPE_CHECKING:
    from ophsd.train.config import TrainConfig

OBJECTIVES = ("distill", "offpolicy")


def needs_frozen_teacher(config: TrainConfig) -> bool:
    """A separate teacher model is built (``--teacher initial`` under ``--objective distill``)."""
    return config.distill.teacher == "initial" and config.task.objective == "distill"


@dataclass
class Objective:
    """The per-token loss and token weights of one run (the trainer's flags, or the benchmark's).

    A value (the collector reads it too); the process groups its collectives run over are an
    argument of each method that needs them."""

    kind: str = "distill"  # one of OBJECTIVES
    divergence: str = "reverse_kl"  # distill: reverse_kl, forward_kl or jsd
    beta: float = 0.5  # the JSD mixture weight
    temperature: float = 1.0  # distill temperature (the teacher's and the student's logits are divided by it)
    vocab_size: int = 0  # the true vocabulary (padding columns of the vocab shards are excluded)
    backend: str = "auto"  # ophsd_kernels backend of the divergence
    token_sampling_ratio: float = 1.0  # < 1: train on that fraction of the response tokens, drawn per step
    entropy_weighting: bool = False  # draw those tokens in proportion to the teacher's entropy
    seed: int = 0  # seeds the token draw (with the step and micro-batch size)

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective {self.kind!r}: expected one of {', '.join(OBJECTIVES)}")

    @classmethod
    def from_config(cls, config: TrainConfig, vocab_size: int) -> "Objective":
        d = config.distill
        return cls(kind=config.task.objective, divergence=d.divergence, beta=d.beta,
                   temperature=d.distill_temperature, vocab_size=vocab_size, backend=d.kernel_backend,
                   token_sampling_ratio=d.token_sampling_ratio, entropy_weighting=d.entropy_weighting,
                   seed=config.model.seed)

    @property
    def distill(self) -> bool:
        """On-policy distillation: the student's own samples are the responses, a teacher scores them."""
        return self.kind == "distill"

    @property
    def metric(self) -> str:
        """The metrics key of the step's loss."""
        return f"divergence/{self.divergence if self.distill else 'nll'}"

    def teacher_rows(self, teacher, mbs: list[MicroBatch], groups: ParallelGroups, full_logits: bool = False) -> list:
        """The teacher's vocab-parallel logits at the response rows per micro-batch (last stage;
        None elsewhere, and everywhere for ``offpolicy``)."""
        if not self.distill:
            return [None] * len(mbs)
        return step.teacher_response_logits(teacher, mbs, groups, full_logits=full_logits)

    def per_token_loss(self, teacher_rows: list, groups: ParallelGroups) -> step.PerTokenLoss:
        if self.distill:
            return step.divergence_loss(teacher_rows, groups, kind=self.divergence, beta=self.beta,
                                        temperature=self.temperature, vocab_size=self.vocab_size,
                                        backend=self.backend)
        return step.nll_loss(self.vocab_size, groups)

    def token_weights(self, mbs: list[MicroBatch], teacher_rows: list, step_num: int,
                      groups: ParallelGroups) -> list[torch.Tensor]:
        """Per-token weights of each micro-batch: the sample weight x (optional) random or
        entropy-weighted subsampling (drawn on the last pipeline stage, where the loss is)."""
        if not groups.is_pipeline_last_stage:
            return [mb.weights for mb in mbs]
        return [self._token_weights(mb, rows, step_num, groups) for mb, rows in zip(mbs, teacher_rows)]

    def _token_weights(self, mb: MicroBatch, teacher_rows: torch.Tensor | None, step_num: int,
                       groups: ParallelGroups) -> torch.Tensor:
        w = mb.weights.clone()
        if self.token_sampling_ratio >= 1:
            return w
        g = torch.Generator().manual_seed(self.seed * 7919 + step_num * 131 + int(mb.targets.numel()))
        n = w.numel()
        k = max(1, int(round(self.token_sampling_ratio * n)))
        if self.entropy_weighting and teacher_rows is not None:
            probs = self.teacher_entropy(teacher_rows, groups).clamp_min(1e-6).cpu()
        else:
            probs = torch.ones(n)
        alive = (w > 0).cpu()
        keep = torch.multinomial(probs * alive, min(k, int(alive.sum())), replacement=False, generator=g)
        mask = torch.zeros(n)
        mask[keep] = 1.0
        return w * mask.to(w.device)

    def teacher_entropy(self, logits: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
        """Entropy of the tempered teacher over TP vocab shards (padding excluded)."""
        group = groups.tp
        x = logits.float() / self.temperature
        start = groups.tp_rank * x.shape[-1]
        valid = max(0, min(x.shape[-1], self.vocab_size - start))
        x = x[:, :valid]
        m = x.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m[:, None])
        z, s = e.sum(-1), (e * (x - m[:, None])).sum(-1)
        zs = torch.stack([z, s])
        dist.all_reduce(zs, group=group)
        z, s = zs
        return torch.log(z) - s / z
