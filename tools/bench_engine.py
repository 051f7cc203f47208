#!/usr/bin/env python
"""Embedded-engine generation throughput vs plain ``transformers.generate`` one request at a time.

    python tools/bench_engine.py --model smollm2-135m --new-tokens 32 --concurrency 1,8,32,64

Both sides use the same model object weights, dtype, prompts (chat-templated questions of
varied length) and greedy decoding with a fixed number of new tokens (EOS ignored), in the
same process and run. The baseline runs ``--baseline-requests`` prompts one after another
(its tokens/s does not depend on how many it runs); the engine gets ``c`` requests from ``c``
threads at once for each concurrency ``c``. Prints a table and writes CSV + Markdown.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is 17 plus 25?",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "A train travels 60 km in 45 minutes. What is its average speed in km per hour?",
    "Write a short greeting for a new colleague.",
    "Which is larger, 0.7 or 0.65? Explain briefly.",
    "List the steps to make a cup of tea.",
    "If I have 12 apples and give away 5, how many are left?",
    "Translate 'good morning' into French.",
    "What is the capital of Japan, and what is it known for?",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "Give two tips for studying effectively.",
]


def machine_description() -> str:
    from ophsd.runtime.machine import cpu_name

    cpu = cpu_name()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    dev = "no GPU"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return (f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"{dev}; Python {platform.python_version()}; load average at start {load[0]:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name/path (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 (default: %(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated concurrent request counts")
    ap.add_argument("--baseline-requests", type=int, default=4, help="sequential HF generate calls per round")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds per point; the fastest is reported (shared CPUs are noisy), median too")
    ap.add_argument("--out-dir", default="bench_results/engine", help="where CSV and Markdown go")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from ophsd.models.hub import load_hf_model, load_tokenizer, resolve_model
    from ophsd.rollout import SamplingParams
    from ophsd.rollout.embedded import EmbeddedEngine, parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
    t0 = time.time()
    source = resolve_model(args.model)
    model = load_hf_model(source, dtype).to(args.device)
    tok = load_tokenizer(source)
    print(f"loaded {args.model} in {time.time() - t0:.1f}s; {machine_description()}", flush=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    n_new = args.new_tokens

    # ---- baseline: plain transformers.generate, one request at a time
    def hf_one(p):
        ids = torch.tensor([p], device=args.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        assert out.shape[1] - len(p) == n_new
        return out[0, len(p):].tolist()

    engine = EmbeddedEngine.from_pretrained_objects(model, tok, name=args.model, dtype=dtype, device=args.device,
                                                    max_running=max(conc))
    sp = SamplingParams(temperature=0.0, max_new_tokens=n_new, ignore_eos=True)

    def run(c):
        done = []
        barrier = threading.Barrier(c + 1)

        def worker(i):
            barrier.wait()
            done.append(engine.generate([prompts[i % len(prompts)]], sp)[0][0])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
        for th in threads:
            th.start()
        barrier.wait()
        t = time.perf_counter()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        assert len(done) == c and all(len(x.output_ids) == n_new for x in done)
        return dt

    def baseline_round():
        t = time.perf_counter()
        outs = [hf_one(prompts[i % len(prompts)]) for i in range(args.baseline_requests)]
        return time.perf_counter() - t, outs

    hf_one(prompts[0])  # warm-up both
    engine.generate([prompts[0]], sp)
    # Rounds interleave the baseline and every engine point, so all see the same machine load.
    base_dts, dts = [], {c: [] for c in conc}
    for r in range(args.repeats):
        dt, baseline_out = baseline_round()
        base_dts.append(dt)
        print(f"round {r + 1}: baseline {args.baseline_requests * n_new / dt:.1f} tok/s", end="", flush=True)
        for c in conc:
            dts[c].append(run(c))
            print(f" | c={c}: {c * n_new / dts[c][-1]:.1f}", end="", flush=True)
        print(flush=True)
    base_dt, base_med = min(base_dts), statistics.median(base_dts)
    base_tps = args.baseline_requests * n_new / base_dt
    check = engine.generate([prompts[i] for i in range(min(3, args.baseline_requests))], sp)
    eos = set(engine.eos_token_ids)

    def same_until_eos(ours, ref):  # HF's min_new_tokens masks EOS, the engine's ignore_eos samples it
        k = next((i for i, t in enumerate(ours) if t in eos), len(ours))
        return ours[:k] == ref[:k]

    agree = sum(same_until_eos(c[0].output_ids, b) for c, b in zip(check, baseline_out))
    rows = [{"mode": "transformers.generate x1 sequential", "concurrency": 1, "requests": args.baseline_requests,
             "new_tokens": n_new, "seconds": round(base_dt, 3), "tokens_per_s": round(base_tps, 1),
             "tokens_per_s_median": round(args.baseline_requests * n_new / base_med, 1), "speedup": 1.0}]
    for c in conc:
        dt = min(dts[c])
        tps = c * n_new / dt
        rows.append({"mode": "EmbeddedEngine, concurrent requests", "concurrency": c, "requests": c,
                     "new_tokens": n_new, "seconds": round(dt, 3), "tokens_per_s": round(tps, 1),
                     "tokens_per_s_median": round(c * n_new / statistics.median(dts[c]), 1),
                     "speedup": round(tps / base_tps, 2)})
    engine.close()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_engine.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [f"Model {args.model}, dtype {args.dtype}, device {args.device}, greedy, {n_new} new tokens per request "
          f"(EOS ignored). Machine: {machine_description()}. Greedy agreement engine (batched) vs HF up to the first EOS on "
          f"{len(check)} prompts: {agree}/{len(check)}.", "",
          f"Best of {args.repeats} rounds per point (median in parentheses).", "",
          "| mode | concurrent requests | seconds (best) | tokens/s best (median) | speedup vs one-at-a-time |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mode']} | {r['concurrency']} | {r['seconds']} | {r['tokens_per_s']} "
                  f"({r['tokens_per_s_median']}) | {r['speedup']}x |")
    (out / "bench_engine.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'bench_engine.csv'} and {out / 'bench_engine.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
