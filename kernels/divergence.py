"""Fused vocab-parallel divergence between student and teacher next-token distributions.

``vocab_parallel_divergence`` computes reverse KL, forward KL or JSD-beta between the
tempered softmax distributions of two ``[N, V_local]`` logit shards, forward and backward,
without materialising probabilities: extra memory is O(N) on top of the inputs and the
gradient.

Pass structure (DESIGN.md section 5, the two-pass floor):

* forward: phase A reads student and teacher once and produces per-row online-softmax
  statistics ``(m_s, z_s, m_t, z_t, a)``; with a tensor-parallel ``group`` the ranks'
  ``[N, 5]`` rows are combined (one all-gather of 5 fp32 per token; never logits). JSD adds
  phase B (a second read) for ``(b_s, b_t)``, one SUM all-reduce of 2 fp32 per token.
  The inputs are saved by reference, plus O(N) statistics.
* backward: one pass reads student and teacher again and writes the gradient, scaled by
  the real ``grad_output``; no communication.

So forward = one read of both inputs, forward+backward = two reads + one write (JSD: three
reads + one write). Backends implement three primitives (see :mod:`ophsd_kernels.reference`
for their exact contract): ``"triton"`` (CUDA; CPU through ``TRITON_INTERPRET=1``),
``"cpp"`` (the OpenMP CPU extension, :mod:`ophsd_kernels.cpu_backend`) and ``"torch"``
(plain chunked PyTorch, the fallback).
"""
from __future__ import annotations

import importlib
import math
import os
from numbers import Real
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "vocab_parallel_divergence",
    "get_backend",
    "backend_status",
    "resolve_backend",
    "KINDS",
    "REDUCTIONS",
    "BACKENDS",
]

KINDS = ("reverse_kl", "forward_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpp", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# backends


def _triton_status():
    """(module or None, reason) for the Triton backend."""
    try:
        mod = importlib.import_module("ophsd_kernels.triton_divergence")
    except Exception as exc:  # noqa: BLE001 - triton missing or broken: say why
        return None, f"the Triton backend could not be imported ({type(exc).__name__}: {exc})"
    return mod, ""


def _cpp_status():
    try:
        mod = importlib.import_module("ophsd_kernels.cpu_backend")
    except ImportError as exc:
        return None, f"the C++ CPU backend module is missing ({exc})"
    try:
        ok = bool(mod.is_available())
    except Exception as exc:  # noqa: BLE001
        return None, f"the C++ CPU backend failed to load ({type(exc).__name__}: {exc})"
    if not ok:
        return None, f"the C++ CPU backend is not built: {mod.unavailable_reason()}"
    return mod, ""


def _interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str, device: torch.device | str = "cpu"):
    """``(module or None, reason)`` for backend ``name`` on tensors of ``device``."""
    device = torch.device(device)
    if name == "torch":
        from . import reference

        return reference, ""
    if name == "cpp":
        if device.type != "cpu":
            return None, f"the C++ backend runs on CPU tensors only (got {device.type} tensors)"
        return _cpp_status()
    if name == "triton":
        if device.type == "cpu" and not _interpret_on():
            return None, ("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1, set "
                          "before triton is imported, to run its kernels on CPU for tests)")
        if device.type not in ("cpu", "cuda"):
            return None, f"the Triton backend runs on CUDA tensors (got {device.type})"
        mod, why = _triton_status()
        if mod is not None and not mod.runs_on(device):
            return None, mod.why_not(device)
        return mod, why
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend name that ``backend`` (maybe ``"auto"``) means for ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in order:
        if backend_status(name, device)[0] is not None:
            return name
    return "torch"


def get_backend(backend: str, device: torch.device | str):
    """The backend module for ``backend`` (``"auto"`` resolved) or a ``ValueError`` saying why not."""
    name = resolve_backend(backend, device)
    mod, why = backend_status(name, device)
    if mod is None:
        raise ValueError(f"backend={name!r} is unavailable: {why}")
    return mod


# --------------------------------------------------------------------------------------
# validation


def _check_args(student, teacher, kind, beta, temperature, weights, vocab_size, group,
                reduction, backend):
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, V_local], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} does not match "
                         f"student_logits shape {tuple(student.shape)}")
    if student.dtype != teacher.dtype:
        raise ValueError(f"teacher_logits dtype {teacher.dtype} does not match student_logits "
                         f"dtype {student.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"teacher_logits is on {teacher.device}, student_logits on {student.device}")
    if student.shape[1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V_local == 0)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd":
        if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta):
            raise ValueError(f"beta must be a real number in (0, 1), got {beta!r}")
        if beta <= 0.0 or beta >= 1.0:
            raise ValueError(
                f"beta must lie strictly in (0, 1) for kind='jsd', got {beta}: at beta=0 the "
                "mixture is the student (use kind='forward_kl' for KL(teacher||student)), at "
                "beta=1 it is the teacher (use kind='reverse_kl' for KL(student||teacher))")
    if (isinstance(temperature, bool) or not isinstance(temperature, Real)
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise ValueError(f"weights must be a torch.Tensor of shape [N] or None, got "
                             f"{type(weights).__name__}")
        if weights.shape != (student.shape[0],):
            raise ValueError(f"weights must have shape [N] = ({student.shape[0]},), got "
                             f"{tuple(weights.shape)}")
        if weights.is_complex():
            raise ValueError(f"weights must be a real tensor, got {weights.dtype}")
        if weights.device != student.device:
            raise ValueError(f"weights is on {weights.device}, student_logits on {student.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    world = 1
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group was given but torch.distributed is not initialised")
        world = dist.get_world_size(group)
    v_global = student.shape[1] * world
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an int or None, got {vocab_size!r}")
        if not 1 <= vocab_size <= v_global:
            raise ValueError(f"vocab_size must be in [1, {v_global}] (V_local * tensor-parallel "
                             f"size), got {vocab_size}")


def _raise_nonfinite(student, teacher, weights, n_valid, kind):
    """Slow path, only after the statistics came out non-finite: name the culprit."""
    if weights is not None and not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contains NaN or Inf")
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if n_valid > 0 and not bool(torch.isfinite(x[:, :n_valid]).all()):
            raise ValueError(f"{name} contains NaN or Inf (in non-padding columns)")
    raise ValueError("student_logits or teacher_logits contains NaN or Inf (on another "
                     "tensor-parallel rank, or too large after dividing by the temperature)")


# --------------------------------------------------------------------------------------
# tensor-parallel combination of the per-row statistics


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def _rescale(z, m, m_glob):
    # z * exp(m - m_glob), with empty shards (z == 0, m == -inf) contributing exact zeros.
    return torch.where(z != 0, z * torch.exp(m - m_glob), torch.zeros_like(z))


def combine_stats(stats: torch.Tensor, kind: str) -> torch.Tensor:
    """Combine ``[R, N, 5]`` per-shard statistics into the global ``[N, 5]``."""
    if stats.shape[0] == 1:
        return stats[0]
    m_s, z_s, m_t, z_t, a = stats.unbind(-1)
    gm_s = m_s.amax(0)
    gm_t = m_t.amax(0)
    sc_s = torch.where(z_s != 0, torch.exp(m_s - gm_s), torch.zeros_like(z_s))
    sc_t = torch.where(z_t != 0, torch.exp(m_t - gm_t), torch.zeros_like(z_t))
    sc_a = sc_s if kind == "reverse_kl" else sc_t
    out = torch.stack([gm_s, (z_s * sc_s).sum(0), gm_t, (z_t * sc_t).sum(0),
                       (torch.where(sc_a != 0, a, torch.zeros_like(a)) * sc_a).sum(0)], dim=-1)
    # Bad inputs on any shard (NaN anywhere, an infinite z or a, or m == +inf) must survive
    # the where() above, which only masks empty shards (m == -inf, z == 0, a == 0).
    bad = (stats.isnan().any(-1) | torch.isinf(stats[..., [1, 3, 4]]).any(-1)
           | (stats[..., [0, 2]] == math.inf).any(-1)).any(0)
    out[bad] = math.nan
    return out


# --------------------------------------------------------------------------------------
# autograd


class _Cfg:
    __slots__ = ("kind", "beta", "inv_temp", "vocab_size", "col_start", "group", "world",
                 "reduction", "be")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _forward_stats(student, teacher, cfg: _Cfg):
    """Global per-row ``(lse_s, lse_t, d, extra)`` in fp32; non-finite rows flagged by NaN."""
    be = cfg.be
    stats = be.partial_stats(student, teacher, cfg.kind, cfg.inv_temp, cfg.col_start,
                             cfg.vocab_size)
    if cfg.world > 1:
        stats = combine_stats(_all_gather_rows(stats, cfg.group), cfg.kind)
    m_s, z_s, m_t, z_t, a = stats.unbind(1)
    lse_s = m_s + torch.log(z_s)
    lse_t = m_t + torch.log(z_t)
    if cfg.kind == "reverse_kl":
        d = a / z_s - lse_s + lse_t
        extra = d
    elif cfg.kind == "forward_kl":
        d = a / z_t - lse_t + lse_s
        extra = d
    else:
        b = be.jsd_partial(student, teacher, lse_s, lse_t, cfg.beta, cfg.inv_temp,
                           cfg.col_start, cfg.vocab_size)
        if cfg.world > 1:
            b = b.contiguous()
            dist.all_reduce(b, op=dist.ReduceOp.SUM, group=cfg.group)
        b_s, b_t = b.unbind(1)
        d = cfg.beta * b_t + (1.0 - cfg.beta) * b_s
        extra = b_s
    return lse_s.contiguous(), lse_t.contiguous(), d.contiguous(), extra.contiguous()


def _row_coef(grad_out, w, denom, reduction, inv_temp, n, device):
    if reduction == "none":
        g = grad_out.reshape(n).float()
    else:
        g = grad_out.reshape(()).float().expand(n)
    # "none" returns the unweighted d (weights are the caller's to apply), so its rows'
    # coefficients are grad_out alone; mean/sum weight the rows here.
    coef = g * inv_temp if (w is None or reduction == "none") else g * w * inv_temp
    if reduction == "mean":
        coef = torch.where(denom > 0, coef / torch.where(denom > 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(coef))
    return coef.contiguous()


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weights, cfg: _Cfg):
        n = student.shape[0]
        lse_s, lse_t, d, extra = _forward_stats(student, teacher, cfg)
        w = None if weights is None else weights.float()
        # One host sync for all value checks (O(N) data): NaN/Inf in the logits shows up in
        # the statistics; weights must be finite and >= 0.
        ok = torch.isfinite(d).all() & torch.isfinite(lse_s).all() & torch.isfinite(lse_t).all()
        if w is not None:
            ok = ok & torch.isfinite(w).all() & (w >= 0).all()
        if not bool(ok):
            if w is not None and bool(torch.isfinite(w).all()) and not bool((w >= 0).all()):
                raise ValueError("weights must be >= 0 (0 drops a token)")
            n_valid = max(0, min(student.shape[1], cfg.vocab_size - cfg.col_start))
            _raise_nonfinite(student, teacher, w, n_valid, cfg.kind)
        per = d if w is None else w * d
        denom = None
        if cfg.reduction == "none":
            loss = d.clone()
        elif cfg.reduction == "sum":
            loss = per.sum()
        else:
            denom = torch.tensor(float(n), device=d.device) if w is None else w.sum()
            safe = torch.where(denom > 0, denom, torch.ones_like(denom))
            loss = torch.where(denom > 0, per.sum() / safe, torch.zeros_like(safe))
        ctx.cfg = cfg
        ctx.save_for_backward(student, teacher, lse_s, lse_t, extra, w, denom)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student, teacher, lse_s, lse_t, extra, w, denom = ctx.saved_tensors
        cfg = ctx.cfg
        n = student.shape[0]
        coef = _row_coef(grad_out, w, denom, cfg.reduction, cfg.inv_temp, n, student.device)
        g = cfg.be.grad(student, teacher, lse_s, lse_t, coef, extra, cfg.kind, cfg.beta,
                        cfg.inv_temp, cfg.col_start, cfg.vocab_size)
        return g, None, None, None


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    weights: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    group=None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Divergence between tempered student and teacher distributions over vocab shards.

    Args:
        student_logits: ``[N, V_local]`` float32/bfloat16/float16; gradients flow here (in
            its dtype, computed in fp32).
        teacher_logits: ``[N, V_local]``, same dtype; a constant (never gets a gradient).
        kind: ``"reverse_kl"`` KL(S||T), ``"forward_kl"`` KL(T||S), or ``"jsd"``
            beta*KL(T||M) + (1-beta)*KL(S||M) with M = beta*T + (1-beta)*S.
        beta: JSD mixture weight, strictly inside (0, 1); ignored by the KL kinds.
        temperature: both distributions are ``softmax(logits / temperature)``; the loss is
            the divergence of the tempered distributions (no T^2 factor).
        weights: ``[N]`` non-negative per-token weights (0 drops a token), or None (all 1).
        vocab_size: true vocabulary size; global columns ``>= vocab_size`` are padding.
        group: tensor-parallel process group; rank r holds global columns
            ``[r*V_local, (r+1)*V_local)``. None: the whole vocabulary is local.
        reduction: ``"mean"`` sum(w*d)/sum(w) (0 when sum(w) == 0), ``"sum"`` sum(w*d), or
            ``"none"`` the per-token divergence ``d``, shape ``[N]``, *without* the weights
            (apply them yourself, e.g. ``(w * d).sum()``; weights are still validated).
        backend: ``"auto"`` (Triton on CUDA; the C++ extension on CPU when built, else
            torch), ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 loss (a scalar, or ``[N]`` for ``reduction="none"``), identical on every
        tensor-parallel rank.

    Raises:
        ValueError naming the argument for bad shapes/dtypes/devices, kind, beta,
        temperature, weights, vocab_size, reduction or backend, and for NaN/Inf in the
        logits (detected from the per-row statistics at the cost of one O(N) host sync).
    """
    _check_args(student_logits, teacher_logits, kind, beta, temperature, weights, vocab_size,
                group, reduction, backend)
    world, rank = 1, 0
    if group is not None:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
    v_local = student_logits.shape[1]
    be = get_backend(backend, student_logits.device)
    teacher = teacher_logits.detach()
    student = student_logits
    # Triton and torch take any row stride (e.g. a [:, :V] view of a wider buffer); the C++
    # backend wants fully contiguous rows. A copy costs one extra read and write.
    if be.__name__.endswith("cpu_backend"):
        student, teacher = student.contiguous(), teacher.contiguous()
    else:
        if student.stride(1) != 1:
            student = student.contiguous()
        if teacher.stride(1) != 1:
            teacher = teacher.contiguous()
    cfg = _Cfg(kind=kind, beta=float(beta), inv_temp=1.0 / float(temperature),
               vocab_size=int(vocab_size) if vocab_size is not None else v_local * world,
               col_start=rank * v_local, group=group, world=world, reduction=reduction, be=be)
    return _VocabParallelDivergence.apply(student, teacher, weights, cfg)
