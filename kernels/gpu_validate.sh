#!/usr/bin/env bash
# GPU validation and benchmark of the divergence kernel (issue 7), from the repository root
# of a CUDA machine where the package is not installed:
#   bash kernels/gpu_validate.sh [tests|table|sweep|all] [extra benchmark args...]
# Writes logs, CSV and PNG under $OUT (default kernels/bench_results). Liger-Kernel is
# installed from .whl/liger_kernel-*.whl when it is not importable (no network needed).
set -uo pipefail
OUT=${OUT:-kernels/bench_results}
STEP=${1:-all}; shift || true
mkdir -p "$OUT" /tmp/ophsd_shim
ln -sfn "$PWD/kernels" /tmp/ophsd_shim/ophsd_kernels   # the import name of kernels/
export PYTHONPATH=/tmp/ophsd_shim:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ! $PY -c "import liger_kernel" 2>/dev/null && ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ophsd_site .whl/liger_kernel-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/ophsd_site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())";
  $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1; } | tee "$OUT/env.txt"
if [ "$STEP" = tests ] || [ "$STEP" = all ]; then
  timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -ra -p no:cacheprovider tests/test_divergence.py tests/test_divergence_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [ "$STEP" = sweep ] || [ "$STEP" = all ]; then
  timeout ${SWEEP_TIMEOUT:-240} $PY -m ophsd_kernels.benchmark --sweep --tokens 16384 --vocab 151936 --rep-ms 100 --out "$OUT" "$@" 2>&1 | tee "$OUT/sweep.log" | tail -8
fi
if [ "$STEP" = table ] || [ "$STEP" = all ]; then
  timeout ${TABLE_TIMEOUT:-420} $PY -m ophsd_kernels.benchmark --out "$OUT" "$@" 2>&1 | tee "$OUT/table.log" | tail -80
fi
