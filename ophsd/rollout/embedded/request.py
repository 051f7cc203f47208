"""One sequence of the embedded engine, from the request to its :class:`Completion`: the
request's checks, the finish checks (EOS, stop tokens, stop strings, length) and the result in
SGLang's terms."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ophsd.rollout.base import Completion, InvalidRequestError, SamplingParams


def check_prompt(prompt_ids: Sequence[int], sampling: SamplingParams, vocab_size: int, max_context: int) -> list[int]:
    """The prompt of one request as a list of ints, or :class:`InvalidRequestError`."""
    try:
        prompt = [int(t) for t in prompt_ids]
    except (TypeError, ValueError):
        raise InvalidRequestError("a prompt must be a sequence of integer token ids") from None
    if not prompt:
        raise InvalidRequestError("empty prompt: give at least one token id")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
            + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        )
    badstop = [t for t in sampling.stop_token_ids if not 0 <= t < vocab_size]
    if badstop:
        raise InvalidRequestError(f"stop_token_ids outside the vocabulary: {badstop[:5]}")
    if len(prompt) + sampling.max_new_tokens > max_context:
        raise InvalidRequestError(
            f"prompt of {len(prompt)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
            f"model's context length {max_context}"
        )
    return prompt


@dataclass(eq=False)
class Seq:
    """One sampled continuation (a prompt with ``n`` samples becomes ``n`` of these)."""

    rid: str
    prompt: list[int]
    sp: SamplingParams
    gen: torch.Generator
    future: Future
    created: float = field(default_factory=time.monotonic)
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    version: int | None = None
    aborted: str | None = None  # abort message once aborted
    finish: dict | None = None  # SGLang finish_reason JSON: {"type": ..., "matched"/"length"/"message"}
    text: str = ""
    stop_scan_from: int = 0

    def check_finish(self, eos_token_ids, tokenizer) -> dict | None:
        """The finish reason after the token just appended, or ``None`` to go on. Stop strings
        are searched in the decoded text from just before where the last search ended."""
        t = self.out[-1]
        if not self.sp.ignore_eos and t in eos_token_ids:
            return {"type": "stop", "matched": t}
        if t in self.sp.stop_token_ids:
            return {"type": "stop", "matched": t}
        if self.sp.stop:
            text = tokenizer.decode(self.out, skip_special_tokens=True)
            width = max(len(x) for x in self.sp.stop)
            start = max(0, self.stop_scan_from - width)
            hits = [(text.find(x, start), x) for x in self.sp.stop]
            hits = [h for h in hits if h[0] >= 0]
            if hits:
                pos, matched = min(hits)
                self.text = text[:pos]
                return {"type": "stop", "matched": matched}
            self.stop_scan_from = len(text)
        if len(self.out) >= self.sp.max_new_tokens:
            return {"type": "length", "length": self.sp.max_new_tokens}
        return None

    def resolve(self, tokenizer, version_now: int) -> None:
        """Set the future's :class:`Completion` (``finish`` is set); ``version_now`` serves a
        sequence that never ran."""
        f = self.finish
        if not (f["type"] == "stop" and isinstance(f.get("matched"), str)):
            ids = self.out[:-1] if f["type"] == "stop" and self.out else self.out  # SGLang trims the matched token
            self.text = tokenizer.decode(ids, skip_special_tokens=True)
        version = self.version if self.version is not None else version_now
        c = Completion(
            prompt_ids=self.prompt, output_ids=list(self.out), text=self.text, finish_reason=f["type"],
            weight_version=version, logprobs=list(self.logprobs) if self.sp.return_logprob else None,
            meta={"rid": self.rid, "finish_reason": dict(f), "prompt_tokens": len(self.prompt),
                  "completion_tokens": len(self.out), "e2e_latency": time.monotonic() - self.created},
        )
        if not self.future.done():
            self.future.set_result(c)
