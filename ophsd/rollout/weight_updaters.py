"""How trainer weights reach SGLang-API servers: one updater class per transport.

:class:`~ophsd.rollout.sglang.SGLangEngine` picks its updater when it is constructed
(``weight_sync="disk"`` or ``"tensor"``) and calls :meth:`push` between ``/pause_generation`` and
``/continue_generation``. An updater sends one weight version to the given servers and reports,
per server, whether it took it; the engine then moves its version and the stale flags.

* :class:`DiskWeightUpdater`: one safetensors shard per bucket in a temporary directory the
  servers can read, then one ``/update_weights_from_disk`` per server (atomic on the embedded
  server).
* :class:`TensorWeightUpdater`: one ``/update_weights_from_tensor`` per bucket (SGLang's colocated
  path: CUDA IPC handles; the embedded server takes ``load_format="ophsd_safetensors_b64"``), the
  version set with the last bucket.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Protocol, Sequence

import torch

from ophsd.rollout import protocol as P
from ophsd.rollout.base import EngineError
from ophsd.rollout.server_pool import Server, ServerPool
from ophsd.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    EMBEDDED_TENSOR_FORMAT,
    iter_buckets,
    serialize_for_embedded,
    serialize_for_sglang,
    write_bucket_shards,
)

NamedTensors = Iterable[tuple[str, torch.Tensor]]
PushResult = tuple[dict[str, bool], dict[str, str]]  # {url: took it}, {url: error}


class WeightUpdater(Protocol):
    def push(self, pool: ServerPool, named_tensors: NamedTensors, version: int,
             targets: Sequence[Server]) -> PushResult:
        """Send ``named_tensors`` as ``version`` to ``targets``; :class:`EngineError` when the
        stream itself cannot be read (nothing was applied anywhere, or the caller is told so)."""


class DiskWeightUpdater:
    """``/update_weights_from_disk`` from shards written under ``weights_dir`` (default: the
    system temp dir; it must be visible to the servers at the same path)."""

    method = "disk"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, weights_dir: str | os.PathLike | None = None):
        self.bucket_bytes = bucket_bytes
        self.weights_dir = weights_dir

    def push(self, pool: ServerPool, named_tensors: NamedTensors, version: int,
             targets: Sequence[Server]) -> PushResult:
        tmp = tempfile.mkdtemp(prefix=f"ophsd-weights-v{version}-", dir=self.weights_dir)
        try:
            try:
                write_bucket_shards(named_tensors, tmp, self.bucket_bytes)
            except Exception as e:
                raise EngineError(f"weight update v{version} failed while writing shards ({type(e).__name__}: {e}); "
                                  f"servers keep version {pool.version}") from e
            body = P.update_weights_from_disk_request(tmp, version)
            ok, errors = {}, {}
            for url, r in pool.call_all("/update_weights_from_disk", body, targets).items():
                ok[url] = not isinstance(r, Exception) and bool((r or {}).get("success", True))
                if not ok[url]:
                    errors[url] = str(r)
            return ok, errors
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class TensorWeightUpdater:
    """One ``/update_weights_from_tensor`` per bucket; a server that fails one bucket gets no more."""

    method = "tensor"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes

    def push(self, pool: ServerPool, named_tensors: NamedTensors, version: int,
             targets: Sequence[Server]) -> PushResult:
        ok, errors = {s.url: True for s in targets}, {}
        try:
            buckets = iter_buckets(named_tensors, self.bucket_bytes)
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
                for url, r in pool.call_all("/update_weights_from_tensor", body, live).items():
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


def make_updater(weight_sync: "str | WeightUpdater", *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 weights_dir: str | os.PathLike | None = None) -> WeightUpdater:
    """``"disk"`` / ``"tensor"`` -> that updater; an object with ``push`` is used as it is."""
    if not isinstance(weight_sync, str):
        if not callable(getattr(weight_sync, "push", None)):
            raise TypeError(f"weight_sync must be 'disk', 'tensor' or an updater with push(), got {weight_sync!r}")
        return weight_sync
    if weight_sync == "disk":
        return DiskWeightUpdater(bucket_bytes, weights_dir)
    if weight_sync == "tensor":
        return TensorWeightUpdater(bucket_bytes)
    raise ValueError(f"weight_sync must be 'disk' or 'tensor', got {weight_sync!r}")
