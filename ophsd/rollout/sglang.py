"""Engine over SGLang's native HTTP API: one or many servers, optionally behind sglang-router.

:class:`SGLangEngine` implements :class:`~ophsd.rollout.base.Engine` over HTTP (standard
library only). It talks to real SGLang servers (:class:`ServerLauncher` starts them) and to
the embedded server (``python -m ophsd.rollout.serve``), which is how CI runs this code.

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

import atexit
import importlib.util
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ophsd.rollout import protocol as P
from ophsd.rollout.base import Completion, Engine, EngineError, InvalidRequestError, Messages, SamplingParams
from ophsd.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    EMBEDDED_TENSOR_FORMAT,
    iter_buckets,
    serialize_for_embedded,
    serialize_for_sglang,
    write_bucket_shards,
)

log = logging.getLogger(__name__)

SGLANG_MISSING = (
    "SGLang is not installed (it needs CUDA GPUs): install it on a GPU machine with `pip install \"sglang[all]\"`, "
    "or use the embedded engine (--rollout-engine embedded), optionally served with `python -m ophsd.rollout.serve`"
)


class _Transient(Exception):
    """Connection error, timeout or 5xx: worth retrying elsewhere."""

    def __init__(self, msg: str, dead: bool):
        super().__init__(msg)
        self.dead = dead


@dataclass(eq=False)
class _Server:
    url: str
    alive: bool = True
    stale: bool = False
    failures: int = 0
    dead_since: float = 0.0
    last_error: str = ""
    version: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.alive and not self.stale


def _http(url: str, path: str, body=None, timeout: float = 60.0, method: str | None = None):
    """One HTTP call -> (status, parsed JSON or text). Raises _Transient / InvalidRequestError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method or ("GET" if body is None else "POST"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Transient(f"{url}{path}: {type(reason).__name__}: {reason}", dead=True) from None
    try:
        payload = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = raw.decode(errors="replace")
    if status >= 500:
        raise _Transient(f"{url}{path}: HTTP {status}: {_message(payload)}", dead=False)
    if status >= 400:
        raise InvalidRequestError(f"{url}{path}: HTTP {status}: {_message(payload)}")
    return status, payload


def _message(payload) -> str:
    if isinstance(payload, dict):
        return str(payload.get("message") or payload.get("error") or payload.get("detail") or payload)[:2000]
    return str(payload)[:2000]


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
        weights_dir: where ``method="disk"`` writes shards; must be visible to the servers at
            the same path (same machine or shared filesystem). Default: system temp dir.
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
        weights_dir: str | None = None,
        launcher: "ServerLauncher | None" = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.servers = [_Server(u.rstrip("/")) for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.request_timeout = request_timeout
        self.control_timeout = control_timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.dead_cooldown_s = dead_cooldown_s
        self.weights_dir = weights_dir
        self._launcher = launcher
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ophsd-sglang")
        self._no_update = threading.Event()
        self._no_update.set()
        self._update_lock = threading.Lock()
        self._epoch = 0
        self._closed = False
        self._tokenizer = tokenizer
        self._version = 0
        self._connect()

    # ------------------------------------------------------------------ construction helpers
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

    def _connect(self):
        errors = []
        for s in self.servers:
            try:
                _, info = _http(s.url, "/get_model_info", timeout=self.control_timeout)
                s.info = info if isinstance(info, dict) else {}
                s.version = self._server_version(s)
            except (_Transient, InvalidRequestError) as e:
                self._mark_dead(s, str(e))
                errors.append(str(e))
        live = [s for s in self.servers if s.alive]
        if not live:
            raise EngineError("no SGLang server answers: " + "; ".join(errors))
        versions = {s.version for s in live}
        self._version = max((v for v in versions if v is not None), default=0)
        for s in live:
            if (s.version or 0) != self._version:
                s.stale = True
                log.warning("server %s has weight_version %s, others %s: out of rotation until updated",
                            s.url, s.version, self._version)

    def _server_version(self, s: _Server) -> int | None:
        try:
            _, body = _http(s.url, "/get_weight_version", timeout=self.control_timeout)
            return P.parse_weight_version((body or {}).get("weight_version"))
        except InvalidRequestError:  # older SGLang without the route: fall back to model info
            return P.parse_weight_version(s.info.get("weight_version"))

    @property
    def is_embedded_backend(self) -> bool:
        return all(s.info.get("engine") == "ophsd-embedded" for s in self.servers if s.info)

    # ------------------------------------------------------------------ Engine API
    @property
    def weight_version(self) -> int:
        return self._version

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
        if self._closed:
            raise EngineError("engine is closed")
        try:
            checked = [[int(t) for t in p] for p in prompts]
        except (TypeError, ValueError):
            raise InvalidRequestError("prompts must be sequences of integer token ids") from None
        if any(not p for p in checked):
            raise InvalidRequestError("empty prompt: give at least one token id")
        futs = [self._pool.submit(self._generate_one, p, sampling) for p in checked]
        return [f.result() for f in futs]

    def generate_many(self, requests) -> list[list[Completion]]:
        """One ``/generate`` request per prompt with its own ``sampling_params`` (``sampling_seed``...)."""
        if self._closed:
            raise EngineError("engine is closed")
        try:
            checked = [([int(t) for t in p], sp) for p, sp in requests]
        except (TypeError, ValueError):
            raise InvalidRequestError("prompts must be sequences of integer token ids") from None
        if any(not p for p, _ in checked):
            raise InvalidRequestError("empty prompt: give at least one token id")
        futs = [self._pool.submit(self._generate_one, p, sp) for p, sp in checked]
        return [f.result() for f in futs]

    def _pick(self, exclude: set) -> _Server | None:
        with self._lock:
            now = time.monotonic()
            order = list(self.servers)
            k = next(self._rr) % len(order)
            order = order[k:] + order[:k]
            for s in order:
                if s.usable and s.url not in exclude:
                    return s
            for s in order:  # re-probe dead servers after their cooldown
                if not s.alive and now - s.dead_since >= self.dead_cooldown_s and s.url not in exclude:
                    s.dead_since = now
                    probe = s
                    break
            else:
                return None
        return probe if self._revive(probe) else None

    def _revive(self, s: _Server) -> bool:
        try:
            status, _ = _http(s.url, "/health_generate", timeout=30)
            version = self._server_version(s)
        except (_Transient, InvalidRequestError):
            return False
        with self._lock:
            s.alive, s.failures = True, 0
            s.version = version
            s.stale = (version or 0) != self._version
        log.info("server %s is back (weight_version %s%s)", s.url, version, ", stale" if s.stale else "")
        return s.usable

    def _mark_dead(self, s: _Server, why: str):
        with self._lock:
            s.alive, s.dead_since, s.last_error = False, time.monotonic(), why
        log.warning("server %s out of rotation: %s", s.url, why)

    def _generate_one(self, prompt: list[int], sp: SamplingParams) -> list[Completion]:
        body = P.generate_request(prompt, sp)
        errors: list[str] = []
        tried: set[str] = set()
        attempt = 0
        resends = 0
        while True:
            self._no_update.wait()
            epoch = self._epoch
            target_url, server = self._target(tried)
            if target_url is None:
                detail = "; ".join(errors[-4:]) or "; ".join(
                    f"{s.url}: {'stale weights' if s.stale else s.last_error or 'down'}" for s in self.servers)
                raise EngineError(f"no SGLang server could serve the request after {attempt} attempts: {detail}")
            try:
                _, out = _http(target_url, "/generate", body, timeout=self.request_timeout)
            except _Transient as e:
                errors.append(str(e))
                if server is not None:
                    with self._lock:
                        server.failures += 1
                        server.last_error = str(e)
                    if e.dead or server.failures >= 2:
                        self._mark_dead(server, str(e))
                    tried.add(server.url)
                attempt += 1
                if attempt > self.max_retries:
                    raise EngineError(f"request failed after {attempt} attempts: " + "; ".join(errors[-4:])) from None
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
                if len(tried) >= len(self.servers):
                    tried.clear()  # every server failed once: allow revisits after backoff
                continue
            if server is not None:
                with self._lock:
                    server.failures = 0
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
            stale = [c.weight_version for c in comps if c.weight_version != self._version]
            if stale and self._epoch == epoch:
                msg = f"{target_url} answered with weight_version {stale[0]}, expected {self._version}"
                errors.append(msg)
                with self._lock:
                    if server is not None:
                        server.stale = True
                        tried.add(server.url)
                log.warning("stale result detected: %s; server out of rotation", msg)
                if server is None:  # behind a router: cannot pick another worker ourselves
                    raise EngineError(msg + " (behind the router; update or restart that worker)")
                continue
            elif stale:
                continue  # an update finished while we waited: run again
            return comps

    def _target(self, tried: set) -> tuple[str | None, _Server | None]:
        if self.router_url:
            return self.router_url, None
        s = self._pick(tried)
        return (s.url, s) if s else (None, None)

    # ------------------------------------------------------------------ control plane
    def _all(self, path: str, body=None, servers=None, timeout=None) -> dict:
        """POST/GET to every live worker in parallel -> {url: payload or exception}."""
        servers = [s for s in (servers or self.servers) if s.alive]

        def call(s):
            try:
                return _http(s.url, path, body, timeout=timeout or self.control_timeout,
                             method="POST" if body is not None else "GET")[1]
            except Exception as e:  # noqa: BLE001 - reported per server
                return e

        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as ex:
            return dict(zip([s.url for s in servers], ex.map(call, servers)))

    def pause_generation(self, mode: str = "abort"):
        res = self._all("/pause_generation", {"mode": mode})
        bad = {u: r for u, r in res.items() if isinstance(r, Exception)}
        if bad:
            raise EngineError(f"pause_generation failed on {sorted(bad)}: {list(bad.values())[0]}")

    def continue_generation(self):
        res = self._all("/continue_generation", {})
        for u, r in res.items():
            if isinstance(r, Exception):
                log.warning("continue_generation failed on %s: %s", u, r)

    def flush_cache(self):
        return self._all("/flush_cache", {})

    def abort(self, rid: str | None = None, abort_all: bool = False):
        return self._all("/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, method: str = "disk",
                       pause_mode: str = "abort") -> None:
        """Push HF-named full tensors as ``version`` to every live server.

        ``method="disk"``: shards (one per bucket) in a temp dir + one ``/update_weights_from_disk``
        per server (atomic on the embedded server). ``method="tensor"``: one
        ``/update_weights_from_tensor`` per bucket (colocated SGLang, or the embedded server).
        Servers that fail are taken out of rotation (stale); :class:`EngineError` when none
        succeeded -- then ``weight_version`` keeps its old value.
        """
        if method not in ("disk", "tensor"):
            raise ValueError("method must be 'disk' or 'tensor'")
        version = int(version)
        with self._update_lock:
            self._no_update.clear()
            self._epoch += 1
            tmp = None
            try:
                targets = [s for s in self.servers if s.alive]
                if not targets:
                    raise EngineError("no live server to update")
                try:
                    self.pause_generation(pause_mode)
                    if method == "disk":
                        tmp = tempfile.mkdtemp(prefix=f"ophsd-weights-v{version}-", dir=self.weights_dir)
                        ok, errors = self._push_disk(named_tensors, version, bucket_bytes, targets, tmp)
                    else:
                        ok, errors = self._push_tensor(named_tensors, version, bucket_bytes, targets)
                finally:
                    self.continue_generation()
                succeeded = [s for s in targets if ok.get(s.url)]
                if not succeeded:
                    raise EngineError(f"weight update v{version} failed on every server (they keep version "
                                      f"{self._version}): " + "; ".join(f"{u}: {m}" for u, m in errors.items()))
                with self._lock:
                    self._version = version
                    for s in self.servers:
                        if s in succeeded:
                            s.version, s.stale = version, False
                        elif s.version != version:
                            s.stale = True
                if errors:
                    log.warning("weight update v%d failed on %s: out of rotation until updated", version,
                                sorted(errors))
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
                self._no_update.set()

    def _push_disk(self, named_tensors, version, bucket_bytes, targets, tmp):
        try:
            write_bucket_shards(named_tensors, tmp, bucket_bytes)
        except Exception as e:
            raise EngineError(f"weight update v{version} failed while writing shards ({type(e).__name__}: {e}); "
                              f"servers keep version {self._version}") from e
        body = P.update_weights_from_disk_request(tmp, version)
        ok, errors = {}, {}
        for url, r in self._all("/update_weights_from_disk", body, targets).items():
            ok[url] = not isinstance(r, Exception) and bool((r or {}).get("success", True))
            if not ok[url]:
                errors[url] = str(r)
        return ok, errors

    def _push_tensor(self, named_tensors, version, bucket_bytes, targets):
        ok, errors = {s.url: True for s in targets}, {}
        try:
            buckets = iter_buckets(named_tensors, bucket_bytes)
            cur = next(buckets, None)
            if cur is None:
                raise EngineError("empty weight stream: nothing to push")
            while cur is not None:
                nxt = next(buckets, None)  # look ahead: the version goes with the last bucket
                live = [s for s in targets if ok[s.url]]
                if not live:
                    break
                if all(s.info.get("engine") == "ophsd-embedded" for s in live):
                    payload, fmt = [serialize_for_embedded(cur)], EMBEDDED_TENSOR_FORMAT
                else:
                    payload, fmt = serialize_for_sglang(cur, int(live[0].info.get("tp_size", 1))), None
                body = P.update_weights_from_tensor_request(payload, version if nxt is None else None, load_format=fmt)
                for url, r in self._all("/update_weights_from_tensor", body, live).items():
                    if isinstance(r, Exception) or not (r or {}).get("success", True):
                        ok[url] = False
                        errors[url] = str(r)
                cur = nxt
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"weight update v{version} failed while reading tensors ({type(e).__name__}: {e}); "
                              "servers may hold a partial update and keep their old weight_version") from e
        return ok, errors

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> dict:
        """SGLang's disaggregated path, step 1: every server joins an NCCL group with the trainer
        (rank 0 is the trainer; server ``i`` takes ranks from ``rank_offset``). Real SGLang only."""
        body = P.init_weights_update_group_request(master_address, master_port, rank_offset, world_size,
                                                   group_name, backend)
        return self._all("/init_weights_update_group", body)

    def update_weights_from_distributed(self, buckets_meta: Iterable[tuple[list[str], list[str], list[list[int]]]],
                                        version: int, broadcast_bucket, group_name: str = "weight_update_group"):
        """SGLang's disaggregated path, step 2, per bucket: post the names/dtypes/shapes to every
        server (they block receiving) while ``broadcast_bucket(i)`` broadcasts the tensors from
        the trainer over the NCCL group; the version is set with the last bucket."""
        self._no_update.clear()
        self._epoch += 1
        try:
            self.pause_generation()
            metas = list(buckets_meta)
            for i, (names, dtypes, shapes) in enumerate(metas):
                body = P.update_weights_from_distributed_request(
                    names, dtypes, shapes, version if i == len(metas) - 1 else None, group_name)
                with ThreadPoolExecutor(max_workers=1) as ex:
                    fut = ex.submit(self._all, "/update_weights_from_distributed", body)
                    broadcast_bucket(i)
                    res = fut.result()
                bad = {u: r for u, r in res.items() if isinstance(r, Exception)}
                if bad:
                    raise EngineError(f"update_weights_from_distributed failed on {sorted(bad)}: {list(bad.values())[0]}")
            with self._lock:
                self._version = int(version)
                for s in self.servers:
                    if s.alive:
                        s.version, s.stale = int(version), False
        finally:
            self.continue_generation()
            self._no_update.set()

    def release_memory(self) -> None:
        res = self._all("/release_memory_occupation", {})
        bad = [u for u, r in res.items() if isinstance(r, Exception)]
        if bad:
            raise EngineError(f"release_memory_occupation failed on {bad}")

    def resume_memory(self) -> None:
        res = self._all("/resume_memory_occupation", {})
        bad = [u for u, r in res.items() if isinstance(r, Exception)]
        if bad:
            raise EngineError(f"resume_memory_occupation failed on {bad}")

    def health(self) -> bool:
        urls = [self.router_url] if self.router_url else [s.url for s in self.servers if s.alive]
        for u in urls:
            try:
                _http(u, "/health_generate", timeout=30)
                return True
            except (_Transient, InvalidRequestError):
                continue
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._launcher is not None:
            self._launcher.shutdown()


# ---------------------------------------------------------------------- launcher

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


class ServerLauncher:
    """Start generation servers for a model directory and stop them with the trainer.

    ``backend="sglang"``: ``python -m sglang.launch_server --model-path M --tp-size T
    --mem-fraction-static F --base-gpu-id i*T`` per server (+ ``sglang_router.launch_router``
    in front when ``router=True``). ``backend="embedded"``: ``python -m ophsd.rollout.serve``
    (same HTTP API; CPU). Logs go to ``log_dir``; the first health wait is long
    (``startup_timeout``, default 900 s for SGLang: weights load + CUDA-graph capture) and fails
    early, with the log tail, when a server process exits.
    """

    def __init__(self, model_path: str, *, backend: str = "sglang", num_servers: int = 1, tp: int = 1,
                 mem_fraction: float = 0.8, host: str = "127.0.0.1", ports: Sequence[int] | None = None,
                 router: bool = False, router_port: int | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float | None = None, log_dir: str | None = None, env: dict | None = None,
                 python: str = sys.executable):
        if backend not in ("sglang", "embedded"):
            raise ValueError("backend must be 'sglang' or 'embedded'")
        if backend == "sglang" and not sglang_available():
            raise EngineError(SGLANG_MISSING)
        if router and importlib.util.find_spec("sglang_router") is None:
            raise EngineError("sglang-router is not installed (`pip install sglang-router`); "
                              "or pass several URLs to SGLangEngine without a router")
        if num_servers < 1 or tp < 1 or not 0 < mem_fraction <= 1:
            raise ValueError("num_servers and tp must be >= 1 and mem_fraction in (0, 1]")
        self.model_path, self.backend, self.num_servers, self.tp = str(model_path), backend, num_servers, tp
        self.mem_fraction, self.host, self.router = mem_fraction, host, router
        self.ports = list(ports) if ports else [free_port(host) for _ in range(num_servers)]
        if len(self.ports) != num_servers:
            raise ValueError("give one port per server")
        self.router_port = router_port or (free_port(host) if router else None)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout or (900.0 if backend == "sglang" else 300.0)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="ophsd-servers-")
        self.env = {**os.environ, **(env or {})}
        self.python = python
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        self._atexit = False

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    @property
    def router_url(self) -> str | None:
        return f"http://{self.host}:{self.router_port}" if self.router else None

    def server_command(self, i: int) -> list[str]:
        port = str(self.ports[i])
        if self.backend == "embedded":
            return [self.python, "-m", "ophsd.rollout.serve", "--model", self.model_path, "--host", self.host,
                    "--port", port, *self.extra_args]
        return [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--tp-size", str(self.tp), "--mem-fraction-static", str(self.mem_fraction),
                "--base-gpu-id", str(i * self.tp), "--host", self.host, "--port", port, *self.extra_args]

    def router_command(self) -> list[str]:
        return [self.python, "-m", "sglang_router.launch_router", "--worker-urls", *self.worker_urls,
                "--host", self.host, "--port", str(self.router_port)]

    def _spawn(self, name: str, cmd: list[str]):
        path = os.path.join(self.log_dir, f"{name}.log")
        logf = open(path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        logf.close()
        self.procs.append((name, proc, path))
        log.info("started %s (pid %d): %s; log %s", name, proc.pid, " ".join(cmd), path)

    def start(self) -> "ServerLauncher":
        if not self._atexit:
            atexit.register(self.shutdown)
            self._atexit = True
        try:
            for i in range(self.num_servers):
                self._spawn(f"server{i}", self.server_command(i))
            self.wait_healthy(self.worker_urls, self.procs[: self.num_servers])
            if self.router:
                self._spawn("router", self.router_command())
                self.wait_healthy([self.router_url], self.procs[-1:], path="/health")
        except BaseException:
            self.shutdown()
            raise
        return self

    @staticmethod
    def _tail(path: str, n: int = 3000) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_healthy(self, urls, procs, path: str = "/health_generate"):
        deadline = time.monotonic() + self.startup_timeout
        pending = dict(zip(urls, procs))
        delay = 0.5
        while pending:
            for url, (name, proc, logp) in list(pending.items()):
                if proc.poll() is not None:
                    raise EngineError(f"{name} exited with code {proc.returncode} before becoming healthy "
                                      f"({' '.join(proc.args)}); last log lines:\n{self._tail(logp)}")
                try:
                    _http(url, path, timeout=10)
                    del pending[url]
                except (_Transient, InvalidRequestError):
                    pass
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(v[0] for v in pending.values())
                raise EngineError(f"{names} not healthy after {self.startup_timeout:.0f}s; logs in {self.log_dir}")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def shutdown(self, timeout: float = 30.0):
        procs, self.procs = self.procs, []
        for name, proc, _ in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        end = time.monotonic() + timeout
        for name, proc, _ in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait(timeout=10)
