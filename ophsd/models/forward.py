"""Forward (and forward+backward) through megatron-core's pipeline schedules.

One helper for every place that runs the Megatron model: verification, training, scoring.
Micro-batches are dicts with ``tokens`` [b, s] (int64) and optional ``position_ids``; the
model returns vocab-parallel logits [b, s, V_padded / TP] on the last pipeline stage.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather vocab-parallel logits over TP and drop the padding columns.

    Only for verification and generation-side checks: the trainer never gathers logits.
    """
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]


def _forward_step(loss_fn, data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"].to(next(model.parameters()).device, non_blocking=True)  # no-op when already there
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, pos, attention_mask=None)
    return output, partial(loss_fn, batch)


def run_schedule(model, microbatches: list[dict], loss_fn: Callable, forward_only: bool = False,
                 collect_non_loss_data: bool = False):
    """Run megatron's schedule over ``microbatches`` (all of the same [b, s] shape).

    ``loss_fn(batch, output_tensor, non_loss_data=False)`` runs on the last stage and returns
    megatron's ``(loss, num_tokens, log_dict)`` triple, or any object when collecting
    non-loss data. Returns the schedule's list of per-micro-batch results (last stage only).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    b, s = microbatches[0]["tokens"].shape
    if any(mb["tokens"].shape != (b, s) for mb in microbatches):
        raise ValueError("all micro-batches of one schedule must have the same [batch, seq] shape")
    model.config.variable_seq_lengths = False
    if not torch.cuda.is_available():
        model.config.batch_p2p_comm = False  # gloo has no coalesced send/recv
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def forward_logits(model, microbatches: list[dict]) -> list[torch.Tensor] | None:
    """Full-vocabulary logits (true vocab) per micro-batch on the last stage; None elsewhere."""
    from megatron.core import parallel_state as ps

    vocab = model.ophsd_spec.vocab_size

    def collect(batch, output, non_loss_data=False):
        return gather_vocab_logits(output.float(), vocab)

    with torch.no_grad():
        out = run_schedule(model, microbatches, collect, forward_only=True, collect_non_loss_data=True)
    return list(out) if ps.is_pipeline_last_stage() else None
