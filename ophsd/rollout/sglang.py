"""Engine over SGLang's native HTTP API: one or many servers, optionally behind sglang-router.

:class:`SGLangEngine` implements :class:`~ophsd.rollout.base.Engine` over HTTP (one pooled
``httpx.Client``). It talks to real SGLang servers (:class:`~ophsd.rollout.launcher.ServerLauncher`
starts them) and to the embedded server (``python -m ophsd.rollout.serve``), which is how CI runs
this code. The pieces, one file each:

* this module: the client -- ``/generate`` requests, their retries and re-sends, the control
  plane, the weight-update bracket;
* :mod:`ophsd.rollout.server_pool`: the servers -- HTTP calls, round-robin rotation, health
  probes, retry/backoff policy, weight versions per server;
* :mod:`ophsd.rollout.weight_updaters`: how weights travel (``disk`` or ``tensor``), fixed when
  the engine is constructed;
* :mod:`ophsd.rollout.launcher`: starting and stopping server processes.

Failure handling:

* each prompt is its own ``/generate`` request, sent from a thread pool (concurrency), to the
  next live server in round-robin order (or to the router when one is given);
* connection errors, timeouts and 5xx answers are retried with exponential backoff on
  another server (``max_retries``); a server that refuses connections or times out is taken
  out of rotation and probed again (``/health_generate``) after ``dead_cooldown_s``;
* 4xx answers are the caller's mistake: :class:`InvalidRequestError` at once, no retry;
* every completion carries the server's ``weight_version``; a completion from other weights
  than the last pushed version marks that server *stale* (out of rotation until it is
  updated) and the request is re-sent elsewhere, so results from stale weights never reach
  the caller;
* :class:`EngineError` only when no server can serve.

Weight updates (:meth:`SGLangEngine.update_weights`) are bracketed by ``/pause_generation``
(mode ``abort``) and ``/continue_generation`` on every server; requests aborted by that pause
are re-sent after the update, so every completion comes from a single weight version.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import torch

from ophsd.rollout import protocol as P
from ophsd.rollout.base import Completion, Engine, EngineError, InvalidRequestError, Messages, SamplingParams
from ophsd.rollout.launcher import SGLANG_MISSING, ServerLauncher, sglang_available
from ophsd.rollout.server_pool import RetryPolicy, Server, ServerPool, TransientError
from ophsd.rollout.weight_sync import DEFAULT_BUCKET_BYTES
from ophsd.rollout.weight_updaters import WeightUpdater, make_updater
from ophsd.runtime.distributed import free_port

__all__ = ["SGLangEngine", "ServerLauncher", "ServerPool", "RetryPolicy", "SGLANG_MISSING", "free_port",
           "sglang_available"]

log = logging.getLogger(__name__)


class SGLangEngine(Engine):
    """Client for SGLang servers (or the embedded server). See the module docstring.

    Args:
        urls: worker server URLs (``http://host:port``). Weight updates and control calls go to
            each of them.
        router_url: an ``sglang-router`` in front of the workers; generation goes through it.
        tokenizer: tokenizer (object, model name or path) for :meth:`apply_chat_template`;
            default: the ``model_path`` reported by the first server.
        request_timeout: seconds one ``/generate`` may take before it counts as failed.
        max_retries: further attempts after a transient failure (each on another server).
        backoff_s: first retry delay (doubles per attempt, at most ``max_backoff_s``).
        max_concurrency: parallel HTTP requests.
        weight_sync: how :meth:`update_weights` sends tensors: ``"disk"`` (shards in a temp dir
            + one ``/update_weights_from_disk`` per server, atomic on the embedded server),
            ``"tensor"`` (one ``/update_weights_from_tensor`` per bucket: colocated SGLang, or the
            embedded server), or a :class:`~ophsd.rollout.weight_updaters.WeightUpdater`.
        bucket_bytes: the most bytes of tensors per shard / per tensor call.
        weights_dir: where ``weight_sync="disk"`` writes shards; must be visible to the servers at
            the same path (same machine or shared filesystem). Default: system temp dir.
        pause_mode: the ``/pause_generation`` mode around a weight update.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        router_url: str | None = None,
        tokenizer=None,
        request_timeout: float = 600.0,
        control_timeout: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        max_concurrency: int = 64,
        dead_cooldown_s: float = 15.0,
        weight_sync: "str | WeightUpdater" = "disk",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        weights_dir: str | None = None,
        pause_mode: str = "abort",
        launcher: ServerLauncher | None = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.weight_updater = make_updater(weight_sync, bucket_bytes=bucket_bytes, weights_dir=weights_dir)
        self.pool = ServerPool(urls, router_url=router_url, control_timeout=control_timeout,
                               dead_cooldown_s=dead_cooldown_s, max_idle=max_concurrency,
                               retry=RetryPolicy(max_retries, backoff_s, max_backoff_s))
        self.request_timeout = request_timeout
        self.pause_mode = pause_mode
        self._launcher = launcher
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ophsd-sglang")
        self._no_update = threading.Event()  # cleared while a weight update runs
        self._no_update.set()
        self._update_lock = threading.Lock()
        self._epoch = 0  # weight updates started so far
        self._closed = False
        self._tokenizer = tokenizer
        self.pool.connect()

    @classmethod
    def launch(cls, model_path: str, *, backend: str = "sglang", num_servers: int = 1, tp: int = 1,
               mem_fraction: float = 0.8, router: bool = False, extra_args: Sequence[str] = (),
               startup_timeout: float | None = None, **kwargs) -> "SGLangEngine":
        """Start servers (``backend="sglang"`` or ``"embedded"``) and connect; ``close()`` stops them."""
        launcher = ServerLauncher(model_path, backend=backend, num_servers=num_servers, tp=tp,
                                  mem_fraction=mem_fraction, router=router, extra_args=extra_args,
                                  startup_timeout=startup_timeout)
        launcher.start()
        try:
            return cls(launcher.worker_urls, router_url=launcher.router_url, launcher=launcher, **kwargs)
        except BaseException:
            launcher.shutdown()
            raise

    @property
    def servers(self) -> list[Server]:
        return self.pool.servers

    @property
    def router_url(self) -> str | None:
        return self.pool.router_url

    # ------------------------------------------------------------------ Engine API
    @property
    def weight_version(self) -> int:
        return self.pool.version

    @property
    def tokenizer(self):
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            from ophsd.models.hub import load_tokenizer, resolve_model

            name = self._tokenizer or next((s.info.get("tokenizer_path") or s.info.get("model_path")
                                            for s in self.servers if s.info), None)
            if not name:
                raise EngineError("no tokenizer: pass tokenizer= to SGLangEngine (servers report no model_path)")
            self._tokenizer = load_tokenizer(resolve_model(name))
        return self._tokenizer

    def apply_chat_template(self, messages: Messages) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("the tokenizer has no chat template: pass prompt token ids instead")
        ids = tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[list[Completion]]:
        return self._run([(p, sampling) for p in prompts])

    def generate_many(self, requests) -> list[list[Completion]]:
        """One ``/generate`` request per prompt with its own ``sampling_params`` (``sampling_seed``...)."""
        return self._run(requests)

    def _run(self, requests) -> list[list[Completion]]:
        if self._closed:
            raise EngineError("engine is closed")
        try:
            checked = [([int(t) for t in p], sp) for p, sp in requests]
        except (TypeError, ValueError):
            raise InvalidRequestError("prompts must be sequences of integer token ids") from None
        if any(not p for p, _ in checked):
            raise InvalidRequestError("empty prompt: give at least one token id")
        futs = [self._executor.submit(self._generate_one, p, sp) for p, sp in checked]
        return [f.result() for f in futs]

    def _generate_one(self, prompt: list[int], sp: SamplingParams) -> list[Completion]:
        pool = self.pool
        body = P.generate_request(prompt, sp)
        errors: list[str] = []
        tried: set[str] = set()
        attempt = 0
        resends = 0
        while True:
            self._no_update.wait()
            epoch = self._epoch
            target_url, server = pool.target(tried)
            if target_url is None:
                detail = "; ".join(errors[-4:]) or pool.why_unavailable()
                raise EngineError(f"no SGLang server could serve the request after {attempt} attempts: {detail}")
            try:
                _, out = pool.request(target_url, "/generate", body, timeout=self.request_timeout)
            except TransientError as e:
                errors.append(str(e))
                if server is not None:
                    pool.record_failure(server, e)
                    tried.add(server.url)
                attempt += 1
                if attempt > pool.retry.max_retries:
                    raise EngineError(f"request failed after {attempt} attempts: " + "; ".join(errors[-4:])) from None
                time.sleep(pool.retry.delay(attempt))
                if len(tried) >= len(pool.servers):
                    tried.clear()  # every server failed once: allow revisits after backoff
                continue
            if server is not None:
                pool.record_success(server)
            outs = out if isinstance(out, list) else [out]
            try:
                comps = [P.completion_from_sglang(o, prompt) for o in outs]
            except ValueError as e:
                raise EngineError(f"{target_url}/generate answered an unexpected shape: {e}") from None
            if len(comps) != sp.n:
                raise EngineError(f"{target_url}/generate returned {len(comps)} completions for n={sp.n}")
            if any(c.finish_reason == "abort" for c in comps) and (self._epoch != epoch or not self._no_update.is_set()):
                resends += 1  # aborted by our own weight-update pause: run again on the new weights
                if resends > 3:
                    raise EngineError("request kept being aborted by weight updates")
                continue
            stale = [c.weight_version for c in comps if c.weight_version != pool.version]
            if stale and self._epoch == epoch:
                msg = f"{target_url} answered with weight_version {stale[0]}, expected {pool.version}"
                errors.append(msg)
                if server is not None:
                    pool.mark_stale(server)
                    tried.add(server.url)
                log.warning("stale result detected: %s; server out of rotation", msg)
                if server is None:  # behind a router: cannot pick another worker ourselves
                    raise EngineError(msg + " (behind the router; update or restart that worker)")
                continue
            elif stale:
                continue  # an update finished while we waited: run again
            return comps

    # ------------------------------------------------------------------ control plane
    def pause_generation(self, mode: str = "abort"):
        self.pool.call_every("/pause_generation", {"mode": mode})

    def continue_generation(self):
        res = self.pool.call_all("/continue_generation", {})
        for u, r in res.items():
            if isinstance(r, Exception):
                log.warning("continue_generation failed on %s: %s", u, r)

    def flush_cache(self):
        return self.pool.call_all("/flush_cache", {})

    def abort(self, rid: str | None = None, abort_all: bool = False):
        return self.pool.call_all("/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push HF-named full tensors as ``version`` to every live server with the engine's
        ``weight_sync`` method, between ``/pause_generation`` and ``/continue_generation``.

        Servers that fail are taken out of rotation (stale); :class:`EngineError` when none
        succeeded -- then ``weight_version`` keeps its old value.
        """
        version = int(version)
        with self._update_lock:
            self._no_update.clear()
            self._epoch += 1
            try:
                targets = [s for s in self.servers if s.alive]
                if not targets:
                    raise EngineError("no live server to update")
                try:
                    self.pause_generation(self.pause_mode)
                    ok, errors = self.weight_updater.push(self.pool, named_tensors, version, targets)
                finally:
                    self.continue_generation()
                succeeded = [s for s in targets if ok.get(s.url)]
                if not succeeded:
                    raise EngineError(f"weight update v{version} failed on every server (they keep version "
                                      f"{self.pool.version}): " + "; ".join(f"{u}: {m}" for u, m in errors.items()))
                self.pool.set_version(version, succeeded)
                if errors:
                    log.warning("weight update v%d failed on %s: out of rotation until updated", version,
                                sorted(errors))
            finally:
                self._no_update.set()

    def release_memory(self) -> None:
        self.pool.call_every("/release_memory_occupation", {})

    def resume_memory(self) -> None:
        self.pool.call_every("/resume_memory_occupation", {})

    def health(self) -> bool:
        return self.pool.health()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
        if self._launcher is not None:
            self._launcher.shutdown()
