#!/usr/bin/env bash
# GPU validation and benchmark of the divergence kernel (issues 7, 13), from the repository root
# of a CUDA machine where the package is not installed:
#   bash kernels/gpu_validate.sh [tests|headline|table|sweep|all] [extra benchmark args...]
#     tests     CUDA kernel tests: tests/test_divergence.py (Triton compiled; with the JSD rows near
#               ln FLT_MIN, issue 13) and tests/test_divergence_gpu.py          -> tests.log
#     headline  the headline rows: reverse KL and JSD, N=16384, V=151936, bf16, TP=1, ours vs
#               torch_chunked, Liger (bf16 and fp32 log-probabilities, kernel alone), then
#               torch.compile (fwd+bwd only: its compiles are the slow part)
#                                   -> bench.log, bench_headline.csv, bench_headline.png
#     table     the full table (every size/kind/mode/impl, TP-sim rows) -> table.log, bench_cuda.*
#     sweep     the launch-parameter sweep                               -> sweep.log, sweep.json
#     all       tests, sweep, table
# Writes under $OUT (default kernels/bench_results). Each step runs under `timeout` (seconds:
# TEST_TIMEOUT, HEADLINE_TIMEOUT (rows without torch.compile), COMPILE_TIMEOUT (torch.compile
# rows), TABLE_TIMEOUT, SWEEP_TIMEOUT) and the CSV is rewritten after every row, so a step cut
# short keeps the rows it measured. The environment goes to $ENV_OUT (default $OUT/env.txt).
# Liger-Kernel is installed from .whl/liger_kernel-*.whl when it is not importable (no network).
# CPU dry run of the benchmark part: DRY_RUN=1 bash kernels/gpu_validate.sh headline
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-kernels/bench_results}
ENV_OUT=${ENV_OUT:-$OUT/env.txt}
STEP=${1:-all}; shift || true
mkdir -p "$OUT" /tmp/ophsd_shim
ln -sfn "$PWD/kernels" /tmp/ophsd_shim/ophsd_kernels   # the import name of kernels/
export PYTHONPATH=/tmp/ophsd_shim:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV_ARGS=()
if [ "${DRY_RUN:-0}" = 1 ]; then   # CPU: the same steps on tiny shapes, no GPU needed
  DEV_ARGS=(--device cpu --tokens 64 --vocab 1024 --cpu-reps 1 --equiv-rows 32)
fi
if ! $PY -c "import liger_kernel" 2>/dev/null && ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ophsd_site .whl/liger_kernel-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/ophsd_site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
  $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1; } | tee -a "$ENV_OUT"
rc=0
if [ "$STEP" = tests ] || [ "$STEP" = all ]; then
  XDIST=()
  if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${TEST_WORKERS:-8}"); fi   # parallel Triton compiles
  timeout -k 10 "${TEST_TIMEOUT:-300}" $PY -m pytest -q -ra -p no:cacheprovider "${XDIST[@]}" \
    tests/test_divergence.py tests/test_divergence_gpu.py > "$OUT/tests.log" 2>&1 || rc=$?
  tail -25 "$OUT/tests.log"; echo "kernel tests rc=$rc"
fi
if [ "$STEP" = headline ]; then
  H=(tools/bench_kernel.py --tokens 16384 --vocab 151936 --dtype bf16 --kinds reverse_kl,jsd
     --tp-sim --out "$OUT" --tag headline)
  timeout -k 10 "${HEADLINE_TIMEOUT:-150}" $PY "${H[@]}" --modes fwd,fwd+bwd \
    --impls ours,torch_chunked,liger_jsd,liger_jsd_fp32,liger_jsd_kernel "${DEV_ARGS[@]}" "$@" > "$OUT/bench.log" 2>&1 || rc=$?
  echo "headline rows rc=$rc" | tee -a "$OUT/bench.log"
  # torch.compile last: its two compiles (one per kind) take most of this step's time.
  timeout -k 10 "${COMPILE_TIMEOUT:-150}" $PY "${H[@]}" --modes fwd+bwd --impls torch_compile --append \
    "${DEV_ARGS[@]}" "$@" >> "$OUT/bench.log" 2>&1 || rc=$?
  echo "torch.compile rows rc=$rc" | tee -a "$OUT/bench.log"
  grep -A 40 "^impl " "$OUT/bench.log" | tail -40
fi
if [ "$STEP" = sweep ] || [ "$STEP" = all ]; then
  timeout -k 10 "${SWEEP_TIMEOUT:-240}" $PY tools/bench_kernel.py --sweep --tokens 16384 --vocab 151936 --rep-ms 100 \
    --out "$OUT" "$@" > "$OUT/sweep.log" 2>&1 || rc=$?
  tail -8 "$OUT/sweep.log"
fi
if [ "$STEP" = table ] || [ "$STEP" = all ]; then
  timeout -k 10 "${TABLE_TIMEOUT:-420}" $PY tools/bench_kernel.py --out "$OUT" "${DEV_ARGS[@]}" "$@" \
    > "$OUT/table.log" 2>&1 || rc=$?
  tail -80 "$OUT/table.log"
fi
exit $rc
