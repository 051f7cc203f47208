#!/usr/bin/env bash
# The GPU checks of issues 6 and 7 on one lent H100 (the workplace's device runner), from the
# repository root there, in three calls of under 10 minutes each (prepare the carried folders
# first with examples/h100/device_prepare.sh):
#   bash examples/h100/device_check.sh kernels   # carry .whl: divergence kernel tests + benchmark table (issue 7)
#   bash examples/h100/device_check.sh trainer   # carry .whl: trainer on CUDA (tiny model: train, save, resume)
#                                                #   + tools/bench_train.py on SmolLM2-135M and Qwen3-1.7B shapes
#   bash examples/h100/device_check.sh smollm2   # carry .whl .carry/gguf_a .carry/gguf_b: convert the real
#                                                #   SmolLM2-135M-Instruct and train it on arith with plan-solve
# The GGUF travels in two halves (one call carries at most 64 MiB): carry .carry/gguf_a in a call
# just before (a warm machine keeps ignored files between calls), then .carry/gguf_b with `smollm2`.
# Results (logs, JSON, Markdown, metrics) go to $OUT (default bench_results/device).
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: device_check.sh kernels|trainer|smollm2}
OUT=${OUT:-bench_results/device}
PY=${PY:-python3}
mkdir -p "$OUT" /tmp/ophsd_shim
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
ln -sfn "$PWD/kernels" /tmp/ophsd_shim/ophsd_kernels   # kernels/ is imported as ophsd_kernels
export PYTHONPATH=/tmp/ophsd_shim:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"
} 2>&1 | tee "$OUT/env.txt"

case "$STAGE" in
kernels)
  OUT="$OUT" TEST_TIMEOUT=200 bash kernels/gpu_validate.sh tests
  OUT="$OUT" TABLE_TIMEOUT=330 bash kernels/gpu_validate.sh table
  ;;
trainer)
  # 1. The whole trainer on CUDA/NCCL at one rank: rollouts on the GPU engine, bf16, save, exact resume.
  $PY -c "from tests.tiny_models import write_tiny_model; write_tiny_model('/tmp/tiny', 'llama')"
  T=(-m ophsd.train --model /tmp/tiny --bf16 --rollout-batch-size 4 --n-samples-per-prompt 2 --micro-batch-size 4
     --max-response-length 32 --plan-tokens 32 --skip-eval --no-tensorboard --lr 1e-4)
  rm -rf /tmp/run-full /tmp/run-part
  timeout 150 $PY "${T[@]}" --train-iters 3 --save /tmp/run-full > "$OUT/trainer_full.log" 2>&1; echo "full rc=$?"
  timeout 150 $PY "${T[@]}" --train-iters 2 --save /tmp/run-part > "$OUT/trainer_part.log" 2>&1; echo "part rc=$?"
  timeout 150 $PY "${T[@]}" --train-iters 3 --save /tmp/run-part --load /tmp/run-part >> "$OUT/trainer_part.log" 2>&1
  echo "resume rc=$?"
  $PY - <<'EOF' | tee "$OUT/trainer_resume_check.txt"
import json
full = [json.loads(l) for l in open("/tmp/run-full/metrics.jsonl")]
part = [json.loads(l) for l in open("/tmp/run-part/metrics.jsonl")]
f, p = [r["loss"] for r in full if "loss" in r], [r["loss"] for r in part if "loss" in r]
print("uninterrupted losses", f); print("save at 2 + resume  ", p)
print("next-step loss after resume matches:", abs(p[-1] - f[-1]) <= 1e-3 * abs(f[-1]))
EOF
  # 2. Step throughput (ophsd/train/BENCHMARKS.md, H100 section).
  timeout 240 $PY tools/bench_train.py --model smollm2-135m --bf16 --seq-length 4096 --response-length 2048 \
    --teacher-extra-length 1024 --micro-batch-size 4 --num-microbatches 4 --kernel-backend triton,torch \
    --warmup-steps 3 --steps 10 --out "$OUT/bench-smollm2" 2>&1 | tail -15
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 300 $PY tools/bench_train.py --model qwen3-1.7b --bf16 \
    --seq-length 4096 --response-length 2048 --teacher-extra-length 1024 --micro-batch-size 1 \
    --num-microbatches 8 --kernel-backend triton,torch --warmup-steps 3 --steps 10 --out "$OUT/bench-qwen3" 2>&1 | tail -15
  ;;
smollm2)
  NAME=$(cat .carry/gguf_a/NAME)
  cat .carry/gguf_a/part-00 .carry/gguf_b/part-01 > "/tmp/$NAME" || exit 1
  timeout 120 $PY tools/convert_hf.py import --gguf "/tmp/$NAME" --output /tmp/smollm2-mcore --overwrite 2>&1 | tail -3
  rm -rf /tmp/smollm2-run
  timeout 420 $PY -m ophsd.train --load /tmp/smollm2-mcore --bf16 --task arith --harness plan_solve \
    --train-iters 30 --rollout-batch-size 16 --n-samples-per-prompt 4 --micro-batch-size 16 \
    --max-response-length 192 --plan-tokens 128 --lr 1e-5 --lr-warmup-iters 3 --eval-limit 64 \
    --no-tensorboard --save /tmp/smollm2-run > "$OUT/smollm2_train.log" 2>&1; echo "train rc=$?"
  cp /tmp/smollm2-run/metrics.jsonl /tmp/smollm2-run/report.md "$OUT/" 2>/dev/null
  grep -E "^\[ophsd\] (eval|step)" "$OUT/smollm2_train.log" | tail -40
  ;;
*) echo "unknown stage $STAGE (kernels|trainer|smollm2)"; exit 2 ;;
esac
