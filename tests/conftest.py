import os

import pytest

import torch

# Triton kernels run in the interpreter on CPU-only machines. It must be set before anything
# imports triton (megatron-core does), so it lives here; on a GPU the kernels compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tests.tiny_models import write_tiny_tokenizer

    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: ``tiny_model_dir("llama" | "llama-untied" | "qwen2" | "qwen3")`` -> HF dir (cached)."""
    from tests.tiny_models import write_tiny_model

    cache = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = write_tiny_model(
                tmp_path_factory.mktemp(f"tiny_{arch}"), arch, tokenizer_dir=tiny_tokenizer_dir
            )
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def llama(tiny_model_dir):
    """The tiny random Llama's HF directory: the model the engine tests serve."""
    return tiny_model_dir("llama")
