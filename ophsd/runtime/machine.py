"""What a benchmark row names as its machine, and whether other processes share its CPUs."""
from __future__ import annotations

import os
import platform
import sys
import time

# /proc/cpuinfo flags that decide CPU matmul speed, in the order a note names them.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_isa() -> list[str]:
    """The vector extensions this CPU reports (of avx2, avx512f, avx512_bf16, amx_bf16): detected,
    never assumed, since the machines a benchmark runs on differ (AVX2-only EPYCs, AVX512-BF16 ones)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def _cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of ``/proc/stat``."""
    try:
        with open(path) as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return total - idle, total


def busy_cpus(before: tuple[int, int], after: tuple[int, int], ncpu: int) -> float:
    """CPUs' worth of work done between two :func:`_cpu_times` readings."""
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    return 0.0 if d_total <= 0 else ncpu * max(0, d_busy) / d_total


def cpu_contention_warning(threads: int, interval: float = 0.25) -> str | None:
    """A warning when other processes keep the CPUs too busy for ``threads`` intra-op threads.

    Measured while this process sleeps, so what is busy is someone else. torch's parallel regions
    end at a barrier: with fewer free CPUs than threads, each product split over threads waits for
    a descheduled one. On 2 cores beside another 2-thread process, a 16-row SmolLM2-135M decode
    step ran 3-5x slower at 2 threads and ~1.4x at 1 thread (``tools/bench_cpu_contention.py``).
    ``None``: no contention seen, or not measurable."""
    ncpu = os.cpu_count() or 1
    before = _cpu_times()
    if before is None or threads < 2:
        return None
    time.sleep(interval)
    after = _cpu_times()
    if after is None:
        return None
    busy = busy_cpus(before, after, ncpu)
    if ncpu - busy >= threads - 0.5:
        return None
    return (f"other processes keep {busy:.1f} of this machine's {ncpu} CPUs busy and torch runs {threads} "
            f"threads: every multi-threaded product will wait on descheduled threads (a decode step ran "
            f"2-5x slower on 2 shared cores; tools/bench_cpu_contention.py). Run one job at a time, or "
            f"give each job fewer threads (OMP_NUM_THREADS=1).")


def warn_if_cpus_shared(prog: str) -> None:
    """Print :func:`cpu_contention_warning` to stderr when torch will compute on the CPU."""
    import torch

    if not torch.cuda.is_available():
        msg = cpu_contention_warning(torch.get_num_threads())
        if msg:
            print(f"{prog}: warning: {msg}", file=sys.stderr, flush=True)
