"""Tiny random HF models and a sentencepiece tokenizer trained on the fly (no downloads).

Used by tests of the model backend, the converter, the engines and the harnesses.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB = 400  # not a multiple of 128: exercises Megatron's vocabulary padding


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    words = "the a plan step answer solve add subtract multiply total each apples books cost left".split()
    lines = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"Question {i}: what is {a} plus {b}? " + " ".join(rng.choices(words, k=8)) + f" = {a + b}.")
    return lines


def write_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Train a BPE sentencepiece model and save it as a HF Llama tokenizer with a chat template."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=TINY_VOCAB, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


def tiny_config(arch: str = "llama", **overrides):
    """A 4-layer config: 4 query heads, 2 KV groups (TP in {1, 2, 4}, PP in {1, 2, 4})."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
    elif arch == "llama-untied":
        cfg = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def write_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, tokenizer_dir=None) -> Path:
    """Save a random tiny causal LM (safetensors, float32) plus the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so logits are not all near zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif getattr(model.config, "attention_bias", False) or name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out))
    if tokenizer_dir is None:
        write_tiny_tokenizer(out)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out
