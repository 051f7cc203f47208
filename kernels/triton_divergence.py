"""Triton backend of the divergence primitives (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Same contract as :mod:`ophsd_kernels.reference` (read its docstring for the math). Three
kernels:

``_stats_kernel``  one program per row; streams the row's valid columns in blocks of
                   ``BLOCK`` and keeps an online softmax of both inputs plus the KL
                   accumulator ``a`` (rescaled whenever the running max moves). One read of
                   each input; writes 5 fp32 per row.
``_jsd_kernel``    one program per row; second read for JSD's ``(b_s, b_t)``.
``_grad_kernel``   one program per (row, column block): reads both inputs once more and
                   writes the gradient in the student's dtype. Rows whose ``coef`` is 0
                   (masked tokens) and padding columns are stored as zeros without reading
                   the inputs.

All arithmetic is fp32, in base 2 (``x * inv_temp * log2(e)`` then ``exp2``/``log2``,
converted back to natural units once per row), which saves a multiply per exponential.
Full blocks run without masks; only the tail block of a row is masked. Row offsets are
computed in int64 (``N * V`` exceeds 2**31 at the sizes we care about).

A NaN/Inf in a valid column of a row makes that row's statistics NaN: ``z_s`` accumulates
``(s - s) + (t - t)``, which is 0 for finite values and NaN otherwise (IEEE arithmetic, no
fast-math in Triton's default lowering), so ``-inf`` logits, which would otherwise vanish
from an exponential sum, are caught too.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["partial_stats", "jsd_partial", "grad", "is_available", "unavailable_reason",
           "runs_on", "why_not", "CONFIG"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_KIND_ID = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}

# Launch parameters, per kernel. Chosen on an H100 (see kernels/BENCHMARKS.md); the
# benchmark's --sweep mode overrides them through this dict.
CONFIG = {
    "stats": {"BLOCK": 4096, "num_warps": 8, "num_stages": 2},
    "jsd": {"BLOCK": 4096, "num_warps": 8, "num_stages": 2},
    "grad": {"BLOCK": 4096, "num_warps": 8, "num_stages": 1},
}
# Under the interpreter every block is a numpy op: the largest useful block is fastest.
_INTERPRET_BLOCK = 2048


def _fix_interpreter_numpy24():
    """Triton 3.6's interpreter calls ``int()`` on 1-element numpy arrays (scalar kernel
    arguments used as loop bounds), which numpy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"; triton-lang/triton issue 9171, fixed upstream by
    squeezing the array). Apply the same one-line fix, only to the interpreter and only when
    it is needed. Compiled (CUDA) kernels are untouched."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # noqa: BLE001 - no interpreter, nothing to fix
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_ophsd_fixed", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._ophsd_fixed = True
    _interp._patch_lang_tensor = _patch_lang_tensor


def _interpreted() -> bool:
    return type(_stats_kernel).__name__ == "InterpretedFunction"


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def runs_on(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return not _interpreted() and torch.cuda.is_available()
    return device.type == "cpu" and _interpreted()


def why_not(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and _interpreted():
        return ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 was set "
                "when ophsd_kernels.triton_divergence was imported); they cannot take CUDA tensors")
    if device.type == "cpu":
        return ("the Triton kernels were compiled for CUDA (TRITON_INTERPRET was not set when "
                "ophsd_kernels.triton_divergence was imported); they cannot take CPU tensors")
    return f"the Triton backend cannot run on {device}"


# --------------------------------------------------------------------------------------
# kernels


@triton.jit
def _stats_update(s, t, dst, m_s, z_s, m_t, z_t, a, KIND: tl.constexpr):
    # s, t: base-2 scaled logits of one block, masked lanes -inf (so their e is 0);
    # dst = s - t with masked lanes 0 (so e * dst is 0 there, never 0 * NaN).
    ms_new = tl.maximum(m_s, tl.max(s, 0))
    mt_new = tl.maximum(m_t, tl.max(t, 0))
    e_s = tl.exp2(s - ms_new)
    e_t = tl.exp2(t - mt_new)
    al_s = tl.exp2(m_s - ms_new)
    al_t = tl.exp2(m_t - mt_new)
    z_s = z_s * al_s + tl.sum(e_s, 0)
    z_t = z_t * al_t + tl.sum(e_t, 0)
    if KIND == 0:
        a = a * al_s + tl.sum(e_s * dst, 0)
    elif KIND == 1:
        a = a * al_t - tl.sum(e_t * dst, 0)
    return ms_new, z_s, mt_new, z_t, a


@triton.jit
def _stats_kernel(S, T, OUT, stride_s, stride_t, n_valid, n_full, scale,
                  KIND: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK)
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    chk = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, n_full, BLOCK, num_stages=NUM_STAGES):
        s = tl.load(s_row + start + offs).to(tl.float32) * scale
        t = tl.load(t_row + start + offs).to(tl.float32) * scale
        chk += (s - s) + (t - t)
        m_s, z_s, m_t, z_t, a = _stats_update(s, t, s - t, m_s, z_s, m_t, z_t, a, KIND)
    if n_full < n_valid:
        cols = n_full + offs
        mask = cols < n_valid
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        chk += (s - s) + (t - t)
        m_s, z_s, m_t, z_t, a = _stats_update(tl.where(mask, s, float("-inf")),
                                              tl.where(mask, t, float("-inf")), s - t,
                                              m_s, z_s, m_t, z_t, a, KIND)
    # chk is 0 unless some valid input was NaN/Inf; adding it keeps z_s exact otherwise.
    z_s = z_s + tl.sum(chk, 0)
    o = OUT + row * 5
    tl.store(o + 0, m_s * 0.6931471805599453)
    tl.store(o + 1, z_s)
    tl.store(o + 2, m_t * 0.6931471805599453)
    tl.store(o + 3, z_t)
    tl.store(o + 4, a * 0.6931471805599453)


@triton.jit
def _jsd_terms(s, t, lse_s2, lse_t2, beta):
    ls = s - lse_s2
    lt = t - lse_t2
    p_s = tl.exp2(ls)
    p_t = tl.exp2(lt)
    m = beta * p_t + (1.0 - beta) * p_s
    lm = tl.log2(m)
    pos = m > 0.0
    bs = tl.where(pos, p_s * (ls - lm), 0.0)
    bt = tl.where(pos, p_t * (lt - lm), 0.0)
    return bs, bt


@triton.jit
def _jsd_kernel(S, T, OUT, LSE_S, LSE_T, stride_s, stride_t, n_valid, n_full, scale, beta,
                BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lse_s2 = tl.load(LSE_S + row) * 1.4426950408889634
    lse_t2 = tl.load(LSE_T + row) * 1.4426950408889634
    offs = tl.arange(0, BLOCK)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    acc_t = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, n_full, BLOCK, num_stages=NUM_STAGES):
        s = tl.load(s_row + start + offs).to(tl.float32) * scale
        t = tl.load(t_row + start + offs).to(tl.float32) * scale
        bs, bt = _jsd_terms(s, t, lse_s2, lse_t2, beta)
        acc_s += bs
        acc_t += bt
    if n_full < n_valid:
        cols = n_full + offs
        mask = cols < n_valid
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        bs, bt = _jsd_terms(s, t, lse_s2, lse_t2, beta)
        acc_s += tl.where(mask, bs, 0.0)
        acc_t += tl.where(mask, bt, 0.0)
    tl.store(OUT + row * 2, tl.sum(acc_s, 0) * 0.6931471805599453)
    tl.store(OUT + row * 2 + 1, tl.sum(acc_t, 0) * 0.6931471805599453)


@triton.jit
def _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND: tl.constexpr):
    ls = s - lse_s2
    lt = t - lse_t2
    p_s = tl.exp2(ls)
    if KIND == 0:
        f = p_s * ((ls - lt) * 0.6931471805599453 - extra)
    elif KIND == 1:
        f = p_s - tl.exp2(lt)
    else:
        m = beta * tl.exp2(lt) + (1.0 - beta) * p_s
        f = tl.where(m > 0.0,
                     (1.0 - beta) * p_s * ((ls - tl.log2(m)) * 0.6931471805599453 - extra), 0.0)
    return coef * f


@triton.jit
def _grad_kernel(S, T, G, LSE_S, LSE_T, COEF, EXTRA, stride_s, stride_t, stride_g,
                 n_cols, n_valid, n_cb, scale, beta,
                 KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // n_cb
    start = (pid - row * n_cb) * BLOCK
    row = row.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cols = start + offs
    g_ptrs = G + row * stride_g + cols
    coef = tl.load(COEF + row)
    if (coef == 0.0) | (start >= n_valid):
        tl.store(g_ptrs, tl.zeros((BLOCK,), G.dtype.element_ty), mask=cols < n_cols)
    else:
        lse_s2 = tl.load(LSE_S + row) * 1.4426950408889634
        lse_t2 = tl.load(LSE_T + row) * 1.4426950408889634
        extra = tl.load(EXTRA + row)
        s_ptrs = S + row * stride_s + cols
        t_ptrs = T + row * stride_t + cols
        if start + BLOCK <= n_valid:
            s = tl.load(s_ptrs).to(tl.float32) * scale
            t = tl.load(t_ptrs).to(tl.float32) * scale
            g = _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND)
            tl.store(g_ptrs, g.to(G.dtype.element_ty))
        else:
            mask = cols < n_valid
            s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32) * scale
            t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32) * scale
            g = _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND)
            g = tl.where(mask, g, 0.0)
            tl.store(g_ptrs, g.to(G.dtype.element_ty), mask=cols < n_cols)


if _interpreted():
    _fix_interpreter_numpy24()


# --------------------------------------------------------------------------------------
# launchers (the backend contract)


def _n_valid(v_local, col_start, vocab_size):
    return max(0, min(v_local, vocab_size - col_start))


def _cfg(name, n_valid):
    c = dict(CONFIG[name])
    if _interpreted():
        c["BLOCK"] = min(_INTERPRET_BLOCK, triton.next_power_of_2(max(16, n_valid)))
    return c


def _check(x):
    if x.stride(1) != 1:
        raise ValueError("the Triton backend needs unit stride along the vocabulary dimension")


def partial_stats(student, teacher, kind, inv_temp, col_start, vocab_size):
    _check(student)
    _check(teacher)
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    out = torch.empty(n, 5, dtype=torch.float32, device=student.device)
    if nv == 0:
        out[:] = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, 0.0])
        return out
    if n == 0:
        return out
    c = _cfg("stats", nv)
    _stats_kernel[(n,)](student, teacher, out, student.stride(0), teacher.stride(0), nv,
                        nv // c["BLOCK"] * c["BLOCK"], float(inv_temp) * LOG2E, KIND=_KIND_ID[kind], BLOCK=c["BLOCK"],
                        NUM_STAGES=c["num_stages"], num_warps=c["num_warps"])
    return out


def jsd_partial(student, teacher, lse_s, lse_t, beta, inv_temp, col_start, vocab_size):
    _check(student)
    _check(teacher)
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    out = torch.zeros(n, 2, dtype=torch.float32, device=student.device)
    if nv == 0 or n == 0:
        return out
    c = _cfg("jsd", nv)
    _jsd_kernel[(n,)](student, teacher, out, lse_s.contiguous(), lse_t.contiguous(),
                      student.stride(0), teacher.stride(0), nv, nv // c["BLOCK"] * c["BLOCK"],
                      float(inv_temp) * LOG2E,
                      float(beta), BLOCK=c["BLOCK"], NUM_STAGES=c["num_stages"],
                      num_warps=c["num_warps"])
    return out


def grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_temp, col_start,
         vocab_size, out=None):
    """The gradient; ``out`` (optional, ``[N, V_local]`` in the student's dtype, unit column
    stride) is written in place and returned."""
    _check(student)
    _check(teacher)
    n, v = student.shape
    nv = _n_valid(v, col_start, vocab_size)
    if out is None:
        out = torch.empty(n, v, dtype=student.dtype, device=student.device)
    if n == 0:
        return out
    c = _cfg("grad", v)
    block = c["BLOCK"]
    n_cb = triton.cdiv(v, block)
    _grad_kernel[(n * n_cb,)](student, teacher, out, lse_s.contiguous(), lse_t.contiguous(),
                              coef.float().contiguous(), extra.contiguous(),
                              student.stride(0), teacher.stride(0), out.stride(0), v, nv, n_cb,
                              float(inv_temp) * LOG2E, float(beta), KIND=_KIND_ID[kind],
                              BLOCK=block, num_warps=c["num_warps"])
    return out
