"""The C++ CPU backend (ophsd_kernels._C via ophsd_kernels.cpu_backend) against float64 PyTorch.

Each primitive (partial_stats, jsd_partial, grad) is checked against a float64 computation of
the same quantity on the same (dtype-rounded) inputs; then the primitives are combined the way
the public API does (per-shard statistics -> global lse, per-token divergence, gradient) and
checked against float64 autograd of log_softmax-based KL / JSD over the true vocabulary.

Tolerances (the kernel computes in fp32 from inputs that are exactly representable in fp32):
* m: the max of ``x * inv_temp`` rounded to fp32: rtol 1e-6.
* z, b, divergence: fp32 exp/log polynomials (~2 ulp) and fp32 rounding of ``x*inv_temp - lse``
  (|x| ~ 10: ~1e-6 absolute on a log-probability), sums in fp32 SIMD lanes per 1024-column chunk
  and fp64 across chunks: relative 2e-5 of the sum of absolute terms, plus 2e-5 absolute on
  quantities that are differences of O(10) log-sum-exps (d = a/z - lse_s + lse_t).
* gradient: the same fp32 error budget relative to the largest gradient entry (2e-5 * max|g|),
  plus the output rounding of the dtype: half an ulp, relative <= 2^-8 for bf16 (rtol 4e-3) and
  2^-11 for fp16 (rtol 5e-4,
  and subnormal spacing 2^-24 absolute); float32 rtol 1e-4 for small entries.
A wrong term, sign, temperature factor, padding leak or chunk-rescaling bug gives errors of the
order of the values themselves, far above these bounds.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from ophsd_kernels import cpu_backend as cb

_REQUIRE = os.environ.get("OPHSD_REQUIRE_NATIVE", "") not in ("", "0")
if not cb.is_available() and not _REQUIRE:
    pytest.skip(f"C++ CPU backend unavailable: {cb.unavailable_reason()}", allow_module_level=True)

KINDS = ("reverse_kl", "forward_kl", "jsd")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 4e-3, torch.float16: 5e-4}
GRAD_ATOL_ABS = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The inputs here are tiny: intra-op threads only add OpenMP barrier waits (seconds on a
    # loaded 2-core CI machine). test_thread_count_does_not_change_results covers the threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(n, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = s + torch.randn(n, v, generator=g) * scale  # related but different distributions
    return s.to(dtype).contiguous(), t.to(dtype).contiguous()


def _close(got, want, rtol, atol, what):
    got = got.double()
    err = (got - want).abs()
    bound = rtol * want.abs() + atol
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} entries off; worst err "
                           f"{err.max().item():.3e} (bound there {bound.flatten()[err.argmax()].item():.3e})")


# ---- float64 references of the primitives -----------------------------------------------------

def ref_stats(student, teacher, kind, inv_t, col_start, vocab_size):
    nv = max(0, min(student.shape[1], vocab_size - col_start))
    s = student.double()[:, :nv] * inv_t
    t = teacher.double()[:, :nv] * inv_t
    n = student.shape[0]
    if nv == 0:
        z = torch.zeros(n, dtype=torch.float64)
        ninf = torch.full((n,), -math.inf, dtype=torch.float64)
        return torch.stack([ninf, z, ninf, z, z], 1), z, z
    m_s, m_t = s.amax(1), t.amax(1)
    es, et = (s - m_s[:, None]).exp(), (t - m_t[:, None]).exp()
    if kind == "reverse_kl":
        terms = es * (s - t)
    elif kind == "forward_kl":
        terms = et * (t - s)
    else:
        terms = torch.zeros_like(es)
    out = torch.stack([m_s, es.sum(1), m_t, et.sum(1), terms.sum(1)], 1)
    return out, terms.abs().sum(1), es.sum(1)


def ref_jsd_partial(student, teacher, lse_s, lse_t, beta, inv_t, col_start, vocab_size):
    nv = max(0, min(student.shape[1], vocab_size - col_start))
    lps = student.double()[:, :nv] * inv_t - lse_s.double()[:, None]
    lpt = teacher.double()[:, :nv] * inv_t - lse_t.double()[:, None]
    lm = torch.logaddexp(math.log(beta) + lpt, math.log1p(-beta) + lps)
    ts, tt = lps.exp() * (lps - lm), lpt.exp() * (lpt - lm)
    return torch.stack([ts.sum(1), tt.sum(1)], 1), torch.stack([ts.abs().sum(1), tt.abs().sum(1)], 1)


def ref_grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_t, col_start, vocab_size):
    n, v = student.shape
    nv = max(0, min(v, vocab_size - col_start))
    lps = student.double()[:, :nv] * inv_t - lse_s.double()[:, None]
    lpt = teacher.double()[:, :nv] * inv_t - lse_t.double()[:, None]
    ps, pt = lps.exp(), lpt.exp()
    e = extra.double()[:, None]
    if kind == "reverse_kl":
        f = ps * (lps - lpt - e)
    elif kind == "forward_kl":
        f = ps - pt
    else:
        lm = torch.logaddexp(math.log(beta) + lpt, math.log1p(-beta) + lps)
        f = (1 - beta) * ps * (lps - lm - e)
    # error scale of each entry: fp32 rounding of p (relative) and of the log-ratio (absolute)
    if kind == "forward_kl":
        scale = ps + pt
    elif kind == "reverse_kl":
        scale = ps * ((lps - lpt - e).abs() + 1)
    else:
        scale = ps * ((lps - lm - e).abs() + 1)
    out = torch.zeros(n, v, dtype=torch.float64)
    err_scale = torch.zeros(n, v, dtype=torch.float64)
    out[:, :nv] = coef.double()[:, None] * f
    err_scale[:, :nv] = coef.double().abs()[:, None] * scale
    return out, err_scale


# ---- float64 autograd reference of the whole divergence ---------------------------------------

def ref_divergence(student, teacher, kind, beta, inv_t, vocab_size):
    """Per-token divergence of the tempered distributions over the first vocab_size columns."""
    lps = torch.log_softmax(student[:, :vocab_size] * inv_t, dim=-1)
    lpt = torch.log_softmax(teacher[:, :vocab_size] * inv_t, dim=-1)
    if kind == "reverse_kl":
        return (lps.exp() * (lps - lpt)).sum(-1)
    if kind == "forward_kl":
        return (lpt.exp() * (lpt - lps)).sum(-1)
    lm = torch.logaddexp(math.log(beta) + lpt, math.log1p(-beta) + lps)
    return beta * (lpt.exp() * (lpt - lm)).sum(-1) + (1 - beta) * (lps.exp() * (lps - lm)).sum(-1)


def cpp_divergence(student, teacher, kind, beta, inv_t, vocab_size, shard, weights):
    """Per-token d and d(sum_i w_i d_i)/d student from the C++ primitives over column shards of
    width ``shard`` (rank r holds global columns [r*shard, (r+1)*shard)), combined like the API."""
    v = student.shape[1]
    starts = list(range(0, v, shard))
    sl = [(c, student[:, c:c + shard].contiguous(), teacher[:, c:c + shard].contiguous())
          for c in starts]
    stats = torch.stack([cb.partial_stats(s, t, kind, inv_t, c, vocab_size) for c, s, t in sl])
    m_s, z_s, m_t, z_t, a = stats.double().unbind(-1)
    gm_s, gm_t = m_s.amax(0), m_t.amax(0)
    sc_s = torch.where(z_s != 0, (m_s - gm_s).exp(), torch.zeros_like(z_s))
    sc_t = torch.where(z_t != 0, (m_t - gm_t).exp(), torch.zeros_like(z_t))
    sc_a = sc_s if kind == "reverse_kl" else sc_t
    Z_s, Z_t, A = (z_s * sc_s).sum(0), (z_t * sc_t).sum(0), (a * sc_a).sum(0)
    lse_s, lse_t = gm_s + Z_s.log(), gm_t + Z_t.log()
    if kind == "reverse_kl":
        d = A / Z_s - lse_s + lse_t
        extra = d
    elif kind == "forward_kl":
        d = A / Z_t - lse_t + lse_s
        extra = d
    else:
        b = sum(cb.jsd_partial(s, t, lse_s.float(), lse_t.float(), beta, inv_t, c, vocab_size).double()
                for c, s, t in sl)
        d = beta * b[:, 1] + (1 - beta) * b[:, 0]
        extra = b[:, 0]
    coef = (weights.double() * inv_t).float()
    g = torch.cat([cb.grad(s, t, lse_s.float(), lse_t.float(), coef, extra.float(), kind, beta,
                           inv_t, c, vocab_size) for c, s, t in sl], dim=1)
    return d, g


# ---- the module is the compiled one -----------------------------------------------------------

def test_compiled_module_is_used():
    assert cb.is_available(), cb.unavailable_reason()
    assert cb.unavailable_reason() == ""
    info = cb.build_info()
    assert info["file"].endswith(".so") and os.path.basename(info["file"]).startswith("_C.")
    import ophsd_kernels
    assert os.path.dirname(info["file"]) == os.path.dirname(ophsd_kernels.__file__)
    assert info["torch_version"] == torch.__version__
    assert info["simd"] in ("avx512", "avx2", "baseline") and info["openmp"]
    # the wrappers call the dispatcher ops that the shared library registered ...
    s, t = _logits(3, 50, torch.float32, 0)
    direct = torch.ops.ophsd_kernels.partial_stats(s, t, "reverse_kl", 1.0, 0, 50)
    assert torch.equal(cb.partial_stats(s, t, "reverse_kl", 1.0, 0, 50), direct)
    # ... and those are C++ kernels (their argument errors come from C++ TORCH_CHECK_VALUE).
    with pytest.raises(ValueError, match="kind must be 'reverse_kl'"):
        torch.ops.ophsd_kernels.partial_stats(s, t, "kl", 1.0, 0, 50)


# ---- primitives vs float64 --------------------------------------------------------------------

LAYOUTS = [  # (V_local, col_start, vocab_size)
    (1031, 0, 1031),      # one full shard, no padding
    (1031, 1031, 2000),   # second shard of two, vocab_size cuts it (969 valid columns)
    (1031, 2062, 2063),   # a shard with one valid column, all the rest padding
    (1031, 2062, 2062),   # a shard that is all padding (m = -inf, z = 0, zero gradient)
    (5000, 0, 4990),      # several 1024-column chunks with a growing max (online rescaling)
]


def _lid(layout):
    return f"V{layout[0]}c{layout[1]}v{layout[2]}"


def _cases(first, layouts, dtype_layout):
    """Every value of `first` x every layout in float32, and x bf16/fp16 on one layout: the
    dtype only changes the loads/stores, the layouts exercise the padding and chunk logic."""
    cases = [pytest.param(a, torch.float32, l, id=f"{a}-float32-{_lid(l)}")
             for a in first for l in layouts]
    cases += [pytest.param(a, dt, dtype_layout, id=f"{a}-{str(dt)[6:]}-{_lid(dtype_layout)}")
              for a in first for dt in DTYPES[1:]]
    return cases


@pytest.mark.parametrize("kind,dtype,layout", _cases(KINDS, LAYOUTS, LAYOUTS[4]))
def test_partial_stats(kind, dtype, layout):
    v, c, vocab = layout
    s, t = _logits(37, v, dtype, seed=v + c + vocab)
    if v == 5000:  # make the running max grow from chunk to chunk: rescaling z and a matters
        ramp = torch.linspace(0, 12, v)
        s, t = (s.float() + ramp).to(dtype), (t.float() + 0.5 * ramp).to(dtype)
    inv_t = 1 / 0.7
    got = cb.partial_stats(s, t, kind, inv_t, c, vocab)
    assert got.dtype == torch.float32 and got.shape == (37, 5)
    want, abs_terms, _ = ref_stats(s, t, kind, inv_t, c, vocab)
    if vocab <= c:
        assert torch.isneginf(got[:, 0]).all() and torch.isneginf(got[:, 2]).all()
        assert (got[:, [1, 3, 4]] == 0).all()
        return
    _close(got[:, 0], want[:, 0], 1e-6, 1e-6, "m_s")
    _close(got[:, 2], want[:, 2], 1e-6, 1e-6, "m_t")
    _close(got[:, 1], want[:, 1], 2e-5, 0, "z_s")
    _close(got[:, 3], want[:, 3], 2e-5, 0, "z_t")
    if kind == "jsd":
        assert (got[:, 4] == 0).all()
    else:  # signed sum: error relative to the sum of |terms|
        _close(got[:, 4], want[:, 4], 0, 2e-5 * abs_terms + 1e-6, "a")


@pytest.mark.parametrize("beta,dtype,layout", _cases((0.1, 0.5, 0.9), LAYOUTS[:3] + LAYOUTS[4:],
                                                     LAYOUTS[1]))
def test_jsd_partial(beta, dtype, layout):
    v, c, vocab = layout
    s, t = _logits(37, v, dtype, seed=7 * v + c)
    inv_t = 1 / 1.3
    # global lse over the valid columns of this shard (as if it were the whole vocabulary)
    nv = min(v, vocab - c)
    lse_s = torch.logsumexp(s.double()[:, :nv] * inv_t, 1).float()
    lse_t = torch.logsumexp(t.double()[:, :nv] * inv_t, 1).float()
    got = cb.jsd_partial(s, t, lse_s, lse_t, beta, inv_t, c, vocab)
    assert got.dtype == torch.float32 and got.shape == (37, 2)
    want, abs_terms = ref_jsd_partial(s, t, lse_s, lse_t, beta, inv_t, c, vocab)
    _close(got, want, 0, 2e-5 * abs_terms + 2e-6, "b")
    assert (got >= -1e-5).all()  # both are KL divergences to the mixture


@pytest.mark.parametrize("kind,dtype,layout", _cases(KINDS, LAYOUTS[1:3] + LAYOUTS[4:], LAYOUTS[1]))
def test_grad_primitive(kind, dtype, layout):
    v, c, vocab = layout
    n = 37
    s, t = _logits(n, v, dtype, seed=3 * v + c + 1)
    inv_t, beta = 1 / 0.7, 0.3
    nv = min(v, vocab - c)
    lse_s = torch.logsumexp(s.double()[:, :nv] * inv_t, 1).float()
    lse_t = torch.logsumexp(t.double()[:, :nv] * inv_t, 1).float()
    g = torch.Generator().manual_seed(11)
    coef = torch.rand(n, generator=g) * 2 - 0.5
    coef[::5] = 0.0
    extra = torch.rand(n, generator=g) * 0.5
    got = cb.grad(s, t, lse_s, lse_t, coef, extra, kind, beta, inv_t, c, vocab)
    assert got.dtype == dtype and got.shape == (n, v)
    want, err_scale = ref_grad(s, t, lse_s, lse_t, coef, extra, kind, beta, inv_t, c, vocab)
    atol = 1e-5 * err_scale + 1e-7 * want.abs().amax() + GRAD_ATOL_ABS[dtype]
    _close(got, want, GRAD_RTOL[dtype], atol, f"grad {kind}")
    assert (got[::5] == 0).all() and not torch.signbit(got[::5].float()).any()
    assert (got[:, nv:] == 0).all()


# ---- combined: divergence and gradient vs float64 autograd ------------------------------------

_KIND_BETA = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
_SHARDS = {"tp1": (1031, 1031), "tp3_padded": (700, 2063), "tp2_padded": (1031, 2000)}
_COMBINED = [pytest.param(k, b, torch.float32, *sv, id=f"{k}-{b}-float32-{name}")
             for k, b in _KIND_BETA for name, sv in _SHARDS.items()]
_COMBINED += [pytest.param(k, b, dt, *_SHARDS["tp2_padded"], id=f"{k}-{b}-{str(dt)[6:]}-tp2_padded")
              for k, b in _KIND_BETA for dt in DTYPES[1:]]


@pytest.mark.parametrize("kind,beta,dtype,shard,vocab", _COMBINED)
def test_divergence_and_grad_vs_autograd(kind, beta, dtype, shard, vocab):
    n = 37
    ranks = -(-vocab // shard)
    s, t = _logits(n, ranks * shard, dtype, seed=ranks * 100 + vocab)
    inv_t = 1 / 0.8
    w = torch.rand(n, generator=torch.Generator().manual_seed(5))
    w[3::7] = 0.0  # masked tokens
    d, g = cpp_divergence(s, t, kind, beta, inv_t, vocab, shard, w)

    s64 = s.double().requires_grad_(True)
    d64 = ref_divergence(s64, t.double(), kind, beta, inv_t, vocab)
    (w.double() * d64).sum().backward()
    g64 = s64.grad
    _close(d, d64.detach(), 2e-5, 2e-5, f"{kind} divergence")
    assert g.dtype == dtype
    atol = 2e-5 * g64.abs().amax() + GRAD_ATOL_ABS[dtype]
    _close(g, g64, GRAD_RTOL[dtype], atol, f"{kind} gradient")
    assert (g[3::7] == 0).all()
    assert (g[:, vocab:] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_large_magnitude_logits_stay_finite(kind):
    n, v = 17, 1031
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(n, v, generator=g) * 1e4).contiguous()
    t = (torch.randn(n, v, generator=g) * 1e4).contiguous()
    s[0], t[0] = 1e4, -1e4  # constant rows: uniform distributions
    w = torch.ones(n)
    d, grad = cpp_divergence(s, t, kind, 0.5, 1.0, v, v, w)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    s64 = s.double().requires_grad_(True)
    d64 = ref_divergence(s64, t.double(), kind, 0.5, 1.0, v)
    d64.sum().backward()
    # |x| ~ 3e4: fp32 lse has an ulp of ~2e-3, so d carries an absolute error of ~1e-2.
    _close(d, d64.detach(), 1e-6, 2e-2, f"{kind} divergence at |x|~1e4")
    # Each gradient entry is p * (difference of log-probabilities of size |x| ~ 3e4) or a
    # difference of probabilities; in fp32 those operands carry ~1 ulp of |x| each, so the bound
    # is 4e-7 (~3 ulp) of p * (|s| + |t| + |d| + 1) per entry (p = the larger probability).
    lps = torch.log_softmax(s.double(), -1)
    lpt = torch.log_softmax(t.double(), -1)
    p = torch.maximum(lps.exp(), lpt.exp())
    mag = p * (s.double().abs() + t.double().abs() + d64.detach().abs()[:, None] + 1)
    _close(grad, s64.grad, 0, 4e-7 * mag + 1e-7, f"{kind} gradient at |x|~1e4")


@pytest.mark.parametrize("kind", KINDS)
def test_thread_count_does_not_change_results(kind):
    # Rows are independent and each row is reduced in a fixed order: the result must be
    # bit-identical for any number of threads (and the multi-threaded path must run at all).
    n, v = 64, 4099  # 262k elements: split over 2 threads (grain 32k elements)
    s, t = _logits(n, v, torch.bfloat16, 21)
    lse_s, lse_t = torch.randn(n) + 8, torch.randn(n) + 8
    coef, extra = torch.rand(n), torch.rand(n)

    def run():
        return (cb.partial_stats(s, t, kind, 0.9, 10, 4000),
                cb.jsd_partial(s, t, lse_s, lse_t, 0.3, 0.9, 10, 4000),
                cb.grad(s, t, lse_s, lse_t, coef, extra, kind, 0.3, 0.9, 10, 4000))

    one = run()
    torch.set_num_threads(2)
    try:
        two = run()
    finally:
        torch.set_num_threads(1)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_zero_coef_rows_are_exact_zeros_even_for_nonfinite_inputs():
    n, v = 6, 1031
    s, t = _logits(n, v, torch.float32, 9)
    s[2, 5] = float("nan")  # never read: the row is masked
    lse = torch.zeros(n)
    coef = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    for kind in KINDS:
        out = cb.grad(s, t, lse, lse, coef, lse, kind, 0.5, 1.0, 0, v)
        assert (out[coef == 0] == 0).all()
        assert torch.isfinite(out[[0, 3, 5]]).all()


def test_nonfinite_inputs_show_up_in_the_statistics():
    # The public API detects NaN/Inf logits from the per-token statistics: they must not vanish.
    s, t = _logits(4, 2000, torch.float32, 2)
    s[0, 1500] = float("nan")
    s[1, 10] = float("inf")
    t[2, 700] = float("-inf")
    for kind in ("reverse_kl", "forward_kl"):
        st = cb.partial_stats(s, t, kind, 1.0, 0, 2000)
        bad = ~torch.isfinite(st).all(1)
        assert bad[:3].all() and not bad[3], (kind, st)
    st = cb.partial_stats(s, t, "jsd", 1.0, 0, 2000)
    assert not torch.isfinite(st[:2]).all(1).any()


def test_argument_errors():
    s, t = _logits(4, 64, torch.float32, 1)
    v = torch.zeros(4)
    with pytest.raises(ValueError, match="kind"):
        cb.partial_stats(s, t, "kl", 1.0, 0, 64)
    with pytest.raises(ValueError, match="teacher dtype"):
        cb.partial_stats(s, t.half(), "jsd", 1.0, 0, 64)
    with pytest.raises(ValueError, match="teacher shape"):
        cb.partial_stats(s, t[:, :32].contiguous(), "jsd", 1.0, 0, 64)
    with pytest.raises(ValueError, match="contiguous"):
        cb.partial_stats(s.t(), t.t(), "jsd", 1.0, 0, 64)
    with pytest.raises(ValueError, match="dtype must be"):
        cb.partial_stats(s.double(), t.double(), "jsd", 1.0, 0, 64)
    with pytest.raises(ValueError, match="inv_temp"):
        cb.partial_stats(s, t, "jsd", 0.0, 0, 64)
    with pytest.raises(ValueError, match="beta"):
        cb.jsd_partial(s, t, v, v, 1.0, 1.0, 0, 64)
    with pytest.raises(ValueError, match="lse_t"):
        cb.jsd_partial(s, t, v, v[:3], 0.5, 1.0, 0, 64)
    with pytest.raises(ValueError, match="coef"):
        cb.grad(s, t, v, v, v.double(), v, "reverse_kl", 0.5, 1.0, 0, 64)
    # the C++ side checks too (callers that bypass the wrappers)
    with pytest.raises(ValueError, match="extra"):
        torch.ops.ophsd_kernels.grad(s, t, v, v, v, v[:2], "reverse_kl", 0.5, 1.0, 0, 64)
