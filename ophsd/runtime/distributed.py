"""Process group and megatron-core parallel state set-up, for torchrun and single processes.

NCCL on CUDA, gloo on CPU (where :mod:`ophsd.runtime.cpu_shim` is installed first).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from ophsd.runtime import cpu_shim


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (for MASTER_PORT, servers, tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    """True on global rank 0 of the initialised process group."""
    return dist.get_rank() == 0


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None): rank 0 alone owns the
    engine and the run directory, and every rank must take the same decision from what it saw."""
    box = [obj if is_rank0() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def log_rank0(msg: str, prefix: str = "ophsd") -> None:
    """Print ``[prefix] msg`` on rank 0 only."""
    if is_rank0():
        print(f"[{prefix}] {msg}", flush=True)


def comm_device() -> torch.device:
    """Where model inputs and small collective tensors live: the current CUDA device under NCCL
    (which rejects CPU tensors), the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 1800) -> None:
    """Initialise torch.distributed (from torchrun's env, or a 1-rank group) and megatron's groups."""
    from megatron.core import parallel_state as ps

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_shim.install()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python` run: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    ws = dist.get_world_size()
    if ws % (tp * pp):
        raise ValueError(f"world size {ws} is not divisible by TP*PP = {tp}*{pp}")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == tp and ps.get_pipeline_model_parallel_world_size() == pp:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Same seed on every rank for data; megatron's TP-aware CUDA RNG tracker on GPU."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
