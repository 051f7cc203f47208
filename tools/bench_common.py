"""What the benchmark scripts in ``tools/`` share: the machine a result names, wall/CPU timing,
package versions, and the files a run writes (CSV, JSON, Markdown tables).

The scripts (``bench_kernel.py``, ``bench_train.py``, ``bench_step.py``, ``bench_engine.py``) are
thin over this module. ``tools/`` is not a package: a script imports it as ``bench_common``
after putting its own folder on ``sys.path``; importing it puts the repository root there too
(so ``ophsd`` imports from the checkout). Torch is imported only by the helpers that need it,
so ``--help`` stays fast.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Benchmarks never download: models come from the embedded default, local dirs or presets.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def offline() -> None:
    """Default the Hugging Face libraries to offline mode (an explicit setting wins)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


# ------------------------------------------------------------------------------ the machine


def cpu_cores(sep: str = ", ") -> str:
    """``"<CPU model><sep><n> logical cores"``."""
    from ophsd.runtime.machine import cpu_name

    return f"{cpu_name()}{sep}{os.cpu_count()} logical cores"


def gpu_name(device=None) -> str | None:
    """The CUDA device's name (``device``: a ``torch.device``, an index or None for the current
    one); None without CUDA or for a CPU device."""
    import torch

    if getattr(device, "type", "cuda") != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def versions(modules=("megatron.core", "transformers", "triton", "transformer_engine")) -> dict:
    """torch and Python versions, plus each of ``modules`` that imports."""
    import torch

    v = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in modules:
        try:
            m = __import__(mod, fromlist=["__version__"])
            v[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional
            pass
    return v


# ---------------------------------------------------------------------------------- timing


def sync(device=None) -> None:
    """Wait for queued CUDA work (a no-op on CPU, or for a CPU ``device``)."""
    import torch

    if getattr(device, "type", "cuda") == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.wall`` / ``sw.cpu``: wall-clock seconds and this
    process's CPU seconds (all threads). On a shared machine the CPU time is the steadier of the
    two: wall time measures the other tenants as much as the code."""

    wall = cpu = 0.0

    def __enter__(self):
        self._c0, self._w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w0, time.process_time() - self._c0
        return False


# ----------------------------------------------------------------------------------- files


def write_csv(path, rows, fieldnames=None, meta=None) -> None:
    """Write ``rows`` (dicts or dataclasses) as CSV, atomically (a ``.tmp`` file, then rename).
    ``fieldnames`` default to the first row's keys; ``meta`` becomes ``# key: value`` lines
    before the header."""
    rows = [asdict(r) if is_dataclass(r) else r for r in rows]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        if meta:
            f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()))
        w = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    """``obj`` as indented JSON with a final newline."""
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def md_table(cols, rows) -> list[str]:
    """A Markdown table's lines: header, separator and one line per row (cells as given)."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def wrote(*paths) -> None:
    """Say which files a run wrote: ``wrote A and B``."""
    print("wrote " + " and ".join(str(p) for p in paths), flush=True)
