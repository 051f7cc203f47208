"""The embedded engine's public façade: loads the model and composes the parts (see the package
docstring); every public method of :class:`EmbeddedEngine` is here, most delegate."""
from __future__ import annotations

import random
import uuid
from concurrent.futures import Future
from typing import Iterable, Mapping, Sequence

import torch

from ophsd.rollout.base import Completion, Engine, InvalidRequestError, Messages, SamplingParams
from ophsd.rollout.embedded.model_runner import ModelRunner
from ophsd.rollout.embedded.request import Seq, check_prompt
from ophsd.rollout.embedded.scheduler import Scheduler
from ophsd.rollout.embedded.weights import WeightSwap
from ophsd.rollout.prefix_cache import PrefixCache
from ophsd.rollout.sampling import LOGPROB_MODES

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


class _SchedulerSetting:
    """An engine attribute that lives on its scheduler, so setting it on the engine takes effect."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, engine, owner=None):
        return self if engine is None else getattr(engine._scheduler, self.name)

    def __set__(self, engine, value):
        setattr(engine._scheduler, self.name, value)


class EmbeddedEngine(Engine):
    """Batched, thread-safe generation on a transformers model (CPU default, CUDA works too).

    Args:
        model: short name (``smollm2-135m``), HF directory or ``.gguf`` file; see
            :func:`ophsd.models.hub.resolve_model`. Use :meth:`from_pretrained_objects` for a
            model already in memory.
        dtype: weights/compute dtype (``float32`` default; ``bfloat16`` is faster on CPUs
            with AVX512-BF16/AMX, at bf16 precision).
        max_running: most sequences decoded together (rows of the batch).
        max_prefill_tokens: padded prompt tokens admitted in one prefill forward.
        batch_window_s: how long an idle engine waits for more requests before prefilling.
        logprob_mode: ``"temperature"`` (SGLang default: ``log_softmax(logits / T)``, before
            top-k/top-p) or ``"original"`` (``log_softmax(logits)``, SGLang's
            ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``).
        seed: seeds the generators of requests that carry no ``seed`` of their own.
        prefix_cache_tokens: most prompt tokens whose KV the prefix cache keeps (LRU eviction
            of unused leaves beyond it); ``0`` turns the cache off. Each cached token costs
            ``2 * layers * kv_heads * head_dim`` values (SmolLM2-135M fp32: 46 KB, so the
            default 32768 tokens is at most ~1.5 GB). Off for models with sliding-window layers.
    """

    eos_token_ids = _SchedulerSetting()
    logprob_mode = _SchedulerSetting()
    max_running = _SchedulerSetting()
    max_prefill_tokens = _SchedulerSetting()
    batch_window_s = _SchedulerSetting()

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        dtype="float32",
        device: str | torch.device = "cpu",
        max_running: int = 64,
        max_prefill_tokens: int = 16384,
        batch_window_s: float = 0.005,
        logprob_mode: str = "temperature",
        seed: int | None = None,
        prefix_cache_tokens: int = 32768,
        _objects=None,
    ):
        if logprob_mode not in LOGPROB_MODES:
            raise ValueError(f"logprob_mode must be one of {LOGPROB_MODES}, got {logprob_mode!r}")
        if max_running < 1 or max_prefill_tokens < 1:
            raise ValueError("max_running and max_prefill_tokens must be >= 1")
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (0 turns the cache off), got {prefix_cache_tokens}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        if _objects is None:
            from ophsd.models.hub import load_hf_model, load_tokenizer, resolve_model

            source = resolve_model(model)
            hf_model = load_hf_model(source, self.dtype)
            tokenizer = load_tokenizer(source)
            self.model_path = str(model)
        else:
            hf_model, tokenizer, self.model_path = _objects
            hf_model = hf_model.to(self.dtype)
        hf_model = hf_model.to(self.device).eval()
        for p in hf_model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = hf_model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        # a batch can take new rows (and the prefix cache works) only if every layer keeps every column
        mergeable = all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or [])
        self._seed_rng = random.Random(seed)
        self._stats = {"steps": 0, "prefills": 0, "tokens": 0, "max_batch": 0,
                       "prompt_tokens": 0, "prefill_tokens": 0, "prefix_hit_tokens": 0}
        pc = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 and mergeable else None
        self._runner = ModelRunner(hf_model, self.device, pc, self._stats)
        self._scheduler = Scheduler(
            self._runner, tokenizer, _eos_ids(hf_model, tokenizer), mergeable=mergeable,
            max_running=max_running, max_prefill_tokens=max_prefill_tokens, batch_window_s=batch_window_s,
            logprob_mode=logprob_mode, stats=self._stats)
        self._weights = WeightSwap(self._runner, self._scheduler, self.device)

    @classmethod
    def from_pretrained_objects(cls, model, tokenizer, name: str = "<in-memory>", **kwargs):
        """An engine around an already-loaded transformers model and tokenizer."""
        return cls(_objects=(model, tokenizer, name), **kwargs)

    # ------------------------------------------------------------------ public API
    @property
    def weight_version(self) -> int:
        return self._scheduler.version

    @property
    def model(self):
        """The transformers model (read-only use; change weights with :meth:`update_weights`)."""
        return self._runner.model

    def stats(self) -> dict:
        """Counters. Prefill: ``prompt_tokens`` (of every sequence admitted), ``prefill_tokens``
        (prompt tokens actually run through the model), ``prefix_hit_tokens`` (prompt tokens of
        admitted sequences whose KV came from the prefix cache); prefix cache: ``prefix_cached_tokens``
        now, ``prefix_cache_max_tokens`` (0: off), ``prefix_evicted_tokens``, ``prefix_evictions``
        (nodes), ``prefix_flushes``."""
        pc, s = self._runner.prefix_cache, self._scheduler
        with s.cv:
            return dict(self._stats, waiting=len(s.waiting), running=s.n_running,
                        paused=s.pause_count > 0, weight_version=s.version,
                        prefix_cache_max_tokens=pc.max_tokens if pc else 0,
                        prefix_cached_tokens=pc.total_tokens if pc else 0,
                        prefix_evicted_tokens=pc.evicted_tokens if pc else 0,
                        prefix_evictions=pc.evictions if pc else 0,
                        prefix_flushes=self._runner.prefix_flushes)

    def flush_cache(self) -> int:
        """Drop every cached prefix (SGLang's ``/flush_cache``); returns the tokens dropped.
        Waits for a prefill in progress; running sequences keep their own KV."""
        return self._runner.flush_prefix_cache()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def apply_chat_template(self, messages: Messages) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"the tokenizer of {self.model_path} has no chat template: pass prompt token ids instead"
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
            )
        except Exception as e:  # jinja errors, bad roles...
            raise InvalidRequestError(f"could not render the conversation with the chat template: {e}") from e
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def validate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> list[int]:
        """Check one request; returns the prompt as a list of ints or raises InvalidRequestError."""
        return check_prompt(prompt_ids, sampling, self.vocab_size, self.max_context)

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, rid: str | None = None) -> list[Future]:
        """Queue one prompt; returns ``sampling.n`` futures of :class:`Completion`."""
        return self.submit_many([(prompt_ids, sampling)], [rid])[0]

    def submit_many(self, requests, rids=None) -> list[list[Future]]:
        """Queue ``[(prompt_ids, sampling), ...]`` atomically (all validated before any is queued)."""
        requests = list(requests)
        rids = list(rids) if rids is not None else [None] * len(requests)
        checked = [self.validate(p, sp) for p, sp in requests]
        groups, seqs = [], []
        for prompt, (_, sp), rid in zip(checked, requests, rids):
            rid = rid or uuid.uuid4().hex
            futs = []
            for j in range(sp.n):
                seed = sp.seed + j if sp.seed is not None else self._seed_rng.getrandbits(63)
                gen = torch.Generator(device=self.device)
                gen.manual_seed(seed)
                fut: Future = Future()
                seqs.append(Seq(rid if sp.n == 1 else f"{rid}-{j}", prompt, sp, gen, fut))
                futs.append(fut)
            groups.append(futs)
        self._scheduler.add(seqs)
        return groups

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        groups = self.submit_many([(p, sampling) for p in prompts])
        return [[f.result() for f in futs] for futs in groups]

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "aborted by request") -> int:
        """Abort queued/running sequences whose rid starts with ``rid`` (SGLang's prefix rule)."""
        if not abort_all and not rid:
            return 0
        return self._scheduler.abort_where(lambda s: abort_all or s.rid.startswith(rid), message)

    def cancel(self, futures: Iterable[Future], message: str = "aborted") -> int:
        """Abort the sequences behind ``futures`` (a request whose HTTP client has gone; rids may be
        shared or prefixes of other requests' rids, futures are not)."""
        futures = set(futures)
        return self._scheduler.abort_where(lambda s: s.future in futures, message)

    def pause_generation(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop starting new sequences and wait until the running batch is finished (or aborted)."""
        self._scheduler.pause(abort=abort, timeout=timeout)

    def continue_generation(self) -> None:
        self._scheduler.resume()

    def paused(self, abort: bool = False):
        """Context manager: :meth:`pause_generation` inside, :meth:`continue_generation` after."""
        return self._scheduler.paused(abort=abort)

    @property
    def is_paused(self) -> bool:
        return self._scheduler.pause_count > 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor (name, shape, finiteness), then swap them in between batches.

        Tensors are staged (copied to the engine's device/dtype) while generation goes on; the
        swap itself waits for the running batch to finish. On any problem nothing changes and
        :class:`EngineError` (:class:`InvalidRequestError` for bad names/shapes) is raised.
        """
        self.apply_staged(self.stage_weights(named_tensors), version)

    def stage_weights(self, named_tensors) -> dict[str, torch.Tensor]:
        """First half of :meth:`update_weights`: validate (name, shape, dtype kind, finite) and copy
        every tensor to the engine's device/dtype while generation goes on; nothing changes yet.
        Raises :class:`InvalidRequestError` (bad tensors) or :class:`EngineError` (unreadable
        stream). Hand the result to :meth:`apply_staged`."""
        return self._weights.stage(named_tensors)

    def apply_staged(self, staged: Mapping[str, torch.Tensor], version: int) -> None:
        """Second half of :meth:`update_weights`: swap staged tensors in between batches, flush the
        prefix cache and serve ``version``."""
        self._weights.apply(staged, version)

    def set_weight_version(self, version: int) -> None:
        self._weights.set_version(version)

    def release_memory(self) -> None:
        """Drain, then move the weights off the accelerator (a no-op move on CPU)."""
        self._weights.release()

    def resume_memory(self) -> None:
        self._weights.resume()

    def health(self, timeout: float = 30.0) -> bool:
        s = self._scheduler
        if s.closed or not s.thread.is_alive():
            return False
        if s.pause_count > 0:
            return True  # alive; it answers again after continue_generation / resume_memory
        try:
            fut = self.submit([self.eos_token_ids[0] if self.eos_token_ids else 0],
                              SamplingParams(temperature=0.0, max_new_tokens=1), rid="HEALTH_CHECK")[0]
            fut.result(timeout=timeout)
            return True
        except Exception:  # noqa: BLE001 - health answers a bool
            return False

    def close(self) -> None:
        self._scheduler.close()
