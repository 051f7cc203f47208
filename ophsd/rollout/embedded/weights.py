"""Weight changes of the embedded engine: validate and stage new tensors while generation goes
on, swap them in between batches (so every completion comes from one weight version), and move
the weights off / back onto the accelerator."""
from __future__ import annotations

import logging
from typing import Mapping

import torch

from ophsd.rollout.base import EngineError, InvalidRequestError
from ophsd.rollout.embedded.model_runner import ModelRunner
from ophsd.rollout.embedded.scheduler import Scheduler

log = logging.getLogger(__name__)


class WeightSwap:
    """Changes ``runner.model``'s weights, pausing ``scheduler`` around every swap and flushing
    the prefix cache (its KV belongs to the old weights)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, device: torch.device):
        self.runner = runner
        self.scheduler = scheduler
        self.device = device
        self.released = False

    def _targets(self) -> dict[str, torch.Tensor]:
        return dict(self.runner.model.state_dict(keep_vars=True))

    def stage(self, named_tensors) -> dict[str, torch.Tensor]:
        try:
            version_now = self.scheduler.version
            targets = self._targets()
            staged: dict[str, torch.Tensor] = {}
            errors: list[str] = []
            it = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
            for name, tensor in it:
                target = targets.get(name)
                if target is None:
                    errors.append(f"unknown parameter name {name!r}")
                    continue
                if not isinstance(tensor, torch.Tensor):
                    errors.append(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
                    continue
                if tuple(tensor.shape) != tuple(target.shape):
                    errors.append(f"{name}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
                    continue
                if tensor.is_floating_point() != target.is_floating_point():
                    errors.append(f"{name}: dtype {tensor.dtype} cannot replace {target.dtype}")
                    continue
                t = tensor.detach().to(device=self.device, dtype=target.dtype, copy=True)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    errors.append(f"{name}: contains NaN or Inf")
                    continue
                staged[name] = t
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(
                f"weight update failed while reading tensors ({type(e).__name__}: {e}); "
                f"the engine keeps weight version {version_now}"
            ) from e
        if errors:
            more = f" (+{len(errors) - 8} more)" if len(errors) > 8 else ""
            raise InvalidRequestError(
                f"weight update rejected, the engine keeps weight version {version_now}: "
                + "; ".join(errors[:8]) + more
            )
        if not staged:
            raise InvalidRequestError(f"weight update with no tensors; the engine keeps version {version_now}")
        return staged

    def apply(self, staged: Mapping[str, torch.Tensor], version: int) -> None:
        version = int(version)
        targets = self._targets()
        with self.scheduler.paused():
            with torch.no_grad():
                for name, t in staged.items():
                    targets[name].copy_(t)
            self.runner.flush_prefix_cache()
            self.set_version(version)
        log.info("embedded engine: %d tensors updated, weight version %d", len(staged), version)

    def set_version(self, version: int) -> None:
        with self.scheduler.cv:
            self.scheduler.version = int(version)

    def release(self) -> None:
        """Drain, then move the weights off the accelerator (a no-op move on CPU); the scheduler
        stays paused until :meth:`resume`."""
        sched = self.scheduler
        sched.pause()
        with sched.cv:
            if self.released:
                sched.resume()  # already released: keep the one pause that release took
                return
            self.released = True
        self.runner.flush_prefix_cache()
        if self.device.type != "cpu":
            self.runner.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resume(self) -> None:
        with self.scheduler.cv:
            if not self.released:
                return
        if self.device.type != "cpu":
            self.runner.model.to(self.device)
        with self.scheduler.cv:
            self.released = False
        self.scheduler.resume()
