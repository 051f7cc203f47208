"""Paired sequences with aligned response positions, packed into fixed-shape micro-batches.

A sample is ``[student prompt | response]`` and ``[teacher prompt | response]``. Logit at
position p predicts token p+1, so for response token j the student logit sits at
``Ls - 1 + j`` and the teacher logit at ``Lt - 1 + j``. Pairs that do not fit the length
limits are skipped and counted: response tokens are never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    weight: float = 1.0
    meta: dict = field(default_factory=dict)


@dataclass
class MicroBatch:
    """Right-padded token blocks plus the flat indices of the response positions."""

    student_tokens: torch.Tensor  # [b, S]
    teacher_tokens: torch.Tensor  # [b, T]
    rows: torch.Tensor  # [n] batch row of each response token
    student_pos: torch.Tensor  # [n] position of the logit predicting it in the student sequence
    teacher_pos: torch.Tensor  # [n] same in the teacher sequence
    targets: torch.Tensor  # [n] the response token ids
    weights: torch.Tensor  # [n] float32 per-token weights (sample weight)


def filter_pairs(samples: list[Sample], max_prompt_length: int, max_response_length: int):
    """(kept samples, counters): skip empty responses and pairs longer than the limits."""
    kept, skipped = [], {"skipped/empty_response": 0, "skipped/too_long": 0}
    for s in samples:
        if not s.response:
            skipped["skipped/empty_response"] += 1
        elif (max(len(s.student_prompt), len(s.teacher_prompt)) > max_prompt_length
              or len(s.response) > max_response_length):
            skipped["skipped/too_long"] += 1
        else:
            kept.append(s)
    return kept, skipped


def _pad_to(n: int, multiple: int = 8) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def pack(samples: list[Sample], micro_batch_size: int, pad_id: int = 0) -> list[MicroBatch]:
    """Fixed [micro_batch_size, S] / [.., T] blocks (megatron's schedules want one shape per step).

    The last micro-batch is filled with zero-weight copies of the first sample when the
    number of samples is not a multiple of ``micro_batch_size``.
    """
    if not samples:
        return []
    S = _pad_to(max(len(s.student_prompt) + len(s.response) for s in samples))
    T = _pad_to(max(len(s.teacher_prompt) + len(s.response) for s in samples))
    filler = Sample(samples[0].student_prompt, samples[0].teacher_prompt, samples[0].response, weight=0.0)
    padded = samples + [filler] * (-len(samples) % micro_batch_size)
    out = []
    for start in range(0, len(padded), micro_batch_size):
        chunk = padded[start: start + micro_batch_size]
        st = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        tt = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        rows, sp, tp, tg, w = [], [], [], [], []
        for b, s in enumerate(chunk):
            ls, lt, r = len(s.student_prompt), len(s.teacher_prompt), len(s.response)
            st[b, : ls + r] = torch.tensor(s.student_prompt + s.response)
            tt[b, : lt + r] = torch.tensor(s.teacher_prompt + s.response)
            rows += [b] * r
            sp += range(ls - 1, ls - 1 + r)
            tp += range(lt - 1, lt - 1 + r)
            tg += s.response
            w += [float(s.weight)] * r
        out.append(MicroBatch(st, tt, torch.tensor(rows), torch.tensor(sp), torch.tensor(tp),
                              torch.tensor(tg), torch.tensor(w, dtype=torch.float32)))
    return out
