"""Megatron model directories: a megatron-core distributed checkpoint plus the HF config/tokenizer.

Layout (written by ``tools/convert_hf.py import`` and by the trainer)::

    DIR/ophsd_megatron.json   format marker: arch, true vocab size, dtype, source
    DIR/hf/                   HF config.json + tokenizer files (rebuild the model, chat template)
    DIR/model/                megatron-core dist checkpoint (torch_dist), loadable at any TP/PP

The vocabulary dimension is stored padded for the TP it was saved with; megatron-core's
``allow_shape_mismatch`` on the embedding/output tensors re-pads on load at another TP.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ophsd.models.megatron import ModelSpec, model_spec_from_hf

MARKER = "ophsd_megatron.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A Megatron directory that is missing, incomplete or corrupted."""


def write_marker(out_dir: str | os.PathLike, spec: ModelSpec, **extra) -> None:
    meta = {"format": "ophsd-megatron", "version": FORMAT_VERSION, "arch": spec.arch,
            "vocab_size": spec.vocab_size, **extra}
    Path(out_dir, MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_marker(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir, MARKER)
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} is not a Megatron model directory (no {MARKER}); create one with "
            f"`python tools/convert_hf.py import --hf-dir ... --output {model_dir}`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != "ophsd-megatron":
        raise CheckpointError(f"{path} is not an ophsd Megatron marker")
    return meta


def load_spec(model_dir: str | os.PathLike, tp: int = 1, pp: int = 1) -> ModelSpec:
    """The model spec of a Megatron directory at the requested TP/PP (validates divisibility)."""
    from transformers import AutoConfig

    read_marker(model_dir)
    return model_spec_from_hf(AutoConfig.from_pretrained(Path(model_dir, "hf")), tp, pp)


def save_model(model, ckpt_dir: str | os.PathLike) -> None:
    """Collective over all ranks: write this rank's shards into ``ckpt_dir`` (created empty)."""
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))


def load_model(model, ckpt_dir: str | os.PathLike) -> None:
    """Collective: fill every parameter of the local stage from a dist checkpoint.

    Any parameter missing from the checkpoint, or a checkpoint tensor the model does not
    have, is an error (never a silently random-initialised weight).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-core distributed checkpoint (no metadata.json)")
    sharded = model.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.RAISE_ALL)
    except Exception as e:  # torch.distributed.checkpoint raises many types for bad files
        raise CheckpointError(f"failed to load the distributed checkpoint in {ckpt_dir}: {e}") from e
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} left parameters unfilled: {missing[:8]}")


def build_and_load(model_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                   params_dtype: torch.dtype = torch.float32):
    """Build the local stage at the current parallel state and load it from ``model_dir``."""
    from ophsd.models.megatron import build_model

    spec = load_spec(model_dir, tp, pp)
    model = build_model(spec, params_dtype=params_dtype, perform_initialization=False)
    load_model(model, Path(model_dir, "model"))
    return model


def load_as_hf_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A transformers model with the weights of a Megatron directory (for eval and engines).

    Runs megatron-core in this process (a one-rank group when none exists) at TP=PP=1.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ophsd.models import mapping
    from ophsd.runtime import distributed

    distributed.initialize(1, 1)
    model = build_and_load(model_dir, 1, 1, params_dtype=torch.float32)
    spec = model.ophsd_spec
    hf_state = mapping.megatron_to_hf(dict(mapping.iter_full_megatron_tensors(model)), spec)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(Path(model_dir, "hf")), dtype=dtype)
    missing, unexpected = hf.load_state_dict({k: v.to(dtype) for k, v in hf_state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and spec.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: HF model left {missing[:5]} unfilled / got unexpected {unexpected[:5]}")
    if spec.tie_embeddings:
        hf.tie_weights()
    return hf.eval()
