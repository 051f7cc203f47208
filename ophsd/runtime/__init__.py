"""Process-level runtime: distributed init, megatron parallel state, the CPU device shim."""
