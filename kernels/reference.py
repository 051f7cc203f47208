"""Plain PyTorch implementation of the divergence primitives (the ``"torch"`` backend).

Readable, chunked code: the fallback when no compiled backend is available, and the
numerical model the Triton and C++ backends follow. Every function works on one rank's
vocabulary shard ``[N, V_local]``; the tensor-parallel combination and the autograd glue
live in :mod:`ophsd_kernels.divergence`.

Notation (per row, fp32 inside whatever the input dtype):

* ``s = student * inv_temp``, ``t = teacher * inv_temp``;
* local column ``j`` has global index ``col_start + j``; global indices ``>= vocab_size``
  are padding: excluded from every sum and given a zero gradient;
* ``kind`` is ``"reverse_kl"`` (KL(student || teacher)), ``"forward_kl"``
  (KL(teacher || student)) or ``"jsd"`` (beta*KL(T||M) + (1-beta)*KL(S||M),
  M = beta*T + (1-beta)*S).

The three primitives (identical signatures in every backend):

``partial_stats(student, teacher, kind, inv_temp, col_start, vocab_size) -> [N, 5] f32``
    local ``(m_s, z_s, m_t, z_t, a)``: ``m = max``, ``z = sum exp(x - m)`` over the valid
    local columns; ``a = sum exp(s - m_s) (s - t)`` (reverse_kl), ``sum exp(t - m_t) (t - s)``
    (forward_kl) or ``0`` (jsd). A shard with no valid column gives ``(-inf, 0, -inf, 0, 0)``.
    A row with a NaN/Inf in a valid column gives non-finite stats (the orchestration turns
    that into a ``ValueError``).

``jsd_partial(student, teacher, lse_s, lse_t, beta, inv_temp, col_start, vocab_size) -> [N, 2] f32``
    local ``(b_s, b_t)``: ``b_s = sum p_s (log p_s - log m)``, ``b_t = sum p_t (log p_t - log m)``
    with ``log m = logaddexp(log(beta) + log p_t, log(1 - beta) + log p_s)``. The compiled
    backends form ``m = beta p_t + (1 - beta) p_s`` in fp32 and take ``log(max(m, 2^-126))``
    (C++ ``flog``, Triton ``_mixture``): the same value wherever m is a normal fp32 number;
    below that (log-probabilities under ln 2^-126 = -87.34 in both models) the terms
    ``p (log p - log m)`` are < 1e-36 either way, and the clamp keeps a flush-to-zero log of a
    subnormal m (-inf on sm_90) out of them (issue 13).

``grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_temp, col_start, vocab_size) -> [N, V_local]``
    in the student's dtype: ``coef_i * f_ij`` with ``f = p_s (log p_s - log p_t - extra)``
    (reverse_kl, extra = d), ``p_s - p_t`` (forward_kl), ``(1 - beta) p_s (log p_s - log m - extra)``
    (jsd, extra = b_s). Rows with ``coef == 0`` and padding columns are exact zeros.
"""
from __future__ import annotations

import math

import torch

__all__ = ["partial_stats", "jsd_partial", "grad", "is_available", "unavailable_reason"]

# fp32 elements per temporary chunk: bounds the extra memory of this backend (about
# 6 temporaries of this many floats, ~100 MB) independently of N.
_CHUNK_ELEMS = 1 << 22


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def _n_valid(v_local: int, col_start: int, vocab_size: int) -> int:
    return max(0, min(v_local, vocab_size - col_start))


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMS // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def _rowdot(x, y):
    """Per-row dot product (one batched matmul instead of a product and a sum)."""
    return torch.einsum("ij,ij->i", x, y)


def partial_stats(student, teacher, kind, inv_temp, col_start, vocab_size):
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    out = torch.empty(n, 5, dtype=torch.float32, device=student.device)
    if nv == 0:
        out[:] = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, 0.0])
        return out
    for r0, r1 in _row_chunks(n, nv):
        s = student[r0:r1, :nv].float() * inv_temp
        t = teacher[r0:r1, :nv].float() * inv_temp
        m_s = s.amax(dim=1, keepdim=True)
        m_t = t.amax(dim=1, keepdim=True)
        e_s = (s - m_s).exp_()
        e_t = (t - m_t).exp_()
        z_s = e_s.sum(dim=1)
        diff = s.sub_(t)  # s - t (s is not needed any more)
        o = out[r0:r1]
        o[:, 0] = m_s[:, 0]
        o[:, 2] = m_t[:, 0]
        o[:, 3] = e_t.sum(dim=1)
        if kind == "forward_kl":
            o[:, 4] = -_rowdot(e_t, diff)
            o[:, 1] = z_s
        else:
            a = _rowdot(e_s, diff)
            if kind == "reverse_kl":
                o[:, 4] = a
                o[:, 1] = z_s
            else:
                # JSD needs no a; adding a * 0 makes NaN/Inf inputs surface in z_s.
                o[:, 4] = 0.0
                o[:, 1] = z_s + a * 0.0
        # NaN/Inf inputs surface as non-finite stats without a separate check: NaN or +inf
        # poisons m or z; -inf gives e = 0 next to an infinite (s - t), so e * (s - t) is NaN
        # or infinite in a (both KL kinds; JSD through the term above).
    return out


def _log_m(log_ps, log_pt, beta):
    return torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))


def jsd_partial(student, teacher, lse_s, lse_t, beta, inv_temp, col_start, vocab_size):
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    out = torch.zeros(n, 2, dtype=torch.float32, device=student.device)
    if nv == 0:
        return out
    for r0, r1 in _row_chunks(n, nv):
        log_ps = student[r0:r1, :nv].float() * inv_temp - lse_s[r0:r1, None]
        log_pt = teacher[r0:r1, :nv].float() * inv_temp - lse_t[r0:r1, None]
        log_m = _log_m(log_ps, log_pt, beta)
        out[r0:r1, 0] = (torch.exp(log_ps) * (log_ps - log_m)).sum(dim=1)
        out[r0:r1, 1] = (torch.exp(log_pt) * (log_pt - log_m)).sum(dim=1)
    return out


def grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_temp, col_start, vocab_size):
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    out = torch.zeros(n, v, dtype=student.dtype, device=student.device)
    if nv == 0:
        return out
    for r0, r1 in _row_chunks(n, nv):
        c = coef[r0:r1, None]
        live = c[:, 0] != 0
        if not bool(live.any()):
            continue
        log_ps = student[r0:r1, :nv].float() * inv_temp
        log_ps -= lse_s[r0:r1, None]
        log_pt = teacher[r0:r1, :nv].float() * inv_temp
        log_pt -= lse_t[r0:r1, None]
        p_s = log_ps.exp()
        x = extra[r0:r1, None]
        if kind == "reverse_kl":
            f = log_ps.sub_(log_pt).sub_(x).mul_(p_s)  # p_s (log p_s - log p_t - d)
        elif kind == "forward_kl":
            f = p_s.sub_(log_pt.exp_())  # p_s - p_t
        else:
            f = (log_ps - _log_m(log_ps, log_pt, beta)).sub_(x).mul_(p_s).mul_(1.0 - beta)
        g = f.mul_(c)
        if not bool(live.all()):
            # Rows with coef 0 are exact zeros even where f is not finite.
            g = torch.where(live[:, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        out[r0:r1, :nv] = g
    return out
