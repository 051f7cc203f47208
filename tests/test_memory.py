"""Per-phase peak memory (ophsd.runtime.memory): what a run logs as mem/<phase>_peak_gb."""
import sys

import numpy as np
import pytest

from ophsd.runtime.memory import PeakMemory, worst_phase

GB = 1024 ** 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-phase reset needs Linux's /proc/self/clear_refs")
def test_each_phase_sees_only_its_own_peak():
    mem = PeakMemory()
    if not mem.per_phase:
        pytest.skip("/proc/self/clear_refs is not writable here: only lifetime peaks can be read")
    out = {}
    with mem.phase("small", out):
        pass
    with mem.phase("big", out):
        a = np.ones(400 * 1024 ** 2 // 8)  # 400 MiB, touched
        a += 1
        del a
    with mem.phase("after", out):
        pass
    big, small, after = out["mem/big_peak_gb"], out["mem/small_peak_gb"], out["mem/after_peak_gb"]
    # the 400 MiB array shows in its phase (0.39 GiB) and not in the phases around it
    assert big - small >= 0.37, out
    assert after < big - 0.3, out
    assert worst_phase(out) == ("big", big)


def test_worst_phase_ignores_device_peaks_and_other_keys():
    row = {"loss": 1.0, "mem/harness_peak_gb": 12.6, "mem/teacher_peak_gb": 3.0,
           "mem/student_cuda_peak_gb": 80.0, "time/harness": 20.0}
    assert worst_phase(row) == ("harness", 12.6)
    assert worst_phase({"loss": 1.0}) is None


def _rss_gb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")) / 1024 ** 2


def test_release_free_heap_returns_freed_pages_to_the_os():
    """Freed heap pages below a live block stay resident until malloc_trim (the RSS ratchet of a
    run's evals); after release_free_heap they are gone."""
    from ophsd.runtime.memory import release_free_heap

    if not release_free_heap():
        pytest.skip("no glibc malloc_trim on this platform")
    # 256 MiB of 64 KiB heap blocks (below mmap's threshold), every byte written, so resident
    blocks = [b"\x01" * (64 * 1024) for _ in range(4096)]
    pin = b"\x01" * (64 * 1024)  # allocated last: keeps the heap top from shrinking by itself
    del blocks
    before = _rss_gb()
    assert release_free_heap()
    after = _rss_gb()
    assert before - after > 0.15, (before, after)  # most of the 0.25 GiB leaves; nothing else was freed
    del pin
