"""Batched next-token selection with per-row sampling parameters and generators.

Semantics follow SGLang's sampler (``python/sglang/srt/layers/sampler.py``):

* ``temperature == 0`` is greedy (argmax of the raw logits).
* otherwise the logits are divided by the temperature, top-k then top-p (nucleus) truncate
  the distribution, and one token is drawn from the renormalised remainder.
* The *reported* log-probability of the chosen token is taken from
  ``log_softmax(logits / temperature)`` -- after temperature, **before** top-k/top-p
  truncation (greedy rows: ``log_softmax(logits)``). That is SGLang's default; SGLang's
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (our ``logprob_mode="original"``) reports
  ``log_softmax(logits)`` of the raw logits for every row instead.

Every row draws with its own ``torch.Generator``: a seeded request gives the same tokens
whichever other requests share its batch (up to floating-point ties).
"""
from __future__ import annotations

from typing import Sequence

import torch

LOGPROB_MODES = ("temperature", "original")


def select_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator],
    logprob_mode: str = "temperature",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` [B, V] -> (token ids [B] int64, log-probabilities of those tokens [B] fp32)."""
    if logprob_mode not in LOGPROB_MODES:
        raise ValueError(f"logprob_mode must be one of {LOGPROB_MODES}, got {logprob_mode!r}")
    logits = logits.float()
    bsz, vocab = logits.shape
    temps = torch.tensor(temperatures, dtype=torch.float32, device=logits.device)
    greedy = temps <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    tokens = torch.empty(bsz, dtype=torch.long, device=logits.device)
    if greedy.any():
        tokens[greedy] = logits[greedy].argmax(-1)
    rows = (~greedy).nonzero().flatten().tolist()
    if rows:
        x = scaled[rows]
        ks = [top_ks[i] for i in rows]
        ps = [top_ps[i] for i in rows]
        truncate = any(0 < k < vocab for k in ks) or any(p < 1.0 for p in ps)
        if truncate:
            sorted_logits, order = x.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=x.device)[None, :]
            k_t = torch.tensor([k if 0 < k < vocab else vocab for k in ks], device=x.device)
            sorted_logits = sorted_logits.masked_fill(rank >= k_t[:, None], float("-inf"))
            probs = torch.softmax(sorted_logits, dim=-1)
            p_t = torch.tensor(ps, dtype=torch.float32, device=x.device)
            # drop a token when the mass strictly before it already reaches top_p (keep >= 1)
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= p_t[:, None], 0.0)
            for j, i in enumerate(rows):
                pick = torch.multinomial(probs[j], 1, generator=generators[i])
                tokens[i] = order[j, pick[0]]
        else:
            probs = torch.softmax(x, dim=-1)
            for j, i in enumerate(rows):
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    base = logits if logprob_mode == "original" else scaled
    logprobs = torch.log_softmax(base, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
