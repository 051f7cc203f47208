"""Let megatron-core run on CPU (gloo ranks) when CUDA is absent.

megatron-core assumes CUDA in a handful of places that are not about compute: it passes
``device=torch.cuda.current_device()`` to factory calls, calls ``torch.cuda.synchronize()``
in the pipeline schedules, and moves small tensors with ``.cuda()``. On a machine without
CUDA this shim, and nothing else, makes those calls mean "the CPU":

* ``torch.cuda.current_device()`` returns ``"cpu"`` (a valid ``device=`` argument);
* ``torch.cuda.synchronize()`` and the CUDA RNG seeding calls become no-ops;
* a ``TorchFunctionMode`` rewrites ``device="cuda"`` / ``device=torch.device("cuda", i)``
  in factory calls and ``Tensor.to/.cuda`` into the CPU, and reports CPU tensors'
  legacy ``Tensor.type()`` names as ``torch.cuda.*`` (megatron's grad clipping asserts it).

It is installed by :func:`ophsd.runtime.distributed.initialize` only when
``torch.cuda.is_available()`` is False, is idempotent, and never active on a GPU machine.
The core attention is handled separately (``ophsd.models.megatron.SDPAttention``), since
megatron's own ``DotProductAttention`` also needs a CUDA memory buffer.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Redirects CUDA device arguments to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or isinstance(kwargs["device"], int)):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's grad clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if func is torch.Tensor.to and len(args) > 1 and (_is_cuda(args[1]) or (
                isinstance(args[1], int) and not isinstance(args[1], bool))):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def install() -> bool:
    """Install the shim if CUDA is absent. Returns True when the shim is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.device_count = lambda: 0
    # ``_CudaToCpu`` stays pushed for the life of the process, on the thread that installed
    # it (megatron's schedules and optimizer run on the main thread).
    _CudaToCpu().__enter__()
    _INSTALLED = True
    return True


def active() -> bool:
    return _INSTALLED
