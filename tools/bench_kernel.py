"""Benchmark of the fused divergence kernel against the usual ways of computing it.

    python tools/bench_kernel.py                            # GPU: full table (bf16)
    python tools/bench_kernel.py --device cpu               # CPU: C++ vs PyTorch, N=4096 V=32768 fp32
    python tools/bench_kernel.py --sweep                    # GPU: launch-parameter sweep per kernel
    torchrun --nproc-per-node 8 tools/bench_kernel.py --tp --tokens 16384 --vocab 151936

Implementations compared (same inputs, same loss definition, ``mean`` over tokens):

``ours``           :func:`ophsd_kernels.vocab_parallel_divergence` (Triton on CUDA; on CPU the
                   ``cpp`` and ``torch`` backends are rows of their own: ``ours-cpp``,
                   ``ours-torch``).
``torch_chunked``  the reference paper's way: per chunk of rows, ``log_softmax`` of both
                   (fp32), then ``F.kl_div(..., log_target=True)`` (JSD: the TRL-style mixture
                   via ``logsumexp``); one autograd graph, one backward.
``torch_compile``  ``torch.compile`` of the same per-chunk function.
``liger_jsd``      Liger-Kernel's JSD (``liger_jsd``; ``beta=1`` is its reverse-KL branch).
                   It takes log-probabilities, so the row includes ``log_softmax`` of both
                   inputs in the logits' dtype (bf16 log-probabilities: not our function);
                   ``liger_jsd_fp32`` feeds it fp32 log-probabilities (our function, more
                   bytes); ``liger_jsd_kernel`` times its kernel alone on precomputed bf16
                   log-probabilities, differentiated w.r.t. them (the most favourable reading
                   for Liger, and not our gradient).

Every row is checked before it is timed (:func:`check_equivalence`): its loss, and its
gradient where it is w.r.t. the same tensor (the student logits), against ours on the first
``--equiv-rows`` rows of the same inputs; the ``equivalent`` column says ``yes``, ``reference``
(ours) or ``no (why)``, with the relative errors in ``loss_rel_err`` / ``grad_rel_err``.
A row that is not equivalent is still timed, but its speed-up compares different work.

Reported per row: median time (CUDA events through ``triton.testing.do_bench``, which also
flushes L2 between runs; CPU: wall clock), the bytes model (fwd: read S and T once;
fwd+bwd: two reads of each + one gradient write; JSD: one more read of each), achieved
bandwidth = model bytes / time, two floors: model bytes / measured device copy bandwidth
(``floor_ms``, bytes read + written by a large device-to-device copy) and model bytes /
measured read-only bandwidth (``floor_read_ms``, a large reduction that reads its input once;
the model's bytes are mostly reads), and peak extra memory (beyond the inputs and, for fwd+bwd, the gradient itself; CUDA:
``max_memory_allocated``; CPU: sampled in-use heap growth, coarse). Writes CSV (+ PNG when
matplotlib imports) under ``--out`` (default ``kernels/bench_results``). Results and notes:
``kernels/BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ophsd_kernels import divergence as dv
from ophsd_kernels import vocab_parallel_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, next to this file
import bench_common as bc  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------
# the baselines


def _chunk_loss_sum(s, t, kind: str, beta: float, inv_temp: float):
    """Sum over the chunk's rows of the per-token divergence (fp32), paper style."""
    s_lp = F.log_softmax(s.float() * inv_temp, dim=-1)
    t_lp = F.log_softmax(t.float() * inv_temp, dim=-1)
    if kind == "reverse_kl":  # KL(S || T) = sum p_s (log p_s - log p_t)
        return F.kl_div(t_lp, s_lp, reduction="sum", log_target=True)
    if kind == "forward_kl":  # KL(T || S)
        return F.kl_div(s_lp, t_lp, reduction="sum", log_target=True)
    mix = torch.logsumexp(torch.stack([s_lp + math.log(1 - beta), t_lp + math.log(beta)]), dim=0)
    kl_t = F.kl_div(mix, t_lp, reduction="sum", log_target=True)
    kl_s = F.kl_div(mix, s_lp, reduction="sum", log_target=True)
    return beta * kl_t + (1 - beta) * kl_s


_COMPILED = {}


def torch_chunked(s, t, kind, beta=0.5, temperature=1.0, chunk=2048, compiled=False):
    fn = _chunk_loss_sum
    if compiled:
        fn = _COMPILED.get("fn")
        if fn is None:
            fn = _COMPILED["fn"] = torch.compile(_chunk_loss_sum, dynamic=False)
    total = None
    for r0 in range(0, s.shape[0], chunk):
        part = fn(s[r0:r0 + chunk], t[r0:r0 + chunk], kind, beta, 1.0 / temperature)
        total = part if total is None else total + part
    return total / s.shape[0]


def liger_fn():
    try:
        from liger_kernel.transformers.functional import liger_jsd
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"
    return liger_jsd, ""


def liger_full(s, t, beta, liger_jsd, fp32=False):
    # Liger's JSD: log-space inputs; beta weights the teacher (target) like ours.
    if fp32:
        s, t = s.float(), t.float()
    return liger_jsd(torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1), beta=beta)


def _liger_beta(kind, beta):
    return {"jsd": beta, "reverse_kl": 1.0, "forward_kl": 0.0}[kind]


@dataclass(frozen=True)
class Impl:
    """One benchmark row's computation.

    ``loss(s_in, t_in, kind, beta, temperature, ctx)`` returns the mean loss over the rows;
    ``prepare(s, t)`` (optional, run untimed and without autograd) turns the logits into what
    the row is fed, and the row is then differentiated w.r.t. the prepared student tensor;
    ``grad_wrt`` names that tensor ("logits": the same as ours, so the gradients are compared;
    anything else: not our gradient, so a fwd+bwd row is not equivalent); ``inputs`` says what
    the row reads (shown in the ``no (why)`` label); ``needs``: "liger" or "cuda" or ""."""
    loss: Callable
    prepare: Optional[Callable] = None
    grad_wrt: str = "logits"
    inputs: str = "logits"
    needs: str = ""


def _log_softmax_pair(s, t):
    return torch.log_softmax(s, -1), torch.log_softmax(t, -1)


IMPLS = {
    "ours": Impl(lambda s, t, k, b, T, ctx: vocab_parallel_divergence(
        s, t, kind=k, beta=b, temperature=T, backend=ctx.get("backend", "auto"))),
    "torch_chunked": Impl(lambda s, t, k, b, T, ctx: torch_chunked(s, t, k, b, T)),
    "torch_compile": Impl(lambda s, t, k, b, T, ctx: torch_chunked(s, t, k, b, T, compiled=True),
                          needs="cuda"),
    "liger_jsd": Impl(lambda s, t, k, b, T, ctx: liger_full(s, t, _liger_beta(k, b), ctx["liger"]),
                      inputs="log-probabilities in the logits' dtype", needs="liger"),
    "liger_jsd_fp32": Impl(lambda s, t, k, b, T, ctx: liger_full(s, t, _liger_beta(k, b), ctx["liger"],
                                                                 fp32=True),
                           inputs="fp32 log-probabilities", needs="liger"),
    "liger_jsd_kernel": Impl(lambda s, t, k, b, T, ctx: ctx["liger"](s, t, beta=_liger_beta(k, b)),
                             prepare=_log_softmax_pair, grad_wrt="log-probabilities",
                             inputs="precomputed log-probabilities in the logits' dtype",
                             needs="liger"),
}
IMPLS["ours-cpp"] = IMPLS["ours-torch"] = IMPLS["ours"]  # ctx["backend"] picks the backend

# Equivalence tolerances, relative, against ours. Loss: every row that computes our function
# does it in fp32 from the same logits, and the fp32 rows agree with ours to ~1e-6 on the
# benchmark's inputs (measured on CPU: <= 1.3e-6); a row that rounds an intermediate to bf16
# (log-probabilities) is off by 1e-4..1e-3. 2e-5 sits between, ~15x from each. Gradient,
# ||g - g_ours|| / ||g_ours||: both are one rounding of an fp32 result to the output dtype,
# at most 2^-9 relative each in bf16 (so 2 * 2^-9 ~ 4e-3), 2^-12 in fp16 (5e-4); fp32 rows
# differ by summation order only (~1e-6; 2e-5). A bf16 log_softmax backward is off by 1e-2.
LOSS_RTOL = 2e-5
GRAD_RTOL = {"bf16": 4e-3, "fp16": 5e-4, "fp32": 2e-5}


def check_equivalence(impl, kind, s, t, mode, beta, temperature, ctx, rows=2048,
                      ref_backend="auto"):
    """Does ``impl`` compute our function on these inputs? Runs ours and the row on the first
    ``rows`` rows of the logits ``s``, ``t`` (not modified); returns ``(label, loss_rel_err,
    grad_rel_err)`` with label ``"yes"`` or ``"no (why)"``; ``grad_rel_err`` is None where
    the gradients are not compared (fwd, or the row differentiates another tensor)."""
    spec = IMPLS[impl]
    s = s[:rows].detach()
    t = t[:rows].detach()
    bwd = mode == "fwd+bwd"
    dtype = {v: k for k, v in DTYPES.items()}.get(s.dtype, "fp32")
    x = s.clone().requires_grad_(bwd)
    with torch.set_grad_enabled(bwd):
        ref = vocab_parallel_divergence(x, t, kind=kind, beta=beta, temperature=temperature,
                                        backend=ref_backend)
        if bwd:
            ref.backward()
        if spec.prepare is not None:
            with torch.no_grad():
                s_in, t_in = spec.prepare(s, t)
            leaf = s_in = s_in.detach().requires_grad_(bwd)
        else:
            leaf = s_in = s.clone().requires_grad_(bwd)
            t_in = t
        loss = spec.loss(s_in, t_in, kind, beta, temperature, ctx)
        if bwd:
            loss.backward()
    r, lo = float(ref.detach().double()), float(loss.detach().double())
    loss_rel = abs(lo - r) / max(abs(r), 1e-12)
    reasons, grad_rel = [], None
    if not math.isfinite(lo):
        reasons.append(f"loss {lo}")
    elif loss_rel > LOSS_RTOL:
        reasons.append(f"loss off by {loss_rel:.1e} rel")
    if bwd:
        if spec.grad_wrt != "logits":
            reasons.append(f"gradient w.r.t. {spec.grad_wrt}, not the logits")
        else:
            g, g_ref = leaf.grad.double(), x.grad.double()
            grad_rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
            if not math.isfinite(grad_rel) or grad_rel > GRAD_RTOL[dtype]:
                reasons.append(f"gradient off by {grad_rel:.1e} rel")
    if reasons and spec.inputs != "logits":
        reasons.append(f"fed {spec.inputs}")
    return ("yes" if not reasons else f"no ({'; '.join(reasons)})"), loss_rel, grad_rel


# --------------------------------------------------------------------------------------
# measurement


@dataclass
class Row:
    device: str
    impl: str
    kind: str
    n: int
    v: int
    dtype: str
    mode: str  # fwd | fwd+bwd
    tp_sim: int = 1
    ms: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    cpu_ms: Optional[float] = None  # CPU runs: median process CPU time (all threads)
    model_gb: Optional[float] = None
    tbps: Optional[float] = None
    floor_ms: Optional[float] = None
    x_floor: Optional[float] = None
    floor_read_ms: Optional[float] = None  # model bytes / read-only bandwidth
    x_floor_read: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    extra_pct_logits: Optional[float] = None
    speedup_vs_torch_chunked: Optional[float] = None
    equivalent: str = ""  # yes | reference | no (why) | "" (not checked)
    loss_rel_err: Optional[float] = None
    grad_rel_err: Optional[float] = None
    note: str = ""
    config: str = field(default="")


def model_bytes(kind, mode, n, v, elem):
    reads = 1 if mode == "fwd" else 2
    if kind == "jsd":
        reads += 1
    writes = 0 if mode == "fwd" else 1
    return (2 * reads + writes) * n * v * elem


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, rep_ms=300)[0]
    del x, y
    return 2 * nbytes / (t * 1e-3)


def read_bandwidth(device) -> float:
    """Read-only bandwidth in bytes/s: a sum over a large buffer (each byte read once, one
    number written). Next to :func:`copy_bandwidth`: the models' bytes are mostly reads."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    t = time_fn(lambda: x.sum(), device, rep_ms=300)[0]
    del x
    return nbytes / (t * 1e-3)


def time_fn(fn: Callable, device, rep_ms=200, warmup_ms=50, grad_to_none=None, cpu_reps=5):
    """(median, p20, p80) wall ms, plus the median process CPU ms on CPU (None on CUDA).

    CPU: process CPU time (all threads) is reported beside wall time because wall time on a
    shared machine measures the other tenants as much as the code."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                    quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q) + (None,)
    fn()  # warm-up
    ts, cs = [], []
    for _ in range(cpu_reps):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        with bc.Stopwatch() as sw:
            fn()
        ts.append(sw.wall * 1e3)
        cs.append(sw.cpu * 1e3)
    ts.sort()
    return (statistics.median(ts), ts[len(ts) // 5], ts[min(len(ts) - 1, (4 * len(ts)) // 5)],
            statistics.median(cs))


class _HeapPeak:
    """Peak growth of this process's in-use heap (glibc ``mallinfo2``: small blocks plus
    mmapped ones, which is where torch's CPU tensors live), sampled every 0.2 ms. Coarse:
    a peak shorter than the sampling period can be missed."""

    def __init__(self):
        import ctypes

        class _MI2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()]

        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = _MI2
        self._fn = fn

    def _used(self):
        m = self._fn()
        return m.uordblks + m.hblkhd

    def __enter__(self):
        self.base = self.peak = self._used()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._used())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._used())

    @property
    def extra(self):
        return self.peak - self.base


def peak_extra_bytes(fn: Callable, device, grad_bytes: int) -> Optional[float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - grad_bytes
    try:
        probe = _HeapPeak()
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    with probe as m:
        fn()
    return m.extra - grad_bytes


def make_case(impl, kind, s, t, beta, temperature, mode, backend, liger):
    """A closure running one forward (+backward) of ``impl``."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return _loss(impl, kind, s, t, beta, temperature, backend, liger)
        return run

    def run():
        s.grad = None
        loss = _loss(impl, kind, s, t, beta, temperature, backend, liger)
        loss.backward()
        return loss
    return run


def _loss(impl, kind, s, t, beta, temperature, backend, liger):
    if impl not in IMPLS:
        raise ValueError(impl)
    return IMPLS[impl].loss(s, t, kind, beta, temperature, {"backend": backend, "liger": liger})


def ref_backend(device) -> str:
    """The backend of the reference ("ours") rows on ``device``: what ``auto`` picks."""
    return dv.resolve_backend("auto", device)


def bench_one(impl, kind, n, v, dtype, mode, device, copy_bw, args, tp_sim=1, liger=None,
              backend="auto", log=print, read_bw=None):
    dt = DTYPES[dtype]
    elem = torch.finfo(dt).bits // 8
    row = Row(device=str(device.type), impl=impl, kind=kind, n=n, v=v, dtype=dtype, mode=mode,
              tp_sim=tp_sim)
    if device.type == "cuda" and impl.startswith("ours"):
        from ophsd_kernels import triton_divergence as td

        row.config = json.dumps(td.CONFIG, separators=(",", ":"))
    gen = torch.Generator(device=device).manual_seed(1234)
    try:
        s = torch.randn(n, v, device=device, dtype=dt, generator=gen).mul_(3)
        t = torch.randn(n, v, device=device, dtype=dt, generator=gen).mul_(3)
        rows = getattr(args, "equiv_rows", 2048)
        if tp_sim > 1 or (impl.startswith("ours")
                          and dv.resolve_backend(backend, device) == ref_backend(device)):
            row.equivalent = "reference"
        elif rows > 0:
            row.equivalent, row.loss_rel_err, row.grad_rel_err = check_equivalence(
                impl, kind, s, t, mode, args.beta, args.temperature,
                {"backend": backend, "liger": liger}, rows=rows, ref_backend=ref_backend(device))
            if row.equivalent != "yes":
                log(f"  {impl} {kind} {mode}: NOT EQUIVALENT to ours: {row.equivalent}")
        spec = IMPLS.get(impl)
        if spec is not None and spec.prepare is not None:
            with torch.no_grad():
                s, t = spec.prepare(s, t)
        if mode == "fwd+bwd":
            s.requires_grad_(True)
        run = make_case(impl, kind, s, t, args.beta, args.temperature, mode, backend, liger)
        run()  # compile / warm up
        bc.sync(device)
        grad_bytes = n * v * elem if mode == "fwd+bwd" else 0
        s.grad = None
        peak = peak_extra_bytes(run, device, grad_bytes)
        ms, p20, p80, cpu_ms = time_fn(run, device, rep_ms=args.rep_ms,
                               grad_to_none=[s] if mode == "fwd+bwd" else None,
                               cpu_reps=args.cpu_reps)
    except torch.OutOfMemoryError as exc:
        row.note = f"OOM: {str(exc).splitlines()[0][:120]}"
        log(f"  {impl} {kind} N={n} V={v} {mode}: OOM")
        return row
    finally:
        s = t = run = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.ms, row.ms_p20, row.ms_p80, row.cpu_ms = ms, p20, p80, cpu_ms
    mb = model_bytes(kind, mode, n, v, elem)
    row.model_gb = mb / 1e9
    row.tbps = mb / (ms * 1e-3) / 1e12
    row.floor_ms = mb / copy_bw * 1e3
    row.x_floor = ms / row.floor_ms
    if read_bw:
        row.floor_read_ms = mb / read_bw * 1e3
        row.x_floor_read = ms / row.floor_read_ms
    if peak is not None:
        row.peak_extra_mb = peak / 2**20
        row.extra_pct_logits = 100.0 * peak / (n * v * elem)
    cpu_txt = f" (cpu {cpu_ms:9.1f} ms)" if cpu_ms is not None else ""
    log(f"  {impl:>16} {kind:>10} N={n:>6} V={v:>6} tp={tp_sim} {mode:>7}: {ms:9.3f} ms{cpu_txt} "
        f"({row.tbps:5.2f} TB/s model, {row.x_floor:5.2f}x copy floor, "
        f"{row.x_floor_read if row.x_floor_read is not None else float('nan'):5.2f}x read floor, "
        f"extra {row.peak_extra_mb if row.peak_extra_mb is not None else float('nan'):9.1f} MiB, "
        f"equivalent: {row.equivalent or '-'})")
    return row


# --------------------------------------------------------------------------------------
# modes


def run_table(args, device, on_row=None):
    """Measure the table's rows; ``on_row(rows, meta)`` is called after each row (the CLI
    rewrites the CSV there, so a run cut short by a timeout keeps what it measured)."""
    log = print
    rows = []
    copy_bw = copy_bandwidth(device)
    read_bw = read_bandwidth(device)
    name = bc.gpu_name(device) or "cpu"
    log(f"device: {name}; measured copy bandwidth {copy_bw / 1e12:.3f} TB/s (read+write), "
        f"read-only bandwidth {read_bw / 1e12:.3f} TB/s; "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    liger, liger_why = liger_fn() if device.type == "cuda" else (None, "CPU run")
    meta = {"device_name": name, "copy_tbps": copy_bw / 1e12, "read_tbps": read_bw / 1e12,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg_1_5_15": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "cpu_count": os.cpu_count(),
            "liger": "available" if liger else f"unavailable: {liger_why}"}

    def add(row):
        rows.append(row)
        if on_row is not None:
            _speedups(rows)
            on_row(rows, meta)

    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; known: {sorted(IMPLS)}")
    if device.type == "cpu":
        impls = [i for i in impls if IMPLS[i].needs not in ("liger", "cuda")]
    for n in args.n:
        for v in args.v:
            for kind in args.kinds.split(","):
                for mode in args.modes.split(","):
                    for impl in impls:
                        backend = "auto"
                        if impl == "ours-cpp":
                            backend = "cpp"
                        elif impl == "ours-torch":
                            backend = "torch"
                        if impl.startswith("ours") and dv.backend_status(
                                dv.resolve_backend(backend, device), device)[0] is None:
                            why = dv.backend_status(dv.resolve_backend(backend, device), device)[1]
                            add(Row(str(device.type), impl, kind, n, v, args.dtype, mode,
                                    note=f"not measured: {why}"))
                            continue
                        if IMPLS[impl].needs == "liger" and liger is None:
                            add(Row(str(device.type), impl, kind, n, v, args.dtype, mode,
                                    note=f"not measured: liger-kernel unavailable "
                                         f"({liger_why})"))
                            continue
                        if impl == "torch_compile" and kind not in args.compile_kinds.split(","):
                            continue
                        add(bench_one(impl, kind, n, v, args.dtype, mode, device, copy_bw,
                                      args, liger=liger, backend=backend, read_bw=read_bw))
    for tp in args.tp_sim:
        if tp <= 1:
            continue
        for n in args.n:
            v = max(args.v)
            for kind in args.kinds.split(","):
                add(bench_one("ours", kind, n, v // tp, args.dtype, "fwd+bwd", device,
                              copy_bw, args, tp_sim=tp, read_bw=read_bw))
    _speedups(rows)
    return rows, meta


def _speedups(rows):
    """Speed-up over torch_chunked: by wall time on CUDA, by process CPU time on CPU."""
    def t(r):
        return r.cpu_ms if r.cpu_ms is not None else r.ms

    ref = {(r.kind, r.n, r.v, r.dtype, r.mode): t(r) for r in rows
           if r.impl == "torch_chunked" and t(r)}
    for r in rows:
        base = ref.get((r.kind, r.n, r.v, r.dtype, r.mode))
        if base and t(r):
            r.speedup_vs_torch_chunked = base / t(r)


def run_sweep(args, device):
    """Time each Triton kernel alone over launch parameters (reverse KL and JSD)."""
    from ophsd_kernels import triton_divergence as td

    copy_bw = copy_bandwidth(device)
    name = bc.gpu_name(device) or "cpu"
    print(f"device {name}; copy {copy_bw / 1e12:.3f} TB/s")
    n, v = args.n[-1], args.v[-1]
    dt = DTYPES[args.dtype]
    elem = torch.finfo(dt).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(n, v, device=device, dtype=dt, generator=gen).mul_(3)
    t = torch.randn(n, v, device=device, dtype=dt, generator=gen).mul_(3)
    st = td.partial_stats(s, t, "reverse_kl", 1.0, 0, v)
    lse_s = st[:, 0] + st[:, 1].log()
    lse_t = st[:, 2] + st[:, 3].log()
    d = st[:, 4] / st[:, 1] - lse_s + lse_t
    coef = torch.full((n,), 1.0 / n, device=device)
    out = torch.empty_like(s)
    rows = []
    orig = {k: dict(c) for k, c in td.CONFIG.items()}
    kernels = {
        "stats": (lambda: td.partial_stats(s, t, args.sweep_kind, 1.0, 0, v), 2),
        "jsd": (lambda: td.jsd_partial(s, t, lse_s, lse_t, 0.5, 1.0, 0, v), 2),
        "grad": (lambda: td.grad(s, t, lse_s, lse_t, coef, d, args.sweep_kind, 0.5, 1.0, 0, v,
                                 out=out), 3),
    }
    for name, (fn, n_tensors) in kernels.items():
        if name not in args.sweep_kernels.split(","):
            continue
        grid = []
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                if name == "grad":
                    grid.append({"BLOCK": block, "num_warps": warps, "num_stages": 1})
                    continue
                if block == 1024:
                    continue
                for stages in (1, 2, 3):
                    for fused in ((True, False) if name == "stats" else (None,)):
                        c = {"BLOCK": block, "num_warps": warps, "num_stages": stages}
                        if fused is not None:
                            c["FUSED"] = fused
                        grid.append(c)
        for cfg in grid:
            td.CONFIG[name] = cfg
            try:
                ms = time_fn(fn, device, rep_ms=args.rep_ms)[0]
            except Exception as exc:  # noqa: BLE001 - e.g. out of resources
                print(f"{name} {cfg}: failed {exc!s:.80}")
                continue
            finally:
                td.CONFIG[name] = dict(orig[name])
            gb = n_tensors * n * v * elem
            tbps = gb / (ms * 1e-3) / 1e12
            rows.append(dict(kernel=name, **cfg, ms=ms, tbps=tbps, x_copy=copy_bw / 1e12 / tbps))
            print(f"{name:>5} {json.dumps(cfg)}: {ms:8.3f} ms {tbps:5.2f} TB/s "
                  f"({copy_bw / 1e12 / tbps:4.2f}x copy time)")
    best = {}
    for r in rows:
        if r["kernel"] not in best or r["ms"] < best[r["kernel"]]["ms"]:
            best[r["kernel"]] = r
    print("best:", json.dumps(best, indent=1))
    return rows, {"copy_tbps": copy_bw / 1e12, "best": best}


def run_tp(args):
    """Under torchrun: every rank holds an [N, V/world] shard; fixed iteration counts."""
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dt = DTYPES[args.dtype]
    results = []
    for n in args.n:
        for v in args.v:
            vl = v // world
            gen = torch.Generator(device=device).manual_seed(rank)
            s = torch.randn(n, vl, device=device, dtype=dt, generator=gen).mul_(3).requires_grad_()
            t = torch.randn(n, vl, device=device, dtype=dt, generator=gen).mul_(3)
            for kind in args.kinds.split(","):
                def step():
                    s.grad = None
                    vocab_parallel_divergence(s, t, kind=kind, group=dist.group.WORLD).backward()
                for _ in range(args.tp_warmup):
                    step()
                times = []
                for _ in range(args.tp_iters):
                    dist.barrier()
                    bc.sync(device)
                    with bc.Stopwatch() as sw:
                        step()
                        bc.sync(device)
                    times.append(sw.wall * 1e3)
                med = torch.tensor([statistics.median(times)], device=device)
                all_med = [torch.zeros_like(med) for _ in range(world)]
                dist.all_gather(all_med, med)
                if rank == 0:
                    meds = [float(x) for x in all_med]
                    r = dict(kind=kind, n=n, v=v, v_local=vl, world=world, iters=args.tp_iters,
                             median_ms_rank_max=max(meds), median_ms_rank_min=min(meds))
                    results.append(r)
                    print(json.dumps(r))
    dist.destroy_process_group()
    return results


# --------------------------------------------------------------------------------------
# output


COLS = ["impl", "kind", "n", "v", "tp_sim", "dtype", "mode", "ms", "cpu_ms", "tbps", "floor_ms", "x_floor",
        "floor_read_ms", "x_floor_read", "speedup_vs_torch_chunked", "peak_extra_mb",
        "extra_pct_logits", "equivalent", "note"]


def print_table(rows):
    def fmt(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    widths = {c: max(len(c), *(len(fmt(getattr(r, c))) for r in rows)) for c in COLS}
    print(" | ".join(c.ljust(widths[c]) for c in COLS))
    for r in rows:
        print(" | ".join(fmt(getattr(r, c)).ljust(widths[c]) for c in COLS))


def load_csv(path):
    """Rows and metadata of a CSV written by :func:`save`."""
    meta, lines = {}, []
    with open(path) as f:
        for line in f:
            if line.startswith("# "):
                k, _, v = line[2:].rstrip("\n").partition(": ")
                meta[k] = v
            else:
                lines.append(line)
    rows = []
    types = {f.name: f.type for f in Row.__dataclass_fields__.values()}
    for rec in csv.DictReader(lines):
        kw = {}
        for k, v in rec.items():
            t = str(types.get(k, "str"))
            if v == "":
                kw[k] = None if "Optional" in t else ""
            elif "float" in t:
                kw[k] = float(v)
            elif "int" in t:
                kw[k] = int(v)
            else:
                kw[k] = v
        rows.append(Row(**kw))
    return rows, meta


def write_csv(rows, meta, path):
    """Write ``rows`` (metadata as ``# key: value`` lines first) atomically."""
    bc.write_csv(path, rows, fieldnames=list(Row.__dataclass_fields__), meta=meta)


def save(rows, meta, out_dir, tag, write_csv_file=True):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench_{tag}.csv")
    if not rows:
        print("no rows measured; nothing written")
        return
    if write_csv_file:
        write_csv(rows, meta, path)
        print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"matplotlib unavailable ({exc}); no PNG written")
        return
    kinds = sorted({r.kind for r in rows if r.ms and r.tp_sim == 1})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sel = [r for r in rows if r.kind == kind and r.mode == "fwd+bwd" and r.ms and r.tp_sim == 1]
        sizes = sorted({(r.n, r.v) for r in sel})
        impls = sorted({r.impl for r in sel})
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            ys = [next(((r.cpu_ms if r.cpu_ms is not None else r.ms) for r in sel
                        if r.impl == impl and (r.n, r.v) == sz), 0) for sz in sizes]
            ax.bar([i + k * width for i in range(len(sizes))], ys, width, label=impl)
        on_cpu = any(r.cpu_ms is not None for r in sel)
        if not on_cpu:
            floors = [next((r.floor_ms for r in sel if (r.n, r.v) == sz), 0) for sz in sizes]
            ax.scatter([i + 0.4 - width / 2 for i in range(len(sizes))], floors, marker="_",
                       s=400, color="k", label="bytes-model floor", zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))])
        ax.set_xticklabels([f"N={n}\nV={v}" for n, v in sizes], fontsize=8)
        if not on_cpu:  # GPU sizes span 30x: log scale; one CPU size: linear from 0
            ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd median " + ("process CPU ms" if on_cpu else "ms (log)"))
        ax.set_title(f"{kind} ({meta.get('device_name', '')})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out_dir, f"bench_{tag}.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # --tokens/--vocab: torchrun's own parser would take --n/--v for its abbreviations.
    p.add_argument("--tokens", "--n", dest="n", type=int, nargs="+", help="N values")
    p.add_argument("--vocab", "--v", dest="v", type=int, nargs="+", help="V values (global)")
    p.add_argument("--dtype", choices=list(DTYPES))
    p.add_argument("--kinds", default="reverse_kl,forward_kl,jsd")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--impls")
    p.add_argument("--compile-kinds", default="reverse_kl,jsd",
                   help="kinds for which torch.compile rows are measured (compiles are slow)")
    p.add_argument("--tp-sim", type=int, nargs="*", default=None,
                   help="simulate the per-rank shard V/TP on one device for these TP sizes")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--cpu-reps", type=int, default=5)
    p.add_argument("--equiv-rows", type=int, default=2048,
                   help="rows on which each row's loss/gradient is checked against ours before "
                        "timing (0: no check); 2048 = torch_chunked's chunk, so torch.compile "
                        "reuses its graph")
    p.add_argument("--out", default=str(bc.REPO / "kernels" / "bench_results"))
    p.add_argument("--tag")
    p.add_argument("--append", action="store_true",
                   help="add the rows to an existing bench_TAG.csv (speed-ups recomputed over all)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-kind", default="reverse_kl")
    p.add_argument("--sweep-kernels", default="stats,grad,jsd")
    p.add_argument("--tp", action="store_true", help="real TP under torchrun")
    p.add_argument("--replot", metavar="CSV", help="redraw the table and PNG of a saved CSV")
    p.add_argument("--tp-warmup", type=int, default=5)
    p.add_argument("--tp-iters", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.n = args.n or ([4096, 16384] if gpu else [4096])
    args.v = args.v or ([32768, 131072, 151936] if gpu else [32768])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.impls = args.impls or ("ours,torch_chunked,torch_compile,liger_jsd,liger_jsd_kernel" if gpu
                                else "ours-cpp,ours-torch,torch_chunked")
    if args.tp_sim is None:
        args.tp_sim = [2, 4, 8] if gpu else []
    if args.replot:
        rows, meta = load_csv(args.replot)
        print_table(rows)
        save(rows, meta, os.path.dirname(os.path.abspath(args.replot)),
             os.path.basename(args.replot)[len("bench_"):-len(".csv")], write_csv_file=False)
        return 0
    if args.tp:
        res = run_tp(args)
        if res:  # rank 0
            os.makedirs(args.out, exist_ok=True)
            bc.write_json(os.path.join(args.out, f"{args.tag or 'tp'}.json"), res)
        return 0
    tag = args.tag or ("sweep" if args.sweep else device.type)
    if args.sweep:
        rows, meta = run_sweep(args, device)
        os.makedirs(args.out, exist_ok=True)
        bc.write_json(os.path.join(args.out, f"{tag}.json"), {"meta": meta, "rows": rows})
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_{tag}.csv")
    old_rows, old_meta = [], {}
    if args.append and os.path.exists(path):
        old_rows, old_meta = load_csv(path)
        print(f"appending to {path} ({len(old_rows)} rows)")

    def merged(rows, meta):
        rows = old_rows + rows
        _speedups(rows)
        return rows, {**old_meta, **meta}

    rows, meta = run_table(args, device, on_row=lambda r, m: write_csv(*merged(r, m), path))
    rows, meta = merged(rows, meta)
    print()
    if rows:
        print_table(rows)
    save(rows, meta, args.out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
