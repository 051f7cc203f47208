#!/usr/bin/env bash
# The paper table in one command (see examples/paper_table/README.md):
#   bash examples/paper_table/run.sh [--budget cpu|gpu] [--tasks ...] [--methods ...] [--seeds ...] [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_env.sh"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python examples/paper_table/run.py "$@"
