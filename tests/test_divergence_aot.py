"""The Triton divergence kernels compile for Hopper (sm_90) on any machine, GPU or not.

Runs ``python -m ophsd_kernels.bench_aot --check`` in a subprocess with TRITON_INTERPRET
unset (the other divergence tests set it on CPU-only machines): every kernel x kind in bf16,
the default launch parameters, compiled by Triton's bundled ptxas into a real sm_90 cubin,
with no register spills and 16-byte global loads/stores. This catches what the interpreter
cannot (compile errors in the GPU path, spills) without a GPU.
"""
import importlib.util
import os
import subprocess
import sys

import pytest


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
    r = subprocess.run([sys.executable, "-m", "ophsd_kernels.bench_aot", "--check", "--dtypes", "bf16"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"sm_90 compile check failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "compiled 7 kernel variants" in r.stdout, r.stdout[-2000:]
