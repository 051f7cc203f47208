"""Megatron model directories: a megatron-core distributed checkpoint plus the HF config/tokenizer.

Layout (written by ``tools/convert_hf.py import`` and by the trainer)::

    DIR/ophsd_megatron.json   format marker: arch, true vocab size, dtype, source
    DIR/hf/                   HF config.json + tokenizer files (rebuild the model, chat template)
    DIR/model/                megatron-core dist checkpoint (torch_dist), loadable at any TP/PP

The vocabulary dimension is stored padded for the TP it was saved with; megatron-core's
``allow_shape_mismatch`` on the embedding/output tensors re-pads on load at another TP.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ophsd.models.megatron import ModelSpec, model_spec_from_hf

MARKER = "ophsd_megatron.json"
FORMAT_VERSION = 1
# Same keys Megatron-LM passes; identical at save and load.
OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                           "singleton_local_shards": False}


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


def save_optimizer(optimizer, model, ckpt_dir: str | os.PathLike) -> None:
    """Collective: the megatron-core optimizer state (incl. fp32 master weights) as a dist checkpoint.

    Written in megatron-core's ``fully_reshardable`` format (Megatron-LM's
    ``--dist-ckpt-optim-fully-reshardable``): one canonical state per model parameter, so it
    reloads at another TP/PP/DP layout and with or without the distributed optimizer.
    """
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False,
                                           metadata=OPTIMIZER_CKPT_METADATA)
    dist_checkpointing.save(sharded, str(ckpt_dir))


def _init_empty_adam_state(optimizer) -> None:
    """Give a fresh torch Adam(W) its state tensors (step 0) so it can be loaded into.

    megatron-core's distributed optimizer reads ``state["step"]`` of every parameter while
    building its load-time state dict; on the TE/Apex fused Adam this exists from the start,
    on torch's Adam (the CPU path) only after a first step.  Every value is overwritten by
    the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def load_optimizer(optimizer, model, ckpt_dir: str | os.PathLike) -> None:
    """Collective: restore the state written by :func:`save_optimizer` into ``optimizer``."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-core distributed optimizer checkpoint "
                              "(no metadata.json)")
    _init_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                           metadata=OPTIMIZER_CKPT_METADATA)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    except Exception as e:  # torch.distributed.checkpoint raises many types for bad files
        raise CheckpointError(f"failed to load the optimizer checkpoint in {ckpt_dir}: {e}") from e
    with _torch_adam_load_fixes(optimizer):
        optimizer.load_state_dict(loaded)


@contextlib.contextmanager
def _torch_adam_load_fixes(optimizer):
    """Work around two megatron-core 0.16 bugs loading distributed-optimizer state into torch's
    Adam (no TE/Apex: the CPU path).  No-op with TE/Apex fused Adam, which keeps no per-param step.

    1. The ``fully_reshardable`` loader drops the per-parameter ``step`` from the checkpoint
       tensors, then copies every key of the destination state, which includes ``step`` ->
       KeyError.  ``load_state_dict`` has already set that step from the param groups, so we
       hand the destination's own value back.
    2. ``load_state_dict`` gives every parameter the *same* step tensor; torch's foreach Adam
       increments each list entry in place, so the shared step would advance by the number of
       parameters per iteration and corrupt the bias correction.  Each state gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        orig = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, orig=orig):
            gi, go = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[gi]["params"][go]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            return orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in patched:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


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
