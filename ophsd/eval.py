"""Standalone vs harness-attached evaluation.

    python -m ophsd.eval --task banking77 --data ../shared/data/banking77/train.csv --split dev \\
        --model smollm2-135m --harness draft_verify --bank-data ../shared/data/banking77/train.csv \\
        --limit 200 --output result.json

One run reports, for the same examples:

* ``standalone``: the bare task prompt (what the trained student sees), greedy;
* ``harness``: the harness's final answer with *no* privileged information (``training=False``);

each with ``accuracy`` (fraction in [0, 1]; mean set-F1 for multi-label tasks), ``n``, mean
response length in tokens, unparsed answers, and ``pass@k`` from ``--n-samples`` samples at
``--temperature`` (when ``--n-samples > 1``); the harness also reports its per-mode counts and
call counters. A table is printed and the JSON written to ``--output``.

Draft-verify bank: ``--bank-data FILE`` seeds it from a labelled file (when that file is the
``--data`` file and ``--split dev`` is used, only the *train* part seeds it: no dev example is
in the bank); without it, the bank is built online from the evaluation stream, each example
added after its own prediction (chunk by chunk, ``--batch-size``).

Engines: the in-process :class:`~ophsd.rollout.embedded.EmbeddedEngine` (default) or SGLang /
embedded HTTP servers with ``--engine-url URL [URL ...]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from ophsd.harness import options as harness_options
from ophsd.harness.base import call_isolated
from ophsd.rollout.base import SamplingParams
from ophsd.tasks import TaskDataError, get_task, list_tasks
from ophsd.tasks.base import split_dev
from ophsd.tasks.rewards import pass_at_k

PROG = "python -m ophsd.eval"


class UsageError(SystemExit):
    """A bad flag or data file: :func:`main` prints it as one line and exits with code 2
    (argparse's convention); ``str(e)`` is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a model standalone (bare prompt) and inside a harness (no privileged info).",
    )
    p.add_argument("--task", required=True, help=f"one of: {', '.join(list_tasks())}")
    p.add_argument("--data", help="task data file (not needed for 'arith', which generates problems)")
    p.add_argument("--model", default="smollm2-135m",
                   help="HF model directory, .gguf file, Megatron directory, or an embedded name (default smollm2-135m)")
    p.add_argument("--harness", default=None,
                   help="harness name (default: the task's, plan_solve for math, draft_verify for classification); "
                        "'none' evaluates standalone only")
    # every registered harness's options: --plan-tokens, --k-neighbours, --cold-start, --bank-data, ...
    harness_options.add_harness_arguments(p, "eval")
    p.add_argument("--split", default="all", choices=["all", "dev", "train"],
                   help="evaluate the whole file, or the dev/train part of a fixed-seed split")
    p.add_argument("--dev-size", type=int, default=500, help="examples in the dev split (default 500)")
    p.add_argument("--seed", type=int, default=0, help="split seed (and arith generator seed)")
    p.add_argument("--limit", type=int, help="evaluate N examples (after the split): a sample drawn with --seed, "
                                             "stratified by label for classification tasks (round-robin over the "
                                             "labels in a seeded order: every label once before any twice)")
    p.add_argument("--n-samples", type=int, default=1,
                   help="samples per example for pass@k (default 1: greedy accuracy only)")
    p.add_argument("--pass-k", default=None, help="comma-separated k values (default: powers of 2 up to n)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for pass@k")
    p.add_argument("--max-new-tokens", type=int, help="answer budget (default: the task's)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per engine batch / online bank update")
    p.add_argument("--engine-url", nargs="+", help="SGLang or embedded server URL(s) instead of the in-process engine")
    p.add_argument("--dtype", default="float32", help="embedded engine dtype (float32, bfloat16)")
    p.add_argument("--device", default="cpu", help="embedded engine device")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument("--save-responses", action="store_true", help="include every example's responses, parsed answers and correctness in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- engine

def make_engine(args):
    if args.engine_url:
        from ophsd.rollout.sglang import SGLangEngine

        tokenizer = None
        if args.model:
            try:
                from ophsd.models.hub import load_tokenizer, resolve_model

                tokenizer = load_tokenizer(resolve_model(args.model))
            except Exception:  # noqa: BLE001 - fall back to the server's model path
                tokenizer = None
        return SGLangEngine(args.engine_url, tokenizer=tokenizer)
    from ophsd.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(args.model, dtype=args.dtype, device=args.device,
                          max_running=max(1, args.batch_size))


# --------------------------------------------------------------------------- helpers

def _pass_ks(n: int, spec: str | None) -> list[int]:
    if spec:
        ks = sorted({int(x) for x in spec.split(",") if x.strip()})
        bad = [k for k in ks if k < 1 or k > n]
        if bad:
            raise UsageError(f"--pass-k values must be in 1..--n-samples ({n}), got {bad}")
        return ks
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _score(task, answer, ex) -> float:
    return float(task.score_answer(answer, ex)) if answer is not None else 0.0


def _load_examples(task, args):
    if task.name == "arith":
        if args.data:
            raise UsageError("task 'arith' generates its problems: drop --data")
        n = args.limit or (args.dev_size if args.split == "dev" else 200)
        return task.dataset(split=args.split, dev_size=args.dev_size, limit=n), None
    if not args.data:
        raise UsageError(f"task {task.name!r} needs --data FILE")
    data = task.load(args.data)
    train_part = None
    if args.split != "all":
        train_part, dev = split_dev(data, args.dev_size, args.seed, key=task.stratum)
        data = dev if args.split == "dev" else train_part
    if args.limit is not None:
        data = task.sample(data, args.limit, args.seed)
    return data, train_part


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# --------------------------------------------------------------------------- evaluation

def evaluate(task, examples, engine, harness=None, n_samples: int = 1, temperature: float = 0.7,
             pass_ks: Sequence[int] = (1,), max_new_tokens: int | None = None, batch_size: int = 64,
             online_bank: bool = False, progress: bool = True, save_responses: bool = False) -> dict:
    """Standalone and harness-attached metrics on ``examples`` (see the module docstring)."""
    budget = int(max_new_tokens or task.max_new_tokens)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=budget)
    sampled = SamplingParams(temperature=temperature, max_new_tokens=budget, n=n_samples, seed=1234)
    sa = {"scores": [], "lens": [], "unparsed": 0, "failed": 0, "correct_counts": []}
    chunk_size, max_workers = max(1, batch_size // 4), 4
    hs = {"scores": [], "lens": [], "unparsed": 0, "correct_counts": []}
    responses = []
    sampler = None
    if harness is not None and n_samples > 1:
        sampler = copy.copy(harness)  # shares the bank; own counters
        sampler.temperature, sampler.seed = temperature, 1234
        sampler._stats, sampler._stats_lock = Counter(), threading.Lock()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=f"eval {task.name}", unit="ex")
    t_sa = t_h = 0.0
    for s in range(0, len(examples), batch_size):
        chunk = list(examples[s: s + batch_size])
        t0 = time.perf_counter()
        convs = [task.student_messages(e) for e in chunk]
        outs = call_isolated(engine, convs, greedy, chunk_size=chunk_size, max_workers=max_workers)
        answers = []
        for e, o in zip(chunk, outs):
            ans = task.extract_answer(o.text) if o.completion is not None else None
            answers.append(ans)
            sa["failed"] += o.completion is None
            sa["unparsed"] += ans is None
            sa["scores"].append(_score(task, ans, e))
            sa["lens"].append(len(o.completion.output_ids) if o.completion is not None else 0)
        if n_samples > 1:
            samples = call_isolated(engine, convs, sampled, chunk_size=chunk_size, max_workers=max_workers)
            for e, o in zip(chunk, samples):
                sa["correct_counts"].append(sum(task.reward(c.text, e) >= 1.0 for c in o.completions))
        t_sa += time.perf_counter() - t0
        hres = [None] * len(chunk)
        if harness is not None:
            t0 = time.perf_counter()
            hres = harness.run(chunk, engine, training=False)
            for e, r in zip(chunk, hres):
                hs["unparsed"] += r.answer is None
                hs["scores"].append(_score(task, r.answer, e))
                hs["lens"].append(r.response_tokens)
            if sampler is not None:
                counts = [0] * len(chunk)
                for _ in range(n_samples):
                    for i, (e, r) in enumerate(zip(chunk, sampler.run(chunk, engine, training=False))):
                        counts[i] += _score(task, r.answer, e) >= 1.0
                hs["correct_counts"].extend(counts)
            if online_bank:
                harness.update(chunk)  # each example joins the bank after its own prediction
            t_h += time.perf_counter() - t0
        if save_responses:
            for e, o, ans, r in zip(chunk, outs, answers, hres):
                s_score = _score(task, ans, e)
                h_score = None if r is None else _score(task, r.answer, e)
                responses.append({
                    "id": e.id, "text": task.input_text(e), "gold": task.format_answer(e.answer),
                    "standalone": o.text, "standalone_error": o.error, "standalone_answer": ans,
                    "standalone_score": s_score, "standalone_correct": s_score >= 1.0,
                    "standalone_tokens": len(o.completion.output_ids) if o.completion is not None else 0,
                    "harness": None if r is None else r.final_response,
                    "harness_answer": None if r is None else r.answer,
                    "harness_score": h_score, "harness_correct": None if r is None else h_score >= 1.0,
                    "mode": None if r is None else r.mode,
                })
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(sa=f"{_mean(sa['scores']):.3f}", h=f"{_mean(hs['scores']):.3f}" if hs["scores"] else "-")
    if bar is not None:
        bar.close()

    def summary(d, seconds):
        out = {"accuracy": _mean(d["scores"]), "n": len(d["scores"]),
               "mean_response_tokens": _mean(d["lens"]), "unparsed": int(d["unparsed"]),
               "seconds": round(seconds, 1)}
        if "failed" in d:
            out["failed_calls"] = int(d["failed"])
        if d["correct_counts"]:
            out["pass@k"] = {f"pass@{k}": _mean(pass_at_k(n_samples, c, k) for c in d["correct_counts"])
                             for k in pass_ks}
            out["n_samples"] = n_samples
            out["temperature"] = temperature
        return out

    result = {"standalone": summary(sa, t_sa)}
    if harness is not None:
        h = summary(hs, t_h)
        st = harness.stats()
        h["modes"] = {k.split("/", 1)[1]: v for k, v in st.items() if k.startswith("mode/")}
        h["stats"] = {k: v for k, v in st.items() if not k.startswith("mode/")}
        h["name"] = harness.name
        result["harness"] = h
    else:
        result["harness"] = {"accuracy": None, "n": 0, "name": None}
    if save_responses:
        result["responses"] = responses
    return result


def format_table(res: dict) -> str:
    rows = [("", "accuracy", "n", "mean tokens", "unparsed", "pass@k")]
    for key in ("standalone", "harness"):
        r = res.get(key) or {}
        if r.get("accuracy") is None:
            continue
        pk = " ".join(f"{k}={v:.3f}" for k, v in (r.get("pass@k") or {}).items()) or "-"
        label = key if key == "standalone" else f"harness ({r.get('name')})"
        rows.append((label, f"{r['accuracy']:.3f}", str(r["n"]), f"{r['mean_response_tokens']:.1f}",
                     str(r.get("unparsed", "")), pk))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    h = res.get("harness") or {}
    if h.get("modes"):
        lines.append("harness modes: " + ", ".join(f"{k}={v}" for k, v in sorted(h["modes"].items())))
    b = res.get("bank")
    if b:
        nla = b.get("nearest_label_accuracy")
        lines.append(f"memory bank: {b['source']}, {b['size_start']} -> {b['size_end']} examples"
                     + (f", nearest-neighbour label accuracy {nla:.3f}" if nla is not None and not math.isnan(nla)
                        else ""))
    return "\n".join(lines)


def _check_flags(args) -> None:
    """Every flag checked before any data or model is read; the output file is probed for writing
    too, so that a run's results are not lost at its end."""
    for flag, low in (("n_samples", 1), ("limit", 1), ("dev_size", 1), ("max_new_tokens", 1), ("batch_size", 1)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")
    error = harness_options.check_minimums(args, "eval")
    if error:
        raise UsageError(error)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.output:
        from ophsd.cli import writable_error

        error = writable_error(args.output, "--output")
        if error:
            raise UsageError(error)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_flags(args)
    if args.engine_url is None and str(args.device).startswith("cpu"):
        from ophsd.runtime.machine import warn_if_cpus_shared

        warn_if_cpus_shared(PROG)
    pass_ks = _pass_ks(args.n_samples, args.pass_k) if args.n_samples > 1 else [1]
    try:
        task = get_task(args.task, **({"seed": args.seed} if args.task == "arith" else {}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        examples, train_part = _load_examples(task, args)
    except ValueError as e:  # TaskDataError (it names the file), a split the data cannot give
        raise UsageError(str(e)) from None
    hname = args.harness or task.default_harness
    if hname == "none":
        hname = None
    error = harness_options.check_exclusive(hname, args, "eval")
    if error:
        raise UsageError(error)

    from ophsd.harness import get_harness

    progress = not args.no_progress
    harness, bank_info, online = None, None, False
    if hname is not None:
        kw = {"progress": progress, "chunk_size": max(1, args.batch_size // 4), "max_workers": 4}
        sources = []  # the labelled files the harness options read (a memory bank's seed)

        def read_data(path):
            """A labelled file named by a harness option; the evaluation file gives its train part only."""
            if _same_file(path, args.data) and train_part is not None and args.split == "dev":
                out = train_part, f"{path} (train part of the split)"
            elif _same_file(path, args.data) and args.split != "train":
                raise UsageError("--bank-data is the evaluation file: use --split dev so the bank "
                                 "holds only the train part (otherwise every example is in the bank)")
            else:
                data_task = get_task(args.task)
                if getattr(task, "labels", None):
                    data_task.set_labels(task.labels)
                out = data_task.load(path), path
            sources.append(out[1])
            return out

        try:
            options = harness_options.options_from_args(hname, args, "eval")
            ctx = harness_options.HarnessContext(task, read_data, progress=progress,
                                                 max_new_tokens=args.max_new_tokens)
            harness = get_harness(hname, task=task, **options.harness_kwargs(ctx), **kw)
        except (ValueError, TaskDataError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        bank = getattr(harness, "bank", None)
        if bank is not None:  # a memory bank: seeded from a file, else grown from the evaluation stream
            online = not sources
            bank_info = {"source": sources[-1] if sources else "online (evaluation stream)",
                         "size_start": len(bank), "embedder": bank.embedder.name}
            if len(bank) and hasattr(harness, "nearest_label_accuracy"):
                bank_info["nearest_label_accuracy"] = harness.nearest_label_accuracy(examples)

    t0 = time.perf_counter()
    from ophsd.models.hub import ModelNotFoundError

    try:
        engine = make_engine(args)
    except (ModelNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    load_s = time.perf_counter() - t0
    try:
        res = evaluate(task, examples, engine, harness, n_samples=args.n_samples, temperature=args.temperature,
                       pass_ks=pass_ks, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       online_bank=online, progress=progress, save_responses=args.save_responses)
    finally:
        engine.close()
    if bank_info is not None:
        bank_info["size_end"] = len(harness.bank)
        res["bank"] = bank_info
    out = {"task": task.name, "model": args.model, "data": args.data, "split": args.split,
           "dev_size": args.dev_size if args.split != "all" else None, "seed": args.seed,
           "harness_name": hname, "n_examples": len(examples),
           "bad_rows": len(getattr(examples, "bad_rows", []) or []), "engine_load_seconds": round(load_s, 1)}
    out.update(res)
    print(format_table(out))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2, ensure_ascii=False, default=str))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
