"""The Triton divergence kernels compile for Hopper (sm_90) on any machine, GPU or not.

Runs ``python tools/bench_aot.py --check`` in a subprocess with TRITON_INTERPRET
unset (the other divergence tests set it on CPU-only machines): every kernel x kind in bf16,
the default launch parameters, compiled by Triton's bundled ptxas into a real sm_90 cubin,
with no register spills and 16-byte global loads/stores. This catches what the interpreter
cannot (compile errors in the GPU path, spills) without a GPU.

Issue 13: compiled for sm_90, exp2/lg2 are flush-to-zero (``ex2.approx.ftz``,
``lg2.approx.ftz``) while the JSD mixture ``m = beta p_t + (1 - beta) p_s`` is plain mul/fma,
so a subnormal ``m`` has ``log m = -inf``. The CPU cannot run that arithmetic, so the PTX is
read instead: every ``lg2.approx`` of the JSD kernels must take ``max(m, 2^-126)``.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SCRIPT = TOOLS / "bench_aot.py"
sys.path.insert(0, str(TOOLS))  # tools/ is not a package; bench_aot imports triton lazily


def _nvidia_backend_present():
    # Locate triton without importing it here: importing triton before TRITON_INTERPRET is
    # set would break the interpreter runs of the other divergence tests.
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    d = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(d, t)) for t in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.skipif(not _nvidia_backend_present(),
                    reason="triton's NVIDIA backend tools (ptxas, cuobjdump, nvdisasm) are missing")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--check", "--dtypes", "bf16"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"sm_90 compile check failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "compiled 7 kernel variants" in r.stdout, r.stdout[-2000:]


def test_log_clamp_report_reads_ptx():
    from bench_aot import log_clamp_report

    clamped = """
\tfma.rn.f32 \t%r153, %r6, %r105, %r137;
\tmax.NaN.f32 \t%r169, %r153, 0f00800000;
\tlg2.approx.ftz.f32 \t%r185, %r169;
\tmov.b32 \t%r7, 0f00800000;
\tmax.f32 \t%r170, %r7, %r154;
\tlg2.approx.ftz.f32 \t%r186, %r170;
"""
    assert log_clamp_report(clamped) == (2, 2, [])
    unclamped = """
\tfma.rn.f32 \t%r153, %r6, %r105, %r137;
\tlg2.approx.ftz.f32 \t%r185, %r153;
\tmax.f32 \t%r170, %r154, 0f3F800000;
\tlg2.approx.ftz.f32 \t%r186, %r170;
"""
    n, ok, bad = log_clamp_report(unclamped)
    assert (n, ok) == (2, 0) and len(bad) == 2 and "%r185" in bad[0]


@pytest.mark.skipif(not _nvidia_backend_present(),
                    reason="triton's NVIDIA backend tools (ptxas, cuobjdump, nvdisasm) are missing")
def test_compiled_jsd_log_takes_the_clamped_mixture(tmp_path):
    """Compile the JSD phase-B and gradient kernels for sm_90 (bf16, fp32) and read the PTX:
    the lg2 of the mixture is there, flush-to-zero, and each one's operand is max(m, 2^-126)."""
    from bench_aot import SMALLEST_NORMAL_PTX, log_clamp_report

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--check", "--kinds", "jsd",
                        "--kernels", "jsd,grad", "--dtypes", "bf16,fp32", "--dump-ptx",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"sm_90 JSD compile/clamp check failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    files = sorted(tmp_path.glob("*.ptx"))
    assert [f.name.rsplit("_b", 1)[0] for f in files] == ["grad_jsd_bf16", "grad_jsd_fp32",
                                                      "jsd_jsd_bf16", "jsd_jsd_fp32"]
    for f in files:
        ptx = f.read_text()
        assert "lg2.approx.ftz.f32" in ptx and "ex2.approx.ftz.f32" in ptx, f.name
        assert SMALLEST_NORMAL_PTX in ptx, f"{f.name}: no smallest-normal constant"
        n, ok, bad = log_clamp_report(ptx)
        assert n > 0 and ok == n, f"{f.name}: {n - ok} of {n} lg2 take an unclamped value: {bad[:3]}"
