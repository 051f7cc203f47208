#!/usr/bin/env bash
# OPHSD for classification: draft-verify harness with a memory bank (BANKING77 CSV text,category).
# Small models fit TP=1; DP over the node's GPUs. The bank grows with each step's true labels and
# is saved with every checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/h100/common.sh
CKPT=${CKPT:?set CKPT to a Megatron model directory}
DATA=${DATA:?set DATA to the BANKING77 training CSV}
RUN=${RUN:-runs/banking77-$(date +%Y%m%d-%H%M)}
ENGINE_ARGS=(--rollout-engine embedded)
if [ -n "${SGLANG_URLS:-}" ]; then
  ENGINE_ARGS=(--rollout-engine sglang); IFS=, read -ra U <<< "$SGLANG_URLS"
  for u in "${U[@]}"; do ENGINE_ARGS+=(--sglang-url "$u"); done
  ENGINE_ARGS+=(--weight-sync "${WEIGHT_SYNC:-disk}")  # see qwen3_8b_math_plan_solve.sh
  if [ -n "${WEIGHT_SYNC_DIR:-}" ]; then mkdir -p "$WEIGHT_SYNC_DIR"; ENGINE_ARGS+=(--weight-sync-dir "$WEIGHT_SYNC_DIR"); fi
fi
torchrun "${DISTRIBUTED_ARGS[@]}" -m ophsd.train \
  --load "$CKPT" --save "$RUN" --save-interval 100 \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --bf16 --use-distributed-optimizer \
  --micro-batch-size 8 --rollout-batch-size 64 \
  --lr 5e-6 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 --train-iters 300 \
  --task banking77 --data "$DATA" --harness draft_verify --bank-k 5 \
  --divergence jsd --beta 0.5 --teacher initial \
  "${ENGINE_ARGS[@]}" --max-prompt-length 2048 --max-response-length 32 \
  --eval-interval 50 --eval-limit 500 "$@"
