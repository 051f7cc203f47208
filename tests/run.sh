#!/usr/bin/env bash
# The test command (README, .ci/run). Installs what it needs into .venv, then runs the
# default suite (everything not marked slow). Pass pytest arguments through, e.g.
#   bash tests/run.sh -m "slow or not slow"   # everything
#   bash tests/run.sh tests/test_divergence.py -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../examples/_env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -q -ra "$@"
