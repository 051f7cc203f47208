"""Fused vocab-parallel divergence: every backend against a float64 oracle.

The oracle is a direct ``log_softmax`` formula in float64 over the full (unsharded,
padding-sliced) vocabulary, differentiated by autograd: independent of the backends'
streaming statistics. Inputs are fresh random draws (a per-test seed, so failures
reproduce), with odd shapes, temperatures != 1, zero weights and padded vocabularies.

Tolerances, per input dtype (the oracle sees the same rounded inputs, upcast, so the input
rounding cancels out and only the kernel's own error remains):

* loss (fp32 inside for every dtype): ``rtol 1e-4, atol 2e-5``. d = a/z - lse_s + lse_t
  cancels terms of size log(V) ~ 10 in fp32 (~1e-6 absolute per token); 10x headroom.
* gradient, elementwise ``|g - ref| <= rtol*|ref| + 1e-6*scale + tiny``, where
  ``scale = max_i |dL/dd_i| / T * max(1, max|x| / T)`` is the size of the terms the gradient
  is made of: fp32 rounds the tempered logits to ~1.2e-7 relative, i.e. an absolute error
  of eps*|x/T| in log-probability space, which reaches the gradient times |coef| even where
  p_s - p_t (or the KL bracket) cancels to something small; 1e-6 is ~8 eps32.
  ``rtol``: fp32 1e-5; bf16 8e-3 (8 significant bits: rounding the fp32 result costs
  <= 2^-8 = 3.9e-3 relative, 2x headroom); fp16 1e-3 (11 bits: <= 2^-11 = 4.9e-4, 2x);
  ``tiny``: 2^-24 for fp16 (its subnormal spacing), else 0.

Triton runs through ``TRITON_INTERPRET=1`` when no GPU is present (set below, before triton
is imported, so the same tests compile for real on a GPU); its cases are few and small.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

from ophsd_kernels import divergence as dv  # noqa: E402
from ophsd_kernels import vocab_parallel_divergence  # noqa: E402

KINDS = ("reverse_kl", "forward_kl", "jsd")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

LOSS_TOL = dict(rtol=1e-4, atol=2e-5)
GRAD_TOL = {  # dtype: (rtol, tiny)
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (8e-3, 0.0),
    torch.float16: (1e-3, 2.0 ** -24),
}


# --------------------------------------------------------------------------------------
# oracle and helpers


def oracle(student, teacher, kind="reverse_kl", beta=0.5, temperature=1.0, weights=None,
           vocab_size=None, reduction="mean", grad_out=None):
    """float64 loss, gradient over the full vocabulary (columns >= vocab_size dropped) and the
    gradient's term scale (see the module docstring)."""
    n, v = student.shape
    vs = v if vocab_size is None else vocab_size
    s = student.detach().double()[:, :vs].clone().requires_grad_(True)
    t = teacher.detach().double()[:, :vs]
    ls = torch.log_softmax(s / temperature, dim=1)
    lt = torch.log_softmax(t / temperature, dim=1)
    if kind == "reverse_kl":
        d = (ls.exp() * (ls - lt)).sum(1)
    elif kind == "forward_kl":
        d = (lt.exp() * (lt - ls)).sum(1)
    else:
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        d = beta * (lt.exp() * (lt - lm)).sum(1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(1)
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double().cpu()
    w = w.to(d.device)
    d.retain_grad()
    per = w * d
    if reduction == "none":  # the unweighted per-token divergence
        loss = d
        d.backward(grad_out.double().to(d.device))
    else:
        loss = per.sum() if reduction == "sum" else (
            per.sum() / w.sum() if float(w.sum()) > 0 else per.sum() * 0.0)
        loss.backward()
    g = torch.zeros(n, v, dtype=torch.float64, device=s.device)
    g[:, :vs] = s.grad
    xmax = max(1.0, float(torch.cat([s.detach(), t]).abs().max()) / temperature) if n else 1.0
    scale = (float(d.grad.abs().max()) / temperature * xmax) if n else 0.0
    return loss.detach(), g, scale


def seed_of(*parts) -> int:
    """A fixed seed per check (different inputs for every check, reproducible failures)."""
    return zlib.crc32(repr(parts).encode()) % (2 ** 31)


def make_inputs(n, v, dtype, seed, device=DEV, ramp=False, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=gen) * scale
    # A teacher correlated with the student (realistic) plus independent noise.
    t = 0.6 * s + torch.randn(n, v, generator=gen) * scale
    if ramp:  # the running max moves in every block: exercises the online rescaling
        r = torch.linspace(0, 12, v)
        s, t = s + r, t + r.flip(0) * 0.5 + r * 0.5
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_weights(n, mode, seed, device=DEV):
    if mode is None:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    if mode == "zeros":
        w = (torch.rand(n, generator=gen) > 0.4).float()
        w[0] = 0.0
        return w.to(device)
    if mode == "rand":
        w = torch.rand(n, generator=gen) * 2
        w[n // 2] = 0.0
        return w.to(device)
    if mode == "allzero":
        return torch.zeros(n, device=device)
    raise AssertionError(mode)


def assert_grad_close(g, ref, dtype, scale, what=""):
    rtol, tiny = GRAD_TOL[dtype]
    g = g.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(g).all(), f"non-finite gradient {what}"
    bound = rtol * ref.abs() + 1e-6 * scale + tiny + 1e-300
    err = (g - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"gradient mismatch {what}: max err/bound = {worst:.3g}, "
                          f"max abs err {err.max().item():.3g}, max |ref| "
                          f"{ref.abs().max().item():.3g}")


def assert_loss_close(loss, ref, what=""):
    loss = loss.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(loss).all(), f"non-finite loss {what}"
    torch.testing.assert_close(loss, ref, **LOSS_TOL, msg=lambda m: f"loss mismatch {what}: {m}")


def backend_or_skip(name, device=DEV):
    mod, why = dv.backend_status(name, device)
    if mod is None:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


def run_backend(backend, s0, t0, grad_out=None, **kw):
    s = s0.clone().requires_grad_(True)
    loss = vocab_parallel_divergence(s, t0, backend=backend, **kw)
    if kw.get("reduction", "mean") == "none":
        loss.backward(grad_out.to(loss.device))
    else:
        loss.backward()
    return loss.detach(), s.grad


# --------------------------------------------------------------------------------------
# backends vs float64

# (N, V, vocab_size, temperature, weights, reduction, ramp)
CASES = {
    "37x1031": (37, 1031, None, 1.0, None, "mean", False),
    "37x1031-pad-T0.7-w0-sum": (37, 1031, 1000, 0.7, "zeros", "sum", False),
    "19x2053-T2.3-wrand-none": (19, 2053, 2053, 2.3, "rand", "none", False),
    "6x4099-pad-ramp-w0-mean": (6, 4099, 3001, 1.3, "zeros", "mean", True),
    "3x7-tiny": (3, 7, 5, 0.5, "rand", "mean", False),
}
FAST_BACKENDS = ("torch", "cpp")


def _check_case(backend, kind, dtype, case, beta, seed):
    n, v, vs, temp, wmode, red, ramp = CASES[case]
    s, t = make_inputs(n, v, dtype, seed, ramp=ramp)
    w = make_weights(n, wmode, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    g_out = torch.randn(n, generator=gen)
    kw = dict(kind=kind, beta=beta, temperature=temp, weights=w, vocab_size=vs, reduction=red)
    loss, g = run_backend(backend, s, t, grad_out=g_out, **kw)
    ref_loss, ref_g, scale = oracle(s, t, grad_out=g_out, **kw)
    what = f"[{backend} {kind} {dtype} {case} beta={beta} seed={seed}]"
    assert loss.dtype == torch.float32
    assert g.dtype == dtype and g.shape == s.shape
    assert_loss_close(loss, ref_loss, what)
    assert_grad_close(g, ref_g, dtype, scale, what)
    if vs is not None and vs < v:
        assert (g[:, vs:] == 0).all(), f"padding columns got a gradient {what}"
    if w is not None and red != "none":  # "none" leaves the weights to the caller
        assert (g[w == 0] == 0).all(), f"zero-weight rows got a gradient {what}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_fast_backends_match_float64(backend, kind, dtype, case):
    backend_or_skip(backend)
    betas = (0.1, 0.5, 0.9) if kind == "jsd" else (0.5,)
    for i, beta in enumerate(betas):
        _check_case(backend, kind, dtype, case, beta, seed=seed_of(backend, kind, str(dtype), case, i))


# Interpreter runs are slow (each block op is numpy): a handful of cases.
TRITON_CASES = [
    ("reverse_kl", torch.float32, "37x1031", 0.5),
    ("reverse_kl", torch.bfloat16, "6x4099-pad-ramp-w0-mean", 0.5),
    ("forward_kl", torch.float32, "37x1031-pad-T0.7-w0-sum", 0.5),
    ("forward_kl", torch.float16, "6x4099-pad-ramp-w0-mean", 0.5),
    ("jsd", torch.float32, "19x2053-T2.3-wrand-none", 0.1),
    ("jsd", torch.bfloat16, "37x1031-pad-T0.7-w0-sum", 0.9),
    ("jsd", torch.float32, "6x4099-pad-ramp-w0-mean", 0.5),
    ("reverse_kl", torch.float16, "3x7-tiny", 0.5),
]


@pytest.mark.parametrize("kind,dtype,case,beta", TRITON_CASES,
                         ids=[f"{k}-{str(d)[6:]}-{c}-b{b}" for k, d, c, b in TRITON_CASES])
def test_triton_matches_float64(kind, dtype, case, beta):
    backend_or_skip("triton")
    _check_case("triton", kind, dtype, case, beta, seed=seed_of(kind, str(dtype), case, beta))


@pytest.mark.parametrize("kind", KINDS)
def test_triton_many_blocks_online_rescaling(kind, monkeypatch):
    """Force small blocks so a row spans many full blocks plus a tail, with a moving max."""
    backend_or_skip("triton")
    from ophsd_kernels import triton_divergence as td

    if DEV == "cpu":
        monkeypatch.setattr(td, "_INTERPRET_BLOCK", 128)
    else:
        cfg = {k: dict(v, BLOCK=128) for k, v in td.CONFIG.items()}
        monkeypatch.setattr(td, "CONFIG", cfg)
    s, t = make_inputs(4, 1031, torch.float32, seed=11, ramp=True)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], device=DEV)
    kw = dict(kind=kind, beta=0.3, temperature=0.8, weights=w, vocab_size=1000)
    loss, g = run_backend("triton", s, t, **kw)
    ref_loss, ref_g, scale = oracle(s, t, **kw)
    assert_loss_close(loss, ref_loss, kind)
    assert_grad_close(g, ref_g, torch.float32, scale, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_fused_tuple_reductions(kind, monkeypatch):
    """The compiled default (one tuple reduction for the maxima, one for the sums) computes
    the same statistics; the interpreter runs it only on this tiny case (it is slow there)."""
    backend_or_skip("triton")
    from ophsd_kernels import triton_divergence as td

    cfg = {k: dict(v) for k, v in td.CONFIG.items()}
    cfg["stats"]["FUSED"] = True
    monkeypatch.setattr(td, "CONFIG", cfg)
    if DEV == "cpu":
        monkeypatch.setattr(td, "_INTERPRET_BLOCK", 64)
    s, t = make_inputs(2, 150, torch.float32, seed=21, ramp=True)
    st = td.partial_stats(s, t, kind, 1.25, 0, 140)
    from ophsd_kernels import reference as ref

    expect = ref.partial_stats(s, t, kind, 1.25, 0, 140)
    lse = lambda x: x[:, 0] + x[:, 1].log()  # noqa: E731
    torch.testing.assert_close(lse(st), lse(expect), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(st[:, 2] + st[:, 3].log(), expect[:, 2] + expect[:, 3].log(),
                               rtol=1e-6, atol=1e-5)
    if kind != "jsd":
        z = st[:, 1] if kind == "reverse_kl" else st[:, 3]
        ze = expect[:, 1] if kind == "reverse_kl" else expect[:, 3]
        torch.testing.assert_close(st[:, 4] / z, expect[:, 4] / ze, rtol=1e-5, atol=1e-5)
    else:
        assert (st[:, 4] == 0).all()


def test_triton_grad_writes_every_element():
    """Poison the output buffer: every element (zero rows, padding, tails) must be written."""
    backend_or_skip("triton")
    from ophsd_kernels import triton_divergence as td

    n, v, vs = 9, 1031, 1000
    s, t = make_inputs(n, v, torch.float32, seed=3)
    coef = torch.linspace(-1, 1, n, device=DEV)
    coef[2] = 0.0
    stats = td.partial_stats(s, t, "reverse_kl", 1.0, 0, vs)
    lse_s = stats[:, 0] + stats[:, 1].log()
    lse_t = stats[:, 2] + stats[:, 3].log()
    d = stats[:, 4] / stats[:, 1] - lse_s + lse_t
    out = torch.full((n, v), float("nan"), device=DEV)
    g = td.grad(s, t, lse_s, lse_t, coef, d, "reverse_kl", 0.5, 1.0, 0, vs, out=out)
    assert g.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all() and (out[:, vs:] == 0).all()
    from ophsd_kernels import reference as ref

    expect = ref.grad(s, t, lse_s, lse_t, coef, d, "reverse_kl", 0.5, 1.0, 0, vs)
    assert_grad_close(out, expect.double(), torch.float32, float(coef.abs().max()) * 12)


# --------------------------------------------------------------------------------------
# JSD with log-probabilities at the fp32 normal limit (issue 13)
#
# ln(2^-126) = -87.34: a column whose log-probability is just above it in one model and below
# it in the other gives a mixture m = beta p_t + (1 - beta) p_s that is a nonzero subnormal.
# Compiled for sm_90 the kernels' exp2/lg2 are flush-to-zero, so without a clamp log m = -inf
# and the loss is inf/NaN. Every backend must clamp (C++: flog; Triton: _mixture) or work in
# log space (torch: logaddexp) and match float64.

ISSUE13_ROW = ([0.0, -90.0, -1.0], [0.0, -87.0, -5.0])  # (student, teacher) logits
ISSUE13_JSD = 0.0897897  # float64, beta = 0.5 (issue 13)
LOG_FLT_MIN = math.log(2.0 ** -126)  # -87.3365


def near_limit_inputs(n_random, v, seed, dtype=torch.float32, device=DEV):
    """The issue's row, then rows whose tail columns have log-probabilities straddling
    ln(FLT_MIN): one model 0.02..1.22 above it, the other as far below (random side per
    column),
    plus two columns far below in both models (p = 0 in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.full((n_random + 1, v), -200.0)
    t = torch.full((n_random + 1, v), -200.0)
    s[0, :3] = torch.tensor(ISSUE13_ROW[0])
    t[0, :3] = torch.tensor(ISSUE13_ROW[1])
    for r in range(1, n_random + 1):
        head = 6
        hs = torch.randn(head, generator=gen) * 2
        ht = 0.5 * hs + torch.randn(head, generator=gen) * 2
        s[r, :head], t[r, :head] = hs, ht
        u = 0.02 + torch.rand(v - head, generator=gen) * 1.2
        side = torch.where(torch.rand(v - head, generator=gen) < 0.5, 1.0, -1.0)
        # tail logits sit at lse(head) + ln FLT_MIN +- u: the tail adds ~1e-36 to the sums, so
        # these are the columns' log-probabilities to ~1e-36.
        s[r, head:] = torch.logsumexp(hs, 0) + LOG_FLT_MIN + side * u
        t[r, head:] = torch.logsumexp(ht, 0) + LOG_FLT_MIN - side * u
        s[r, -2:] = -400.0  # both far below: p_s = p_t = 0, m = 0 before the clamp
        t[r, -2:] = -380.0
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def test_near_limit_inputs_straddle_the_normal_limit():
    s, t = near_limit_inputs(3, 40, seed=1)
    ls = torch.log_softmax(s.double().cpu(), 1)
    lt = torch.log_softmax(t.double().cpu(), 1)
    straddle = ((ls > LOG_FLT_MIN) & (lt < LOG_FLT_MIN)) | ((ls < LOG_FLT_MIN) & (lt > LOG_FLT_MIN))
    assert straddle[1:].sum(1).min() >= 10
    # ... and, once the probability below the limit is flushed to zero (ex2.approx.ftz), the
    # mixture is a nonzero fp32 subnormal (the failing case) in many columns, for beta = 0.5
    def ftz(lp):
        p = lp.exp().float()
        return torch.where(p < 2.0 ** -126, torch.zeros_like(p), p)

    m = 0.5 * ftz(lt) + 0.5 * ftz(ls)
    assert ((m > 0) & (m < 2.0 ** -126))[1:].sum(1).min() >= 5
    assert 0 < float(m[0, 1]) < 2.0 ** -126  # the issue's row
    assert abs(float(ls[0, 1]) - (-90.3133)) < 1e-3 and abs(float(lt[0, 1]) - (-87.0067)) < 1e-3


def _check_near_limit(backend, dtype, beta, seed):
    s, t = near_limit_inputs(6, 70, seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 3)
    g_out = torch.randn(s.shape[0], generator=gen)
    kw = dict(kind="jsd", beta=beta, reduction="none")
    loss, g = run_backend(backend, s, t, grad_out=g_out, **kw)
    ref_loss, ref_g, scale = oracle(s, t, grad_out=g_out, **kw)
    what = f"[{backend} jsd near ln FLT_MIN {dtype} beta={beta}]"
    assert torch.isfinite(loss).all(), f"non-finite loss {what}: {loss}"
    assert torch.isfinite(g).all(), f"non-finite gradient {what}"
    assert_loss_close(loss, ref_loss, what)
    assert_grad_close(g, ref_g, dtype, scale, what)
    if beta == 0.5:
        assert abs(float(loss[0]) - ISSUE13_JSD) < 1e-6, f"issue 13 row {what}: {float(loss[0])}"
    return loss, g


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("triton",))
def test_jsd_log_probs_near_fp32_normal_limit(backend):
    """Loss and gradient finite and equal to float64 (tolerances of the module docstring) on
    log-probabilities around -88, for every backend on this machine (on a GPU the Triton row
    runs compiled, with flush-to-zero exp2/lg2: the real reproduction of issue 13)."""
    backend_or_skip(backend)
    fast = backend != "triton" or DEV == "cuda"
    cases = [(torch.float32, b) for b in ((0.1, 0.5, 0.9) if fast else (0.5,))]
    if fast:
        cases += [(torch.bfloat16, 0.5), (torch.float16, 0.3)]
    for i, (dtype, beta) in enumerate(cases):
        _check_near_limit(backend, dtype, beta, seed=seed_of("near-limit", backend, i))


def _ftz_interpreter(monkeypatch):
    """Make the Triton interpreter's exp2 and log2 flush-to-zero like the compiled sm_90
    kernels (ex2.approx.ftz: subnormal results are 0; lg2.approx.ftz: subnormal inputs are 0,
    so their log is -inf). Plain mul/fma stay IEEE, as they are in the PTX (mul.f32, fma.rn.f32)."""
    import numpy as np
    from triton.runtime import interpreter as interp

    tiny = np.float32(2.0 ** -126)
    b = interp.interpreter_builder
    calls = {"exp2": 0, "log2": 0}

    def flush(x):
        return np.where(np.abs(x) < tiny, np.zeros_like(x), x)

    def exp2(arg):
        calls["exp2"] += 1
        with np.errstate(under="ignore"):
            return interp.TensorHandle(flush(np.exp2(arg.data)), arg.dtype.scalar)

    def log2(arg):
        calls["log2"] += 1
        with np.errstate(divide="ignore"):
            return interp.TensorHandle(np.log2(flush(arg.data)), arg.dtype.scalar)

    monkeypatch.setattr(b, "create_exp2", exp2, raising=False)
    monkeypatch.setattr(b, "create_log2", log2, raising=False)
    return calls


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_jsd_clamp_under_emulated_flush_to_zero(monkeypatch):
    """The interpreter, with exp2/log2 made flush-to-zero like the compiled kernels, reproduces
    issue 13 when the mixture is not clamped (inf/NaN loss) and matches float64 with the clamp."""
    backend_or_skip("triton")
    if DEV != "cpu":
        pytest.skip("emulates the GPU's flush-to-zero in the interpreter; on a GPU the compiled "
                    "kernel runs in test_jsd_log_probs_near_fp32_normal_limit")
    import triton
    import triton.language as tl

    from ophsd_kernels import triton_divergence as td

    calls = _ftz_interpreter(monkeypatch)
    _check_near_limit("triton", torch.float32, 0.5, seed=seed_of("ftz", 0))
    assert calls["exp2"] > 0 and calls["log2"] > 0, calls  # the emulation was in the path

    # The interpreter wants triton.language among a @jit function's module globals.
    monkeypatch.setitem(globals(), "tl", tl)

    @triton.jit
    def _unclamped(p_s, p_t, beta):
        return beta * p_t + (1.0 - beta) * p_s

    s, t = near_limit_inputs(0, 3, seed=0)  # the issue's row alone
    st = td.partial_stats(s, t, "jsd", 1.0, 0, 3)
    lse_s, lse_t = st[:, 0] + st[:, 1].log(), st[:, 2] + st[:, 3].log()
    good = td.jsd_partial(s, t, lse_s, lse_t, 0.5, 1.0, 0, 3)
    assert torch.isfinite(good).all(), good
    monkeypatch.setattr(td, "_mixture", _unclamped)
    bad = td.jsd_partial(s, t, lse_s, lse_t, 0.5, 1.0, 0, 3)
    assert not torch.isfinite(bad).all(), (
        f"the unclamped mixture gave finite (b_s, b_t) {bad} under emulated FTZ: the emulation "
        "no longer reproduces issue 13, so the clamped run above proves nothing")
    # Through the public API that surfaced as a ValueError blaming the inputs.
    with pytest.raises(ValueError, match="NaN or Inf"):
        vocab_parallel_divergence(s, t, kind="jsd", beta=0.5, backend="triton")


# --------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("triton",))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_zero_weights(backend, reduction):
    backend_or_skip(backend)
    s, t = make_inputs(5, 33, torch.float32, seed=5)
    w = torch.zeros(5, device=DEV)
    g_out = torch.ones(5)
    loss, g = run_backend(backend, s, t, grad_out=g_out, kind="jsd", weights=w,
                          reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (g == 0).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("triton",))
def test_none_is_unweighted_and_composes_with_weights(backend):
    """reduction="none" gives d without the weights; (w * d).sum() is the "sum" reduction,
    loss and gradient (how the trainer uses it), and zero grad_out rows get exact zeros."""
    backend_or_skip(backend)
    s, t = make_inputs(6, 77, torch.float32, seed=41)
    w = torch.tensor([0.0, 1.0, 2.5, 0.0, 0.3, 1.0], device=DEV)
    kw = dict(kind="reverse_kl", temperature=1.4, vocab_size=70)
    x = s.clone().requires_grad_(True)
    d = vocab_parallel_divergence(x, t, weights=w, reduction="none", backend=backend, **kw)
    d_unweighted = vocab_parallel_divergence(s, t, reduction="none", backend=backend, **kw)
    torch.testing.assert_close(d, d_unweighted, rtol=0, atol=0)
    (w * d).sum().backward()
    y = s.clone().requires_grad_(True)
    total = vocab_parallel_divergence(y, t, weights=w, reduction="sum", backend=backend, **kw)
    total.backward()
    torch.testing.assert_close((w * d).sum(), total, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)
    assert (x.grad[w == 0] == 0).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_zero_rows_and_identical_inputs(backend):
    backend_or_skip(backend)
    s, t = make_inputs(0, 17, torch.float32, seed=1)
    loss, g = run_backend(backend, s, t)
    assert loss.item() == 0.0 and g.shape == (0, 17)
    s, _ = make_inputs(4, 129, torch.float32, seed=2)
    for kind in KINDS:
        loss, g = run_backend(backend, s, s.clone(), kind=kind)
        assert abs(loss.item()) < 1e-5
        assert g.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("triton",))
def test_strided_views(backend):
    """Row-strided views (a slice of a wider buffer) and a transposed-then-copied layout."""
    backend_or_skip(backend)
    big_s, big_t = make_inputs(7, 300, torch.float32, seed=31)
    s, t = big_s[:, 10:270], big_t[:, 5:265]  # row stride 300, column stride 1
    assert not s.is_contiguous()
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0, 0.5, 3.0], device=DEV)
    kw = dict(kind="jsd", beta=0.4, temperature=1.3, weights=w, vocab_size=250)
    loss, g = run_backend(backend, s, t, **kw)
    ref_loss, ref_g, scale = oracle(s, t, **kw)
    assert_loss_close(loss, ref_loss, backend)
    assert_grad_close(g, ref_g, torch.float32, scale, backend)
    # column-strided input (stride(1) != 1) is copied internally
    st = big_s[:, :64].t().contiguous().t()
    loss2, _ = run_backend(backend, st, big_t[:, :64].contiguous(), kind="reverse_kl")
    ref2, _, _ = oracle(st, big_t[:, :64], kind="reverse_kl")
    assert_loss_close(loss2, ref2, backend)


def test_teacher_gets_no_gradient_and_weights_scale():
    s, t = make_inputs(6, 50, torch.float32, seed=4)
    t = t.clone().requires_grad_(True)
    sg = s.clone().requires_grad_(True)
    loss = vocab_parallel_divergence(sg, t, weights=torch.full((6,), 3.0), reduction="sum",
                                     backend="torch")
    loss.backward()
    assert t.grad is None
    base = vocab_parallel_divergence(s, t.detach(), reduction="sum", backend="torch")
    torch.testing.assert_close(loss.detach(), 3 * base, rtol=1e-6, atol=0)
    mean_w = vocab_parallel_divergence(s, t.detach(), weights=torch.full((6,), 3.0),
                                       backend="torch")
    torch.testing.assert_close(mean_w, base / 6, rtol=1e-6, atol=0)


def test_auto_backend_resolution():
    name = dv.resolve_backend("auto", DEV)
    if DEV == "cuda":
        assert name == "triton"
    else:
        cpp_ok = dv.backend_status("cpp", "cpu")[0] is not None
        assert name == ("cpp" if cpp_ok else "torch")
    s, t = make_inputs(3, 40, torch.float32, seed=9)
    a = vocab_parallel_divergence(s, t)  # backend="auto"
    b = vocab_parallel_divergence(s, t, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# errors


def _inputs(n=4, v=16, dtype=torch.float32):
    return make_inputs(n, v, dtype, seed=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="kl"), "kind"),
    (dict(kind="jsd", beta=0.0), "beta.*forward_kl"),
    (dict(kind="jsd", beta=1.0), "beta.*reverse_kl"),
    (dict(kind="jsd", beta=1.5), "beta"),
    (dict(kind="jsd", beta=float("nan")), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(weights=torch.ones(3)), "weights"),
    (dict(weights=torch.ones(4, 1)), "weights"),
    (dict(weights=-torch.ones(4)), "weights"),
    (dict(weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "weights"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(vocab_size=17), "vocab_size"),
    (dict(vocab_size=3.5), "vocab_size"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_raise(kwargs, match):
    s, t = _inputs()
    if "weights" in kwargs:
        kwargs = dict(kwargs, weights=kwargs["weights"].to(DEV))
    with pytest.raises(ValueError, match=match):
        vocab_parallel_divergence(s, t, **kwargs)


def test_bad_tensors_raise():
    s, t = _inputs()
    with pytest.raises(ValueError, match="teacher_logits.*shape"):
        vocab_parallel_divergence(s, t[:, :15])
    with pytest.raises(ValueError, match="teacher_logits.*dtype"):
        vocab_parallel_divergence(s, t.half())
    with pytest.raises(ValueError, match="student_logits.*2-D"):
        vocab_parallel_divergence(s[0], t[0])
    with pytest.raises(ValueError, match="student_logits.*float32"):
        vocab_parallel_divergence(s.double(), t.double())
    with pytest.raises(ValueError, match="student_logits.*Tensor"):
        vocab_parallel_divergence(s.tolist(), t)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("triton",))
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_logits_raise(backend, kind):
    backend_or_skip(backend)
    for who, val in (("student_logits", float("nan")), ("teacher_logits", float("inf")),
                     ("teacher_logits", float("-inf")), ("student_logits", float("-inf"))):
        s, t = _inputs(n=3, v=37)
        (s if who == "student_logits" else t)[1, 5] = val
        with pytest.raises(ValueError, match=who):
            vocab_parallel_divergence(s, t, kind=kind, backend=backend)
    # NaN in a padding column is not an input: no error, same loss as without it.
    s, t = _inputs(n=3, v=37)
    clean = vocab_parallel_divergence(s, t, kind=kind, vocab_size=30, backend=backend)
    s[:, 33] = float("nan")
    t[:, 31] = float("inf")
    dirty = vocab_parallel_divergence(s, t, kind=kind, vocab_size=30, backend=backend)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_unavailable_backend_says_why():
    s, t = _inputs()
    if DEV == "cpu" and dv.backend_status("cpp", "cpu")[0] is None:
        with pytest.raises(ValueError, match="cpp.*unavailable"):
            vocab_parallel_divergence(s, t, backend="cpp")
    if DEV == "cuda":
        with pytest.raises(ValueError, match="cpp.*CPU"):
            vocab_parallel_divergence(s, t, backend="cpp")


# --------------------------------------------------------------------------------------
# tensor parallel (gloo ranks)

TP_CASES = [
    # (kind, dtype, N, V_global, vocab_size, temperature, weights, reduction)
    ("reverse_kl", torch.float32, 13, 4 * 97, None, 1.0, "zeros", "mean"),
    ("forward_kl", torch.float32, 13, 4 * 97, 4 * 97 - 50, 0.7, "rand", "sum"),
    ("jsd", torch.float32, 13, 4 * 97, 2 * 97 - 3, 1.9, "zeros", "none"),  # TP=4: 2 empty shards
    ("reverse_kl", torch.bfloat16, 7, 4 * 97, 3 * 97 + 1, 1.3, None, "mean"),
]


def _tp_worker(rank, world, backends):
    """Each rank: its column shard of the global inputs -> loss and gradient shard."""
    import torch as th

    group = dist.group.WORLD
    out = {}
    for backend in backends:
        for i, (kind, dtype, n, v, vs, temp, wmode, red) in enumerate(TP_CASES):
            s, t = make_inputs(n, v, dtype, seed=100 + i, device="cpu")
            w = make_weights(n, wmode, seed=100 + i, device="cpu")
            v_local = v // world
            sl = slice(rank * v_local, (rank + 1) * v_local)
            g_out = th.randn(n, generator=th.Generator().manual_seed(7))
            ss = s[:, sl].contiguous().requires_grad_(True)
            loss = vocab_parallel_divergence(ss, t[:, sl].contiguous(), kind=kind, beta=0.3,
                                             temperature=temp, weights=w, vocab_size=vs,
                                             group=group, reduction=red, backend=backend)
            (loss * g_out).sum().backward() if red == "none" else loss.backward()
            assert ss.grad.dtype == dtype
            # numpy (by value): torch tensors would travel as shared-memory handles that die
            # with the worker process. float64 holds bf16/fp32 values exactly.
            out[(backend, i)] = (loss.detach().double().numpy(), ss.grad.double().numpy())
    return out


def _tp_check(world):
    backends = [b for b in ("torch", "cpp", "triton") if dv.backend_status(b, "cpu")[0] is not None]
    from tests.dist_utils import run_ranks

    results = run_ranks(_tp_worker, world, backends)
    for backend in backends:
        for i, (kind, dtype, n, v, vs, temp, wmode, red) in enumerate(TP_CASES):
            s, t = make_inputs(n, v, dtype, seed=100 + i, device="cpu")
            w = make_weights(n, wmode, seed=100 + i, device="cpu")
            g_out = torch.randn(n, generator=torch.Generator().manual_seed(7))
            ref_loss, ref_g, scale = oracle(s, t, kind=kind, beta=0.3, temperature=temp, weights=w,
                                     vocab_size=vs, reduction=red, grad_out=g_out)
            what = f"[TP={world} {backend} case {i} {kind} {dtype}]"
            losses = [torch.from_numpy(r[(backend, i)][0]) for r in results]
            for lo in losses[1:]:
                assert torch.equal(lo, losses[0]), f"ranks disagree on the loss {what}"
            assert_loss_close(losses[0], ref_loss, what)
            g = torch.cat([torch.from_numpy(r[(backend, i)][1]) for r in results], dim=1)
            assert_grad_close(g, ref_g, dtype, scale, what)
            # and equal to the same backend run unsharded
            un_loss, un_g = run_backend(backend, s, t, grad_out=g_out, kind=kind, beta=0.3,
                                        temperature=temp, weights=w, vocab_size=vs,
                                        reduction=red)
            assert_loss_close(losses[0], un_loss.double(), what + " vs unsharded")
            assert_grad_close(g, un_g.double(), dtype, scale, what + " vs unsharded")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_unsharded(world):
    if DEV == "cuda":
        pytest.skip("gloo TP test runs the CPU backends; CUDA TP is covered by the benchmark")
    _tp_check(world)


def test_combine_stats_handles_empty_and_bad_shards():
    nan, inf = math.nan, math.inf
    st = torch.tensor([
        [[1.0, 2.0, 0.5, 3.0, 0.25]],
        [[-inf, 0.0, -inf, 0.0, 0.0]],  # a shard of padding only
    ])
    out = dv.combine_stats(st, "reverse_kl")
    torch.testing.assert_close(out, st[0])
    bad = st.clone()
    bad[1, 0, 1] = nan
    assert torch.isnan(dv.combine_stats(bad, "reverse_kl")).all()
