"""Streaming HF-named weights from the trainer into a generation engine: the codecs.

The trainer side (``ophsd.models``) yields ``(hf_name, full_tensor)`` pairs -- TP shards
gathered, PP stages visited, vocabulary padding removed. This module cuts that stream into
size-bounded buckets and encodes them; it imports no engine. Every engine takes the stream
through the one :meth:`Engine.update_weights(named_tensors, version) <ophsd.rollout.base.Engine.update_weights>`:

* :class:`~ophsd.rollout.embedded.EmbeddedEngine` (in process): tensors are validated and
  staged as they arrive, then swapped in atomically between batches.
* a server (embedded or SGLang) through :class:`~ophsd.rollout.sglang.SGLangEngine`, with the
  transport chosen when that client is constructed (:mod:`ophsd.rollout.weight_updaters`):
  ``weight_sync="disk"`` writes one safetensors shard per bucket into a temporary directory
  and makes one ``/update_weights_from_disk`` call (atomic on the embedded server);
  ``weight_sync="tensor"`` posts one ``/update_weights_from_tensor`` per bucket between
  ``/pause_generation`` and ``/continue_generation`` (SGLang's colocated path; the embedded
  server accepts ``load_format="ophsd_safetensors_b64"``).

Peak extra memory on the trainer side is one bucket (default 512 MiB).
"""
from __future__ import annotations

import base64
import os
from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 512 << 20
EMBEDDED_TENSOR_FORMAT = "ophsd_safetensors_b64"


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into lists of at most ``bucket_bytes`` (a larger tensor
    travels alone). Order is preserved; duplicate names are an error."""
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be positive")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weight stream")
        seen.add(name)
        nbytes = tensor_bytes(t)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def _contiguous_cpu(bucket):
    """CPU, contiguous, no two entries sharing storage (tied weights are saved as copies)."""
    out, seen = {}, set()
    for name, t in bucket:
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def write_bucket_shards(named_tensors, directory: str | os.PathLike, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[str]:
    """Write the stream as ``model-XXXXX.safetensors`` shards, one per bucket; returns file paths."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, bucket in enumerate(iter_buckets(named_tensors, bucket_bytes)):
        path = os.path.join(directory, f"model-{i:05d}.safetensors")
        save_file(_contiguous_cpu(bucket), path)
        paths.append(path)
    if not paths:
        raise ValueError("empty weight stream: nothing to push")
    return paths


def load_safetensors_dir(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors of every ``*.safetensors`` file under ``path`` (a directory or one file)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
    else:
        raise FileNotFoundError(f"{path} does not exist")
    for f in files:
        yield from load_file(f).items()


def serialize_for_embedded(bucket) -> str:
    """One bucket -> base64 safetensors bytes (the embedded server's tensor payload)."""
    from safetensors.torch import save

    return base64.b64encode(save(_contiguous_cpu(bucket))).decode("ascii")


def deserialize_for_embedded(payload: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    return list(load(base64.b64decode(payload)).items())


def serialize_for_sglang(bucket, tp_size: int = 1) -> list[str]:
    """SGLang's colocated tensor payload: base64 of ``MultiprocessingSerializer.serialize``
    of the bucket, one entry per TP rank of the server (as slime and SGLang's tests build it).
    The tensors travel as CUDA IPC handles, so this only works on the server's own GPUs.
    Needs sglang installed."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise ImportError(
            "serialize_for_sglang needs sglang (`pip install sglang`, CUDA machines only); "
            "with the embedded engine use method='disk' or serialize_for_embedded"
        ) from e
    data = MultiprocessingSerializer.serialize(list(bucket), output_str=True)
    return [data] * tp_size


def push_weights(engine, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
    """Send a stream of HF-named full tensors to ``engine`` as weight ``version``.

    Any :class:`~ophsd.rollout.base.Engine` works, through its ``update_weights``: how the
    tensors travel (buckets, disk or tensor calls) is the engine's, fixed when it was built.
    Raises :class:`~ophsd.rollout.base.EngineError` on failure with the old weights kept where
    the engine can guarantee it (embedded engine, embedded server with ``weight_sync="disk"``).
    """
    engine.update_weights(named_tensors, version)
