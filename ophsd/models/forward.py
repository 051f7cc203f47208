"""Forward (and forward+backward) through megatron-core's pipeline schedules.

One helper for every place that runs the Megatron model: verification, training, scoring.
Micro-batches are dicts with ``tokens`` [b, s] (int64) and optional

* ``position_ids`` [b, s]: RoPE positions (packed prefix trees restart them per branch);
* ``subtree_end`` [b, s]: a tree-causal mask (``ophsd.train.pairs``); token j is visible to
  token i iff ``j <= i < subtree_end[j]``. Without it attention is plain causal;
* ``logit_index`` (rows, pos): compute logits only there.

The model returns vocab-parallel logits [b, s, V_padded / TP] on the last pipeline stage, or
[1, n, V_padded / TP] with ``logit_index``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ophsd.runtime.groups import ParallelGroups


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """All-gather vocab-parallel logits over ``tp_group`` and drop the padding columns.

    Only for verification and generation-side checks: the trainer never gathers logits.
    """
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=tp_group)
    return full[..., :vocab_size]


def unwrap(model):
    """The GPTModel inside DDP-style wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _forward_step(loss_fn, data_iterator, model):
    from ophsd.train.pairs import tree_attention_mask

    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens = batch["tokens"].to(dev, non_blocking=True)  # no-op when already there
    explicit = batch.get("position_ids")
    pos = (explicit.to(dev, non_blocking=True) if explicit is not None
           else torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens))
    end = batch.get("subtree_end")
    index = batch.get("logit_index")
    if index is not None:
        index = tuple(t.to(dev, non_blocking=True) for t in index)
    inputs = getattr(unwrap(model), "ophsd_inputs", None)
    if inputs is None:
        if explicit is not None or index is not None or end is not None:
            raise RuntimeError("position_ids/logit_index/subtree_end need a model from "
                               "ophsd.models.megatron.build_model")
        return model(tokens, pos, attention_mask=None), partial(loss_fn, batch)
    mask = flex_end = None
    if end is not None:
        end = end.to(dev, non_blocking=True)
        if inputs.tree_backend == "flex":
            flex_end = end  # block-sparse, built by the core attention
        elif inputs.tree_backend == "dense":
            mask = tree_attention_mask(end)
        else:
            raise RuntimeError("this model's core attention cannot take a prefix-tree mask "
                               "(transformer-engine); pack with --no-pack-sequences")
    with inputs.use(position_ids=pos if explicit is not None else None, logit_index=index, subtree_end=flex_end):
        output = model(tokens, pos, attention_mask=mask)
    return output, partial(loss_fn, batch)


def batch_of(rows, full_logits: bool = False, **extra) -> dict:
    """The schedule's micro-batch dict for a :class:`ophsd.train.pairs.TokenRows` (logits at its
    response rows only unless ``full_logits``)."""
    return {"tokens": rows.tokens, "position_ids": rows.position_ids, "subtree_end": rows.subtree_end,
            "logit_index": None if full_logits else (rows.rows, rows.pos), **extra}


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


def forward_logits(model, microbatches: list[dict], groups: ParallelGroups) -> list[torch.Tensor] | None:
    """Full-vocabulary logits (true vocab) per micro-batch on the last stage; None elsewhere."""
    vocab = model.ophsd_spec.vocab_size

    def collect(batch, output, non_loss_data=False):
        return gather_vocab_logits(output.float(), vocab, groups.tp)

    with torch.no_grad():
        out = run_schedule(model, microbatches, collect, forward_only=True, collect_non_loss_data=True)
    return list(out) if groups.is_pipeline_last_stage else None
