"""Model sources (HF dirs, GGUF files, the embedded default) and the megatron-core backend."""
