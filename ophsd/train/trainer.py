"""One OPHSD trainer: rollouts -> harness -> pairs -> teacher fwd -> student fwd/bwd -> step -> sync.

Rank 0 drives generation (it owns the engine, the harness and the data stream) and broadcasts
each step's token ids; every rank runs the Megatron model stage it holds. Teacher logits stay
where the last pipeline stage produced them (vocab-parallel shards, never gathered, never
moved), and the loss is :func:`ophsd_kernels.vocab_parallel_divergence` over those shards.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import comm_device
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.tasks.base import TaskDataError
from ophsd.train import step
from ophsd.train.pairs import MicroBatch, Sample, filter_pairs, layout_stats, pack

LATEST = "latest_checkpointed_iteration.txt"


class TrainingError(RuntimeError):
    """The run cannot continue (a whole batch failed repeatedly, ...); a checkpoint was attempted."""


def _broadcast(obj):
    box = [obj if _rank0() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rollout_seed(run_seed: int, step: int, position: int) -> int:
    """Sampling seed of the prompt at data ``position`` (its index in the example stream) in step
    ``step``: a 62-bit hash, so every prompt of a run has its own random streams (the engines
    draw sample ``j`` with ``seed + j``) and a resumed run (same step and position) redraws them."""
    h = hashlib.blake2b(f"ophsd-rollout/{run_seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def _tail(text: str, n: int = 300) -> str:
    """The last ``n`` characters, with a marker saying how many were cut."""
    return text if len(text) <= n else f"[...{len(text) - n} chars cut...]" + text[-n:]


def _iter_dirs(run_dir: Path) -> dict[int, list[Path]]:
    """Checkpoint directories by iteration: ``iter_N`` first, then ``iter_N.old`` (the previous copy
    of an iteration being re-saved; see :meth:`Trainer.save_checkpoint`). ``.tmp`` ones are never read."""
    out: dict[int, list[Path]] = {}
    for p in Path(run_dir).glob("iter_*"):
        tail = p.name[5:]
        num, _, suffix = tail.partition(".")
        if num.isdigit() and suffix in ("", "old") and p.is_dir():
            out.setdefault(int(num), []).append(p)
    return {k: sorted(v, key=lambda p: p.suffix == ".old") for k, v in out.items()}


def check_resumable_files(ckpt: Path) -> None:
    """Raise CheckpointError when ``ckpt`` is damaged or incomplete (collective: verification is
    shared among ranks). Without a manifest (older ophsd) only the files a resume needs are checked."""
    from ophsd.models import checkpoint

    if not checkpoint.verify(ckpt):
        for need in ("trainer_state.pt", "model/metadata.json", "optimizer/metadata.json", checkpoint.MARKER):
            if not (ckpt / need).is_file():
                raise checkpoint.CheckpointError(f"checkpoint {ckpt} is incomplete: no {need}")


def find_checkpoint(run_dir: str | os.PathLike, log=None) -> Path | None:
    """The checkpoint ``--load run_dir`` resumes: the one ``latest`` names when it verifies, else the
    newest older one that does, saying so through ``log`` (a kill, a full disk or a flipped bit
    must not end a run). None without a ``latest`` file (``run_dir`` is then a model directory).
    Raises CheckpointError when no checkpoint verifies. Collective (see :func:`check_resumable_files`)."""
    from ophsd.models.checkpoint import CheckpointError

    run_dir = Path(run_dir)
    latest_file = run_dir / LATEST
    if not latest_file.is_file():
        return None
    try:
        named = int(latest_file.read_text().strip())
    except (OSError, ValueError):
        named = None
    named_dir = None if named is None else run_dir / f"iter_{named:07d}"
    if named_dir is None:
        why = f"{latest_file} is unreadable"
    elif not named_dir.is_dir():
        why = f"{latest_file} names iteration {named} but {named_dir} does not exist"
    dirs, skipped = _iter_dirs(run_dir), 0
    for it in sorted((k for k in dirs if named is None or k <= named), reverse=True):
        for ckpt in dirs[it]:
            try:
                check_resumable_files(ckpt)
            except CheckpointError as e:
                if ckpt == named_dir:
                    why = str(e)
                else:
                    skipped += 1
                continue
            if ckpt != named_dir and log is not None:
                log(f"{why}; resuming from {ckpt} instead, the newest checkpoint that verifies"
                    + (f" ({skipped} newer damaged)" if skipped else ""))
            return ckpt
    raise CheckpointError(f"--load {run_dir}: no checkpoint to resume: {why}"
                          + (f"; {skipped} older checkpoints are damaged too" if skipped else ""))


def _load_file(path: Path):
    """torch.load of a checkpoint's own file; a damaged one is a one-line CheckpointError naming it."""
    from ophsd.models.checkpoint import CheckpointError, _reason

    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"{path}: unreadable ({_reason(e)})") from e


def _drop_rows_after(path: Path, step_num: int) -> int:
    """Keep the JSONL rows of steps <= ``step_num`` (a resumed run logs the later ones again) and
    drop unparsable lines (one cut by a kill); returns how many rows went."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = int(row.get("step", 0)) <= step_num
        except (ValueError, AttributeError, TypeError):
            keep = False
        kept.append(line) if keep else None
        dropped += not keep
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped


class ExampleStream:
    """Deterministic example order: a generator task streams, file data is reshuffled per epoch."""

    def __init__(self, task, data: str | None, seed: int, dev_size: int = 0):
        """``dev_size`` > 0 holds that many examples out (the eval split carved from ``data``)."""
        self.task, self.seed = task, seed
        split = "train" if dev_size > 0 else "all"
        self.examples = None if data is None else list(
            task.dataset(data, split=split, seed=seed, dev_size=max(1, dev_size)))
        if self.examples is not None and not self.examples:
            raise TrainingError(f"no usable training examples in {data}")

    def batch(self, position: int, n: int) -> list:
        if self.examples is None:
            return [self.task.example(i, "train") for i in range(position, position + n)]
        out, N = [], len(self.examples)
        for i in range(position, position + n):
            epoch, j = divmod(i, N)
            out.append(self.examples[int(self._order(epoch)[j])])
        return out

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(len(self.examples), generator=g)


def wrap_ddp(module, use_distributed_optimizer: bool):
    """megatron-core DDP (fp32 grad buffers) with its grad finalisation hooked into the schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer)
    model = DistributedDataParallel(module.config, cfg, module)
    module.config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(ddp_model, args):
    """The megatron-core optimizer from the Megatron-named flags (also used by tools/bench_train.py)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, [ddp_model])


class Trainer:
    def __init__(self, args):
        from megatron.core import parallel_state as ps

        from ophsd.runtime import distributed

        self.args = args
        distributed.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
        self.ps = ps
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.step_num, self.data_position = 0, 0
        self.counters: Counter = Counter()
        self.stop_requested = False
        self.run_dir = Path(args.save) if args.save else None
        resume_dir = find_checkpoint(args.load, log=_log) if args.load else None
        model_dir = resume_dir or (args.load if args.load else None)
        resume_state = self._check_resumable(resume_dir) if resume_dir else None
        self._load_data()
        self._build_models(model_dir, verified=resume_dir is not None)
        self._build_optimizer()
        self._build_generation()
        if args.max_prompt_length is None:
            args.max_prompt_length = _broadcast(self._derived_max_prompt_length() if _rank0() else None)
        if resume_dir:
            self._load_trainer_state(resume_dir, resume_state)
        self._metrics_file = self._rollouts_file = None
        self._tb = None
        if self.run_dir and _rank0():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_dir:
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    if n := _drop_rows_after(self.run_dir / name, self.step_num):
                        _log(f"{name}: dropped {n} rows past step {self.step_num} (they are re-run)")
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
            if args.log_rollouts:
                self._rollouts_file = open(self.run_dir / "rollouts.jsonl", "a")
            (self.run_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
            if args.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except Exception as e:  # noqa: BLE001 - tensorboard is optional
                    _log(f"TensorBoard logging off ({e.__class__.__name__}: {e}); metrics.jsonl still written")
        self._wandb = None
        if args.wandb_project and _rank0():
            try:
                import wandb

                self._wandb = wandb.init(project=args.wandb_project, config=vars(args),
                                         dir=str(self.run_dir) if self.run_dir else None)
            except ImportError:
                _log("--wandb-project given but wandb is not installed (pip install wandb); logging to JSONL only")
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # ------------------------------------------------------------------------------ building
    def _build_models(self, model_dir, verified: bool = False):
        """``verified``: ``model_dir`` is a checkpoint :func:`find_checkpoint` checked whole."""
        from ophsd.models import checkpoint, mapping
        from ophsd.models.hub import ModelSource, load_config, load_hf_model, load_tokenizer, resolve_model
        from ophsd.models.megatron import build_model, model_spec_from_hf

        a = self.args
        tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
        if model_dir:
            spec = checkpoint.load_spec(model_dir, tp, pp)
            self.hf_dir = Path(model_dir) / "hf"
            # Its config/tokenizer files, read now: checkpoints copy them, and the directory we
            # resumed from may be pruned while we run (examples/paper_table keeps the latest only).
            self._hf_files = {f.name: f.read_bytes() for f in self.hf_dir.iterdir() if f.is_file()}
            student = build_model(spec, params_dtype=self.dtype, perform_initialization=False)
            checkpoint.load_model(student, Path(model_dir) / "model", verify_files=not verified)
            teacher_dir = Path(model_dir) / "teacher"
            self.source = ModelSource(str(model_dir), megatron=True)
        else:
            self.source = resolve_model(a.model)
            spec = model_spec_from_hf(load_config(self.source), tp, pp)
            hf = load_hf_model(self.source, torch.float32)
            student = build_model(spec, params_dtype=self.dtype, perform_initialization=False)
            mapping.load_full_tensors(student, {k: v.to(self.dtype) for k, v in
                                                mapping.hf_to_megatron(hf.state_dict(), spec).items()})
            del hf
            teacher_dir = None
            self.hf_dir = None
        self.spec = spec
        self.tokenizer = load_tokenizer(self.source)
        self.teacher = None
        if a.teacher == "initial" and a.objective == "distill":
            self.teacher = build_model(spec, params_dtype=self.dtype, perform_initialization=False)
            if teacher_dir is not None and (teacher_dir / "metadata.json").is_file():
                checkpoint.load_model(self.teacher, teacher_dir, verify_files=not verified)
            else:
                self.teacher.load_state_dict(student.state_dict())
            self.teacher.requires_grad_(False).eval()
        self.model = wrap_ddp(student, a.use_distributed_optimizer)
        self.module = student

    def _build_optimizer(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        a = self.args
        self.optimizer = build_optimizer(self.model, a)
        decay_iters = max(1, a.train_iters - a.lr_warmup_iters) + a.lr_warmup_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if a.lr_warmup_iters else a.lr, max_lr=a.lr, min_lr=a.min_lr,
            lr_warmup_steps=a.lr_warmup_iters, lr_decay_steps=decay_iters, lr_decay_style=a.lr_decay_style,
            start_wd=a.weight_decay, end_wd=a.weight_decay, wd_incr_steps=decay_iters, wd_incr_style="constant",
        )

    def _load_data(self):
        """Rank 0 reads the training (and eval) data before any model is built: a bad file fails in seconds."""
        from ophsd.tasks import get_task

        a = self.args
        self.task = get_task(a.task)
        self.stream, error = None, None
        if _rank0():
            try:
                self.stream = ExampleStream(self.task, a.data, a.seed, dev_size=self._dev_size())
                if a.eval_data and not a.skip_eval and not self._eval_examples():
                    error = f"--eval-data {a.eval_data}: no usable examples"
            except (ValueError, TrainingError) as e:  # TaskDataError is a ValueError
                error = str(e)
        error = _broadcast(error)
        if error:  # a bad --data/--eval-data file: the user's to fix (exit 2 in main)
            raise TaskDataError(error)

    def _build_generation(self):
        """Rank 0 owns the engine, the harness and the data stream."""
        from ophsd.harness import get_harness

        a = self.args
        self.engine = self.harness = None
        if not _rank0():
            self._sync_weights(version=0)  # collective: every rank takes part in the gather
            return
        from ophsd.harness.options import HarnessContext, options_from_args

        options = options_from_args(a.harness, a, "train")
        kwargs = options.harness_kwargs(HarnessContext(self.task, log=_log))
        self.harness = get_harness(a.harness, self.task, seed=a.seed, **kwargs)
        if a.rollout_engine == "sglang":
            from ophsd.rollout.sglang import SGLangEngine

            self.engine = SGLangEngine(a.sglang_url, weight_sync=a.weight_sync, weights_dir=a.weight_sync_dir)
        else:
            from transformers import AutoModelForCausalLM

            from ophsd.models.hub import load_config
            from ophsd.rollout.embedded import EmbeddedEngine

            # Random-initialised shell: the first weight sync (version 0) fills it from Megatron.
            # It shares rank 0's device; on a GPU it generates in the training dtype, on CPU in fp32.
            device = comm_device()
            dtype = self.dtype if device.type == "cuda" else torch.float32
            hf = AutoModelForCausalLM.from_config(load_config(self.source), dtype=dtype).eval()
            self.engine = EmbeddedEngine.from_pretrained_objects(hf, self.tokenizer, name="ophsd-student",
                                                                 seed=a.seed, device=device, dtype=dtype,
                                                                 prefix_cache_tokens=a.prefix_cache_tokens)
        self._sync_weights(version=0)

    def _derived_max_prompt_length(self) -> int:
        """Rank 0: --max-prompt-length from the task (its longest student/teacher prompt on this data)."""
        a = self.args
        examples = self.stream.examples if self.stream.examples is not None else self.stream.batch(0, 256)
        n = self.task.default_max_prompt_length(lambda m: len(self.engine.apply_chat_template(m)), examples,
                                                k_neighbours=a.bank_k, plan_tokens=a.plan_tokens)
        _log(f"--max-prompt-length {n}: derived from the task (the longest student prompt or teacher context "
             f"it builds on this data, +{self.task.prompt_length_margin - 1:.0%})")
        return n

    # ------------------------------------------------------------------------- weight sync
    def _iter_stage_tensors(self):
        from ophsd.models import mapping

        return mapping.iter_hf_tensors(self.module, self.ps.get_tensor_model_parallel_group())

    @torch.no_grad()
    def _sync_weights(self, version: int) -> float:
        """Gather HF-named full tensors from every pipeline stage to rank 0 and push them."""
        t0 = time.perf_counter()
        ps = self.ps
        pp_group, pp = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
        tensors: list[tuple[str, torch.Tensor]] = []
        mine = list(self._iter_stage_tensors())  # collective over TP
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [dist.get_rank()]
            for stage, src in enumerate(ranks):
                if pp == 1:
                    tensors = mine
                    break
                meta = [[(n, tuple(t.shape), t.dtype) for n, t in mine] if dist.get_rank() == src else None]
                dist.broadcast_object_list(meta, src=src, group=pp_group)
                for i, (name, shape, dtype) in enumerate(meta[0]):
                    buf = (mine[i][1].contiguous() if dist.get_rank() == src
                           else torch.empty(shape, dtype=dtype, device=comm_device()))
                    dist.broadcast(buf, src=src, group=pp_group)
                    if _rank0():
                        tensors.append((name, buf))
        if _rank0() and self.engine is not None:
            from ophsd.rollout.weight_sync import push_weights

            push_weights(self.engine, ((n, t.float()) for n, t in tensors), version)
        dist.barrier()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------ rollouts
    def _rollout(self) -> tuple[list[Sample], dict]:
        """Rank 0: student samples on the current weights + teacher contexts from the harness."""
        from ophsd.rollout import SamplingParams

        a = self.args
        stats: dict = {}
        examples = self.stream.batch(self.data_position, a.rollout_batch_size)
        self._last_examples = examples  # the memory bank takes every true label, rollouts dropped or not
        prompts = [self.engine.apply_chat_template(self.task.student_messages(e)) for e in examples]
        t0 = time.perf_counter()
        # Each prompt samples with its own seed (sample j: seed + j), a function of the run seed,
        # the step and its data position: distinct streams per prompt, the same ones after a resume.
        sampling = [SamplingParams(temperature=a.rollout_temperature, top_p=a.rollout_top_p,
                                   max_new_tokens=a.max_response_length, n=a.n_samples_per_prompt,
                                   seed=rollout_seed(a.seed, self.step_num, self.data_position + i))
                    for i in range(len(examples))]
        if a.objective == "distill":
            from ophsd.harness.base import call_isolated
            from ophsd.rollout.base import EngineError

            # One engine call for the batch; if it fails, prompt by prompt: a prompt that still
            # fails is dropped (counted), a batch where every prompt fails raises (retried by the caller).
            calls = call_isolated(self.engine, [self.task.student_messages(e) for e in examples], sampling,
                                  chunk_size=len(examples), max_workers=1)
            failed = [c.error for c in calls if c.completion is None]
            if len(failed) == len(calls):
                raise EngineError(f"every student rollout failed ({failed[0]})")
            if failed:
                _log(f"step {self.step_num + 1}: {len(failed)} student rollout(s) failed and are dropped "
                     f"(first: {failed[0]})")
                stats["dropped/rollout_failed"] = len(failed)
            keep = [i for i, c in enumerate(calls) if c.completion is not None]
            examples, prompts = [examples[i] for i in keep], [prompts[i] for i in keep]
            completions = [calls[i].completions for i in keep]
        else:
            completions = [[None] for _ in prompts]
        stats["time/rollout"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.harness.reset_stats()
        results = self.harness.run(examples, self.engine, training=True)
        stats["time/harness"] = time.perf_counter() - t0
        for k, v in self.harness.stats().items():
            stats[f"harness/{k}"] = v
        samples = []
        for ex, prompt, comps, res in zip(examples, prompts, completions, results):
            harness_reward = self.task.reward(res.final_response, ex) if res.final_response else 0.0
            weight = (0.1 + 0.9 * harness_reward) if a.reward_weighting else 1.0
            if a.objective == "offpolicy":
                resp = list(self.tokenizer.encode(res.final_response, add_special_tokens=False)) if res.final_response else []
                if resp and self.tokenizer.eos_token_id is not None:
                    resp.append(self.tokenizer.eos_token_id)
                samples.append(Sample(prompt, prompt, resp[: a.max_response_length + 1], weight,
                                      {"harness_reward": harness_reward, "example_id": ex.id, "mode": res.mode}))
                continue
            teacher_prompt = self.engine.apply_chat_template(res.teacher_messages)
            for c in comps:
                samples.append(Sample(prompt, teacher_prompt, list(c.output_ids), weight,
                                      {"student_reward": self.task.reward(c.text, ex), "harness_reward": harness_reward,
                                       "example_id": ex.id, "mode": res.mode}))
        if samples:
            stats["reward/student"] = sum(s.meta.get("student_reward", 0.0) for s in samples) / len(samples)
            stats["reward/harness"] = sum(s.meta["harness_reward"] for s in samples) / len(samples)
        return samples, stats

    # ------------------------------------------------------------------------------ the loss
    def _teacher_logits(self, mbs: list[MicroBatch]):
        """Teacher logits at the response positions, per micro-batch (last stage; vocab shards)."""
        return step.teacher_response_logits(self.teacher if self.teacher is not None else self.module, mbs)

    def _token_weights(self, mb: MicroBatch, teacher_rows: torch.Tensor | None) -> torch.Tensor:
        """Per-token weights: sample weight x (optional) random / entropy-weighted subsampling."""
        a = self.args
        w = mb.weights.clone()
        if a.token_sampling_ratio >= 1:
            return w
        g = torch.Generator().manual_seed(a.seed * 7919 + self.step_num * 131 + int(mb.targets.numel()))
        n = w.numel()
        k = max(1, int(round(a.token_sampling_ratio * n)))
        if a.entropy_weighting and teacher_rows is not None:
            probs = self._vocab_parallel_entropy(teacher_rows).clamp_min(1e-6).cpu()
        else:
            probs = torch.ones(n)
        alive = (w > 0).cpu()
        keep = torch.multinomial(probs * alive, min(k, int(alive.sum())), replacement=False, generator=g)
        mask = torch.zeros(n)
        mask[keep] = 1.0
        return w * mask.to(w.device)

    def _vocab_parallel_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of the tempered teacher over TP vocab shards (padding excluded)."""
        group = self.ps.get_tensor_model_parallel_group()
        x = logits.float() / self.args.distill_temperature
        start = self.ps.get_tensor_model_parallel_rank() * x.shape[-1]
        valid = max(0, min(x.shape[-1], self.spec.vocab_size - start))
        x = x[:, :valid]
        m = x.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m[:, None])
        z, s = e.sum(-1), (e * (x - m[:, None])).sum(-1)
        zs = torch.stack([z, s])
        dist.all_reduce(zs, group=group)
        z, s = zs
        return torch.log(z) - s / z

    def _attach_per_token(self, mine: list[Sample], values: torch.Tensor | None) -> None:
        """Rank 0 gets the per-token loss of DP rank 0's samples (``meta["per_token_loss"]``, for
        rollouts.jsonl) from the last pipeline stage of its pipeline."""
        ps = self.ps
        if not self.args.log_rollouts or not self.run_dir:
            return
        if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
            return
        if ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            box = [values]
            dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
            values = box[0]
        if not _rank0() or values is None:
            return
        start = 0
        for s in mine:
            n = len(s.response)
            s.meta["per_token_loss"] = [round(float(x), 5) for x in values[start: start + n]]
            start += n

    def _packed(self) -> bool:
        """Prefix-tree packing when asked for and the core attention takes a tree mask."""
        if not self.args.pack_sequences:
            return False
        if not hasattr(self, "_tree_backend"):
            self._tree_backend = self.module.ophsd_inputs.tree_backend  # chosen when the model was built
            if self._tree_backend is None:
                _log("--pack-sequences: the transformer-engine core attention cannot take a prefix-tree mask; "
                     "training on right-padded rows (use the local spec for packing)")
            else:
                _log(f"packing micro-batches as prefix trees ({self._tree_backend} tree attention)")
        return self._tree_backend is not None

    def _train_on(self, samples: list[Sample], forward_only: bool = False) -> dict:
        """Teacher forward, student forward/backward and the optimizer step on this rank's share.

        ``forward_only``: just the weighted mean divergence (the probe metric), no update.
        """
        a, ps = self.args, self.ps
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = len(samples) // dp if len(samples) >= dp else 0
        if per_rank == 0:
            return {"skipped_step": 1}
        mine = samples[dp_rank * per_rank: (dp_rank + 1) * per_rank]
        if not forward_only and len(samples) > dp * per_rank:
            # Equal shares keep the DP ranks' schedules in step; the rest (after length filtering) is counted.
            self.counters["skipped/dp_remainder"] += len(samples) - dp * per_rank
        mbs = step.to_device(pack(mine, a.micro_batch_size, pad_id=self.tokenizer.pad_token_id or 0,
                                  packed=self._packed(), max_tokens=a.max_tokens_per_micro_batch), comm_device())
        layout = layout_stats(mbs)
        t0 = time.perf_counter()
        teacher_rows = self._teacher_logits(mbs) if a.objective == "distill" else [None] * len(mbs)
        t_teacher = time.perf_counter() - t0
        token_w = [self._token_weights(mb, tr) if ps.is_pipeline_last_stage() else mb.weights
                   for mb, tr in zip(mbs, teacher_rows)]
        if a.objective == "distill":
            per_token = step.divergence_loss(teacher_rows, kind=a.divergence, beta=a.beta,
                                             temperature=a.distill_temperature, vocab_size=self.spec.vocab_size,
                                             backend=a.kernel_backend)
        else:
            per_token = step.nll_loss(self.spec.vocab_size)
        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        t0 = time.perf_counter()
        res = step.student_pass(self.model, mbs, per_token, token_w, forward_only=forward_only)
        t_student = time.perf_counter() - t0
        if not forward_only:
            self._attach_per_token(mine, res["per_token"])
        loss = res["loss"]
        if forward_only:
            return {"loss": loss}
        result = {**layout, "loss": loss, f"divergence/{a.divergence if a.objective == 'distill' else 'nll'}": loss,
                  "tokens": res["tokens"], "tokens_weighted": res["tokens_weighted"],
                  "time/teacher_forward": t_teacher, "time/student_fwd_bwd": t_student}
        if not step.finite_everywhere(loss, self.module):
            self.counters["nonfinite_steps"] += 1
            _log(f"step {self.step_num + 1}: non-finite loss or gradient, update skipped "
                 f"({self.counters['nonfinite_steps']} so far)")
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            result["skipped_step"] = 1
            return result
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        result.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      lr=self.optimizer.param_groups[0]["lr"])
        return result

    # -------------------------------------------------------------------------------- a step
    def train_step(self) -> dict:
        a = self.args
        t_step = time.perf_counter()
        payload = None
        if _rank0():
            for attempt in range(3):
                try:
                    samples, stats = self._rollout()
                    break
                except Exception as e:  # noqa: BLE001 - engine/harness failure for the whole batch
                    _log(f"rollout failed for the whole batch (attempt {attempt + 1}/3): {e}")
                    samples, stats = None, {"error": str(e)}
            if samples is not None:
                kept, skipped = filter_pairs(samples, a.max_prompt_length, a.max_response_length + 1)
                stats.update(skipped, pairs_kept=len(kept), pairs_total=len(samples))
                self._step_samples = (samples, kept)  # logged after the update (with per-token losses)
                payload = (kept, stats) if kept or not samples else self._all_skipped_message(samples)
        payload = _broadcast(payload)
        if payload is None:
            self.save_checkpoint(reason="rollout failure")
            raise TrainingError("rollouts failed for a whole batch three times in a row; checkpoint saved")
        if isinstance(payload, str):  # every pair skipped: nothing to learn from, and the next step would be the same
            self._flush_step_samples()
            if self.step_num > 0:
                self.save_checkpoint(reason="every pair skipped")
            raise TrainingError(payload)
        kept, stats = payload
        for k in ("skipped/empty_response", "skipped/too_long", "dropped/rollout_failed"):
            self.counters[k] += stats.get(k, 0)
        result = self._train_on(kept)
        self._flush_step_samples()
        self.step_num += 1
        self.data_position += a.rollout_batch_size
        result["time/sync"] = self._sync_weights(version=self.step_num)
        if _rank0():
            self.harness.update(self._last_examples)
        result.update(stats)
        result["time/step"] = time.perf_counter() - t_step
        result["tokens_per_s"] = result.get("tokens", 0) / max(result["time/step"], 1e-9)
        result["step"] = self.step_num
        result.update({f"total/{k}": v for k, v in self.counters.items()})
        return result

    def _all_skipped_message(self, samples: list[Sample]) -> str:
        """Why every pair of this step was skipped, naming the flag to change and the lengths seen."""
        a = self.args
        prompt = [max(len(s.student_prompt), len(s.teacher_prompt)) for s in samples if s.response]
        long_p = [n for n in prompt if n > a.max_prompt_length]
        long_r = [len(s.response) for s in samples if len(s.response) > a.max_response_length + 1]
        empty = sum(not s.response for s in samples)
        why = []
        if long_p:
            why.append(f"prompts (student prompt or teacher context) of {min(long_p)}-{max(long_p)} tokens exceed "
                       f"--max-prompt-length {a.max_prompt_length}; raise it (left unset, it is derived from the task)")
        if long_r:
            why.append(f"responses of {min(long_r)}-{max(long_r)} tokens exceed --max-response-length "
                       f"{a.max_response_length}; raise it")
        if empty:
            why.append(f"{empty} empty responses (the model answered nothing: check --max-response-length, the "
                       "model and its chat template)")
        return f"step {self.step_num + 1}: all {len(samples)} pairs skipped: " + "; ".join(why)

    def _flush_step_samples(self) -> None:
        if _rank0() and getattr(self, "_step_samples", None):
            self._log_rollouts(*self._step_samples)
        self._step_samples = None

    def _log_rollouts(self, samples: list[Sample], kept: list[Sample]) -> None:
        """Rank 0: up to --log-rollouts of this step's samples (spread over its prompts) to rollouts.jsonl."""
        n = self.args.log_rollouts
        if self._rollouts_file is None or not samples or not n:
            return
        kept_ids = {id(s) for s in kept}
        k = min(n, len(samples))
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False)
        for s in (samples[i * len(samples) // k] for i in range(k)):
            row = {"step": self.step_num + 1, "example_id": s.meta.get("example_id"),
                   "student_prompt": _tail(decode(s.student_prompt)), "response": decode(s.response),
                   "student_reward": s.meta.get("student_reward"), "harness_reward": s.meta.get("harness_reward"),
                   "harness_mode": s.meta.get("mode"), "teacher_context": _tail(decode(s.teacher_prompt)),
                   "response_tokens": len(s.response), "student_prompt_tokens": len(s.student_prompt),
                   "teacher_prompt_tokens": len(s.teacher_prompt), "kept": id(s) in kept_ids,
                   "per_token_loss": s.meta.get("per_token_loss")}
            self._rollouts_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._rollouts_file.flush()

    # ------------------------------------------------------------------------------ metrics
    def log_metrics(self, m: dict) -> None:
        if not _rank0():
            return
        m = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        if self._metrics_file:
            self._metrics_file.write(json.dumps(m) + "\n")
            self._metrics_file.flush()
        if self._tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, m.get("step", self.step_num))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m.get("step"))
        if m.get("step", 0) % max(1, self.args.log_interval) == 0 and "loss" in m:
            print(f"[ophsd] step {m['step']:>5}/{self.args.train_iters}  loss {m['loss']:.4f}  "
                  f"grad_norm {m.get('grad_norm', float('nan')):.3f}  lr {m.get('lr', 0):.2e}  "
                  f"pairs {m.get('pairs_kept', 0)}/{m.get('pairs_total', 0)}  tokens {m.get('tokens', 0)}  "
                  f"rollout {m.get('time/rollout', 0):.1f}s harness {m.get('time/harness', 0):.1f}s "
                  f"train {m.get('time/student_fwd_bwd', 0) + m.get('time/teacher_forward', 0):.1f}s "
                  f"sync {m.get('time/sync', 0):.1f}s", flush=True)

    # ------------------------------------------------------------------------------ eval
    def _probe_divergence(self) -> float | None:
        """Divergence on a fixed probe batch: greedy student responses and harness teacher
        contexts, both built once from the initial weights on dev examples. On-policy training
        losses come from a fresh batch each step (noisy); this one is comparable across steps."""
        a = self.args
        if a.objective != "distill":
            return None
        if getattr(self, "_probe", None) is None:
            probe = None
            if _rank0():
                from ophsd.rollout import SamplingParams

                examples = self._eval_examples()[: a.rollout_batch_size]
                prompts = [self.engine.apply_chat_template(self.task.student_messages(e)) for e in examples]
                outs = self.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=a.max_response_length))
                results = self.harness.run(examples, self.engine, training=True)
                samples = [Sample(p, self.engine.apply_chat_template(r.teacher_messages), list(o[0].output_ids))
                           for p, o, r in zip(prompts, outs, results)]
                probe = filter_pairs(samples, a.max_prompt_length, a.max_response_length + 1)[0]
                probe = probe[: len(probe) - len(probe) % a.micro_batch_size] or probe
            self._probe = _broadcast(probe)
        if not self._probe:
            return None
        return self._train_on(self._probe, forward_only=True)["loss"]

    def _dev_size(self) -> int:
        """Examples carved from --data for evaluation (none when --eval-data or --skip-eval)."""
        a = self.args
        return 0 if (a.eval_data or a.skip_eval or not a.data) else a.eval_limit

    def _eval_examples(self) -> list:
        """--eval-limit examples: a seeded sample of --eval-data (stratified by label for classification,
        :meth:`Task.sample`), else the dev split carved from --data (drawn the same way), else arith's dev stream."""
        a = self.args
        if a.eval_data:
            return list(self.task.sample(self.task.dataset(a.eval_data, split="all"), a.eval_limit, a.seed))
        if a.data:
            return list(self.task.dataset(a.data, split="dev", seed=a.seed, dev_size=a.eval_limit))
        return [self.task.example(i, "dev") for i in range(a.eval_limit)]

    def evaluate(self, tag: str) -> dict | None:
        a = self.args
        if a.skip_eval:
            return None
        probe = self._probe_divergence()  # collective
        if not _rank0():
            dist.barrier()
            return None
        from ophsd.eval import evaluate

        examples = self._eval_examples()
        harness = self.harness if a.harness != "opsd" else None
        res = evaluate(self.task, examples, self.engine, harness, progress=True, save_responses=bool(self.run_dir))
        if self.run_dir:
            pred_dir = self.run_dir / "eval_predictions"
            pred_dir.mkdir(parents=True, exist_ok=True)
            with open(pred_dir / f"step_{self.step_num:07d}.jsonl", "w") as f:
                for r in res.pop("responses"):
                    f.write(json.dumps({"step": self.step_num, "tag": tag, **r}, ensure_ascii=False, default=str) + "\n")
        row = {"step": self.step_num, "tag": tag,
               "eval/standalone_accuracy": res["standalone"]["accuracy"], "eval/n": res["standalone"]["n"]}
        if (res.get("harness") or {}).get("accuracy") is not None:  # no harness (OPSD): no such metric
            row["eval/harness_accuracy"] = res["harness"]["accuracy"]
        if probe is not None:
            row["eval/probe_divergence"] = probe
        _log(f"eval ({tag}, step {self.step_num}): standalone {row['eval/standalone_accuracy']:.1%}"
             + (f", harness-attached {row['eval/harness_accuracy']:.1%}" if "eval/harness_accuracy" in row else "")
             + (f", probe {a.divergence} {probe:.4f}" if probe is not None else "")
             + f" on {row['eval/n']} examples")
        self.log_metrics(row)
        dist.barrier()
        return row

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, reason: str = "interval") -> Path | None:
        """Never loses the checkpoint ``latest`` names, whenever the process dies: everything goes to
        ``iter_N.tmp`` (the manifest last), which is renamed into place; only then is ``latest``
        switched and what it replaced removed. Re-saving an existing iteration (a resumed finished
        run, SIGTERM right after an interval save) first moves the old copy aside as ``iter_N.old``,
        which :func:`find_checkpoint` resumes if the process dies before the new one is in place.
        A failed write (disk full) removes the partial copy and raises; the previous checkpoint stays."""
        from ophsd.models.checkpoint import CheckpointError

        if not self.run_dir:
            return None
        final = self.run_dir / f"iter_{self.step_num:07d}"
        tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
        try:
            self._write_checkpoint(tmp)
            self._collective(lambda: _rank0() and self._commit_checkpoint(tmp, final, old))
        except CheckpointError as e:
            if _rank0():
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                prev = f"iteration {int((self.run_dir / LATEST).read_text())}, the previous checkpoint, is intact"
            except (OSError, ValueError):
                prev = "there is no earlier checkpoint"
            raise CheckpointError(f"could not save checkpoint {final} ({reason}): {e}; {prev}") from e
        _log(f"saved checkpoint {final} ({reason})")
        return final

    def _collective(self, fn, *args):
        """Run ``fn`` on this rank; every rank raises the first rank's error (a rank-0-only write
        failing must not leave the other ranks waiting at the next collective). Returns all results."""
        from ophsd.models.checkpoint import CheckpointError

        try:
            out = (None, fn(*args))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            out = ((str(e).strip().splitlines() or [e.__class__.__name__])[0], None)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        for err, _ in gathered:
            if err:
                raise CheckpointError(err)
        return [r for _, r in gathered]

    def _write_checkpoint(self, tmp: Path) -> None:
        """Collective: a complete checkpoint in ``tmp``, its manifest (hashed by all ranks) written last."""
        from ophsd.models import checkpoint

        def fresh():
            if _rank0():
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)

        self._collective(fresh)
        checkpoint.save_model(self.module, tmp / "model")
        if self.teacher is not None:
            checkpoint.save_model(self.teacher, tmp / "teacher")
        checkpoint.save_optimizer(self.optimizer, self.module, tmp / "optimizer")
        self._collective(self._write_small_files, tmp)
        names = _broadcast(checkpoint.list_files(tmp) if _rank0() else None)
        shares = self._collective(checkpoint.hash_files, tmp, names[dist.get_rank()::dist.get_world_size()])
        self._collective(lambda: _rank0() and checkpoint.write_manifest(tmp, {k: v for d in shares for k, v in d.items()}))

    def _write_small_files(self, tmp: Path) -> None:
        from ophsd.models import checkpoint

        (tmp / "rng").mkdir(exist_ok=True)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
        if not _rank0():
            return
        (tmp / "hf").mkdir()
        if self.hf_dir:
            for name, data in self._hf_files.items():
                (tmp / "hf" / name).write_bytes(data)
        else:
            from ophsd.models.hub import load_config

            load_config(self.source).save_pretrained(tmp / "hf")
            self.tokenizer.save_pretrained(tmp / "hf")
        checkpoint.write_marker(tmp, self.spec, dtype=str(self.dtype).replace("torch.", ""), step=self.step_num)
        torch.save({"step": self.step_num, "data_position": self.data_position, "counters": dict(self.counters),
                    "harness": self.harness.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "layout": self._layout(),
                    "distributed_optimizer": self.args.use_distributed_optimizer,
                    "args": vars(self.args)}, tmp / "trainer_state.pt")

    def _commit_checkpoint(self, tmp: Path, final: Path, old: Path) -> None:
        """Rank 0: put the complete ``tmp`` in place as ``final`` and point ``latest`` at it. Each
        step leaves a state :func:`find_checkpoint` resumes from, wherever a kill lands."""
        for dirs in _iter_dirs(self.run_dir).values():  # debris of an interrupted re-save
            for d in dirs:
                if d.suffix == ".old":
                    if len(dirs) > 1:  # its replacement is in place
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        d.rename(d.with_suffix(""))
        if final.exists():  # re-save of the same iteration
            final.rename(old)
        tmp.rename(final)
        latest_tmp = self.run_dir / (LATEST + ".tmp")
        with open(latest_tmp, "w") as f:
            f.write(f"{self.step_num}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.run_dir / LATEST)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames and `latest` reach the disk before anything is removed
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
        for stale in self.run_dir.glob("iter_*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)

    def _layout(self) -> dict:
        ps = self.ps
        return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                "dp": ps.get_data_parallel_world_size()}

    def _check_resumable(self, ckpt: Path) -> dict:
        """The trainer state of ``ckpt``, or a TrainingError naming what does not match (before any model is built)."""
        state = _load_file(ckpt / "trainer_state.pt")
        if not (ckpt / "optimizer").is_dir():
            raise TrainingError(f"--load {ckpt}: no optimizer/ checkpoint (written by an older ophsd?); "
                                "start from its model with --load on a converted model directory instead")
        saved_dist = state.get("distributed_optimizer", False)
        if saved_dist != self.args.use_distributed_optimizer:
            raise TrainingError(f"--load {ckpt}: saved {'with' if saved_dist else 'without'} "
                                f"--use-distributed-optimizer; resume the same way (megatron-core cannot load "
                                "one optimizer's state into the other)")
        return state

    def _load_trainer_state(self, ckpt: Path, state: dict) -> None:
        """Model and optimizer reshard to any TP/PP/DP; RNG streams return only on the same layout."""
        from ophsd.models import checkpoint

        checkpoint.load_optimizer(self.optimizer, self.module, ckpt / "optimizer")
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("layout") == self._layout():
            rng = _load_file(ckpt / "rng" / f"rank{dist.get_rank():05d}.pt")
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            _log(f"resuming {ckpt} (saved at {state.get('layout')}) at {self._layout()}: weights and optimizer "
                 "state are resharded; per-rank RNG streams restart, so results match an uninterrupted run "
                 "only up to reduction order")
        self.step_num, self.data_position = state["step"], state["data_position"]
        self.counters = Counter(state["counters"])
        if _rank0():
            self.harness.load_state_dict(state["harness"])
        self._sync_weights(version=self.step_num)
        _log(f"resumed from {ckpt} at step {self.step_num}")

    def _on_sigterm(self, signum, frame):
        _log("SIGTERM: finishing this step, saving a checkpoint and exiting")
        self.stop_requested = True

    # ---------------------------------------------------------------------------------- run
    def run(self) -> int:
        a = self.args
        if self.step_num == 0 and not a.skip_eval_before:
            self.evaluate("before")
        while self.step_num < a.train_iters:
            stop = torch.tensor(1.0 if self.stop_requested else 0.0, device=comm_device())
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                self.save_checkpoint(reason="SIGTERM")
                return 0
            m = self.train_step()
            self.log_metrics(m)
            if a.save_interval and self.step_num % a.save_interval == 0 and self.step_num < a.train_iters:
                self.save_checkpoint()
            if a.eval_interval and self.step_num % a.eval_interval == 0 and self.step_num < a.train_iters:
                self.evaluate("interval")
        self.evaluate("after")
        if self.run_dir:
            self.save_checkpoint(reason="end of training")
            if _rank0():
                from ophsd.train.report import write_report

                write_report(self.run_dir)
        return 0

    def close(self):
        if self._metrics_file:
            self._metrics_file.close()
        if self._rollouts_file:
            self._rollouts_file.close()
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.engine is not None:
            self.engine.close()
