"""``torchrun --nproc-per-node N -m ophsd.train [flags]`` (also ``ophsd train``)."""
from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from ophsd.train.config import ConfigError, TrainConfig, parse_args

    try:
        config = TrainConfig.from_args(parse_args(argv))  # the CLI edge: flags -> typed config
    except ConfigError as e:
        print(f"ophsd train: error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", 1))
    mp = config.model.tensor_model_parallel_size * config.model.pipeline_model_parallel_size
    if world % mp:
        print(f"ophsd train: error: --tensor-model-parallel-size x --pipeline-model-parallel-size = {mp} "
              f"does not divide the {world} launched ranks (torchrun --nproc-per-node)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if world == 1:  # torchrun's sibling ranks would count as other processes
        from ophsd.runtime.machine import warn_if_cpus_shared

        warn_if_cpus_shared("ophsd train")
    from ophsd.models.checkpoint import CheckpointError
    from ophsd.models.hub import ModelNotFoundError
    from ophsd.runtime import distributed
    from ophsd.tasks.base import TaskDataError
    from ophsd.train.trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(config)
        return trainer.run()
    except TaskDataError as e:  # a bad data file: a usage error
        print(f"ophsd train: error: {e}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, CheckpointError, TrainingError, ValueError) as e:
        print(f"ophsd train: error: {e}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
