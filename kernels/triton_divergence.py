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
from triton.language.extra import libdevice

__all__ = ["partial_stats", "jsd_partial", "grad", "is_available", "unavailable_reason",
           "runs_on", "why_not", "CONFIG"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_KIND_ID = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}

# Launch parameters, per kernel. Chosen on an H100 (see kernels/BENCHMARKS.md); the
# benchmark's --sweep mode overrides them through this dict.
CONFIG = {
    # FUSED: tuple reductions (None: on for compiled kernels, off under the interpreter).
    "stats": {"BLOCK": 4096, "num_warps": 8, "num_stages": 2, "FUSED": None},
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


def _triton_itself_interpreted() -> bool:
    """Triton's own @jit helpers (the combine functions of tl.sum/tl.max) were decorated
    when triton was first imported: they are interpretable only if TRITON_INTERPRET was set
    before that import, not merely before this module's."""
    try:
        from triton.language import standard
    except ImportError:
        return True
    fn = getattr(standard, "_sum_combine", None)
    return fn is None or type(fn).__name__ == "InterpretedFunction"


def runs_on(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return not _interpreted() and torch.cuda.is_available()
    return device.type == "cpu" and _interpreted() and _triton_itself_interpreted()


def why_not(device) -> str:
    device = torch.device(device)
    if device.type == "cpu" and _interpreted() and not _triton_itself_interpreted():
        return ("triton was imported before TRITON_INTERPRET=1 was set, so its own reduction "
                "helpers are compiled-mode functions the interpreter cannot call; set "
                "TRITON_INTERPRET=1 before anything imports triton (environment or conftest.py)")
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
def _max2(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _sum3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _stats_update(xs, xt, dx, m_s, z_s, m_t, z_t, a, scale, KIND: tl.constexpr,
                  FUSED: tl.constexpr):
    # xs, xt: raw fp32 logits of one block, masked lanes -inf (so their e is 0);
    # dx = xs - xt with masked lanes 0 (so e * dx is 0 there, never 0 * NaN).
    # m_*: running maxima in base-2 tempered units (x * scale); z_*: sums of 2^(x*scale - m);
    # a: sum of e * dx in raw units. max(x * scale) = scale * max(x) as scale > 0, so the
    # scale is applied once per block to the maxima and fused into the exponent's FFMA.
    # FUSED: one tuple reduction for both maxima and one for the three sums (fewer
    # barriers on a GPU); the interpreter runs tuple reductions element by element in
    # Python (40x slower), so it takes separate reductions of the same values.
    if FUSED:
        bs, bt = tl.reduce((xs, xt), 0, _max2)
    else:
        bs = tl.max(xs, 0)
        bt = tl.max(xt, 0)
    ms_new = tl.maximum(m_s, bs * scale)
    mt_new = tl.maximum(m_t, bt * scale)
    e_s = tl.exp2(xs * scale - ms_new)
    e_t = tl.exp2(xt * scale - mt_new)
    al_s = tl.exp2(m_s - ms_new)
    al_t = tl.exp2(m_t - mt_new)
    # JSD does not need a, but computing it like reverse KL makes NaN/Inf inputs surface
    # in the statistics (e * dx is NaN or Inf for them).
    if KIND == 1:
        w = e_t * dx
    else:
        w = e_s * dx
    if FUSED:
        sz_s, sz_t, sa = tl.reduce((e_s, e_t, w), 0, _sum3)
    else:
        sz_s = tl.sum(e_s, 0)
        sz_t = tl.sum(e_t, 0)
        sa = tl.sum(w, 0)
    if KIND == 1:
        a = a * al_t - sa
    else:
        a = a * al_s + sa
    z_s = z_s * al_s + sz_s
    z_t = z_t * al_t + sz_t
    return ms_new, z_s, mt_new, z_t, a


@triton.jit
def _stats_kernel(S, T, OUT, stride_s, stride_t, n_valid, n_full, scale,
                  KIND: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
                  FUSED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK)
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    z_s = tl.zeros((), tl.float32)
    z_t = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for start in tl.range(0, n_full, BLOCK, num_stages=NUM_STAGES):
        xs = tl.load(s_row + start + offs).to(tl.float32)
        xt = tl.load(t_row + start + offs).to(tl.float32)
        m_s, z_s, m_t, z_t, a = _stats_update(xs, xt, xs - xt, m_s, z_s, m_t, z_t, a, scale,
                                              KIND, FUSED)
    if n_full < n_valid:
        cols = n_full + offs
        mask = cols < n_valid
        xs = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        m_s, z_s, m_t, z_t, a = _stats_update(tl.where(mask, xs, float("-inf")),
                                              tl.where(mask, xt, float("-inf")), xs - xt,
                                              m_s, z_s, m_t, z_t, a, scale, KIND, FUSED)
    a = a * (scale * 0.6931471805599453)
    if KIND == 2:
        z_s = z_s + a * 0.0  # NaN iff some valid input was NaN/Inf; exact otherwise
        a = 0.0
    o = OUT + row * 5
    tl.store(o + 0, m_s * 0.6931471805599453)
    tl.store(o + 1, z_s)
    tl.store(o + 2, m_t * 0.6931471805599453)
    tl.store(o + 3, z_t)
    tl.store(o + 4, a)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    # FAST: the hardware lg2.approx (one MUFU op, ~2^-22 relative error); tl.log2 lowers to a
    # ~20-instruction polynomial, which made JSD issue-bound (bench_aot: 49 instructions
    # per element pair). The interpreter has no libdevice, so it takes tl.log2.
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _mixture(p_s, p_t, beta):
    # m = beta p_t + (1 - beta) p_s, clamped to the smallest normal fp32 (2^-126) before its
    # log, as the C++ backend's flog does. Compiled for sm_90, exp2/lg2 are flush-to-zero
    # (ex2.approx.ftz, lg2.approx.ftz) but this sum is plain mul/fma: with one log-probability
    # just above ln(2^-126) = -87.34 and the other below it, m is a nonzero subnormal, its
    # lg2.ftz is -inf and p * (l - log m) becomes inf or NaN (issue 13). Clamped, log m is
    # >= -126 (base 2), and a term whose p is that small contributes at most ~1e-36.
    # propagate_nan=ALL keeps a NaN m NaN (max.NaN.f32), so NaN inputs still surface.
    return tl.maximum(beta * p_t + (1.0 - beta) * p_s, 1.1754943508222875e-38,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _jsd_terms(s, t, lse_s2, lse_t2, beta, FAST_LOG: tl.constexpr):
    ls = s - lse_s2
    lt = t - lse_t2
    p_s = tl.exp2(ls)
    p_t = tl.exp2(lt)
    lm = _log2(_mixture(p_s, p_t, beta), FAST_LOG)
    return p_s * (ls - lm), p_t * (lt - lm)


@triton.jit
def _jsd_kernel(S, T, OUT, LSE_S, LSE_T, stride_s, stride_t, n_valid, n_full, scale, beta,
                BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, FAST_LOG: tl.constexpr):
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
        bs, bt = _jsd_terms(s, t, lse_s2, lse_t2, beta, FAST_LOG)
        acc_s += bs
        acc_t += bt
    if n_full < n_valid:
        cols = n_full + offs
        mask = cols < n_valid
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * scale
        bs, bt = _jsd_terms(s, t, lse_s2, lse_t2, beta, FAST_LOG)
        acc_s += tl.where(mask, bs, 0.0)
        acc_t += tl.where(mask, bt, 0.0)
    tl.store(OUT + row * 2, tl.sum(acc_s, 0) * 0.6931471805599453)
    tl.store(OUT + row * 2 + 1, tl.sum(acc_t, 0) * 0.6931471805599453)


@triton.jit
def _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND: tl.constexpr,
                FAST_LOG: tl.constexpr):
    ls = s - lse_s2
    lt = t - lse_t2
    p_s = tl.exp2(ls)
    if KIND == 0:
        f = p_s * ((ls - lt) * 0.6931471805599453 - extra)
    elif KIND == 1:
        f = p_s - tl.exp2(lt)
    else:
        lm = _log2(_mixture(p_s, tl.exp2(lt), beta), FAST_LOG)
        f = (1.0 - beta) * p_s * ((ls - lm) * 0.6931471805599453 - extra)
    return coef * f


@triton.jit
def _grad_kernel(S, T, G, LSE_S, LSE_T, COEF, EXTRA, stride_s, stride_t, stride_g,
                 n_cols, n_valid, n_cb, scale, beta,
                 KIND: tl.constexpr, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
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
            g = _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND, FAST_LOG)
            tl.store(g_ptrs, g.to(G.dtype.element_ty))
        else:
            mask = cols < n_valid
            s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32) * scale
            t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32) * scale
            g = _grad_terms(s, t, lse_s2, lse_t2, coef, extra, beta, KIND, FAST_LOG)
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
    fused = c.get("FUSED")
    fused = (not _interpreted()) if fused is None else bool(fused)
    _stats_kernel[(n,)](student, teacher, out, student.stride(0), teacher.stride(0), nv,
                        nv // c["BLOCK"] * c["BLOCK"], float(inv_temp) * LOG2E, KIND=_KIND_ID[kind], BLOCK=c["BLOCK"],
                        NUM_STAGES=c["num_stages"], FUSED=fused,
                        num_warps=c["num_warps"])
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
                      FAST_LOG=not _interpreted(), num_warps=c["num_warps"])
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
                              BLOCK=block, FAST_LOG=not _interpreted(),
                              num_warps=c["num_warps"])
    return out
