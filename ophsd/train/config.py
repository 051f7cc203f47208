"""Trainer flags: Megatron-LM's names for what Megatron users know, plus OPHSD's own.

``--config file.yaml`` supplies defaults with the same names (dashes or underscores); the
command line wins. YAML values go through the same argparse ``type=``/``choices=`` conversion
as command-line strings, so a config cannot hold what the flag would refuse. :func:`validate`
fails fast, before any model is loaded, naming the flag (and the file).
"""
from __future__ import annotations

import argparse
from pathlib import Path


class ConfigError(ValueError):
    """An invalid flag or flag combination; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ophsd train",
        description="On-Policy Harness Self-Distillation on megatron-core. Launch with "
                    "`torchrun --nproc-per-node N -m ophsd.train ...` (N = TP x PP x DP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", help="YAML file of defaults (same names as the flags)")
    g = ap.add_argument_group("model and parallelism (Megatron-LM names)")
    g.add_argument("--load", help="Megatron model directory (tools/convert_hf.py import) or a trainer "
                                  "checkpoint directory to resume from")
    g.add_argument("--model", default="smollm2-135m",
                   help="used when --load is not given: HF dir, .gguf or embedded name, converted in memory")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=4,
                   help="sequences per micro-batch with --no-pack-sequences (packed micro-batches are sized "
                        "by --max-tokens-per-micro-batch)")
    g.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=True,
                   help="pack each micro-batch into one row as a prefix tree: a prefix shared by sequences (the "
                        "samples of one prompt, a task-wide instruction) is computed once, with tree-causal "
                        "attention and per-branch positions; exact (same losses and gradients as unpacked)")
    g.add_argument("--max-tokens-per-micro-batch", type=int, default=4096,
                   help="packed tokens per micro-batch and pass (student, teacher) with --pack-sequences")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (default: rollout-batch-size x n-samples-per-prompt)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 parameters (fp32 main weights in the optimizer)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard Adam state and fp32 master weights over data-parallel ranks (megatron-core "
                        "DistributedOptimizer); checkpoints still reload at any TP/PP/DP")
    g.add_argument("--seed", type=int, default=1234)
    g = ap.add_argument_group("optimisation (Megatron-LM names)")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g = ap.add_argument_group("checkpoints and logging")
    g.add_argument("--save", help="run directory: checkpoints, metrics.jsonl, TensorBoard, report")
    g.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases too (needs wandb)")
    g = ap.add_argument_group("task and harness")
    g.add_argument("--task", default="arith", help="arith | gsm8k | math | deepmath | banking77 | lawbench | uspto")
    g.add_argument("--data", help="training data file (not needed for arith)")
    g.add_argument("--harness", default="plan_solve",
                   help="teacher-context provider: plan_solve | draft_verify | opsd (OPSD baseline) | a registered name")
    g.add_argument("--objective", default="distill", choices=["distill", "offpolicy"],
                   help="distill: on-policy divergence to the teacher; offpolicy: cross-entropy on the "
                        "harness's final responses (the off-policy baseline)")
    from ophsd.harness import options as harness_options  # every registered harness's options

    harness_options.add_harness_arguments(g, "train")  # --plan-tokens, --bank-k, --bank-data, ...
    g = ap.add_argument_group("distillation")
    g.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    g.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight, 0 < beta < 1")
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--teacher", default="initial", choices=["initial", "current"],
                   help="initial: frozen copy of the starting weights; current: the live weights, detached")
    g.add_argument("--token-sampling-ratio", type=float, default=1.0,
                   help="keep this fraction of response tokens per step (entropy-weighted if --entropy-weighting)")
    g.add_argument("--entropy-weighting", action="store_true",
                   help="sample kept tokens with probability proportional to the teacher's entropy")
    g.add_argument("--reward-weighting", action="store_true",
                   help="weight each sample by 0.1 + 0.9 x reward of the harness answer")
    g.add_argument("--kernel-backend", default="auto", choices=["auto", "triton", "cpp", "torch"])
    g = ap.add_argument_group("rollouts")
    g.add_argument("--rollout-engine", default="embedded", choices=["embedded", "sglang"])
    g.add_argument("--sglang-url", action="append", help="SGLang server URL(s) (with --rollout-engine sglang)")
    g.add_argument("--weight-sync", default="disk", choices=["disk", "tensor"],
                   help="how new weights reach SGLang servers after each step: disk = safetensors shards + "
                        "/update_weights_from_disk (servers must see --weight-sync-dir); tensor = "
                        "/update_weights_from_tensor per bucket (SGLang colocated on the trainer's GPUs)")
    g.add_argument("--weight-sync-dir", help="directory for --weight-sync disk shards, visible to the servers at "
                                             "the same path (default: the system temp dir)")
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step")
    g.add_argument("--n-samples-per-prompt", type=int, default=1)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--prefix-cache-tokens", type=int, default=32768,
                   help="embedded engine: prompt tokens whose KV its radix prefix cache keeps (the shared "
                        "instruction and each prompt are prefilled once per weight version: rollouts, then the "
                        "harness's calls hit); 0 turns it off")
    g.add_argument("--max-prompt-length", type=int, default=None,
                   help="tokens (student prompt or teacher context); longer pairs are skipped and counted, and a "
                        "step where every pair is skipped stops the run. Default: derived from the task, the "
                        "longest prompt it and its harnesses build on the training data, +25%%")
    g.add_argument("--max-response-length", type=int, default=128)
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=0, help="steps between evals (0: before and after only)")
    g.add_argument("--eval-data", help="evaluation file (default: a dev split carved from --data, or arith dev)")
    g.add_argument("--eval-limit", type=int, default=100,
                   help="evaluation examples: a seeded sample (stratified by label for classification) of "
                        "--eval-data, or the dev split carved from --data (held out of training). Each eval runs "
                        "them standalone and in the harness: on 2 CPU cores ~10 min for SmolLM2 on BANKING77; "
                        "lower it for smoke runs (one of 100 examples moves accuracy 1 point)")
    g.add_argument("--skip-eval", action="store_true")
    g.add_argument("--skip-eval-before", action="store_true",
                   help="no evaluation of the untrained model at step 0 (when another run already measured it)")
    g.add_argument("--log-rollouts", type=int, default=4,
                   help="rollouts per step written to DIR/rollouts.jsonl with --save (prompt, response, rewards, "
                        "teacher context, lengths; 0: off). Evals always write their per-example predictions to "
                        "DIR/eval_predictions/step_NNNNNNN.jsonl")
    return ap


def _yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The YAML file's settings, each converted and checked by its flag's own argparse action."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a YAML file (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config {path}: YAML syntax error{line}: {what}") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: YAML nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out = {}
    for k, v in data.items():
        dest = str(k).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"--config {path}: unknown setting '{k}'")
        try:
            out[dest] = _yaml_value(parser, action, v)
        except (argparse.ArgumentError, ConfigError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return out


def _yaml_value(parser: argparse.ArgumentParser, action: argparse.Action, v):
    """One YAML value as the command line would give it: flags take true/false, list flags
    (``action="append"``) a value or a list, others one scalar, converted by argparse's own
    ``_get_values`` (``type=`` then ``choices=``)."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true / store_false / --x/--no-x
        if not isinstance(v, bool):
            raise ConfigError(f"{flag} is a switch: give true or false, got {v!r}")
        return v
    if v is None:
        if action.default is None:
            return None
        raise ConfigError(f"{flag} needs a value (null given; drop the line for the default {action.default!r})")
    many = isinstance(action, argparse._AppendAction)
    values = v if many and isinstance(v, list) else [v]
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            raise ConfigError(f"{flag} takes one {'number' if action.type in (int, float) else 'value'}, "
                              f"got {type(x).__name__} {x!r}")
        out.append(parser._get_values(action, [str(x)]))
    return out if many else out[0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(pre.config, parser))
    args = parser.parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Cheap checks before any model is loaded; each message names the flag."""
    from ophsd.tasks import list_tasks

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                 "max_tokens_per_micro_batch",
                 "train_iters", "rollout_batch_size", "n_samples_per_prompt", "max_prompt_length",
                 "max_response_length"):
        if flag == "max_prompt_length" and args.max_prompt_length is None:
            continue  # derived from the task by the trainer
        need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    need(args.eval_limit >= 1, f"--eval-limit must be >= 1, got {args.eval_limit}")
    need(args.prefix_cache_tokens >= 0, f"--prefix-cache-tokens must be >= 0, got {args.prefix_cache_tokens}")
    need(args.log_rollouts >= 0, f"--log-rollouts must be >= 0, got {args.log_rollouts}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(0 <= args.min_lr <= args.lr, f"--min-lr must be in [0, --lr], got {args.min_lr}")
    need(args.lr_warmup_iters < args.train_iters or args.lr_warmup_iters == 0,
         f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than --train-iters ({args.train_iters})")
    need(args.clip_grad >= 0, f"--clip-grad must be >= 0, got {args.clip_grad}")
    need(args.distill_temperature > 0, f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if args.divergence == "jsd":
        need(0 < args.beta < 1, f"--beta must be in (0, 1) for --divergence jsd, got {args.beta} "
                                "(beta -> 0/1 degenerates: use reverse_kl / forward_kl)")
    need(0 < args.token_sampling_ratio <= 1, f"--token-sampling-ratio must be in (0, 1], got {args.token_sampling_ratio}")
    need(not args.entropy_weighting or args.token_sampling_ratio < 1,
         "--entropy-weighting needs --token-sampling-ratio < 1 (it chooses which tokens to keep)")
    need(args.task in list_tasks(), f"--task {args.task!r} is unknown; known: {', '.join(list_tasks())}")
    if args.task != "arith":
        need(bool(args.data), f"--task {args.task} needs --data FILE (only arith is generated)")
    if args.data:
        need(Path(args.data).is_file(), f"--data {args.data}: no such file")
    from ophsd.harness import options as harness_options

    for error in (harness_options.check_minimums(args, "train"),
                  harness_options.check_exclusive(args.harness, args, "train")):
        need(error is None, error)
    for fl in harness_options.file_flags(args.harness, "train"):
        value = getattr(args, fl.dest)
        if value:
            need(Path(value).is_file(), f"{fl.flag} {value}: no such file")
    if args.eval_data:
        need(Path(args.eval_data).is_file(), f"--eval-data {args.eval_data}: no such file")
    if args.rollout_engine != "sglang":
        need(args.weight_sync == "disk" and not args.weight_sync_dir,
             "--weight-sync/--weight-sync-dir apply to --rollout-engine sglang only (the embedded engine is updated in memory)")
    if args.weight_sync_dir:
        need(Path(args.weight_sync_dir).is_dir(), f"--weight-sync-dir {args.weight_sync_dir}: no such directory")
    if args.rollout_engine == "sglang":
        need(bool(args.sglang_url), "--rollout-engine sglang needs --sglang-url URL (start servers with "
                                    "`python -m sglang.launch_server`, or use --rollout-engine embedded)")
    seqs = args.rollout_batch_size * args.n_samples_per_prompt
    if args.global_batch_size is None:
        args.global_batch_size = seqs
    need(args.global_batch_size == seqs,
         f"--global-batch-size ({args.global_batch_size}) must equal --rollout-batch-size x "
         f"--n-samples-per-prompt ({seqs}): every on-policy sample is used once")
    need(args.pack_sequences or args.global_batch_size % args.micro_batch_size == 0,
         f"--global-batch-size ({args.global_batch_size}) must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    if args.load:
        need(Path(args.load).is_dir(), f"--load {args.load}: no such directory")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save DIR")
    if args.save:
        from ophsd.cli import writable_error

        error = writable_error(args.save, "--save", directory=True)
        need(error is None, error)
