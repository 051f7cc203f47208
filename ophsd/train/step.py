"""One OPHSD update on packed micro-batches: the piece the trainer and ``tools/bench_train.py`` share.

The trainer adds rollouts, token weighting, metrics and the scheduler around these calls; the
benchmark times them on synthetic batches. Keeping them here means the benchmark measures the
code that trains.

Devices: model inputs and every small collective tensor live on
:func:`ophsd.runtime.distributed.comm_device` (the current CUDA device under NCCL, the CPU under
gloo); NCCL rejects CPU tensors.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import comm_device
from ophsd.runtime.groups import ParallelGroups
from ophsd.train.pairs import MicroBatch

# (student response rows [n, V/TP], micro-batch, its index, token weights [n]) -> per-token loss [n]
PerTokenLoss = Callable[[torch.Tensor, MicroBatch, int, torch.Tensor], torch.Tensor]


def to_device(mbs: list[MicroBatch], device: torch.device) -> list[MicroBatch]:
    return [mb.to(device) for mb in mbs]


def _response_rows(output: torch.Tensor, rows, full_logits: bool) -> torch.Tensor:
    # the model computed the response rows only ([1, n, V/TP]), or every position ([b, s, V/TP])
    return output[rows.rows, rows.pos] if full_logits else output[0]


def teacher_response_logits(teacher, mbs: list[MicroBatch], groups: ParallelGroups,
                            full_logits: bool = False) -> list[torch.Tensor | None]:
    """Teacher forward (no grad): only the response rows of its vocab-parallel logits are kept,
    one ``[n, V/TP]`` tensor per micro-batch on the last pipeline stage (None elsewhere).

    ``full_logits``: run the output layer at every position and index afterwards (the layout
    before response-row selection; kept for the step benchmark's baseline)."""
    from ophsd.models import forward

    def keep(batch, output, non_loss_data=False):
        return _response_rows(output, batch["mb"].teacher, full_logits).detach().contiguous()

    with torch.no_grad():
        out = forward.run_schedule(teacher, [forward.batch_of(mb.teacher, full_logits, mb=mb) for mb in mbs], keep,
                                   forward_only=True, collect_non_loss_data=True)
    return list(out) if groups.is_pipeline_last_stage else [None] * len(mbs)


def divergence_loss(teacher_rows: list, groups: ParallelGroups, *, kind: str, beta: float, temperature: float,
                    vocab_size: int, backend: str = "auto") -> PerTokenLoss:
    """Per-token divergence between the student's response rows and the teacher's, over TP shards."""
    from ophsd_kernels import vocab_parallel_divergence

    def per_token(rows, mb, i, w):
        return vocab_parallel_divergence(rows, teacher_rows[i], kind=kind, beta=beta, temperature=temperature,
                                         weights=w, vocab_size=vocab_size, group=groups.tp, reduction="none",
                                         backend=backend)

    return per_token


def nll_loss(vocab_size: int, groups: ParallelGroups) -> PerTokenLoss:
    """Cross-entropy of the response tokens over vocab shards, padding columns masked (off-policy baseline)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def per_token(rows, mb, i, w):
        v_local = rows.shape[-1]
        start = groups.tp_rank * v_local
        x = rows.float()
        if start + v_local > vocab_size:
            x = x.clone()
            x[:, max(0, vocab_size - start):] = float("-inf")
        return vocab_parallel_cross_entropy(x[None], mb.targets[None])[0]

    return per_token


def student_pass(model, mbs: list[MicroBatch], per_token: PerTokenLoss, token_weights: list[torch.Tensor],
                 groups: ParallelGroups, forward_only: bool = False, full_logits: bool = False) -> dict:
    """Student forward (+backward) through megatron's pipeline schedule.

    The objective is the token-weighted mean of ``per_token`` over every micro-batch of every DP
    rank; megatron divides each micro-batch loss by the micro-batch count and DDP averages over
    DP, so each micro-batch's weighted sum is scaled by ``dp * n_mb / total_weight`` to undo both.
    Returns ``loss`` (that mean, the same on every rank), ``tokens``, ``tokens_weighted`` and
    ``per_token`` (the unweighted per-token values in micro-batch order, CPU; last stage only).
    """
    from ophsd.models import forward

    dev = comm_device()
    dp = groups.dp_size
    total_w = torch.stack([w.sum() for w in token_weights]).sum().to(dev, torch.float32)
    dist.all_reduce(total_w, group=groups.dp)  # same on every TP/PP rank
    scale = dp * len(mbs) / max(float(total_w), 1e-12)

    values: list[torch.Tensor | None] = [None] * len(mbs)

    def loss_fn(batch, output, non_loss_data=False):
        mb, i = batch["mb"], batch["i"]
        rows = _response_rows(output, mb.student, full_logits)
        w = token_weights[i].to(rows.device)
        loss = per_token(rows, mb, i, w)
        values[i] = loss.detach().float().cpu()
        wsum = (w * loss).sum()
        return wsum * scale, {"wsum": wsum.detach(), "w": w.sum().detach(),
                              "n": torch.tensor(float(w.numel()), device=w.device)}

    with torch.set_grad_enabled(not forward_only):
        out = forward.run_schedule(model, [forward.batch_of(mb.student, full_logits, mb=mb, i=i) for i, mb in enumerate(mbs)],
                                   loss_fn, forward_only=forward_only)
    stats = torch.zeros(3, device=dev)
    if groups.is_pipeline_last_stage and groups.tp_rank == 0:
        for o in out:
            stats += torch.stack([o["wsum"].float(), o["w"].float(), o["n"].float()]).to(dev)
    dist.all_reduce(stats)
    wsum, wtot, n = stats.tolist()
    last = groups.is_pipeline_last_stage
    return {"loss": wsum / max(wtot, 1e-12), "tokens": int(n), "tokens_weighted": wtot,
            "per_token": torch.cat(values) if last and values else None}


def grads_finite(module) -> bool:
    for p in module.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None and not torch.isfinite(g).all():
            return False
    return True


def finite_everywhere(loss: float, module) -> bool:
    """The loss and every rank's gradients are finite (one MIN all-reduce, so all ranks agree)."""
    ok = torch.tensor(1.0 if math.isfinite(loss) and grads_finite(module) else 0.0, device=comm_device())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() >= 1)
