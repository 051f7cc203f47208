#!/usr/bin/env bash
# The GPU checks of issues 6, 7 and 13 on one lent H100/H200 (the workplace's device runner),
# sized for 15 minutes of device time in all, start-up included. Prepare the carried wheels
# first, where pip works: bash examples/h100/device_prepare.sh   (fills .whl/, ~4 MB)
#
#   bash examples/h100/device_check.sh run1    # carry .whl. THE prepared run, < 8 minutes:
#       1. CUDA kernel tests (tests/test_divergence.py compiled, tests/test_divergence_gpu.py)
#       2. headline benchmark rows: reverse KL and JSD, N=16384, V=151936, bf16, TP=1: ours vs
#          torch_chunked, Liger (bf16 / fp32 log-probabilities, kernel alone), torch.compile;
#          each row labelled equivalent yes/no before it is timed
#       3. tiny CUDA trainer: train 3 steps | train 2 + save + resume to 3 (same next-step loss),
#          with tests/test_packing.py -k cuda (prefix-tree packing through FlexAttention,
#          backward included) beside it
# Second run, only if device time is left (each < 8 minutes):
#   bash examples/h100/device_check.sh steps     # carry .whl: tools/bench_train.py step throughput
#   bash examples/h100/device_check.sh smollm2   # carry .whl .carry/gguf_a .carry/gguf_b (prepare with
#                                                #   device_prepare.sh --gguf): real SmolLM2-135M on arith
# Pieces of run1 alone (reruns): kernels (1+2), trainer (3).
#
# Everything goes to $OUT (the device runner sets it; default bench_results/device), at most 8
# files (the runner brings back 8): summary.txt (environment, each stage's rc and seconds, the
# resume check, the headline table), tests.log, bench.log, bench_headline.csv, bench_headline.png,
# trainer.log, runs.tar.gz (the trainer runs' metrics.jsonl/report.md).
# Every stage runs under `timeout`, capped so that run1 ends within DEADLINE seconds (default 440).
# CPU dry run (small shapes, no GPU, no wheels needed): DRY_RUN=1 bash examples/h100/device_check.sh run1
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: device_check.sh run1|kernels|trainer|steps|smollm2}
OUT=${OUT:-bench_results/device}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-440}
START=$SECONDS
SUMMARY="$OUT/summary.txt"
mkdir -p "$OUT" /tmp/ophsd_shim
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$SUMMARY"; exit 1; }
fi
ln -sfn "$PWD/kernels" /tmp/ophsd_shim/ophsd_kernels   # kernels/ is imported as ophsd_kernels
export PYTHONPATH=/tmp/ophsd_shim:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# cap SECONDS RESERVE: a stage's timeout, at most SECONDS, leaving RESERVE seconds of the
# DEADLINE for the stages after it (never under 20).
cap() { local left=$((DEADLINE - (SECONDS - START) - $2)); [ "$left" -lt "$1" ] && set -- "$left"; [ "$1" -lt 20 ] && set -- 20; echo "$1"; }
stage() { echo "[$(date +%T)] +$((SECONDS - START))s $*" | tee -a "$SUMMARY"; }

{ echo "== device_check.sh $STAGE at $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  $PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
  $PY -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
} >> "$SUMMARY"
cat "$SUMMARY"

kernels() {
  local t0=$SECONDS rc
  if [ "${DRY_RUN:-0}" = 1 ]; then
    stage "kernel tests: skipped in DRY_RUN (CPU: bash tests/run.sh tests/test_divergence.py)"
  else
    OUT="$OUT" ENV_OUT=/dev/null TEST_TIMEOUT=$(cap 110 320) PY=$PY bash kernels/gpu_validate.sh tests > /dev/null; rc=$?
    stage "kernel tests rc=$rc ($((SECONDS - t0)) s): $(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$OUT/tests.log" | tail -1)"
  fi
  t0=$SECONDS
  OUT="$OUT" ENV_OUT="$SUMMARY" HEADLINE_TIMEOUT=$(cap 80 240) COMPILE_TIMEOUT=$(cap 90 150) PY=$PY \
    bash kernels/gpu_validate.sh headline > /dev/null; rc=$?
  stage "headline benchmark rc=$rc ($((SECONDS - t0)) s)"
  $PY - "$OUT/bench_headline.csv" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys
sys.path.insert(0, "tools")
from bench_kernel import load_csv
rows, meta = load_csv(sys.argv[1])
print(f"device {meta.get('device_name')}: copy {float(meta.get('copy_tbps', 'nan')):.2f} TB/s (read+write), "
      f"read-only {float(meta.get('read_tbps', 'nan')):.2f} TB/s; liger {meta.get('liger')}")
f = lambda x, p=3: "-" if x is None else f"{x:.{p}g}"
print("| impl | kind | mode | ms | x copy floor | x read floor | x torch_chunked | extra % logits | equivalent |")
for r in rows:
    print(f"| {r.impl} | {r.kind} | {r.mode} | {f(r.ms)} | {f(r.x_floor)} | {f(r.x_floor_read)} | "
          f"{f(r.speedup_vs_torch_chunked)} | {f(r.extra_pct_logits, 2)} | {r.equivalent or r.note} |")
EOF
}

trainer() {
  local t0=$SECONDS budget rc_full rc_part rc_pack rc_res
  budget=$(cap 150 0)
  rm -rf /tmp/tiny /tmp/run-full /tmp/run-part
  $PY -c "from tests.tiny_models import write_tiny_model; write_tiny_model('/tmp/tiny', 'llama')" >> "$OUT/trainer.log" 2>&1
  T=(-m ophsd.train --model /tmp/tiny --bf16 --rollout-batch-size 4 --n-samples-per-prompt 2 --micro-batch-size 4
     --max-response-length 32 --plan-tokens 32 --skip-eval --no-tensorboard --lr 1e-4)
  if [ "${DRY_RUN:-0}" = 1 ]; then T+=(--rollout-batch-size 2 --micro-batch-size 2 --max-response-length 12 --plan-tokens 12); fi
  # The uninterrupted run, the interrupted one and the packing test run side by side (one tiny
  # model each; every process picks its own free port), then the resume.
  timeout -k 10 $((budget * 3 / 5)) $PY "${T[@]}" --train-iters 3 --save /tmp/run-full > /tmp/trainer_full.log 2>&1 & P1=$!
  timeout -k 10 $((budget * 3 / 5)) $PY "${T[@]}" --train-iters 2 --save /tmp/run-part > /tmp/trainer_part.log 2>&1 & P2=$!
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "packing CUDA test: skipped in DRY_RUN" > /tmp/trainer_pack.log; P3=
  else
    timeout -k 10 $((budget * 3 / 5)) $PY -m pytest -q -ra -p no:cacheprovider tests/test_packing.py -k cuda > /tmp/trainer_pack.log 2>&1 & P3=$!
  fi
  wait $P1; rc_full=$?; wait $P2; rc_part=$?; rc_pack=0; [ -n "$P3" ] && { wait $P3; rc_pack=$?; }
  timeout -k 10 $(cap $((budget * 2 / 5)) 0) $PY "${T[@]}" --train-iters 3 --save /tmp/run-part --load /tmp/run-part \
    > /tmp/trainer_resume.log 2>&1; rc_res=$?
  for f in full part resume pack; do echo "===== $f"; cat /tmp/trainer_$f.log; done >> "$OUT/trainer.log"
  stage "trainer rc: full=$rc_full part=$rc_part resume=$rc_res packing-cuda-test=$rc_pack ($((SECONDS - t0)) s): $(tail -1 /tmp/trainer_pack.log)"
  $PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, os
def load(p):
    p = os.path.join(p, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
full = [r for r in load("/tmp/run-full") if "loss" in r]
part = [r for r in load("/tmp/run-part") if "loss" in r]
print("uninterrupted: steps", [r.get("step") for r in full], "losses", [r["loss"] for r in full])
print("save at 2, resume to 3: steps", [r.get("step") for r in part], "losses", [r["loss"] for r in part])
ok = len(full) == 3 and [r.get("step") for r in part] == [1, 2, 3]
if ok:
    rel = [abs(p["loss"] - f["loss"]) / max(abs(f["loss"]), 1e-12) for p, f in zip(part, full)]
    print("relative loss differences per step:", rel, "(bitwise equal)" if max(rel) == 0 else "")
    ok = max(rel) <= 1e-3
print("TRAINER RESUME CHECK:", "PASS" if ok else "FAIL")
EOF
  latest=$(cat /tmp/run-part/latest_checkpointed_iteration.txt 2>/dev/null)
  stage "checkpoint: latest_checkpointed_iteration.txt=${latest:-missing}"
  tar -czf "$OUT/runs.tar.gz" -C /tmp --ignore-failed-read run-full/metrics.jsonl run-full/report.md \
    run-part/metrics.jsonl run-part/report.md run-part/latest_checkpointed_iteration.txt 2>/dev/null
}

case "$STAGE" in
run1) kernels; trainer ;;
kernels) kernels ;;
trainer) trainer ;;
steps)
  # Step throughput (ophsd/train/BENCHMARKS.md, H100 section): SmolLM2-135M and Qwen3-1.7B shapes.
  timeout -k 10 $(cap 200 210) $PY tools/bench_train.py --model smollm2-135m --bf16 --seq-length 4096 --response-length 2048 \
    --teacher-extra-length 1024 --micro-batch-size 4 --num-microbatches 4 --kernel-backend triton,torch \
    --warmup-steps 3 --steps 10 --out "$OUT/bench-smollm2" > "$OUT/steps.log" 2>&1
  stage "bench_train smollm2 rc=$?"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -k 10 $(cap 210 0) $PY tools/bench_train.py --model qwen3-1.7b --bf16 \
    --seq-length 4096 --response-length 2048 --teacher-extra-length 1024 --micro-batch-size 1 \
    --num-microbatches 8 --kernel-backend triton,torch --warmup-steps 3 --steps 10 --out "$OUT/bench-qwen3" >> "$OUT/steps.log" 2>&1
  stage "bench_train qwen3-1.7b rc=$?"
  tail -30 "$OUT/steps.log"
  ;;
smollm2)
  NAME=$(cat .carry/gguf_a/NAME)
  cat .carry/gguf_a/part-00 .carry/gguf_b/part-01 > "/tmp/$NAME" || exit 1
  timeout 120 $PY tools/convert_hf.py import --gguf "/tmp/$NAME" --output /tmp/smollm2-mcore --overwrite 2>&1 | tail -3
  rm -rf /tmp/smollm2-run
  timeout -k 10 $(cap 330 0) $PY -m ophsd.train --load /tmp/smollm2-mcore --bf16 --task arith --harness plan_solve \
    --train-iters 30 --rollout-batch-size 16 --n-samples-per-prompt 4 --micro-batch-size 16 \
    --max-response-length 192 --plan-tokens 128 --lr 1e-5 --lr-warmup-iters 3 --eval-limit 64 \
    --no-tensorboard --save /tmp/smollm2-run > "$OUT/smollm2_train.log" 2>&1
  stage "smollm2 train rc=$?"
  cp /tmp/smollm2-run/metrics.jsonl /tmp/smollm2-run/report.md "$OUT/" 2>/dev/null
  grep -E "^\[ophsd\] (eval|step)" "$OUT/smollm2_train.log" | tail -40
  ;;
*) echo "unknown stage $STAGE (run1|kernels|trainer|steps|smollm2)"; exit 2 ;;
esac
stage "done: $STAGE in $((SECONDS - START)) s"
