"""Trainer flags and the typed config built from them.

Each argument group of ``ophsd train --help`` is a dataclass below (Megatron-LM's names for what
Megatron users know, plus OPHSD's own); a field's ``metadata`` holds its help line and argparse
settings, so the flag and the field are declared once. :func:`parse_args` is the command line
(with ``--config file.yaml`` defaults: same names, dashes or underscores; the command line wins;
YAML values go through the same argparse ``type=``/``choices=`` conversion as command-line
strings, so a config cannot hold what the flag would refuse). :meth:`TrainConfig.from_args`
turns the parsed flags into the config the trainer takes; each group's ``__post_init__`` (and
:class:`TrainConfig`'s, for checks across groups) fails fast, before any model is loaded, naming
the flag (and the file).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class ConfigError(ValueError):
    """An invalid flag or flag combination; the message names the flag."""


def _need(cond, msg) -> None:
    if not cond:
        raise ConfigError(msg)


def _at_least_one(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        _need(v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")


def flag(default: Any = None, help: str | None = None, **argparse_kwargs):
    """A config field and its flag ``--<field-name>``: ``help`` is both the field's documentation and
    its ``--help`` line; ``argparse_kwargs`` (``type``, ``choices``, ``action``) go to ``add_argument``."""
    return field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


@dataclass
class ModelConfig:
    """Which model, its split over ranks (TP x PP; DP is the rest), how a step's sequences are batched
    (:func:`~ophsd.train.build.build_models`, the update's packing) and the run seed."""

    TITLE: ClassVar[str] = "model and parallelism (Megatron-LM names)"

    load: str | None = flag(help="Megatron model directory (tools/convert_hf.py import) or a trainer checkpoint "
                                 "directory to resume from")
    model: str = flag("smollm2-135m", "used when --load is not given: HF dir, .gguf or embedded name, converted "
                                      "in memory")
    tensor_model_parallel_size: int = flag(1, "tensor-parallel ranks per model replica (TP)", type=int)
    pipeline_model_parallel_size: int = flag(1, "pipeline stages per model replica (PP)", type=int)
    micro_batch_size: int = flag(4, "sequences per micro-batch with --no-pack-sequences (packed micro-batches are "
                                    "sized by --max-tokens-per-micro-batch)", type=int)
    pack_sequences: bool = flag(True, "pack each micro-batch into one row as a prefix tree: a prefix shared by "
                                      "sequences (the samples of one prompt, a task-wide instruction) is computed "
                                      "once, with tree-causal attention and per-branch positions; exact (same losses "
                                      "and gradients as unpacked)", action=argparse.BooleanOptionalAction)
    max_tokens_per_micro_batch: int = flag(4096, "packed tokens per micro-batch and pass (student, teacher) with "
                                                 "--pack-sequences", type=int)
    global_batch_size: int | None = flag(None, "sequences per optimizer step (default: rollout-batch-size x "
                                               "n-samples-per-prompt)", type=int)
    bf16: bool = flag(False, "bfloat16 parameters (fp32 main weights in the optimizer)", action="store_true")
    use_distributed_optimizer: bool = flag(False, "shard Adam state and fp32 master weights over data-parallel "
                                                  "ranks (megatron-core DistributedOptimizer); checkpoints still "
                                                  "reload at any TP/PP/DP", action="store_true")
    seed: int = flag(1234, "run seed: data order, rollouts, harness, token sampling, model-parallel RNG", type=int)

    def __post_init__(self):
        _at_least_one(self, "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                      "max_tokens_per_micro_batch")
        if self.load:
            _need(Path(self.load).is_dir(), f"--load {self.load}: no such directory")


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule (:func:`~ophsd.train.update.build_scheduler`;
    :class:`~ophsd.train.update.OptimizerSettings` adds ModelConfig's bf16 and distributed-optimizer switches)."""

    TITLE: ClassVar[str] = "optimisation (Megatron-LM names)"

    train_iters: int = flag(20, "optimizer steps of the run", type=int)
    optimizer: str = flag("adam", "megatron-core optimizer", choices=["adam", "sgd"])
    lr: float = flag(1e-5, "peak learning rate", type=float)
    min_lr: float = flag(0.0, "learning rate the decay ends at", type=float)
    lr_warmup_iters: int = flag(0, "steps of linear warm-up from 0 (0: none)", type=int)
    lr_decay_style: str = flag("constant", "learning-rate decay after the warm-up, over the remaining steps "
                               "(WSD: constant, then a decay over the last --lr-wsd-decay-iters steps)",
                               choices=["constant", "linear", "cosine", "WSD"])
    lr_wsd_decay_iters: int | None = flag(None, "with --lr-decay-style WSD: the last steps, over which the "
                                          "learning rate decays to --min-lr", type=int)
    lr_wsd_decay_style: str = flag("linear", "with --lr-decay-style WSD: the shape of that decay",
                                   choices=["linear", "cosine", "exponential", "minus_sqrt"])
    override_opt_param_scheduler: bool = flag(False, "on resume, follow this command's learning-rate flags "
                                              "from the saved step on instead of refusing a schedule that "
                                              "differs from the checkpoint's (e.g. to decay a constant-lr "
                                              "run from where it stands)", action="store_true")
    weight_decay: float = flag(0.0, "weight decay, constant over the run", type=float)
    clip_grad: float = flag(1.0, "gradient-norm clipping threshold (0: no clipping)", type=float)
    adam_beta1: float = flag(0.9, "Adam's first-moment decay", type=float)
    adam_beta2: float = flag(0.999, "Adam's second-moment decay", type=float)

    def __post_init__(self):
        _at_least_one(self, "train_iters")
        _need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, --lr], got {self.min_lr}")
        _need(self.lr_warmup_iters < self.train_iters or self.lr_warmup_iters == 0,
              f"--lr-warmup-iters ({self.lr_warmup_iters}) must be smaller than --train-iters ({self.train_iters})")
        if self.lr_decay_style == "WSD":
            _need(self.lr_wsd_decay_iters is not None,
                  "--lr-decay-style WSD needs --lr-wsd-decay-iters (the steps the final decay takes)")
            _need(1 <= self.lr_wsd_decay_iters <= self.train_iters - self.lr_warmup_iters,
                  f"--lr-wsd-decay-iters must be in [1, --train-iters - --lr-warmup-iters = "
                  f"{self.train_iters - self.lr_warmup_iters}], got {self.lr_wsd_decay_iters}")
        else:
            _need(self.lr_wsd_decay_iters is None,
                  f"--lr-wsd-decay-iters applies only with --lr-decay-style WSD (got {self.lr_decay_style})")
        _need(self.clip_grad >= 0, f"--clip-grad must be >= 0, got {self.clip_grad}")


@dataclass
class LoggingConfig:
    """The run directory and what goes into it (checkpoints, :class:`~ophsd.train.metrics.MetricSinks`)."""

    TITLE: ClassVar[str] = "checkpoints and logging"

    save: str | None = flag(help="run directory: checkpoints, metrics.jsonl, TensorBoard, report")
    save_interval: int = flag(0, "steps between checkpoints (0: only at the end)", type=int)
    log_interval: int = flag(1, "steps between console metric lines", type=int)
    tensorboard: bool = flag(True, "TensorBoard events under the --save directory",
                             action=argparse.BooleanOptionalAction)
    wandb_project: str | None = flag(None, "log to Weights & Biases too (needs wandb)")

    def __post_init__(self):
        if self.save_interval and not self.save:
            raise ConfigError("--save-interval needs --save DIR")
        if self.save:
            from ophsd.cli import writable_error

            error = writable_error(self.save, "--save", directory=True)
            _need(error is None, error)


@dataclass
class TaskConfig:
    """What is learned: the task and its data, the harness that builds the teacher's context (with every
    registered harness's option flags), and the objective."""

    TITLE: ClassVar[str] = "task and harness"

    task: str = flag("arith", "arith | gsm8k | math | deepmath | banking77 | lawbench | uspto")
    data: str | None = flag(help="training data file (not needed for arith)")
    harness: str = flag("plan_solve", "teacher-context provider: plan_solve | draft_verify | opsd (OPSD baseline) | "
                                      "a registered name")
    objective: str = flag("distill", "distill: on-policy divergence to the teacher; offpolicy: cross-entropy on the "
                                     "harness's final responses (the off-policy baseline)",
                          choices=["distill", "offpolicy"])
    harness_flags: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "every registered harness's option flags (--plan-tokens, --bank-k, --bank-data, ...) by dest, "
                "declared with the harnesses (ophsd.harness.options)",
        "harness_flags": True})

    def __post_init__(self):
        from ophsd.harness import options as harness_options
        from ophsd.tasks import list_tasks

        _need(self.task in list_tasks(), f"--task {self.task!r} is unknown; known: {', '.join(list_tasks())}")
        if self.task != "arith":
            _need(bool(self.data), f"--task {self.task} needs --data FILE (only arith is generated)")
        if self.data:
            _need(Path(self.data).is_file(), f"--data {self.data}: no such file")
        flags = self._flag_namespace()
        for error in (harness_options.check_minimums(flags, "train"),
                      harness_options.check_exclusive(self.harness, flags, "train")):
            _need(error is None, error)
        for fl in harness_options.file_flags(self.harness, "train"):
            value = self.harness_flags.get(fl.dest)
            if value:
                _need(Path(value).is_file(), f"{fl.flag} {value}: no such file")

    def _flag_namespace(self) -> argparse.Namespace:
        """The harness flags as the shared harness-option helpers read them (attributes, as parsed)."""
        return argparse.Namespace(**self.harness_flags)

    def harness_options(self):
        """The chosen harness's options (:class:`ophsd.harness.options.HarnessOptions`)."""
        from ophsd.harness.options import options_from_args

        return options_from_args(self.harness, self._flag_namespace(), "train")


@dataclass
class DistillConfig:
    """Which model teaches and the per-token loss and token weights
    (:meth:`~ophsd.train.objective.Objective.from_config`)."""

    TITLE: ClassVar[str] = "distillation"

    divergence: str = flag("reverse_kl", "per-token divergence of the student from the teacher",
                           choices=["reverse_kl", "forward_kl", "jsd"])
    beta: float = flag(0.5, "JSD mixture weight, 0 < beta < 1", type=float)
    distill_temperature: float = flag(1.0, "temperature dividing the student's and the teacher's logits", type=float)
    teacher: str = flag("initial", "initial: frozen copy of the starting weights; current: the live weights, detached",
                        choices=["initial", "current"])
    token_sampling_ratio: float = flag(1.0, "keep this fraction of response tokens per step (entropy-weighted if "
                                            "--entropy-weighting)", type=float)
    entropy_weighting: bool = flag(False, "sample kept tokens with probability proportional to the teacher's entropy",
                                   action="store_true")
    reward_weighting: bool = flag(False, "weight each sample by 0.1 + 0.9 x reward of the harness answer",
                                  action="store_true")
    kernel_backend: str = flag("auto", "ophsd_kernels backend of the divergence",
                               choices=["auto", "triton", "cpp", "torch"])

    def __post_init__(self):
        _need(self.distill_temperature > 0, f"--distill-temperature must be > 0, got {self.distill_temperature}")
        if self.divergence == "jsd":
            _need(0 < self.beta < 1, f"--beta must be in (0, 1) for --divergence jsd, got {self.beta} "
                                     "(beta -> 0/1 degenerates: use reverse_kl / forward_kl)")
        _need(0 < self.token_sampling_ratio <= 1,
              f"--token-sampling-ratio must be in (0, 1], got {self.token_sampling_ratio}")
        _need(not self.entropy_weighting or self.token_sampling_ratio < 1,
              "--entropy-weighting needs --token-sampling-ratio < 1 (it chooses which tokens to keep)")


@dataclass
class RolloutConfig:
    """The student's rollouts: the engine, the sampling, and the lengths pairs must fit
    (:class:`~ophsd.train.collect.Collector`, :func:`~ophsd.train.build.build_engine`)."""

    TITLE: ClassVar[str] = "rollouts"

    rollout_engine: str = flag("embedded", "embedded: an in-process engine on rank 0; sglang: SGLang servers "
                                           "(--sglang-url)", choices=["embedded", "sglang"])
    sglang_url: list[str] | None = flag(None, "SGLang server URL(s) (with --rollout-engine sglang)", action="append")
    weight_sync: str = flag("disk", "how new weights reach SGLang servers after each step: disk = safetensors shards "
                                    "+ /update_weights_from_disk (servers must see --weight-sync-dir); tensor = "
                                    "/update_weights_from_tensor per bucket (SGLang colocated on the trainer's GPUs)",
                            choices=["disk", "tensor"])
    weight_sync_dir: str | None = flag(None, "directory for --weight-sync disk shards, visible to the servers at the "
                                             "same path (default: the system temp dir)")
    rollout_batch_size: int = flag(8, "prompts per step", type=int)
    n_samples_per_prompt: int = flag(1, "student samples per prompt", type=int)
    rollout_temperature: float = flag(1.0, "sampling temperature of the student's rollouts", type=float)
    rollout_top_p: float = flag(1.0, "nucleus-sampling top-p of the student's rollouts", type=float)
    prefix_cache_tokens: int = flag(32768, "embedded engine: prompt tokens whose KV its radix prefix cache keeps (the "
                                           "shared instruction and each prompt are prefilled once per weight "
                                           "version: rollouts, then the harness's calls hit); 0 turns it off",
                                    type=int)
    max_prompt_length: int | None = flag(None, "tokens (student prompt or teacher context); longer pairs are skipped "
                                               "and counted, and a step where every pair is skipped stops the run. "
                                               "Default: derived from the task, the longest prompt it and its "
                                               "harnesses build on the training data, +25%", type=int)
    max_response_length: int = flag(128, "tokens the student generates per response at most", type=int)
    rollout_dtype: str | None = flag(None, "embedded engine: the dtype it generates in (rollouts, harness calls, "
                                           "evals). Default: the training dtype on a GPU, float32 on a CPU; "
                                           "bfloat16 reads half the bytes per decode step (fast on CPUs with "
                                           "AVX512-BF16 or AMX) at bf16 precision", choices=["float32", "bfloat16"])

    def __post_init__(self):
        _at_least_one(self, "rollout_batch_size", "n_samples_per_prompt", "max_response_length")
        if self.max_prompt_length is not None:  # None: derived from the task by the trainer
            _at_least_one(self, "max_prompt_length")
        _need(self.prefix_cache_tokens >= 0, f"--prefix-cache-tokens must be >= 0, got {self.prefix_cache_tokens}")
        _need(self.rollout_engine != "sglang" or self.rollout_dtype is None,
              "--rollout-dtype applies to the embedded engine; SGLang servers take --dtype when launched")
        if self.rollout_engine != "sglang":
            _need(self.weight_sync == "disk" and not self.weight_sync_dir,
                  "--weight-sync/--weight-sync-dir apply to --rollout-engine sglang only (the embedded engine is "
                  "updated in memory)")
        if self.weight_sync_dir:
            _need(Path(self.weight_sync_dir).is_dir(), f"--weight-sync-dir {self.weight_sync_dir}: no such directory")
        if self.rollout_engine == "sglang":
            _need(bool(self.sglang_url), "--rollout-engine sglang needs --sglang-url URL (start servers with "
                                         "`python -m sglang.launch_server`, or use --rollout-engine embedded)")

    @property
    def sequences_per_step(self) -> int:
        """Every on-policy sample of a step: prompts x samples per prompt."""
        return self.rollout_batch_size * self.n_samples_per_prompt


@dataclass
class EvalConfig:
    """Evaluation during training and the rollouts logged per step (:class:`~ophsd.train.evaluation.Evaluator`)."""

    TITLE: ClassVar[str] = "evaluation"

    eval_interval: int = flag(0, "steps between evals (0: before and after only)", type=int)
    eval_data: str | None = flag(help="evaluation file (default: a dev split carved from --data, or arith dev)")
    eval_limit: int = flag(100, "evaluation examples: a seeded sample (stratified by label for classification) of "
                                "--eval-data, or the dev split carved from --data (held out of training). Each eval "
                                "runs them standalone and in the harness: on 2 CPU cores ~10 min for SmolLM2 on "
                                "BANKING77; lower it for smoke runs (one of 100 examples moves accuracy 1 point)",
                           type=int)
    eval_harness: str = flag("every", "which evals also run the harness-attached model (the costly half: on 2 CPU "
                                      "cores ~17 min for 300 BANKING77 messages): every eval, or only the 'before' "
                                      "and 'after' ones (ends: interval evals are standalone only), or none (never)",
                             choices=["every", "ends", "never"])
    eval_batch_size: int = flag(64, "eval examples decoded together: the eval's memory grows with it (each row holds "
                                    "its prompt's KV; SmolLM2-135M on BANKING77's ~750-token prompts, CPU: 64 rows "
                                    "peak ~+5.8 GiB, 16 rows ~+1.3 GiB for ~25%% more eval time)", type=int)
    skip_eval: bool = flag(False, "no evaluation at all", action="store_true")
    skip_eval_before: bool = flag(False, "no evaluation of the untrained model at step 0 (when another run already "
                                         "measured it)", action="store_true")
    log_rollouts: int = flag(4, "rollouts per step written to DIR/rollouts.jsonl with --save (prompt, response, "
                                "rewards, teacher context, lengths; 0: off). Evals always write their per-example "
                                "predictions to DIR/eval_predictions/step_NNNNNNN.jsonl", type=int)

    def __post_init__(self):
        _need(self.eval_limit >= 1, f"--eval-limit must be >= 1, got {self.eval_limit}")
        _need(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        _need(self.log_rollouts >= 0, f"--log-rollouts must be >= 0, got {self.log_rollouts}")
        if self.eval_data:
            _need(Path(self.eval_data).is_file(), f"--eval-data {self.eval_data}: no such file")


@dataclass
class TrainConfig:
    """Everything one run is configured by, one group per ``--help`` section. Built from the parsed
    flags by :meth:`from_args`; the trainer and its roles read it (or the group they need).

    Mutable for the two values derived at start-up: ``model.global_batch_size`` (here) and
    ``rollout.max_prompt_length`` (by the trainer, from the task, when not given)."""

    config: str | None = flag(help="YAML file of defaults (same names as the flags)")
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        m, seqs = self.model, self.rollout.sequences_per_step
        if m.global_batch_size is None:
            m.global_batch_size = seqs
        _need(m.global_batch_size == seqs,
              f"--global-batch-size ({m.global_batch_size}) must equal --rollout-batch-size x "
              f"--n-samples-per-prompt ({seqs}): every on-policy sample is used once")
        _need(m.pack_sequences or m.global_batch_size % m.micro_batch_size == 0,
              f"--global-batch-size ({m.global_batch_size}) must be a multiple of --micro-batch-size "
              f"({m.micro_batch_size})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of :func:`parse_args`'s flags, validated (:class:`ConfigError` naming the flag)."""
        values = dict(vars(args))
        groups = {}
        for name, group in _groups():
            kwargs = {f.name: values.pop(f.name) for f in _flag_fields(group)}
            groups[name] = group, kwargs
        config = values.pop("config")
        # What is left are the registered harnesses' option flags (added by the harness registry).
        groups["task"][1]["harness_flags"] = values
        return cls(config=config, **{name: group(**kwargs) for name, (group, kwargs) in groups.items()})

    def to_dict(self) -> dict[str, Any]:
        """Flag dest -> value in the parser's order: what the run directory's args.json, checkpoints and
        Weights & Biases record (the layout of the parsed namespace, so older records compare)."""
        out = {"config": self.config}
        for name, group in _groups():
            sub = getattr(self, name)
            for f in dataclasses.fields(group):
                if f.metadata.get("harness_flags"):
                    out.update(sub.harness_flags)
                else:
                    out[f.name] = getattr(sub, f.name)
        return out


def _groups() -> list[tuple[str, type]]:
    """(TrainConfig field, its group dataclass), in ``--help`` order."""
    return [(f.name, f.default_factory) for f in dataclasses.fields(TrainConfig) if f.name != "config"]


def _flag_fields(group: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(group) if not f.metadata.get("harness_flags")]


def _add_flag(parser, f: dataclasses.Field) -> None:
    """``--<name>`` for field ``f``, its help from the field (``%`` escaped: argparse %-formats help)."""
    parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata["argparse"],
                        help=f.metadata["help"].replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    """The ``ophsd train`` flags, one argument group per config group, from the dataclass fields."""
    ap = argparse.ArgumentParser(
        prog="ophsd train",
        description="On-Policy Harness Self-Distillation on megatron-core. Launch with "
                    "`torchrun --nproc-per-node N -m ophsd.train ...` (N = TP x PP x DP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_flag(ap, next(f for f in dataclasses.fields(TrainConfig) if f.name == "config"))
    for _, group in _groups():
        g = ap.add_argument_group(group.TITLE)
        for f in _flag_fields(group):
            _add_flag(g, f)
        if group is TaskConfig:
            from ophsd.harness import options as harness_options  # every registered harness's options

            harness_options.add_harness_arguments(g, "train")
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
    """The command line over the ``--config`` file's defaults (checked as flags; :meth:`TrainConfig.from_args`
    checks the combination)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(pre.config, parser))
    return parser.parse_args(argv)
