"""C++ CPU backend of the fused divergence kernel: thin checked wrappers over ``ophsd_kernels._C``.

The extension is built by ``CMakeLists.txt`` (``pip install --no-build-isolation -e .`` runs it;
see the README / ``kernels/csrc/``).  It is optional: when it is missing, :func:`is_available`
is False and :func:`unavailable_reason` says why; calling a primitive then raises
``RuntimeError`` with that reason (the public API falls back to the PyTorch reference).

Primitives (inputs: contiguous ``[N, V_local]`` CPU tensors, float32/bfloat16/float16, the same
dtype for both; ``s = student * inv_temp``, ``t = teacher * inv_temp`` in fp32; local column
``j`` is global column ``col_start + j``; global columns ``>= vocab_size`` are padding, excluded
from all sums and given zero gradient):

``partial_stats(student, teacher, kind, inv_temp, col_start, vocab_size) -> [N, 5] float32``
    per row ``(m_s, z_s, m_t, z_t, a)``: ``m = max``, ``z = sum exp(x - m)`` over the valid local
    columns (``m = -inf, z = 0`` for a shard with no valid column); ``a = sum exp(s - m_s)(s - t)``
    for ``"reverse_kl"``, ``sum exp(t - m_t)(t - s)`` for ``"forward_kl"``, ``0`` for ``"jsd"``.
``jsd_partial(student, teacher, lse_s, lse_t, beta, inv_temp, col_start, vocab_size) -> [N, 2]``
    ``(b_s, b_t) = (sum p_s (log p_s - log m), sum p_t (log p_t - log m))`` with
    ``log p = x - lse`` and ``m = beta p_t + (1 - beta) p_s``.
``grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_temp, col_start, vocab_size)``
    ``-> [N, V_local]`` in the student's dtype: ``coef_i * f_ij`` with ``f = p_s (log p_s -
    log p_t - extra_i)`` (reverse_kl), ``p_s - p_t`` (forward_kl), ``(1 - beta) p_s (log p_s -
    log m - extra_i)`` (jsd).  Rows with ``coef_i == 0`` are exact zeros.

``lse_s``, ``lse_t``, ``coef``, ``extra`` are ``[N]`` float32.  Work is split over rows on
torch's CPU threads (``torch.set_num_threads``); extra memory is O(N).  NaN/Inf logits are not
filtered: they propagate into the statistics (the public API detects them there).

``OPHSD_DISABLE_CPP=1`` makes the module count as absent (to exercise the fallback).
Build details: ``kernels/csrc/README.md``.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

import torch

__all__ = [
    "is_available",
    "unavailable_reason",
    "build_info",
    "partial_stats",
    "jsd_partial",
    "grad",
]

KINDS = ("reverse_kl", "forward_kl", "jsd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL_HINT = "run `pip install --no-build-isolation -e .` after installing cmake and a C++ compiler"
# setup.py records why the last native build did not happen (editable installs only).
BUILD_STATUS_FILE = Path(__file__).resolve().parent / "csrc" / "build_status.txt"

_module = None
_reason: str | None = None
_loaded = False


def _static_reason() -> str:
    """Best explanation of a missing module from the machine and the last build attempt."""
    if BUILD_STATUS_FILE.is_file():
        text = BUILD_STATUS_FILE.read_text(errors="replace").strip()
        if text and text != "ok":
            return f"ophsd_kernels._C not built: {text}"
    if shutil.which("cmake") is None and not (Path(sys.executable).parent / "cmake").exists():
        return f"ophsd_kernels._C not built: cmake not found; {INSTALL_HINT}"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return f"ophsd_kernels._C not built: no C++ compiler found; {INSTALL_HINT}"
    return f"ophsd_kernels._C not built; {INSTALL_HINT}"


def _load() -> None:
    global _module, _reason, _loaded
    if _loaded:
        return
    _loaded = True
    if os.environ.get("OPHSD_DISABLE_CPP", "") not in ("", "0"):
        _reason = "ophsd_kernels._C disabled by OPHSD_DISABLE_CPP"
        return
    try:
        mod = importlib.import_module("ophsd_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ophsd_kernels._C", "ophsd_kernels"):
            _reason = f"ophsd_kernels._C failed to import ({exc}); rebuild: {INSTALL_HINT}"
        else:
            _reason = _static_reason()
        return
    except (ImportError, OSError) as exc:  # e.g. built against another torch (undefined symbols)
        _reason = f"ophsd_kernels._C failed to load ({exc}); rebuild: {INSTALL_HINT}"
        return
    built = getattr(mod, "TORCH_VERSION", "unknown")
    if built != torch.__version__:
        _reason = (f"ophsd_kernels._C was built against torch {built} but torch {torch.__version__} "
                   f"is running; rebuild: {INSTALL_HINT}")
        return
    if not hasattr(torch.ops.ophsd_kernels, "partial_stats"):
        _reason = "ophsd_kernels._C loaded but registered no ops; rebuild: " + INSTALL_HINT
        return
    _module = mod


def is_available() -> bool:
    """True when the compiled extension is importable and matches the running torch."""
    _load()
    return _module is not None


def unavailable_reason() -> str:
    """Why :func:`is_available` is False ('' when it is available)."""
    _load()
    return "" if _module is not None else (_reason or "ophsd_kernels._C not built")


def build_info() -> dict:
    """Where the compiled module lives and how it was built (for tests and benchmarks)."""
    _load()
    if _module is None:
        return {"available": False, "reason": unavailable_reason()}
    return {
        "available": True,
        "file": _module.__file__,
        "torch_version": _module.TORCH_VERSION,
        "simd": _module.SIMD,
        "openmp": bool(_module.OPENMP),
        "chunk": _module.CHUNK,
        "threads": torch.get_num_threads(),
    }


def _ops():
    _load()
    if _module is None:
        raise RuntimeError(unavailable_reason())
    return torch.ops.ophsd_kernels


def _check_logits(student, teacher) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {x.device}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, V_local], got shape {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} must equal student shape "
                         f"{tuple(student.shape)}")
    if teacher.dtype != student.dtype:
        raise ValueError(f"teacher dtype {teacher.dtype} must equal student dtype {student.dtype}")


def _check_vec(x, name: str, n: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 1 or x.shape[0] != n \
            or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape [{n}], got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_scalars(inv_temp, col_start, vocab_size) -> None:
    inv_temp = float(inv_temp)
    if not (inv_temp > 0.0 and inv_temp != float("inf")):
        raise ValueError(f"inv_temp must be finite and > 0, got {inv_temp}")
    if int(col_start) < 0:
        raise ValueError(f"col_start must be >= 0, got {col_start}")
    if int(vocab_size) < 0:
        raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")


def _check_beta(beta) -> None:
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")


def partial_stats(student: torch.Tensor, teacher: torch.Tensor, kind: str, inv_temp: float,
                  col_start: int, vocab_size: int) -> torch.Tensor:
    """Per-row ``(m_s, z_s, m_t, z_t, a)`` over the valid local columns, ``[N, 5]`` float32."""
    ops = _ops()
    _check_logits(student, teacher)
    _check_kind(kind)
    _check_scalars(inv_temp, col_start, vocab_size)
    return ops.partial_stats(student.detach(), teacher.detach(), kind, float(inv_temp),
                             int(col_start), int(vocab_size))


def jsd_partial(student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor,
                lse_t: torch.Tensor, beta: float, inv_temp: float, col_start: int,
                vocab_size: int) -> torch.Tensor:
    """Per-row ``(b_s, b_t)`` of the JSD mixture terms over the valid local columns, ``[N, 2]``."""
    ops = _ops()
    _check_logits(student, teacher)
    n = student.shape[0]
    _check_vec(lse_s, "lse_s", n)
    _check_vec(lse_t, "lse_t", n)
    _check_beta(beta)
    _check_scalars(inv_temp, col_start, vocab_size)
    return ops.jsd_partial(student.detach(), teacher.detach(), lse_s.detach(), lse_t.detach(),
                           float(beta), float(inv_temp), int(col_start), int(vocab_size))


def grad(student: torch.Tensor, teacher: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
         coef: torch.Tensor, extra: torch.Tensor, kind: str, beta: float, inv_temp: float,
         col_start: int, vocab_size: int) -> torch.Tensor:
    """``coef_i * f_ij`` as a new ``[N, V_local]`` tensor in the student's dtype."""
    ops = _ops()
    _check_logits(student, teacher)
    _check_kind(kind)
    n = student.shape[0]
    for name, x in (("lse_s", lse_s), ("lse_t", lse_t), ("coef", coef), ("extra", extra)):
        _check_vec(x, name, n)
    if kind == "jsd":
        _check_beta(beta)
    _check_scalars(inv_temp, col_start, vocab_size)
    return ops.grad(student.detach(), teacher.detach(), lse_s.detach(), lse_t.detach(),
                    coef.detach(), extra.detach(), kind, float(beta), float(inv_temp),
                    int(col_start), int(vocab_size))
