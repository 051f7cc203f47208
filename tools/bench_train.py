#!/usr/bin/env python
"""Training-step throughput of the OPHSD student update (everything in a trainer step but rollouts).

    python tools/bench_train.py --model tiny --steps 2 --warmup-steps 1 --kernel-backend cpp,torch --out /tmp/b
    python tools/bench_train.py --model qwen3-1.7b --bf16 --kernel-backend triton,torch \\
        --seq-length 4096 --response-length 2048 --teacher-extra-length 1024 --micro-batch-size 1 \\
        --num-microbatches 8 --out bench_results/train           # one H100 80 GB
    torchrun --nproc-per-node 2 tools/bench_train.py --model tiny --tensor-model-parallel-size 2 ...

Results and the exact H100 commands: ophsd/train/BENCHMARKS.md.

One step is what the trainer's update (``ophsd.train.update.update_step``) does with a batch of
pairs, on synthetic tokens:

1. per micro-batch, the frozen teacher (the same architecture, a copy of the student's initial
   weights, like ``--teacher initial``) runs forward without grad over the teacher context
   (``--seq-length`` + ``--teacher-extra-length`` tokens) and keeps only the response rows of
   its vocab-parallel logits (``ophsd.train.step.teacher_response_logits``);
2. the student runs forward+backward through megatron-core's pipeline schedule with the loss
   ``ophsd_kernels.vocab_parallel_divergence(..., reduction="none")`` at the response rows over
   the TP shards (``ophsd.train.step.student_pass``);
3. the gradients are checked for non-finite values on every rank and the megatron-core
   optimizer steps (``ophsd.train.update.build_optimizer``; the model is wrapped by ``wrap_ddp``).
   The LR scheduler's step (scalar arithmetic) is left out.

Steps 1-3 are one call of ``update_step``, the function the trainer's ``Updater`` calls, so this
measures what trains.

The models are random-initialised megatron-core ``GPTModel`` s built by
``build_model(model_spec_from_hf(hf_config, TP, PP), perform_initialization=True)``; nothing is
downloaded. Every ``--kernel-backend`` in the comma list gets a fresh student with the same
initial weights and a fresh optimizer, the same micro-batches, its own ``--warmup-steps`` and
``--steps`` timed steps, so the first-step losses of the backends must agree (they are
recorded: that makes the side-by-side comparison meaningful).

Reported per backend: median/mean step time (wall clock around the step with
``torch.cuda.synchronize``; every step starts after a barrier and its time is the slowest
rank's; on CPU the process CPU time is reported too), student tokens per step
(micro-batch x seq-length x num-microbatches x DP), tokens/s per GPU (rank), model TFLOP/s per
GPU and MFU for the student forward+backward (Megatron-LM's dense GPT count, see
:func:`train_step_flops`), the teacher forward FLOPs and an MFU counting both, the time split
(teacher forward / student forward+backward / optimizer), and peak memory (CUDA:
``max_memory_allocated``, max over ranks; CPU: the process's peak RSS). Writes
``bench_train.json`` and ``bench_train.md`` (a Markdown table) under ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, next to this file
import bench_common as bc  # noqa: E402  (puts the repository root on sys.path too)

PRESETS = ("qwen3-1.7b", "smollm2-135m", "tiny")
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 dense tensor-core peak (989.4)
PROG = "bench_train.py"


class BenchError(ValueError):
    """A user mistake (bad flag value or combination); printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------- models


def qwen3_1p7b_config(num_layers: int | None = None):
    """Qwen3-1.7B's shape (config.json of Qwen/Qwen3-1.7B), for random initialisation."""
    from transformers import Qwen3Config

    layers = num_layers or 28
    return Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
        max_window_layers=layers, bos_token_id=151643, eos_token_id=151645,
    )


def tiny_config(num_layers: int | None = None):
    """A 2-layer Qwen3 (GQA 4/2 heads, QK-norm, tied) with a 1000-token vocabulary (TP/PP in {1, 2})."""
    from transformers import Qwen3Config

    layers = num_layers or 2
    return Qwen3Config(
        vocab_size=1000, hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, max_window_layers=layers, bos_token_id=2, eos_token_id=3,
    )


def _set_num_layers(cfg, n: int):
    cfg.num_hidden_layers = n
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and types:
        cfg.layer_types = (types + [types[-1]] * n)[:n]
    if hasattr(cfg, "max_window_layers") and isinstance(cfg.max_window_layers, int):
        cfg.max_window_layers = min(cfg.max_window_layers, n)
    return cfg


def hf_config_for(model: str, num_layers: int | None = None):
    """The HF config of a preset name, the embedded model name, or an HF/GGUF/Megatron path."""
    if model == "qwen3-1.7b":
        return qwen3_1p7b_config(num_layers)
    if model == "tiny":
        return tiny_config(num_layers)
    from ophsd.models.hub import ModelNotFoundError, load_config, resolve_model

    try:
        source = resolve_model(model)
    except ModelNotFoundError as e:
        raise BenchError(f"--model: {e} (benchmark presets: {', '.join(PRESETS)})") from None
    try:
        cfg = load_config(source)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable configs
        raise BenchError(f"--model {model}: cannot read its config ({type(e).__name__}: {e})") from None
    return _set_num_layers(cfg, num_layers) if num_layers else cfg


# ------------------------------------------------------------------------------------ FLOPs


def _shape(cfg):
    hf = getattr(cfg, "hf_config", cfg)  # a ModelSpec or an HF config
    heads = hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return hf, hf.hidden_size, hf.num_hidden_layers, heads, kv, head_dim, hf.intermediate_size


def forward_flops(cfg, seq_len: int, tokens: int, vocab_size: int | None = None,
                  causal: bool = False) -> dict:
    """Matmul FLOPs of one forward pass of a dense Llama/Qwen GPT over ``tokens`` tokens.

    ``tokens`` = batch x ``seq_len`` (sequences of length ``seq_len``). ``cfg`` is an HF config or
    a :class:`~ophsd.models.megatron.ModelSpec` (then ``vocab_size`` defaults to the padded
    vocabulary, which is what the output layer computes; for an HF config to its
    ``vocab_size``). Per layer: Q/K/V/output projections with GQA (``2 t h (2 a d + 2 g d)``),
    attention scores and values (``2 x 2 t s a d``: the full s x s square, as Megatron-LM's
    classic formula and ``torch.utils.flop_counter`` count it; ``causal=True`` halves it, as
    recent Megatron-LM does), SwiGLU MLP (three matmuls, ``2 t 3 h f``); plus the logits
    (``2 t h V``). Norms, RoPE, softmax, the embedding lookup and the divergence (memory-bound,
    O(t V)) are not counted. This is Megatron-LM's ``num_floating_point_operations`` divided by
    its factor 3 for forward + two backward GEMMs.
    """
    hf, h, layers, a, g, d, f = _shape(cfg)
    if vocab_size is None:
        vocab_size = getattr(cfg, "padded_vocab_size", None) or hf.vocab_size
    q, kv = a * d, g * d
    out = {
        "attention_projections": 2.0 * tokens * layers * (h * q + 2 * h * kv + q * h),
        "attention_scores": 2.0 * 2.0 * tokens * seq_len * q * layers * (0.5 if causal else 1.0),
        "mlp": 2.0 * tokens * layers * 3 * h * f,
        "logits": 2.0 * tokens * h * vocab_size,
    }
    out["total"] = sum(out.values())
    return out


def param_count(cfg) -> int:
    """Parameters of the HF model (true vocabulary; tied embeddings counted once)."""
    hf, h, layers, a, g, d, f = _shape(cfg)
    q, kv = a * d, g * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    if getattr(hf, "model_type", "") == "qwen3":
        per_layer += 2 * d  # QK-norm
    if getattr(hf, "model_type", "") == "qwen2" or getattr(hf, "attention_bias", False):
        per_layer += q + 2 * kv
    emb = hf.vocab_size * h * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    return int(emb + layers * per_layer + h)


def train_step_flops(cfg, seq_len: int, tokens: int, teacher_seq_len: int | None = None,
                     teacher_tokens: int = 0, vocab_size: int | None = None, causal: bool = False) -> dict:
    """Model FLOPs of one OPHSD step: student forward+backward (3 passes) and teacher forward (1).

    ``tokens``/``teacher_tokens``: all tokens of the step (every micro-batch and DP rank) in
    sequences of ``seq_len``/``teacher_seq_len``. Returns ``student`` (= 3 x
    ``student_forward``), ``teacher`` and ``total``.
    """
    fwd = forward_flops(cfg, seq_len, tokens, vocab_size, causal)["total"]
    teacher = (forward_flops(cfg, teacher_seq_len or seq_len, teacher_tokens, vocab_size, causal)["total"]
               if teacher_tokens else 0.0)
    return {"student_forward": fwd, "student": 3.0 * fwd, "teacher": teacher, "total": 3.0 * fwd + teacher}


# ----------------------------------------------------------------------------------- device


def device_description() -> str:
    import torch

    gpu = bc.gpu_name()
    if gpu is not None:
        return f"{gpu} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    return f"CPU: {bc.cpu_cores()}, {torch.get_num_threads()} torch threads per rank"


# -------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(PRESETS)}) or an HF config directory / GGUF file "
                        f"(weights are random either way; default: %(default)s)")
    g.add_argument("--num-layers", type=int, default=None,
                   help="override the number of layers (fit a big model's shape on a small device)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 parameters (fp32 main weights in the optimizer)")
    g.add_argument("--init-method-std", type=float, default=None,
                   help="std of the random normal initialisation (default: Megatron's 0.02; 0.1 for the tiny preset, "
                        "whose 64-wide layers give near-identical student/teacher distributions at 0.02)")
    g = p.add_argument_group("parallelism and batch")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--num-microbatches", type=int, default=2, help="micro-batches per step (per DP rank)")
    g.add_argument("--seq-length", type=int, default=1024, help="student sequence length = prompt + response")
    g.add_argument("--response-length", type=int, default=512, help="response tokens per sequence (the loss rows)")
    g.add_argument("--teacher-extra-length", type=int, default=256,
                   help="the teacher context is longer than the student prompt by this many tokens")
    g.add_argument("--shape", default="synthetic", choices=["synthetic", *SHAPES],
                   help="synthetic: --micro-batch-size x --num-microbatches pairs of --seq-length; banking77 / gsm8k: "
                        "one step's samples shaped like that task (a shared instruction, n=2 samples per prompt, "
                        "varied response lengths; see SHAPES)")
    g.add_argument("--layouts", default="padded",
                   help="comma list compared side by side: full-logits (right-padded rows, output layer at every "
                        "position: the trainer before response-row selection), padded (right-padded rows, logits "
                        "at the response rows), packed (prefix-tree packing, the trainer's default)")
    g.add_argument("--max-tokens-per-micro-batch", type=int, default=4096, help="packed layout's micro-batch budget")
    g.add_argument("--no-teacher", action="store_true",
                   help="student forward+backward only: fixed random teacher logits instead of a teacher forward")
    g = p.add_argument_group("loss and optimizer (the trainer's defaults)")
    g.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    g.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight, 0 < beta < 1")
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--kernel-backend", default="auto",
                   help="divergence backend, or a comma list compared side by side (auto, triton, cpp, torch)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per backend")
    g.add_argument("--steps", type=int, default=5, help="timed steps per backend")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help=f"per-GPU peak for MFU (default on CUDA: {H100_BF16_DENSE_TFLOPS:g}, H100 SXM bf16 dense; "
                        "on CPU no MFU unless given)")
    g.add_argument("--causal-attention-flops", action="store_true",
                   help="count half the attention score/value square (recent Megatron-LM) instead of the full "
                        "square (classic Megatron-LM, the default)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--out", default=None, help="directory for bench_train.json and bench_train.md")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate(args) -> list[str]:
    """Flag checks that need no model; returns the concrete backend list (names, maybe 'auto')."""
    def need(ok, msg):
        if not ok:
            raise BenchError(msg)

    need(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    need(args.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    need(args.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    need(args.num_microbatches >= 1, f"--num-microbatches must be >= 1, got {args.num_microbatches}")
    need(args.num_layers is None or args.num_layers >= 1, f"--num-layers must be >= 1, got {args.num_layers}")
    need(args.response_length >= 1, f"--response-length must be >= 1, got {args.response_length}")
    need(args.seq_length > args.response_length,
         f"--seq-length ({args.seq_length}) must exceed --response-length ({args.response_length}): "
         "the student prompt needs at least one token")
    need(args.teacher_extra_length >= 0, f"--teacher-extra-length must be >= 0, got {args.teacher_extra_length}")
    need(args.peak_tflops is None or args.peak_tflops > 0, f"--peak-tflops must be > 0, got {args.peak_tflops}")
    need(args.distill_temperature > 0, f"--distill-temperature must be > 0, got {args.distill_temperature}")
    need(args.divergence != "jsd" or 0 < args.beta < 1, f"--beta must be in (0, 1) for jsd, got {args.beta}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    if args.init_method_std is None:
        args.init_method_std = 0.1 if args.model == "tiny" else 0.02
    need(args.init_method_std > 0, f"--init-method-std must be > 0, got {args.init_method_std}")
    backends = [b.strip() for b in args.kernel_backend.split(",") if b.strip()]
    valid = ("auto", "triton", "cpp", "torch")
    need(backends, "--kernel-backend is empty")
    for b in backends:
        need(b in valid, f"--kernel-backend: unknown backend '{b}' (choose from {', '.join(valid)})")
    need(len(set(backends)) == len(backends), f"--kernel-backend lists a backend twice: {args.kernel_backend}")
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    need(args.layouts and all(x in LAYOUTS for x in args.layouts) and len(set(args.layouts)) == len(args.layouts),
         f"--layouts: a comma list of distinct {', '.join(LAYOUTS)}")
    need(args.max_tokens_per_micro_batch >= 1, "--max-tokens-per-micro-batch must be >= 1")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    need(tp >= 1 and pp >= 1, f"--tensor/pipeline-model-parallel-size must be >= 1, got TP={tp} PP={pp}")
    return backends


def resolve_backends(names: list[str], device) -> list[str]:
    from ophsd_kernels import backend_status, resolve_backend

    out = []
    for name in names:
        concrete = resolve_backend(name, device)
        mod, why = backend_status(concrete, device)
        if mod is None:
            raise BenchError(f"--kernel-backend {name}: {why}")
        if concrete in out:
            raise BenchError(f"--kernel-backend: '{name}' resolves to '{concrete}', which is already listed")
        out.append(concrete)
    return out


# ------------------------------------------------------------------------------------- data


# Task-shaped batches (token counts measured with SmolLM2's tokenizer and chat template): a
# prompt = an instruction shared by every prompt of the task + a per-prompt part; the teacher
# context likewise; n samples per prompt with response lengths drawn in a range.
SHAPES = {
    # BANKING77, draft-verify: the student prompt lists the 77 intents (~650 shared tokens of ~690);
    # the verify context adds the draft and 5 + 5 labelled neighbours. Responses: ~460 tokens per
    # 16 samples were measured at the start of training.
    "banking77": dict(prompts=8, n=2, shared=650, student=40, teacher_shared=650, teacher=200, response=(24, 32)),
    # GSM8K, plan-solve: a short shared instruction, the problem, and plan + answer hint for the teacher.
    "gsm8k": dict(prompts=8, n=2, shared=30, student=70, teacher_shared=30, teacher=300, response=(96, 256)),
}
LAYOUTS = ("full-logits", "padded", "packed")


def task_samples(shape: str, vocab: int, seed: int) -> list:
    """Synthetic samples with the shared-prefix structure of ``SHAPES[shape]``."""
    import torch

    from ophsd.train.pairs import Sample

    c = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    shared, t_shared = r(c["shared"]), r(c["teacher_shared"])
    out = []
    for _ in range(c["prompts"]):
        sp, tp = shared + r(c["student"]), t_shared + r(c["teacher"])
        for _ in range(c["n"]):
            n = int(torch.randint(c["response"][0], c["response"][1] + 1, (1,), generator=g))
            out.append(Sample(sp, tp, r(n)))
    return out


def make_microbatches(args, vocab: int, dp_rank: int, device, layout: str = "padded") -> list:
    """The micro-batches of one step, laid out by the trainer's ``ophsd.train.pairs.pack``.

    ``--shape synthetic``: ``--num-microbatches`` x ``--micro-batch-size`` pairs, student
    ``[prompt | response]`` of ``--seq-length``, teacher ``[extra context | prompt | response]``.
    A task shape: the samples of one step shaped like that task (``SHAPES``). Same tokens for
    every backend and layout (seeded by ``--seed`` and the DP rank; identical over TP and PP).
    """
    import torch

    from ophsd.train.pairs import Sample, pack
    from ophsd.train.step import to_device

    if args.shape != "synthetic":
        samples = task_samples(args.shape, vocab, args.seed * 1000 + dp_rank)
    else:
        b, s, r, extra = args.micro_batch_size, args.seq_length, args.response_length, args.teacher_extra_length
        gen = torch.Generator().manual_seed(args.seed * 1000 + dp_rank)
        samples = []
        for _ in range(args.num_microbatches * b):
            prompt = torch.randint(0, vocab, (s - r,), generator=gen).tolist()
            response = torch.randint(0, vocab, (r,), generator=gen).tolist()
            context = torch.randint(0, vocab, (extra,), generator=gen).tolist()
            samples.append(Sample(prompt, context + prompt, response))
    mbs = pack(samples, args.micro_batch_size, packed=layout == "packed", max_tokens=args.max_tokens_per_micro_batch)
    return to_device(mbs, device)


# ------------------------------------------------------------------------------------- step


def timed_step(model, module, optimizer, teacher, mbs, fixed_teacher_rows, args, spec, backend,
               groups) -> tuple[float, list]:
    """One update through the trainer's own update function (``ophsd.train.update.update_step``), rollouts aside.

    Returns (loss, [teacher, student, optimizer] seconds). The token weights are the samples'
    (all ones): the trainer's optional token subsampling is off by default.
    """
    from ophsd.train.objective import Objective
    from ophsd.train.update import update_step

    objective = Objective("distill", divergence=args.divergence, beta=args.beta, temperature=args.distill_temperature,
                          vocab_size=spec.vocab_size, backend=backend)
    fixed = None if teacher is not None else (fixed_teacher_rows or [None] * len(mbs))  # --no-teacher
    r = update_step(model, module, optimizer, mbs, objective, teacher, groups=groups, teacher_rows=fixed,
                    full_logits=getattr(args, "_layout", "padded") == "full-logits", sync=bc.sync)
    if r.skipped:
        raise BenchError(f"non-finite loss or gradient with backend {backend} (loss {r.loss}); "
                         "the benchmark needs finite steps")
    return r.loss, [r.times["teacher"], r.times["student"], r.times["optimizer"]]


def _rank0() -> bool:
    from ophsd.runtime.distributed import is_rank0  # torch is imported once a run starts, not for --help

    return is_rank0()


def _log(msg: str) -> None:
    from ophsd.runtime.distributed import log_rank0

    log_rank0(msg, prefix="bench_train")


def _max_over_ranks(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def run_backend(a, spec, device, dtype, backend: str, init_state, teacher, mbs, fixed_rows, groups) -> dict:
    """``a.warmup_steps`` + ``a.steps`` steps of a fresh student (``init_state``) and optimizer."""
    import torch

    from ophsd.models.megatron import build_model
    from ophsd.train.update import OptimizerSettings, build_optimizer, wrap_ddp

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    student = build_model(spec, params_dtype=dtype, perform_initialization=False)
    student.load_state_dict(init_state)
    model = wrap_ddp(student, a.use_distributed_optimizer)
    optimizer = build_optimizer(model, OptimizerSettings(optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
                                                         clip_grad=a.clip_grad, bf16=a.bf16,
                                                         use_distributed_optimizer=a.use_distributed_optimizer))
    total = a.warmup_steps + a.steps
    bar = None
    if _rank0() and not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{backend:>6}", unit="step", file=sys.stderr, dynamic_ncols=True)
    losses, walls, cpus, phases = [], [], [], []
    import torch.distributed as dist

    for i in range(total):
        dist.barrier()
        bc.sync()
        with bc.Stopwatch() as sw:
            loss, ph = timed_step(model, student, optimizer, teacher, mbs, fixed_rows, a, spec, backend, groups)
            bc.sync()
        wall, cpu = sw.wall, sw.cpu
        losses.append(loss)
        if i >= a.warmup_steps:
            walls.append(wall)
            cpus.append(cpu)
            phases.append(ph)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.5g}", step_s=f"{wall:.3f}", phase="warmup" if i < a.warmup_steps else "timed")
            bar.update(1)
    if bar is not None:
        bar.close()
    walls = _max_over_ranks(walls, device if on_gpu else "cpu")
    flat = _max_over_ranks([x for ph in phases for x in ph], device if on_gpu else "cpu")
    phases = [flat[3 * i: 3 * i + 3] for i in range(len(walls))]
    if on_gpu:
        peak = _max_over_ranks([float(torch.cuda.max_memory_allocated())], device)[0]
        mem = {"peak_memory_gib": peak / 2**30, "peak_memory_kind": "torch.cuda.max_memory_allocated, max over ranks"}
    else:
        rss = _max_over_ranks([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024], "cpu")[0]
        mem = {"peak_memory_gib": rss / 2**30, "peak_memory_kind": "peak RSS of the process (whole run so far), max over ranks"}
    del optimizer, model, student
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {"backend": backend, "losses": losses, "first_loss": losses[0], "step_s": walls,
            "cpu_s": cpus if not on_gpu else None, "phases_s": phases, **mem}


def summarise(res: dict, ctx: dict) -> dict:
    w = res["step_s"]
    med = statistics.median(w)
    world, peak = ctx["world_size"], ctx["peak_tflops"]
    fl = ctx["flops"]
    r = dict(res)
    r.update(
        step_s_median=med, step_s_mean=statistics.fmean(w), step_s_min=min(w), step_s_max=max(w),
        cpu_s_median=statistics.median(res["cpu_s"]) if res.get("cpu_s") else None,
        teacher_s_median=statistics.median(p[0] for p in res["phases_s"]),
        student_fwd_bwd_s_median=statistics.median(p[1] for p in res["phases_s"]),
        optimizer_s_median=statistics.median(p[2] for p in res["phases_s"]),
        tokens_per_step=ctx["tokens_per_step"],
        tokens_per_s_per_gpu=ctx["tokens_per_step"] / med / world,
        student_tflops_per_gpu=fl["student"] / med / world / 1e12,
        teacher_tflops_per_step=fl["teacher"] / 1e12,
        total_tflops_per_gpu=fl["total"] / med / world / 1e12,
    )
    r["flops"] = fl
    r["mfu"] = r["student_tflops_per_gpu"] / peak if peak else None
    r["mfu_incl_teacher"] = r["total_tflops_per_gpu"] / peak if peak else None
    return r


# -------------------------------------------------------------------------------------- run


def run(args, backends_arg: list[str]) -> int:
    import torch

    from ophsd.models.megatron import model_spec_from_hf

    hf = hf_config_for(args.model, args.num_layers)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    spec = model_spec_from_hf(hf, tp, pp)  # validates the architecture and TP/PP against heads/layers
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % (tp * pp):
        raise BenchError(f"--tensor-model-parallel-size x --pipeline-model-parallel-size = {tp * pp} does not divide "
                         f"the {world} launched ranks (torchrun --nproc-per-node N tools/bench_train.py ...)")
    teacher_len = args.seq_length + args.teacher_extra_length
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos and max(teacher_len, args.seq_length) > max_pos:
        raise BenchError(f"the teacher sequence (--seq-length + --teacher-extra-length = {teacher_len}) exceeds "
                         f"the model's max_position_embeddings ({max_pos})")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    backends = resolve_backends(backends_arg, device)

    from ophsd.runtime import distributed

    distributed.initialize(tp, pp, args.seed)
    try:
        return _run_initialized(args, hf, spec, device, backends)
    finally:
        distributed.destroy()


def _run_initialized(args, hf, spec, device, backends) -> int:
    import torch
    import torch.distributed as dist
    from ophsd.models.megatron import build_model, te_available
    from ophsd.runtime.groups import ParallelGroups

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    teacher_len = args.seq_length + args.teacher_extra_length
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size()
    groups = ParallelGroups.from_parallel_state()
    dp, dp_rank = groups.dp_size, groups.dp_rank
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = args.peak_tflops if args.peak_tflops else (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    dev_name = device_description()
    _log(f"device: {dev_name}; world {world} (TP={tp} PP={pp} DP={dp}); torch {torch.__version__}; "
         f"load average {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    init = build_model(spec, params_dtype=dtype, perform_initialization=True,  # random weights
                       init_method_std=args.init_method_std)
    if args.no_teacher:
        init_state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in init.state_dict().items()}
        del init
        teacher = None
    else:
        teacher = init.requires_grad_(False).eval()  # the frozen copy of the student's initial weights
        init_state = teacher.state_dict()
    _log(f"model {args.model}: {spec.arch}, {hf.num_hidden_layers} layers, hidden {hf.hidden_size}, "
         f"vocab {spec.vocab_size} (padded {spec.padded_vocab_size}), {param_count(hf) / 1e6:.1f}M parameters, "
         f"{str(dtype).replace('torch.', '')}, layer spec {'transformer-engine' if te_available() else 'local (SDPA)'}; "
         f"built in {time.perf_counter() - t0:.1f}s")
    from ophsd.train.pairs import layout_stats

    results = []
    for layout in args.layouts:
        mbs = make_microbatches(args, spec.vocab_size, dp_rank, device, layout)
        stats = layout_stats(mbs)
        fixed_rows = None
        if args.no_teacher and groups.is_pipeline_last_stage:
            g = torch.Generator(device=device).manual_seed(args.seed + 7)
            v_local = spec.padded_vocab_size // tp
            fixed_rows = [torch.randn(mb.targets.numel(), v_local, generator=g, device=device).to(dtype) for mb in mbs]
        if args.shape == "synthetic":
            s_len, t_len = args.seq_length, teacher_len
            tokens_per_step = args.micro_batch_size * args.seq_length * args.num_microbatches * dp
            teacher_tokens = 0 if args.no_teacher else args.micro_batch_size * teacher_len * args.num_microbatches * dp
        else:  # what the layout computes: every position of every row
            s_len, t_len = mbs[0].student.tokens.shape[1], mbs[0].teacher.tokens.shape[1]
            tokens_per_step = stats["layout/student_positions"] * dp
            teacher_tokens = 0 if args.no_teacher else stats["layout/teacher_positions"] * dp
        flops = train_step_flops(spec, s_len, tokens_per_step, t_len, teacher_tokens,
                                 causal=args.causal_attention_flops)
        ctx = {"world_size": world, "peak_tflops": peak, "flops": flops, "tokens_per_step": tokens_per_step}
        _log(f"layout {layout}: {len(mbs)} micro-batches of student {list(mbs[0].student.tokens.shape)} / teacher "
             f"{list(mbs[0].teacher.tokens.shape)}; {stats['layout/student_positions_per_token']:.2f} student and "
             f"{stats['layout/teacher_positions_per_token']:.2f} teacher positions per loss-carrying token")
        args._layout = layout
        for backend in backends:
            _log(f"backend {backend}: {args.warmup_steps} warm-up + {args.steps} timed steps")
            res = summarise(run_backend(args, spec, device, dtype, backend, init_state, teacher, mbs, fixed_rows,
                                        groups), ctx)
            res.update(layout=layout, num_microbatches=len(mbs), teacher_tokens_per_step=teacher_tokens,
                       student_positions_per_token=stats["layout/student_positions_per_token"],
                       teacher_positions_per_token=stats["layout/teacher_positions_per_token"])
            results.append(res)
            _log(_line(res, peak))
    first_layout = {r["backend"]: r for r in results if r["layout"] == args.layouts[0]}
    for r in results:
        r["speedup_vs_first_layout"] = first_layout[r["backend"]]["step_s_median"] / r["step_s_median"]
    flops = results[0]["flops"] if results else None
    tokens_per_step, teacher_tokens = results[0]["tokens_per_step"], results[0]["teacher_tokens_per_step"]

    launcher = (f"torchrun --nproc-per-node {world}" if "TORCHELASTIC_RUN_ID" in os.environ else "python")
    first = [r["first_loss"] for r in results]
    ref = first[0]
    loss_rel = max(abs(x - ref) / max(abs(ref), 1e-30) for x in first)
    for r in results:
        base = next((x for x in results if x["backend"] == "torch" and x["layout"] == r["layout"]), None)
        r["speedup_vs_torch"] = base["step_s_median"] / r["step_s_median"] if base else None
    meta = {
        "device": dev_name,
        "command": " ".join([launcher, "tools/bench_train.py"] + [shlex.quote(x) for x in sys.argv[1:]]),
        "model": args.model, "arch": spec.arch, "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size, "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads, "vocab_size": spec.vocab_size,
        "padded_vocab_size": spec.padded_vocab_size, "parameters": param_count(hf),
        "dtype": str(dtype).replace("torch.", ""), "tp": tp, "pp": pp, "dp": dp, "world_size": world,
        "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches,
        "seq_length": args.seq_length, "response_length": args.response_length,
        "teacher_seq_length": teacher_len, "teacher": not args.no_teacher,
        "divergence": args.divergence, "use_distributed_optimizer": args.use_distributed_optimizer,
        "optimizer": args.optimizer, "warmup_steps": args.warmup_steps, "steps": args.steps,
        "layer_spec": "transformer-engine" if te_available() else "local (SDPA)",
        "peak_tflops": peak, "attention_flops": "causal half" if args.causal_attention_flops else "full square",
        "shape": args.shape, "layouts": args.layouts, "max_tokens_per_micro_batch": args.max_tokens_per_micro_batch,
        "flops_per_step": flops, "tokens_per_step": tokens_per_step, "teacher_tokens_per_step": teacher_tokens,
        "first_loss_max_rel_diff": loss_rel,
        "versions": bc.versions(), "loadavg_1_5_15": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if _rank0():
        print(markdown(meta, results), flush=True)
        if len(results) > 1:
            losses = ", ".join(f"{r['backend']}={r['first_loss']:.9g}" for r in results)
            print(f"first-step losses {losses}: max relative difference {loss_rel:.2e}", flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            bc.write_json(out / "bench_train.json", {"meta": meta, "results": results})
            (out / "bench_train.md").write_text(markdown(meta, results) + "\n")
            bc.wrote(out / "bench_train.json", out / "bench_train.md")
    return 0


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _line(r: dict, peak) -> str:
    cpu = f" (process CPU {r['cpu_s_median']:.3f} s)" if r.get("cpu_s_median") is not None else ""
    mfu = f", MFU {100 * r['mfu']:.1f}% ({100 * r['mfu_incl_teacher']:.1f}% incl. teacher)" if peak else ""
    return (f"{r.get('layout', '')}/{r['backend']}: step {r['step_s_median']:.4f} s median ({r['step_s_mean']:.4f} mean){cpu}; "
            f"teacher {r['teacher_s_median']:.4f} / student fwd+bwd {r['student_fwd_bwd_s_median']:.4f} / "
            f"optimizer {r['optimizer_s_median']:.4f} s; {r['tokens_per_s_per_gpu']:.1f} tokens/s/GPU; "
            f"{r['student_tflops_per_gpu']:.3g} TFLOP/s/GPU student ({r['total_tflops_per_gpu']:.3g} incl. teacher)"
            f"{mfu}; peak mem {r['peak_memory_gib']:.2f} GiB; first loss {r['first_loss']:.7g}")


def markdown(meta: dict, results: list[dict]) -> str:
    head = (f"Device: {meta['device']}. Model {meta['model']} ({meta['arch']}, {meta['num_layers']} layers, "
            f"{meta['parameters'] / 1e6:.1f}M params, random init), {meta['dtype']}, TP={meta['tp']} PP={meta['pp']} "
            f"DP={meta['dp']}, "
            + (f"micro-batch {meta['micro_batch_size']} x {meta['num_microbatches']} micro-batches, "
               f"student seq {meta['seq_length']} (response {meta['response_length']}), teacher seq "
               f"{meta['teacher_seq_length'] if meta['teacher'] else '- (no teacher)'}, "
               if meta["shape"] == "synthetic" else
               f"one step of {meta['shape']}-shaped samples ({SHAPES[meta['shape']]}; padded micro-batches of "
               f"{meta['micro_batch_size']}, packed ones of <= {meta['max_tokens_per_micro_batch']} tokens; FLOPs of "
               "the positions each layout computes), ")
            + f"{meta['divergence']}, "
            f"{meta['warmup_steps']} warm-up + {meta['steps']} timed steps; FLOPs: Megatron-LM dense GPT, attention "
            f"{meta['attention_flops']}; " + (f"MFU against a peak of {meta['peak_tflops']:g} TFLOP/s per GPU"
                                               if meta["peak_tflops"] else "no MFU (no --peak-tflops)")
            + f". Command: `{meta['command']}`")
    cols = ["layout", "backend", "positions per loss token (student/teacher)", "micro-batches", "speed-up vs "
            + meta["layouts"][0], "step s (median)", "step s (mean)", "process CPU s", "teacher s", "student fwd+bwd s",
            "optimizer s", "tokens/step", "tokens/s/GPU", "student TFLOP/s/GPU", "MFU",
            "TFLOP/s/GPU incl. teacher", "MFU incl. teacher", "peak mem GiB", "speed-up vs torch", "first loss"]
    pct = (lambda x: "-" if x is None else f"{100 * x:.1f}%")
    rows = []
    for r in results:
        rows.append([r["layout"], r["backend"],
                f"{r['student_positions_per_token']:.2f} / {r['teacher_positions_per_token']:.2f}",
                str(r["num_microbatches"]), f"{r['speedup_vs_first_layout']:.2f}", f"{r['step_s_median']:.4f}", f"{r['step_s_mean']:.4f}", _fmt(r.get("cpu_s_median"), ".4f"),
                f"{r['teacher_s_median']:.4f}", f"{r['student_fwd_bwd_s_median']:.4f}", f"{r['optimizer_s_median']:.4f}",
                str(r["tokens_per_step"]), f"{r['tokens_per_s_per_gpu']:.1f}", f"{r['student_tflops_per_gpu']:.3g}",
                pct(r["mfu"]), f"{r['total_tflops_per_gpu']:.3g}", pct(r["mfu_incl_teacher"]),
                f"{r['peak_memory_gib']:.2f}", _fmt(r.get("speedup_vs_torch"), ".2f"), f"{r['first_loss']:.7g}"])
    return "\n".join([head, ""] + bc.md_table(cols, rows))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bc.offline()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")  # Apex/TE fallbacks
    try:
        backends = validate(args)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    import torch

    from ophsd.models.megatron import UnsupportedModelError

    try:
        return run(args, backends)
    except (BenchError, UnsupportedModelError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"{PROG}: error: out of memory ({str(e).splitlines()[0][:160]}); lower --micro-batch-size, "
              "--seq-length or --num-layers, or raise --tensor/pipeline-model-parallel-size", file=sys.stderr)
        return 1
    except ValueError as e:  # TP/PP divisibility and the divergence kernel's argument checks
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
