"""Building a run's models and rank 0's rollout engine from the trainer's config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ophsd.runtime.distributed import comm_device, log_rank0

if TYPE_CHECKING:
    from ophsd.train.config import ModelConfig, RolloutConfig


@dataclass
class Models:
    """The student (this rank's pipeline stage), the frozen teacher (or None) and where they came from."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    spec: object  # ophsd.models.megatron.ModelSpec
    tokenizer: object
    source: object  # ophsd.models.hub.ModelSource
    hf_files: dict[str, bytes] | None  # a checkpoint's hf/ files (None: built from an HF model)


def build_models(model: ModelConfig, model_dir, dtype: torch.dtype, frozen_teacher: bool,
                 verified: bool = False) -> Models:
    """From ``model_dir`` (an ophsd checkpoint or converted model directory) or else --model (an HF
    model); ``frozen_teacher``: also a frozen copy as the teacher. ``verified``: ``model_dir`` is a
    checkpoint :func:`find_checkpoint` checked whole."""
    from ophsd.models import checkpoint, mapping
    from ophsd.models.hub import ModelSource, load_config, load_hf_model, load_tokenizer, resolve_model
    from ophsd.models.megatron import build_model, model_spec_from_hf

    tp, pp = model.tensor_model_parallel_size, model.pipeline_model_parallel_size
    if model_dir:
        spec = checkpoint.load_spec(model_dir, tp, pp)
        hf_dir = Path(model_dir) / "hf"
        # Its config/tokenizer files, read now: checkpoints copy them, and the directory we
        # resumed from may be pruned while we run (examples/paper_table keeps the latest only).
        hf_files = {f.name: f.read_bytes() for f in hf_dir.iterdir() if f.is_file()}
        student = build_model(spec, params_dtype=dtype, perform_initialization=False)
        checkpoint.load_model(student, Path(model_dir) / "model", verify_files=not verified)
        teacher_dir = Path(model_dir) / "teacher"
        source = ModelSource(str(model_dir), megatron=True)
    else:
        source = resolve_model(model.model)
        spec = model_spec_from_hf(load_config(source), tp, pp)
        hf = load_hf_model(source, torch.float32)
        student = build_model(spec, params_dtype=dtype, perform_initialization=False)
        mapping.load_full_tensors(student, {k: v.to(dtype) for k, v in
                                            mapping.hf_to_megatron(hf.state_dict(), spec).items()})
        del hf
        teacher_dir = None
        hf_files = None
    tokenizer = load_tokenizer(source)
    teacher = None
    if frozen_teacher:
        teacher = build_model(spec, params_dtype=dtype, perform_initialization=False)
        if teacher_dir is not None and (teacher_dir / "metadata.json").is_file():
            checkpoint.load_model(teacher, teacher_dir, verify_files=not verified)
        else:
            teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False).eval()
    return Models(student, teacher, spec, tokenizer, source, hf_files)


def build_engine(rollout: RolloutConfig, seed: int, source, tokenizer, dtype: torch.dtype):
    """Rank 0's rollout engine: an SGLang client, or the embedded engine (a random-initialised
    shell: the first weight sync, version 0, fills it from Megatron)."""
    if rollout.rollout_engine == "sglang":
        from ophsd.rollout.sglang import SGLangEngine

        return SGLangEngine(rollout.sglang_url, weight_sync=rollout.weight_sync, weights_dir=rollout.weight_sync_dir)
    from transformers import AutoModelForCausalLM

    from ophsd.models.hub import load_config
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.rollout.embedded.engine import parse_dtype
    from ophsd.runtime.machine import cpu_isa

    # It shares rank 0's device; by default it generates in the training dtype on a GPU, in fp32 on a CPU.
    device = comm_device()
    if rollout.rollout_dtype is not None:
        dtype = parse_dtype(rollout.rollout_dtype)
        if dtype == torch.bfloat16 and device.type == "cpu" and not {"avx512_bf16", "amx_bf16"} & set(cpu_isa()):
            log_rank0("warning: --rollout-dtype bfloat16 on a CPU without AVX512-BF16 or AMX: its bf16 products "
                      "are emulated and may well be slower than float32")
    elif device.type != "cuda":
        dtype = torch.float32
    hf = AutoModelForCausalLM.from_config(load_config(source), dtype=dtype).eval()
    return EmbeddedEngine.from_pretrained_objects(hf, tokenizer, name="ophsd-student", seed=seed, device=device,
                                                  dtype=dtype, prefix_cache_tokens=rollout.prefix_cache_tokens)
