"""The process groups a training role uses, passed in rather than read from megatron's globals.

megatron-core's own modules take their groups as arguments (``pg_collection``); the trainer's
roles do the same with :class:`ParallelGroups`, built once by the composition root after
:func:`ophsd.runtime.distributed.initialize`. megatron-core 0.16's ``ProcessGroupCollection``
holds only the groups (set one by one after construction, no ranks, sizes or stage tests), so
the roles would still call ``dist`` for every rank; this object carries what they ask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's tensor-, pipeline- and data-parallel groups, its rank in each and their sizes."""

    tp: dist.ProcessGroup
    """Tensor-parallel group: the vocab shards' collectives (divergence, entropy) and the weight gather."""
    pp: dist.ProcessGroup
    """Pipeline-parallel group: the stages that stream weights and per-token losses to rank 0."""
    dp: dist.ProcessGroup
    """Data-parallel group: the ranks that split a step's samples and sum its token weights."""
    tp_rank: int
    """This rank's vocab shard (columns ``tp_rank * V/TP`` onwards)."""
    tp_size: int
    """The number of TP shards."""
    pp_rank: int
    """The pipeline stage this rank holds."""
    pp_size: int
    """The number of pipeline stages."""
    dp_rank: int
    """Which share of a step's samples this rank trains on."""
    dp_size: int
    """The number of shares (megatron's DDP averages gradients over them)."""

    @property
    def is_pipeline_last_stage(self) -> bool:
        """This rank holds the output layer: logits and the loss exist here only."""
        return self.pp_rank == self.pp_size - 1

    @property
    def layout(self) -> dict:
        """The TP/PP/DP sizes (checkpoints restore RNG streams only on the same layout)."""
        return {"tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size}

    @classmethod
    def from_parallel_state(cls) -> "ParallelGroups":
        """This rank's groups from megatron's ``parallel_state`` (initialised first): the one
        place outside megatron's pipeline schedule that reads its globals."""
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                   dp=ps.get_data_parallel_group(),
                   tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
                   dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
