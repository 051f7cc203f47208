"""The one generation interface the trainer and the harnesses share.

Every engine (embedded transformers engine, HTTP client for SGLang or the embedded
server) implements :class:`Engine`. Calls must be safe from many threads at once:
harness workers issue requests concurrently and engines batch them.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch


class EngineError(RuntimeError):
    """A generation or weight-update request that no server/engine could serve."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (token ids outside the vocabulary, prompt too long,
    unknown weight name...): retrying it elsewhere cannot help. HTTP servers answer it with 4xx."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs with SGLang's names (``max_new_tokens``, ``stop``, ``stop_token_ids``...)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled (SGLang convention)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    return_logprob: bool = False
    ignore_eos: bool = False  # SGLang's key: keep generating past EOS (stop/stop_token_ids still apply)

    def __post_init__(self):
        # Accept a single stop string and lists (JSON) while keeping the dataclass hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, int):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        elif not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise ValueError("temperature and top_p must be finite numbers")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int
    logprobs: list[float] | None = None  # per output token, when requested
    meta: dict = field(default_factory=dict)


Messages = Sequence[Mapping[str, str]]  # chat messages: [{"role": ..., "content": ...}]


class Engine(abc.ABC):
    """Generation against the *current* policy weights."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """One list of ``sampling.n`` completions per prompt (token ids), in prompt order."""

    def generate_chat(
        self, conversations: Sequence[Messages], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Render each conversation with the model's chat template, then :meth:`generate`."""
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling)

    def generate_many(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams]]
    ) -> list[list[Completion]]:
        """Like :meth:`generate`, with its own :class:`SamplingParams` per prompt (e.g. its own
        ``seed``): ``[(prompt_ids, sampling), ...]`` -> one list of ``sampling.n`` completions each.

        Default: an engine with ``submit_many`` (the embedded engine) queues them all at once, so
        they batch exactly as one :meth:`generate` call would; otherwise the prompts sharing a
        ``SamplingParams`` go to one :meth:`generate` call, the groups concurrently.
        """
        requests = [(p, sp) for p, sp in requests]
        submit_many = getattr(self, "submit_many", None)
        if callable(submit_many):
            return [[f.result() for f in futs] for futs in submit_many(requests)]
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, sp) in enumerate(requests):
            groups.setdefault(sp, []).append(i)
        out: list = [None] * len(requests)
        if len(groups) == 1:
            (sp, idx), = groups.items()
            return self.generate([requests[i][0] for i in idx], sp)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(32, len(groups))) as pool:
            futs = {sp: pool.submit(self.generate, [requests[i][0] for i in idx], sp) for sp, idx in groups.items()}
            for sp, idx in groups.items():
                for i, comps in zip(idx, futs[sp].result()):
                    out[i] = comps
        return out

    def generate_chat_many(
        self, conversations: Sequence[Messages], samplings: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """:meth:`generate_many` over chat conversations, one ``SamplingParams`` each."""
        if len(conversations) != len(samplings):
            raise ValueError(f"{len(conversations)} conversations but {len(samplings)} sampling params")
        return self.generate_many([(self.apply_chat_template(c), sp) for c, sp in zip(conversations, samplings)])

    @abc.abstractmethod
    def apply_chat_template(self, messages: Messages) -> list[int]:
        """Prompt token ids for a conversation, ending with the assistant turn header."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights that serve new requests."""

    @abc.abstractmethod
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Replace weights (HF parameter names, full unsharded tensors) atomically.

        On failure the engine keeps serving the old weights and raises :class:`EngineError`.
        """

    def release_memory(self) -> None:  # noqa: B027 - optional for engines without pools
        """Free generation memory (KV cache, weights) while the trainer runs."""

    def resume_memory(self) -> None:  # noqa: B027
        """Undo :meth:`release_memory`."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True when the engine answers a tiny generation request."""

    def close(self) -> None:  # noqa: B027
        """Release threads, servers and processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
