"""Peak memory per phase of a step, read from the kernel (host) and the CUDA allocator (device).

A run's memory is set by its worst phase (harness generation over long prompts, the teacher
forward, the student backward, an eval), not by the model's size; logging each phase's peak tells
a user which flag to turn down before the OOM killer does it for them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
import sys

_CLEAR_REFS = "/proc/self/clear_refs"
_GB = 1024 ** 3


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident set size since the last :meth:`mark`, in GiB.

    Linux resets a process's high-water mark (``VmHWM``) when 5 is written to
    ``/proc/self/clear_refs``; where that is not possible (another OS, a locked-down /proc) the
    reading is the process's lifetime peak (``ru_maxrss``) and :attr:`per_phase` is False. With
    CUDA, the allocator's peak is reset and read alongside (``cuda_peak_gb``).
    """

    def __init__(self):
        self.per_phase = self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open(_CLEAR_REFS, "w") as fh:
                fh.write("5")
            return _vm_hwm_bytes() is not None
        except OSError:
            return False

    @staticmethod
    def _cuda() -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()

    def mark(self) -> None:
        """Start a new phase: later readings cover only what happens from here."""
        if self.per_phase:
            self._reset_hwm()
        if self._cuda():
            sys.modules["torch"].cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        """Host peak RSS since :meth:`mark` (lifetime peak where the mark cannot be reset)."""
        hwm = _vm_hwm_bytes() if self.per_phase else None
        if hwm is None:  # ru_maxrss is KiB on Linux, bytes on macOS
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = ru if sys.platform == "darwin" else ru * 1024
        return hwm / _GB

    def cuda_peak_gb(self) -> float | None:
        return sys.modules["torch"].cuda.max_memory_allocated() / _GB if self._cuda() else None

    def lap(self, name: str, out: dict) -> None:
        """End a phase: its peaks into ``out`` as ``mem/<name>_peak_gb`` (and
        ``mem/<name>_cuda_peak_gb``), then :meth:`mark` for the next one."""
        out[f"mem/{name}_peak_gb"] = round(self.peak_gb(), 3)
        cuda = self.cuda_peak_gb()
        if cuda is not None:
            out[f"mem/{name}_cuda_peak_gb"] = round(cuda, 3)
        self.mark()

    @contextlib.contextmanager
    def phase(self, name: str, out: dict):
        """:meth:`mark`, run the block, :meth:`lap` (also when the block raises)."""
        self.mark()
        try:
            yield
        finally:
            self.lap(name, out)


def worst_phase(m: dict) -> tuple[str, float] | None:
    """``(phase, GiB)`` of the largest host peak among a metrics row's phases (None when it has none)."""
    peaks = {k[4:-8]: v for k, v in m.items()
             if k.startswith("mem/") and k.endswith("_peak_gb") and not k.endswith("_cuda_peak_gb")}
    if not peaks:
        return None
    name = max(peaks, key=peaks.get)
    return name, peaks[name]


@functools.lru_cache(maxsize=1)
def _glibc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only: musl has no malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Hand the heap pages freed since the last call back to the OS (glibc's ``malloc_trim``).

    PyTorch's CPU tensors come from malloc; after a phase that allocates many mid-sized tensors
    (an eval's 64-row KV caches, a prefill's activations) glibc keeps the freed pages mapped, so
    the process's resident size ratchets up by the phase's working set and stays there: measured
    on a BANKING77 label-list run, +3.2 GiB retained after each eval (a 64-example eval: 4.8 GiB
    resident after, 1.5 GiB after the trim). Cheap (it walks the free lists). Returns False where
    there is no glibc."""
    trim = _glibc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_INSTANCE: PeakMemory | None = None


def peak_memory() -> PeakMemory:
    """The process's one :class:`PeakMemory` (every phase resets the same kernel counter)."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = PeakMemory()
    return _INSTANCE
