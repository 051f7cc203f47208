"""ophsd_kernels: the custom kernel library of ophsd (import name of the ``kernels/`` folder).

The folder is importable as ``ophsd_kernels``, never as ``kernels``: a PyPI package of that
name exists (SGLang depends on it).

Public API:
    vocab_parallel_divergence  fused reverse-KL / forward-KL / JSD-beta over vocab-parallel
                               logit shards, forward and backward (Triton on CUDA, C++ or
                               PyTorch on CPU); see :mod:`ophsd_kernels.divergence`.

Triton is imported lazily (only when the Triton backend is used), so that tests can set
``TRITON_INTERPRET=1`` before it is imported.
"""
from .divergence import (  # noqa: F401
    BACKENDS,
    KINDS,
    REDUCTIONS,
    backend_status,
    get_backend,
    resolve_backend,
    vocab_parallel_divergence,
)

__all__ = ["vocab_parallel_divergence", "get_backend", "backend_status", "resolve_backend",
           "KINDS", "REDUCTIONS", "BACKENDS"]
