"""What sharing the CPUs with another torch process costs a decode step, alone vs shared.

    python tools/bench_cpu_contention.py --out-dir bench_results/cpu_contention

One decode step of a Llama-shaped model (default: SmolLM2-135M's shapes, 30 layers of q/k/v/o and
gate/up/down products plus the LM head, fp32, fresh weights) over ``--rows`` rows, and one of its
products alone ([rows, hidden] x [hidden, intermediate]), timed at each
``--threads`` count twice in the same run: alone, and while a second process (this script with
``--as-competitor``) runs the same step at ``--competitor-threads`` threads, as a second training
or test job on the same machine would. torch's parallel regions end at a barrier: when the other
process holds the CPUs, a product split over two threads waits for the descheduled one, and small
products (the decode step's) slow down far more than 2x. Prints a table and writes CSV, JSON and
Markdown with the CPU named (model, vector extensions, cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (puts the repository root on sys.path too)

WORKS = ("step", "product")  # a whole decode step; its gate product alone
SMOLLM2_135M = {"hidden": 576, "intermediate": 1536, "kv": 192, "layers": 30, "vocab": 49152}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ncpu = os.cpu_count() or 1
    p.add_argument("--threads", default=",".join(dict.fromkeys(["1", str(ncpu)])),
                   help="comma-separated torch thread counts to time (default: %(default)s)")
    p.add_argument("--rows", default="1,4,16", help="comma-separated rows decoded together (default: %(default)s)")
    p.add_argument("--competitor-threads", type=int, default=ncpu,
                   help="threads of the competing process (default: this machine's CPUs, %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="steps timed per cell; the median is reported")
    p.add_argument("--rounds", type=int, default=2,
                   help="alone/shared rounds per thread count; the fastest round's median is reported")
    for k, v in SMOLLM2_135M.items():
        p.add_argument(f"--{k}", type=int, default=v, help=f"model shape (default: SmolLM2-135M's {v})")
    p.add_argument("--out-dir", default="bench_results/cpu_contention")
    p.add_argument("--as-competitor", action="store_true", help=argparse.SUPPRESS)
    return p


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise SystemExit(f"bench_cpu_contention: error: --{name} wants positive integers, got {text!r}")
    return vals


class DecodeStep:
    """Fresh fp32 weights in ``nn.Linear`` layout; :meth:`__call__` runs one step's products."""

    def __init__(self, hidden, intermediate, kv, layers, vocab):
        import torch

        g = torch.Generator().manual_seed(0)

        def w(n, k):
            return torch.randn(n, k, generator=g) * k ** -0.5

        self.layers = [dict(q=w(hidden, hidden), k=w(kv, hidden), v=w(kv, hidden), o=w(hidden, hidden),
                            gate=w(intermediate, hidden), up=w(intermediate, hidden), down=w(hidden, intermediate))
                       for _ in range(layers)]
        self.head = w(vocab, hidden)
        self.hidden = hidden

    def __call__(self, x):
        import torch.nn.functional as F

        for L in self.layers:
            F.linear(x, L["q"]), F.linear(x, L["k"]), F.linear(x, L["v"])
            x = x + F.linear(x, L["o"])
            x = x + F.linear(F.linear(x, L["gate"]) * F.linear(x, L["up"]), L["down"])
            x = x / x.norm(dim=-1, keepdim=True)
        return F.linear(x, self.head)


def time_work(step: DecodeStep, work: str, rows: int, repeats: int) -> float:
    """Median milliseconds of ``work`` over ``rows`` rows: a whole decode step, or one of its
    products alone (the first layer's ``gate``, [rows, hidden] x [hidden, intermediate])."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(rows, step.hidden)
    fn = step if work == "step" else (lambda x: F.linear(x, step.layers[0]["gate"]))
    n = 1 if work == "step" else 20  # a product alone is too short to time once
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        times.append(1000 * (time.perf_counter() - t0) / n)
    return statistics.median(times)


@contextmanager
def competitor(threads: int, dims: dict):
    """A second process running decode steps (16 rows) at ``threads`` threads until the block ends."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--as-competitor", "--threads", str(threads)]
    cmd += [a for k, v in dims.items() for a in (f"--{k}", str(v))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":  # its weights built and one step run
            raise RuntimeError(f"competitor process failed to start (exit {proc.poll()})")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_competitor(args, dims) -> int:
    import torch

    torch.set_num_threads(_ints(args.threads, "threads")[0])
    step = DecodeStep(**dims)
    x = torch.randn(16, step.hidden)
    with torch.inference_mode():
        step(x)
        print("ready", flush=True)
        while True:
            step(x)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dims = {k: getattr(args, k) for k in SMOLLM2_135M}
    if args.as_competitor:
        return run_competitor(args, dims)
    threads, rows = _ints(args.threads, "threads"), _ints(args.rows, "rows")
    if args.repeats < 1 or args.rounds < 1 or args.competitor_threads < 1:
        raise SystemExit("bench_cpu_contention: error: --repeats, --rounds and --competitor-threads must be >= 1")
    import torch

    from ophsd.runtime.machine import cpu_isa

    machine = {"cpu": bc.cpu_cores(), "isa": cpu_isa(), "load_average_at_start": os.getloadavg()[0],
               **bc.versions(())}
    print(f"{machine['cpu']} ({', '.join(machine['isa']) or 'no AVX2'}); torch {machine['torch']}; "
          f"load average at start {machine['load_average_at_start']:.2f}", flush=True)
    step = DecodeStep(**dims)
    best: dict[tuple[int, int, str], float] = {}
    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(args.rounds):
                for mode in ("alone", "shared"):
                    with competitor(args.competitor_threads, dims) if mode == "shared" else nullcontext():
                        for work in WORKS:
                            for r in rows:
                                key = (work, t, r, mode)
                                ms = time_work(step, work, r, args.repeats)
                                best[key] = min(best.get(key, float("inf")), ms)
    out = []
    for work in WORKS:
        for t in threads:
            for r in rows:
                a, s = best[(work, t, r, "alone")], best[(work, t, r, "shared")]
                out.append({"work": work, "threads": t, "rows": r, "alone_ms": a, "shared_ms": s,
                            "slowdown": round(s / a, 2)})
                print(f"{work:7s} threads {t} rows {r:3d}: alone {a:9.3f} ms  shared {s:9.3f} ms  "
                      f"{s / a:5.2f}x", flush=True)
    od = Path(args.out_dir)
    od.mkdir(parents=True, exist_ok=True)
    meta = {**machine, "model_shape": dims, "competitor_threads": args.competitor_threads,
            "repeats": args.repeats, "rounds": args.rounds}
    bc.write_csv(od / "cpu_contention.csv", out, meta=meta)
    bc.write_json(od / "cpu_contention.json", {"meta": meta, "rows": out})
    lines = [f"# A decode step alone vs beside a {args.competitor_threads}-thread process",
             "", f"{machine['cpu']}; {', '.join(machine['isa']) or 'no AVX2'}; torch {machine['torch']}; "
             f"fp32; shape {dims}; median of {args.repeats} steps, best of {args.rounds} rounds", "",
             *bc.md_table(["work", "torch threads", "rows", "alone ms", "shared ms", "slowdown"],
                          [[r["work"], r["threads"], r["rows"], f"{r['alone_ms']:.3g}", f"{r['shared_ms']:.3g}", f"{r['slowdown']}x"]
                           for r in out])]
    (od / "cpu_contention.md").write_text("\n".join(lines) + "\n")
    bc.wrote(od / "cpu_contention.md", od / "cpu_contention.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
