"""Run a function on several gloo ranks on CPU (tensor/pipeline-parallel tests).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group on a free port, calls ``fn(rank, world_size, *args)`` on each and returns the
list of per-rank return values (picklable). An exception on any rank is re-raised here
with that rank's traceback.
"""
from __future__ import annotations

import io
import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from ophsd.runtime.distributed import free_port


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    try:
        import torch

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Serialise with torch.save: tensors sent through a multiprocessing queue travel as
        # shared-memory handles that vanish when this process exits before the parent reads.
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, out = queue.get(timeout=timeout)
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(out), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
