"""In-process generation engine on a transformers causal LM with a KV cache.

One scheduler thread owns the model. Callers (any number of threads: the trainer, harness
workers, the HTTP server's request threads) enqueue sequences and wait on futures. The
scheduler runs *continuous batching*:

* requests that arrive while the engine is idle are collected for ``batch_window_s`` and
  prefilled together as one left-padded batch;
* requests that arrive while a batch is running are prefilled at the next step boundary and
  merged into the running batch (both KV caches are left-padded to a common length and
  concatenated), so nobody waits for the whole batch to finish;
* finished rows leave the batch at every step (their cache rows are dropped and columns that
  only hold padding are trimmed).

A *prefix cache* (:class:`PrefixCache`, a radix tree over token ids whose nodes own the KV of
their tokens, as SGLang's RadixAttention) lets a prefill compute only what is new: each prompt
takes its longest cached prefix, prompts of one batch that share an uncached prefix (the ``n``
samples of a prompt; a long instruction common to all prompts) have it computed once, and every
prefilled prompt is inserted for later calls. It is cleared whenever the weights change.

Weight updates drain the running batch first, so every completion is produced by exactly
one weight version (``Completion.weight_version``); new requests wait in the queue while the
weights change. See :mod:`ophsd.rollout.sampling` for the sampling and log-probability
semantics (SGLang's).
"""
from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ophsd.rollout.base import (
    Completion,
    Engine,
    EngineError,
    InvalidRequestError,
    Messages,
    SamplingParams,
)
from ophsd.rollout.prefix_cache import PrefixCache, common_len, own_copy
from ophsd.rollout.sampling import LOGPROB_MODES, select_tokens

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(eq=False)
class _Seq:
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


def _cat_rows(parts):
    """Concatenate batches ``(logits, cache, mask, last_pos)`` along the rows, left-padding the
    caches and masks to a common length (the first part's cache object is reused)."""
    L = max(mask.shape[1] for _, _, mask, _ in parts)
    cache = parts[0][1]
    for i, layer in enumerate(cache.layers):
        for attr in ("keys", "values"):
            setattr(layer, attr, torch.cat([F.pad(getattr(c.layers[i], attr), (0, 0, L - m.shape[1], 0))
                                             for _, c, m, _ in parts], 0))
    mask = torch.cat([F.pad(m, (L - m.shape[1], 0)) for _, _, m, _ in parts], 0)
    return (torch.cat([lg for lg, _, _, _ in parts]), cache, mask, torch.cat([lp for _, _, _, lp in parts]))


# ---------------------------------------------------------------------- KV cache layer
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns.

        ``DynamicLayer.update`` concatenates: every decode step copies the whole cache of every
        layer into fresh memory. Here a step writes its column in place and only a full buffer
        (every ``GROW`` steps) or a tensor set from outside (the engine's merge/select assign
        ``keys``/``values``) is copied into a new buffer. Callers never write into ``keys``.
        """

        GROW = 64

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._kbuf = self._vbuf = None

        def _backed(self) -> bool:
            k, b = self.keys, self._kbuf
            return (b is not None and k.data_ptr() == b.data_ptr() and k.shape[:2] == b.shape[:2]
                    and k.stride() == b.stride() and self.values.data_ptr() == self._vbuf.data_ptr())

        def reserve(self, batch: int, length: int, extra: int, like_k, like_v, zero: bool = True) -> None:
            """Start as ``batch`` rows of ``length`` zero columns (filled in place by the caller)
            with room for ``extra`` more."""
            cap = length + extra + self.GROW
            self._kbuf = like_k.new_empty(batch, like_k.shape[1], cap, like_k.shape[3])
            self._vbuf = like_v.new_empty(batch, like_v.shape[1], cap, like_v.shape[3])
            if zero:
                self._kbuf[:, :, :length].zero_()
                self._vbuf[:, :, :length].zero_()
            self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]
            self.device, self.is_initialized = like_k.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.device = key_states.device
                self.is_initialized = True
                self.keys = self.values = None
                n = 0
            else:
                n = self.keys.shape[-2]
            add = key_states.shape[-2]
            if n == 0 or not self._backed() or self._kbuf.shape[-2] < n + add:
                b, h, _, d = key_states.shape
                kb = key_states.new_empty(b, h, n + add + self.GROW, d)
                vb = value_states.new_empty(b, h, n + add + self.GROW, value_states.shape[-1])
                if n:
                    kb[:, :, :n] = self.keys
                    vb[:, :, :n] = self.values
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[:, :, n:n + add] = key_states
            self._vbuf[:, :, n:n + add] = value_states
            self.keys = self._kbuf[:, :, :n + add]
            self.values = self._vbuf[:, :, :n + add]
            return self.keys, self.values

    return GrowingLayer


_GrowingLayer = None


def _new_kv_cache(config):
    """A transformers ``DynamicCache`` for ``config`` whose plain full-attention layers append
    in place (:func:`_growing_layer_class`); other layer kinds are left as transformers makes them."""
    global _GrowingLayer
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _GrowingLayer is None:
        _GrowingLayer = _growing_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
        self._model = hf_model.to(self.device).eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = self._model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        layer_types = getattr(cfg, "layer_types", None) or []
        self._mergeable = all(t == "full_attention" for t in layer_types)
        self.eos_token_ids = self._eos_ids()
        self.logprob_mode = logprob_mode
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_window_s = batch_window_s
        self._seed_rng = random.Random(seed)
        self._rid_counter = itertools.count()

        self._version = 0
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._n_running = 0
        self._busy = False
        self._pause_count = 0
        self._released = False
        self._closed = False
        self._stats = {"steps": 0, "prefills": 0, "tokens": 0, "max_batch": 0,
                       "prompt_tokens": 0, "prefill_tokens": 0, "prefix_hit_tokens": 0}
        # prefix cache: used by the scheduler thread under _pc_lock (flush_cache takes it too)
        self._pc = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 and self._mergeable else None
        self._pc_lock = threading.Lock()
        self._pc_flushes = 0
        # scheduler-thread state
        self._running: list[_Seq] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._last_pos: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._loop, name="ophsd-embedded-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained_objects(cls, model, tokenizer, name: str = "<in-memory>", **kwargs):
        """An engine around an already-loaded transformers model and tokenizer."""
        return cls(_objects=(model, tokenizer, name), **kwargs)

    # ------------------------------------------------------------------ public API
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def model(self):
        """The transformers model (read-only use; change weights with :meth:`update_weights`)."""
        return self._model

    def stats(self) -> dict:
        """Counters. Prefill: ``prompt_tokens`` (of every sequence admitted), ``prefill_tokens``
        (prompt tokens actually run through the model), ``prefix_hit_tokens`` (prompt tokens of
        admitted sequences whose KV came from the prefix cache); prefix cache: ``prefix_cached_tokens``
        now, ``prefix_cache_max_tokens`` (0: off), ``prefix_evicted_tokens``, ``prefix_evictions``
        (nodes), ``prefix_flushes``."""
        pc = self._pc
        with self._cv:
            return dict(self._stats, waiting=len(self._waiting), running=self._n_running,
                        paused=self._pause_count > 0, weight_version=self._version,
                        prefix_cache_max_tokens=pc.max_tokens if pc else 0,
                        prefix_cached_tokens=pc.total_tokens if pc else 0,
                        prefix_evicted_tokens=pc.evicted_tokens if pc else 0,
                        prefix_evictions=pc.evictions if pc else 0,
                        prefix_flushes=self._pc_flushes)

    def flush_cache(self) -> int:
        """Drop every cached prefix (SGLang's ``/flush_cache``); returns the tokens dropped.
        Waits for a prefill in progress; running sequences keep their own KV."""
        if self._pc is None:
            return 0
        with self._pc_lock:
            n = self._pc.total_tokens
            self._pc.clear()
            self._pc_flushes += 1
        return n

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
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise InvalidRequestError("a prompt must be a sequence of integer token ids") from None
        if not prompt:
            raise InvalidRequestError("empty prompt: give at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            )
        badstop = [t for t in sampling.stop_token_ids if not 0 <= t < self.vocab_size]
        if badstop:
            raise InvalidRequestError(f"stop_token_ids outside the vocabulary: {badstop[:5]}")
        if len(prompt) + sampling.max_new_tokens > self.max_context:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                f"model's context length {self.max_context}"
            )
        return prompt

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
                seqs.append(_Seq(rid if sp.n == 1 else f"{rid}-{j}", prompt, sp, gen, fut))
                futs.append(fut)
            groups.append(futs)
        with self._cv:
            if self._closed:
                raise EngineError("engine is closed")
            self._waiting.extend(seqs)
            self._cv.notify_all()
        return groups

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        groups = self.submit_many([(p, sampling) for p in prompts])
        return [[f.result() for f in futs] for futs in groups]

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "aborted by request") -> int:
        """Abort queued/running sequences whose rid starts with ``rid`` (SGLang's prefix rule)."""
        if not abort_all and not rid:
            return 0
        return self._abort_where(lambda s: abort_all or s.rid.startswith(rid), message)

    def cancel(self, futures: Iterable[Future], message: str = "aborted") -> int:
        """Abort the sequences behind ``futures`` (a request whose HTTP client has gone; rids may be
        shared or prefixes of other requests' rids, futures are not)."""
        futures = set(futures)
        return self._abort_where(lambda s: s.future in futures, message)

    def _abort_where(self, hit_fn, message: str) -> int:
        """Queued sequences end now; running ones at the next decode step."""
        hit = 0
        with self._cv:
            keep = deque()
            for s in self._waiting:
                if hit_fn(s):
                    s.finish = {"type": "abort", "message": message}
                    s.version = self._version
                    self._resolve(s)
                    hit += 1
                else:
                    keep.append(s)
            self._waiting = keep
            for s in list(self._running):
                if hit_fn(s):
                    s.aborted = message
                    hit += 1
            self._cv.notify_all()
        return hit

    def pause_generation(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop starting new sequences and wait until the running batch is finished (or aborted)."""
        with self._cv:
            self._pause_count += 1
            if abort:
                for s in self._running:
                    s.aborted = "aborted by pause_generation"
            self._cv.notify_all()
            if not self._cv.wait_for(lambda: not self._busy and self._n_running == 0, timeout):
                self._pause_count -= 1
                self._cv.notify_all()
                raise EngineError(f"pause_generation timed out after {timeout}s waiting for running requests")

    def continue_generation(self) -> None:
        with self._cv:
            if self._pause_count > 0:
                self._pause_count -= 1
            self._cv.notify_all()

    @contextmanager
    def paused(self, abort: bool = False):
        self.pause_generation(abort=abort)
        try:
            yield
        finally:
            self.continue_generation()

    @property
    def is_paused(self) -> bool:
        return self._pause_count > 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Validate every tensor (name, shape, finiteness), then swap them in between batches.

        Tensors are staged (copied to the engine's device/dtype) while generation goes on; the
        swap itself waits for the running batch to finish. On any problem nothing changes and
        :class:`EngineError` (:class:`InvalidRequestError` for bad names/shapes) is raised.
        """
        self.apply_staged(self.stage_weights(named_tensors), version)

    def _targets(self) -> dict[str, torch.Tensor]:
        return dict(self._model.state_dict(keep_vars=True))

    def stage_weights(self, named_tensors) -> dict[str, torch.Tensor]:
        """First half of :meth:`update_weights`: validate (name, shape, dtype kind, finite) and copy
        every tensor to the engine's device/dtype while generation goes on; nothing changes yet.
        Raises :class:`InvalidRequestError` (bad tensors) or :class:`EngineError` (unreadable
        stream). Hand the result to :meth:`apply_staged`."""
        try:
            version_now = self._version
            targets = self._targets()
            staged: dict[str, torch.Tensor] = {}
            errors: list[str] = []
            it = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
            for name, tensor in it:
                target = targets.get(name)
                if target is None:
                    errors.append(f"unknown parameter name {name!r}")
                    continue
                if not isinstance(tensor, torch.Tensor):
                    errors.append(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
                    continue
                if tuple(tensor.shape) != tuple(target.shape):
                    errors.append(f"{name}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
                    continue
                if tensor.is_floating_point() != target.is_floating_point():
                    errors.append(f"{name}: dtype {tensor.dtype} cannot replace {target.dtype}")
                    continue
                t = tensor.detach().to(device=self.device, dtype=target.dtype, copy=True)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    errors.append(f"{name}: contains NaN or Inf")
                    continue
                staged[name] = t
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(
                f"weight update failed while reading tensors ({type(e).__name__}: {e}); "
                f"the engine keeps weight version {version_now}"
            ) from e
        if errors:
            more = f" (+{len(errors) - 8} more)" if len(errors) > 8 else ""
            raise InvalidRequestError(
                f"weight update rejected, the engine keeps weight version {version_now}: "
                + "; ".join(errors[:8]) + more
            )
        if not staged:
            raise InvalidRequestError(f"weight update with no tensors; the engine keeps version {version_now}")
        return staged

    def apply_staged(self, staged: Mapping[str, torch.Tensor], version: int) -> None:
        """Second half of :meth:`update_weights`: swap staged tensors in between batches, flush the
        prefix cache and serve ``version``."""
        version = int(version)
        targets = self._targets()
        with self.paused():
            with torch.no_grad():
                for name, t in staged.items():
                    targets[name].copy_(t)
            self.flush_cache()  # cached KV belongs to the old weights
            with self._cv:
                self._version = version
        log.info("embedded engine: %d tensors updated, weight version %d", len(staged), version)

    def set_weight_version(self, version: int) -> None:
        with self._cv:
            self._version = int(version)

    def release_memory(self) -> None:
        """Drain, then move the weights off the accelerator (a no-op move on CPU)."""
        self.pause_generation()
        with self._cv:
            if self._released:
                self._pause_count -= 1
                return
            self._released = True
        self.flush_cache()
        if self.device.type != "cpu":
            self._model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        with self._cv:
            if not self._released:
                return
        if self.device.type != "cpu":
            self._model.to(self.device)
        with self._cv:
            self._released = False
        self.continue_generation()

    def health(self, timeout: float = 30.0) -> bool:
        if self._closed or not self._thread.is_alive():
            return False
        if self._pause_count > 0:
            return True  # alive; it answers again after continue_generation / resume_memory
        try:
            fut = self.submit([self.eos_token_ids[0] if self.eos_token_ids else 0],
                              SamplingParams(temperature=0.0, max_new_tokens=1), rid="HEALTH_CHECK")[0]
            fut.result(timeout=timeout)
            return True
        except Exception:  # noqa: BLE001 - health answers a bool
            return False

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        with self._cv:
            for s in self._waiting:
                if not s.future.done():
                    s.future.set_exception(EngineError("engine closed before the request ran"))
            self._waiting.clear()

    # ------------------------------------------------------------------ scheduler
    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc = getattr(self._model, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            for t in src if isinstance(src, (list, tuple)) else [src]:
                if t is not None and int(t) not in ids:
                    ids.append(int(t))
        return ids

    def _loop(self):
        mode = torch.inference_mode()
        with mode:
            while True:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                    while not self._closed and not self._running and (self._pause_count > 0 or not self._waiting):
                        self._cv.wait()
                    if self._closed:
                        self._fail_running(EngineError("engine closed while the request was running"))
                        return
                    fresh_start = not self._running
                if fresh_start and self.batch_window_s > 0:
                    time.sleep(self.batch_window_s)  # let concurrent callers join the first prefill
                with self._cv:
                    new = [] if self._pause_count > 0 else self._take_new()
                    if not new and not self._running:
                        continue
                    self._busy = True
                try:
                    self._step(new)
                except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                    log.exception("embedded engine step failed")
                    err = EngineError(f"generation failed: {type(e).__name__}: {e}")
                    for s in new:
                        if s not in self._running and not s.future.done():
                            s.future.set_exception(err)
                    self._fail_running(err)
                with self._cv:
                    self._n_running = len(self._running)

    def _take_new(self) -> list[_Seq]:
        room = self.max_running - len(self._running)
        if room <= 0 or not self._waiting or (self._running and not self._mergeable):
            return []
        new: list[_Seq] = []
        longest = 0
        while self._waiting and len(new) < room:
            s = self._waiting[0]
            L = max(longest, len(s.prompt))
            if new and L * (len(new) + 1) > self.max_prefill_tokens:
                break
            longest = L
            new.append(self._waiting.popleft())
        return new

    def _fail_running(self, err: Exception):
        for s in self._running:
            if not s.future.done():
                s.future.set_exception(err)
        self._running = []
        self._cache = self._mask = self._last_pos = self._logits = None

    def _forward(self, **kw):
        try:
            return self._model(**kw, use_cache=True)
        except TypeError:
            kw.pop("logits_to_keep", None)
            return self._model(**kw, use_cache=True)

    def _prefill(self, seqs: list[_Seq]):
        """Prefill new sequences; returns (last logits [B, V] fp32, cache, mask, last positions)."""
        self._stats["prefills"] += 1
        self._stats["prompt_tokens"] += sum(len(s.prompt) for s in seqs)
        if self._pc is None:
            return self._prefill_plain(seqs)
        with self._pc_lock:
            return self._prefill_cached(seqs)

    def _prefill_plain(self, seqs: list[_Seq]):
        L = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, L - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_kv_cache(self._model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, logits_to_keep=1)
        self._stats["prefill_tokens"] += sum(len(s.prompt) for s in seqs)
        return out.logits[:, -1].float(), out.past_key_values, mask, pos[:, -1]

    # Shared prefixes shorter than this are left to each row (a separate forward costs more).
    MIN_SHARED_PREFIX = 16

    def _prefill_cached(self, seqs: list[_Seq]):
        pc = self._pc
        # identical prompts (the n samples of one prompt) are computed once, as one row
        rows: dict[tuple[int, ...], int] = {}
        prompts: list[list[int]] = []
        seq_row = []
        for s in seqs:
            r = rows.setdefault(tuple(s.prompt), len(prompts))
            if r == len(prompts):
                prompts.append(s.prompt)
            seq_row.append(r)
        # prompts cached whole, with their last logits: rows straight from the tree, no forward
        hits, todo, hit_len = [], [], [0] * len(prompts)
        for r, p in enumerate(prompts):
            path, m = pc.match(p)
            lg = PrefixCache.end_logits(path, m, len(p))
            if lg is not None:
                hits.append((r, path, lg))
                hit_len[r] = len(p)
            else:
                todo.append(r)
        parts, order = [], []
        if hits:
            parts.append(self._rows_from_tree([prompts[r] for r, _, _ in hits],
                                              [(path, len(prompts[r])) for r, path, _ in hits],
                                              torch.stack([lg for _, _, lg in hits])))
            order += [r for r, _, _ in hits]
        if todo:
            todo_prompts = [prompts[r] for r in todo]
            self._share_prefixes(todo_prompts)
            # every row: its longest cached prefix, leaving at least the last token to compute
            matches = [pc.match(p[:-1]) for p in todo_prompts]
            handles = [pc.lock(path) for path, _ in matches]
            try:
                logits, cache, mask, pos = self._prefill_rows(todo_prompts, matches)
                for i, p in enumerate(todo_prompts):
                    pc.insert(p, self._kv_getter(cache, mask, i), logits=own_copy(logits[i]))
            finally:
                for h in handles:
                    pc.unlock(h)
            parts.append((logits, cache, mask, pos[:, -1]))
            order += todo
            for r, (_, m) in zip(todo, matches):
                hit_len[r] = m
        self._stats["prefix_hit_tokens"] += sum(hit_len[r] for r in seq_row)
        logits, cache, mask, last_pos = parts[0] if len(parts) == 1 else _cat_rows(parts)
        row_of = {r: i for i, r in enumerate(order)}
        take = [row_of[r] for r in seq_row]
        if take != list(range(len(order))):
            idx = torch.tensor(take, device=logits.device)
            logits, mask, last_pos = logits[idx], mask[idx], last_pos[idx]
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        return logits, cache, mask, last_pos

    def _rows_from_tree(self, prompts, matches, logits):
        """Rows for prompts cached whole: their KV copied out of the tree (left-padded), the
        stored logits, no forward."""
        cache, mask = self._past_from_tree(prompts, matches, 0)
        last_pos = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return logits, cache, mask, last_pos

    def _past_from_tree(self, prompts, matches, S: int):
        """A KV cache of ``len(prompts)`` rows holding each row's matched KV right-aligned to
        column ``P = max m`` (left padding zero, mask 0), with room for ``S`` more columns; and the
        ``[rows, P + S]`` mask (its last ``S`` columns are left to the caller)."""
        n = len(prompts)
        P = max(m for _, m in matches)
        mask = torch.zeros(n, P + S, dtype=torch.long)
        for i, (_, m) in enumerate(matches):
            mask[i, P - m:P] = 1
        cache = _new_kv_cache(self._model.config)
        if P:
            ref = next(path for path, m in matches if m)[0][0].kv
            for layer, (k, v) in zip(cache.layers, ref):
                if isinstance(layer, _GrowingLayer):  # straight into a buffer with room for the tails
                    layer.reserve(n, P, S, k, v)
                else:
                    layer.update(k.new_zeros(n, k.shape[1], P, k.shape[3]), v.new_zeros(n, v.shape[1], P, v.shape[3]))
            past = [(layer.keys, layer.values) for layer in cache.layers]
            for i, (path, m) in enumerate(matches):
                if m:
                    PrefixCache.copy_into(path, past, i, P)
        return cache, mask.to(self.device)

    def _share_prefixes(self, prompts: list[list[int]]) -> None:
        """Compute and cache, once each, the uncached prefixes that several prompts share.

        The branch points of the prompts' trie are the common prefixes of lexicographically
        adjacent prompts; shorter ones go first, so a longer one extends a shorter one's KV.
        """
        if len(prompts) < 2:
            return
        pc = self._pc
        order = sorted(prompts)
        points = set()
        for a, b in zip(order, order[1:]):
            n = min(common_len(a, b), len(a) - 1, len(b) - 1)
            if n >= self.MIN_SHARED_PREFIX:
                points.add(tuple(a[:n]))
        for point in sorted(points, key=len):
            path, m = pc.match(point)
            if len(point) - m < self.MIN_SHARED_PREFIX:
                continue
            handle = pc.lock(path)
            try:
                _, cache, mask, _ = self._prefill_rows([list(point)], [(path, m)])
                pc.insert(point, self._kv_getter(cache, mask, 0))
            finally:
                pc.unlock(handle)

    def _prefill_rows(self, prompts: list[list[int]], matches):
        """One forward over the uncached tails ``prompt[m:]`` of the rows, with their cached KV
        as ``past_key_values``. Row ``i`` of the cache/mask is ``[pad][cached m_i][pad][tail]``
        (cached part right-aligned to column ``P = max m``, tails right-aligned to the end);
        padding has mask 0 and the positions are explicit. The returned cache is compacted to
        ``[pad][prompt]`` rows (see :meth:`_compact`)."""
        n = len(prompts)
        P = max(m for _, m in matches)
        S = max(len(p) - m for p, (_, m) in zip(prompts, matches))
        cache, mask = self._past_from_tree(prompts, matches, S)
        ids = torch.zeros(n, S, dtype=torch.long)
        for i, (p, (_, m)) in enumerate(zip(prompts, matches)):
            ids[i, S - (len(p) - m):] = torch.tensor(p[m:])
            mask[i, P + S - (len(p) - m):] = 1
        ids = ids.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, logits_to_keep=1)
        self._stats["prefill_tokens"] += sum(len(p) - m for p, (_, m) in zip(prompts, matches))
        cache = out.past_key_values
        W = max(len(p) for p in prompts)
        if P + S != W or any(m and len(p) - m < S for p, (_, m) in zip(prompts, matches)):  # mid-row padding
            mask = self._compact(cache, mask, W)
        return out.logits[:, -1].float(), cache, mask, pos

    @staticmethod
    def _compact(cache, mask, width: int):
        """Move every row's real columns together at the right end of ``width`` columns (the
        engine's usual left-padded layout, the same as a prompt prefilled whole or read from the
        tree), dropping mid-row padding; returns the new mask."""
        n = mask.shape[0]
        idx = torch.zeros(n, width, dtype=torch.long, device=mask.device)
        new_mask = torch.zeros(n, width, dtype=mask.dtype, device=mask.device)
        for i in range(n):
            cols = mask[i].nonzero().squeeze(1)
            idx[i, width - len(cols):] = cols
            new_mask[i, width - len(cols):] = 1
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            gk = k.gather(2, idx[:, None, :, None].expand(n, k.shape[1], width, k.shape[3]))
            gv = v.gather(2, idx[:, None, :, None].expand(n, v.shape[1], width, v.shape[3]))
            if isinstance(layer, _GrowingLayer):
                layer.reserve(n, width, 0, gk, gv, zero=False)
                layer.keys.copy_(gk)
                layer.values.copy_(gv)
            else:
                layer.keys, layer.values = gk, gv
        return new_mask

    @staticmethod
    def _kv_getter(cache, mask, row: int):
        """``kv_fn`` for :meth:`PrefixCache.insert`: the KV of row ``row``'s prompt positions
        ``start:end`` (its real, unmasked columns in order), as new tensors."""
        cols = mask[row].nonzero().squeeze(1)

        def kv_fn(start, end):
            c = cols[start:end]
            a, b = int(c[0]), int(c[-1]) + 1
            if b - a == end - start:  # contiguous columns: slice
                return [(own_copy(layer.keys[row:row + 1, :, a:b]), own_copy(layer.values[row:row + 1, :, a:b]))
                        for layer in cache.layers]
            return [(layer.keys[row:row + 1].index_select(2, c), layer.values[row:row + 1].index_select(2, c))
                    for layer in cache.layers]

        return kv_fn

    @staticmethod
    def _layers(cache):
        return [(layer, "keys", "values") for layer in cache.layers]

    def _merge(self, logits, cache, mask, last_pos):
        if not self._running:
            self._cache, self._mask, self._last_pos, self._logits = cache, mask, last_pos, logits
            return
        self._logits, self._cache, self._mask, self._last_pos = _cat_rows(
            [(self._logits, self._cache, self._mask, self._last_pos), (logits, cache, mask, last_pos)])

    def _select(self, keep: list[int]):
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        cols = mask.any(0).nonzero()
        start = int(cols[0]) if self._mergeable and len(cols) else 0
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self._mask = mask[:, start:]
        self._last_pos = self._last_pos[idx]

    def _step(self, new: list[_Seq]):
        if new:
            logits, cache, mask, last_pos = self._prefill(new)
            for s in new:
                s.version = self._version
            self._merge(logits, cache, mask, last_pos)
            self._running.extend(new)
        running = self._running
        self._stats["max_batch"] = max(self._stats["max_batch"], len(running))
        sps = [s.sp for s in running]
        tokens, lps = select_tokens(
            self._logits, [sp.temperature for sp in sps], [sp.top_k for sp in sps],
            [sp.top_p for sp in sps], [s.gen for s in running], self.logprob_mode,
        )
        tokens_l, lps_l = tokens.tolist(), lps.tolist()
        keep, done = [], []
        for i, s in enumerate(running):
            if s.aborted:
                s.finish = {"type": "abort", "message": s.aborted}
            else:
                s.out.append(tokens_l[i])
                s.logprobs.append(lps_l[i])
                s.finish = self._check_finish(s)
            (done if s.finish else keep).append(i)
        self._stats["steps"] += 1
        self._stats["tokens"] += len(running)
        for i in done:
            self._resolve(running[i])
        if not keep:
            self._running = []
            self._cache = self._mask = self._last_pos = self._logits = None
            return
        if done:
            self._select(keep)
            self._running = [running[i] for i in keep]
        step_tokens = tokens[torch.tensor(keep, device=tokens.device)] if done else tokens
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(keep), 1)], 1)
        self._last_pos = self._last_pos + 1
        out = self._forward(input_ids=step_tokens[:, None], attention_mask=self._mask,
                            position_ids=self._last_pos[:, None], past_key_values=self._cache)
        self._cache = out.past_key_values
        self._logits = out.logits[:, -1].float()

    def _check_finish(self, s: _Seq) -> dict | None:
        t = s.out[-1]
        if not s.sp.ignore_eos and t in self.eos_token_ids:
            return {"type": "stop", "matched": t}
        if t in s.sp.stop_token_ids:
            return {"type": "stop", "matched": t}
        if s.sp.stop:
            text = self.tokenizer.decode(s.out, skip_special_tokens=True)
            width = max(len(x) for x in s.sp.stop)
            start = max(0, s.stop_scan_from - width)
            hits = [(text.find(x, start), x) for x in s.sp.stop]
            hits = [h for h in hits if h[0] >= 0]
            if hits:
                pos, matched = min(hits)
                s.text = text[:pos]
                return {"type": "stop", "matched": matched}
            s.stop_scan_from = len(text)
        if len(s.out) >= s.sp.max_new_tokens:
            return {"type": "length", "length": s.sp.max_new_tokens}
        return None

    def _resolve(self, s: _Seq):
        f = s.finish
        if not (f["type"] == "stop" and isinstance(f.get("matched"), str)):
            ids = s.out[:-1] if f["type"] == "stop" and s.out else s.out  # SGLang trims the matched token
            s.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        version = s.version if s.version is not None else self._version
        c = Completion(
            prompt_ids=s.prompt, output_ids=list(s.out), text=s.text, finish_reason=f["type"],
            weight_version=version, logprobs=list(s.logprobs) if s.sp.return_logprob else None,
            meta={"rid": s.rid, "finish_reason": dict(f), "prompt_tokens": len(s.prompt),
                  "completion_tokens": len(s.out), "e2e_latency": time.monotonic() - s.created},
        )
        if not s.future.done():
            s.future.set_result(c)
