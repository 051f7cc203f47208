"""The SGLang native HTTP API subset that ophsd speaks, as JSON shapes (both directions).

Target: **SGLang 0.5.3** (the 0.5.x line; ``weight_version`` in responses and weight-update
requests, ``/get_weight_version`` and ``/update_weight_version`` exist since then). Shapes taken
from SGLang's source:

* ``python/sglang/srt/entrypoints/http_server.py`` -- routes, status codes, response bodies
  (``/generate``, ``/health_generate``, ``/get_model_info``, ``/get_weight_version``,
  ``/flush_cache``, ``/abort_request``, ``/update_weights_from_disk``,
  ``/update_weights_from_tensor``, ``/init_weights_update_group``,
  ``/update_weights_from_distributed``, ``/update_weight_version``, ``/pause_generation``,
  ``/continue_generation``, ``/release_memory_occupation``, ``/resume_memory_occupation``).
* ``python/sglang/srt/managers/io_struct.py`` -- request dataclasses (``GenerateReqInput``,
  ``UpdateWeightFromDiskReqInput``, ``UpdateWeightsFromTensorReqInput``,
  ``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``, ``AbortReq``,
  ``UpdateWeightVersionReqInput``, ``PauseGenerationReqInput``).
* ``python/sglang/srt/sampling/sampling_params.py`` -- the ``sampling_params`` keys.
* ``python/sglang/srt/managers/tokenizer_manager.py`` -- the ``/generate`` output
  (``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
  "completion_tokens", "cached_tokens", "weight_version", "e2e_latency",
  "output_token_logprobs": [[logprob, token_id, text|null], ...]}}``).
* ``python/sglang/srt/managers/schedule_batch.py`` -- ``finish_reason`` JSON:
  ``{"type": "stop", "matched": id|str}``, ``{"type": "length", "length": n}``,
  ``{"type": "abort", "message": str}``.

SGLang's ``weight_version`` is a string (``"default"`` at start); ophsd versions are ints
sent as their decimal string. Everything here is pure data handling (no HTTP), shared by the
embedded server (:mod:`ophsd.rollout.serve`) and the client (:mod:`ophsd.rollout.sglang`); the
server's request bodies are the pydantic models of :mod:`ophsd.rollout.io_struct`.
"""
from __future__ import annotations

import math
from typing import Any

from ophsd.rollout.base import Completion, InvalidRequestError, SamplingParams

SGLANG_TARGET_VERSION = "0.5.3"

# sampling_params keys (SamplingParams of SGLang) -> accepted values when not implemented.
SAMPLING_SUPPORTED = {
    "max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "n",
    "ignore_eos", "sampling_seed", "seed",
}
SAMPLING_DEFAULT_ONLY = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
    "custom_params": None, "stream_interval": None, "logit_bias": None, "stop_regex": None,
}
TOP_K_ALL = 1 << 30  # SGLang's "whole vocabulary" top_k
SEED_LIMIT = 1 << 63  # sample j of a request is seeded with seed + j: torch generators take 64 bits


def _num(d, key, kind, default):
    v = d.get(key, default)
    if v is None:
        return default
    # JSON gives floats for 1e400 (inf) and NaN: not an integer, and never a usable number
    finite = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))
    if kind is int:
        if isinstance(v, bool) or not finite or int(v) != v:
            raise InvalidRequestError(f"sampling_params.{key} must be an integer, got {v!r}")
        return int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequestError(f"sampling_params.{key} must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int beyond float range
        raise InvalidRequestError(f"sampling_params.{key} is out of range, got {v!r}") from None


def sampling_from_sglang(d: Any, return_logprob: bool = False) -> SamplingParams:
    """SGLang ``sampling_params`` dict -> :class:`SamplingParams` (400-worthy errors raised)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InvalidRequestError(f"sampling_params must be an object, got {type(d).__name__}")
    for k, v in d.items():
        if k in SAMPLING_DEFAULT_ONLY:
            if v is not None and v != SAMPLING_DEFAULT_ONLY[k]:
                raise InvalidRequestError(
                    f"sampling_params.{k}={v!r} is not implemented by the embedded server "
                    f"(only the default {SAMPLING_DEFAULT_ONLY[k]!r})"
                )
        elif k not in SAMPLING_SUPPORTED:
            raise InvalidRequestError(
                f"unknown sampling_params key {k!r}; known: {', '.join(sorted(SAMPLING_SUPPORTED | set(SAMPLING_DEFAULT_ONLY)))}"
            )
    top_k = _num(d, "top_k", int, -1)
    if top_k >= TOP_K_ALL:
        top_k = -1
    stop = d.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("sampling_params.stop must be a string or a list of strings")
    stop_ids = d.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise InvalidRequestError("sampling_params.stop_token_ids must be a list of integers")
    seed = d.get("sampling_seed", d.get("seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise InvalidRequestError(f"sampling_params.sampling_seed must be an integer in [0, 2**63), got {seed!r}")
    ignore_eos = d.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequestError("sampling_params.ignore_eos must be true or false")
    try:
        return SamplingParams(
            temperature=_num(d, "temperature", float, 1.0), top_p=_num(d, "top_p", float, 1.0),
            top_k=top_k, max_new_tokens=_num(d, "max_new_tokens", int, 128), stop=tuple(stop),
            stop_token_ids=tuple(stop_ids), seed=seed, n=_num(d, "n", int, 1),
            return_logprob=bool(return_logprob), ignore_eos=ignore_eos,
        )
    except ValueError as e:
        raise InvalidRequestError(f"sampling_params: {e}") from None


def sampling_to_sglang(sp: SamplingParams) -> dict:
    """:class:`SamplingParams` -> SGLang ``sampling_params`` (only non-default keys beyond the basics)."""
    d: dict[str, Any] = {
        "temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
        "max_new_tokens": sp.max_new_tokens,
    }
    if sp.stop:
        d["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        d["sampling_seed"] = sp.seed
    if sp.n != 1:
        d["n"] = sp.n
    if sp.ignore_eos:
        d["ignore_eos"] = True
    return d


def generate_request(prompt_ids: list[int], sp: SamplingParams, rid: str | None = None) -> dict:
    """A ``POST /generate`` body for one prompt (``n`` samples via ``sampling_params.n``)."""
    body: dict[str, Any] = {"input_ids": list(prompt_ids), "sampling_params": sampling_to_sglang(sp)}
    if sp.return_logprob:
        body["return_logprob"] = True
    if rid is not None:
        body["rid"] = rid
    return body


def parse_weight_version(v) -> int | None:
    """SGLang's string weight_version -> int (``"default"`` / missing -> ``None``)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        return int(str(v))
    except ValueError:
        return None


def completion_to_sglang(c: Completion, return_logprob: bool, token_texts=None) -> dict:
    """One :class:`Completion` -> SGLang's non-streaming ``/generate`` output object."""
    meta = {
        "id": c.meta.get("rid"),
        "finish_reason": c.meta.get("finish_reason") or {"type": c.finish_reason},
        "prompt_tokens": len(c.prompt_ids),
        "completion_tokens": len(c.output_ids),
        "cached_tokens": 0,
        "weight_version": str(c.weight_version),
        "e2e_latency": c.meta.get("e2e_latency", 0.0),
    }
    if return_logprob:
        texts = token_texts if token_texts is not None else [None] * len(c.output_ids)
        meta["output_token_logprobs"] = [
            [lp, t, s] for lp, t, s in zip(c.logprobs or [], c.output_ids, texts)
        ]
        meta["input_token_logprobs"] = []
    return {"text": c.text, "output_ids": list(c.output_ids), "meta_info": meta}


def completion_from_sglang(d: dict, prompt_ids: list[int]) -> Completion:
    """SGLang ``/generate`` output object -> :class:`Completion` (raises ValueError if malformed)."""
    if not isinstance(d, dict) or "meta_info" not in d:
        raise ValueError(f"not an SGLang generate output: {str(d)[:200]}")
    meta = d["meta_info"]
    fr = meta.get("finish_reason") or {}
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    if kind not in ("stop", "length", "abort"):
        kind = "abort" if kind in (None, "error") else kind
    lps = meta.get("output_token_logprobs")
    output_ids = d.get("output_ids")
    if output_ids is None and lps is not None:
        output_ids = [int(x[1]) for x in lps]
    if output_ids is None:
        raise ValueError("SGLang output without output_ids (launch the server without --skip-tokenizer-init "
                         "restrictions or request return_logprob)")
    version = parse_weight_version(meta.get("weight_version"))
    return Completion(
        prompt_ids=list(prompt_ids), output_ids=[int(t) for t in output_ids], text=d.get("text", ""),
        finish_reason=kind, weight_version=version if version is not None else 0,
        logprobs=[float(x[0]) for x in lps] if lps is not None else None,
        meta={"rid": meta.get("id"), "finish_reason": fr, "prompt_tokens": meta.get("prompt_tokens"),
              "completion_tokens": meta.get("completion_tokens"), "e2e_latency": meta.get("e2e_latency"),
              "weight_version_raw": meta.get("weight_version")},
    )


# ---- weight updates (requests the client sends; the embedded server accepts the first two)

def update_weights_from_disk_request(model_path: str, version: int | None, abort_all_requests: bool = False,
                                     load_format: str | None = None) -> dict:
    body: dict[str, Any] = {"model_path": str(model_path), "abort_all_requests": abort_all_requests}
    if load_format is not None:
        body["load_format"] = load_format
    if version is not None:
        body["weight_version"] = str(version)
    return body


def update_weights_from_tensor_request(serialized_named_tensors: list, version: int | None,
                                       load_format: str | None = None, flush_cache: bool = True,
                                       abort_all_requests: bool = False) -> dict:
    """``serialized_named_tensors``: one entry per TP rank of the server (SGLang: base64 of
    ``MultiprocessingSerializer.serialize(named_tensors)``; embedded: see
    :func:`ophsd.rollout.weight_sync.serialize_for_embedded`)."""
    body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                            "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}
    if load_format is not None:
        body["load_format"] = load_format
    if version is not None:
        body["weight_version"] = str(version)
    return body


def init_weights_update_group_request(master_address: str, master_port: int, rank_offset: int,
                                      world_size: int, group_name: str = "weight_update_group",
                                      backend: str = "nccl") -> dict:
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def update_weights_from_distributed_request(names: list[str], dtypes: list[str], shapes: list[list[int]],
                                            version: int | None, group_name: str = "weight_update_group",
                                            flush_cache: bool = True, abort_all_requests: bool = False) -> dict:
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError("names, dtypes and shapes must have the same length")
    body: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(map(int, s)) for s in shapes],
                            "group_name": group_name, "flush_cache": flush_cache,
                            "abort_all_requests": abort_all_requests}
    if version is not None:
        body["weight_version"] = str(version)
    return body

