#!/usr/bin/env bash
# OPHSD on Qwen3-8B, math with the plan-solve harness, one or more 8xH100 nodes.
#   CKPT: a Megatron dir from `python tools/convert_hf.py import --hf-dir /models/Qwen3-8B --output $CKPT`
#   DATA: JSONL with problem/answer[/solution] (MATH / DeepMath style) or gsm8k question/answer
#   SGLANG_URLS: comma-separated SGLang servers serving the same model (colocated or separate GPUs);
#                start them with `python -m sglang.launch_server --model-path HF_DIR --tp 2` on an HF export
#                (`python tools/convert_hf.py export --megatron-dir $CKPT --output HF_DIR`); the trainer pushes
#                new weights to them after every step:
#   WEIGHT_SYNC=disk (default): safetensors shards in WEIGHT_SYNC_DIR + /update_weights_from_disk; servers on
#                other GPUs or nodes, WEIGHT_SYNC_DIR on a filesystem they see at the same path (/dev/shm on one node)
#   WEIGHT_SYNC=tensor: /update_weights_from_tensor (CUDA IPC), SGLang colocated on the trainer's own GPUs
# Memory (bf16, TP=4, distributed optimizer, 16-bit params + fp32 main/Adam ~ 16 B/param over the
# DP x TP shards): ~8 B params -> ~18 GB/GPU of states at TP=4 x DP=2, plus activations for
# micro-batch 2 x 4k tokens; teacher logits at the response positions are [N, 151936/4] bf16.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/h100/common.sh
CKPT=${CKPT:?set CKPT to a Megatron model directory}
DATA=${DATA:?set DATA to a training JSONL}
RUN=${RUN:-runs/qwen3-8b-math-$(date +%Y%m%d-%H%M)}
SGLANG_URLS=${SGLANG_URLS:?set SGLANG_URLS=http://host:30000[,http://host2:30000]}
URL_ARGS=(); IFS=, read -ra U <<< "$SGLANG_URLS"; for u in "${U[@]}"; do URL_ARGS+=(--sglang-url "$u"); done
URL_ARGS+=(--weight-sync "${WEIGHT_SYNC:-disk}")
if [ -n "${WEIGHT_SYNC_DIR:-}" ]; then mkdir -p "$WEIGHT_SYNC_DIR"; URL_ARGS+=(--weight-sync-dir "$WEIGHT_SYNC_DIR"); fi
torchrun "${DISTRIBUTED_ARGS[@]}" -m ophsd.train \
  --load "$CKPT" --save "$RUN" --save-interval 50 \
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 \
  --bf16 --use-distributed-optimizer \
  --micro-batch-size 2 --rollout-batch-size 64 --n-samples-per-prompt 4 \
  --lr 1e-6 --min-lr 1e-7 --lr-warmup-iters 10 --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 \
  --train-iters 500 --seed 1234 \
  --task math --data "$DATA" --harness plan_solve --plan-tokens 512 \
  --divergence reverse_kl --distill-temperature 1.0 --teacher initial \
  --rollout-engine sglang "${URL_ARGS[@]}" --rollout-temperature 1.0 \
  --max-prompt-length 2048 --max-response-length 4096 \
  --eval-interval 50 --eval-limit 200 "$@"
