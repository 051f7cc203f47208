"""Weight sync: the student's HF-named full tensors, gathered over TP inside each pipeline stage and
streamed over the PP group to rank 0, which pushes them into its rollout engine."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import comm_device
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.groups import ParallelGroups


class WeightSync:
    """Collective: every rank calls :meth:`push`; ``engine`` is rank 0's (None elsewhere);
    ``groups``: the TP group the tensors are gathered over, the PP group they are streamed over."""

    def __init__(self, module, engine, groups: ParallelGroups):
        self.module, self.engine, self.groups = module, engine, groups

    def stage_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """This pipeline stage's HF-named full tensors (collective over TP)."""
        from ophsd.models import mapping

        return list(mapping.iter_hf_tensors(self.module, self.groups.tp))

    @torch.no_grad()
    def push(self, version: int) -> float:
        """Gather HF-named full tensors from every pipeline stage to rank 0 and push them as weight
        version ``version``; returns the seconds it took."""
        t0 = time.perf_counter()
        g = self.groups
        pp_group, pp = g.pp, g.pp_size
        tensors: list[tuple[str, torch.Tensor]] = []
        mine = self.stage_tensors()
        if g.tp_rank == 0 and g.dp_rank == 0:
            ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [dist.get_rank()]
            for stage, src in enumerate(ranks):
                if pp == 1:
                    tensors = mine
                    break
                meta = [[(n, tuple(t.shape), t.dtype) for n, t in mine] if dist.get_rank() == src else None]
                dist.broadcast_object_list(meta, src=src, group=pp_group)
                for i, (name, shape, dtype) in enumerate(meta[0]):
                    buf = (mine[i][1].contiguous() if dist.get_rank() == src
                           else torch.empty(shape, dtype=dtype, device=comm_device()))
                    dist.broadcast(buf, src=src, group=pp_group)
                    if _rank0():
                        tensors.append((name, buf))
        if _rank0() and self.engine is not None:
            from ophsd.rollout.weight_sync import push_weights

            push_weights(self.engine, ((n, t.float()) for n, t in tensors), version)
        dist.barrier()
        return time.perf_counter() - t0
