"""Run-directory checkpoints: ``iter_N`` directories (model, teacher, optimizer, RNG streams, HF
config/tokenizer, trainer state, a manifest) and ``latest_checkpointed_iteration.txt``.

Saving never loses the checkpoint ``latest`` names, whenever the process dies
(:meth:`RunCheckpoints.save`); resuming falls back to the newest checkpoint that verifies
(:func:`find_checkpoint`). Every function marked collective runs on every rank.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ophsd.runtime.distributed import broadcast_from_rank0
from ophsd.runtime.distributed import is_rank0 as _rank0
from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.train.errors import TrainingError

LATEST = "latest_checkpointed_iteration.txt"


def iter_dirs(run_dir: Path) -> dict[int, list[Path]]:
    """Checkpoint directories by iteration: ``iter_N`` first, then ``iter_N.old`` (the previous copy
    of an iteration being re-saved; see :meth:`RunCheckpoints.save`). ``.tmp`` ones are never read."""
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
    dirs, skipped = iter_dirs(run_dir), 0
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


def load_file(path: Path):
    """torch.load of a checkpoint's own file; a damaged one is a one-line CheckpointError naming it."""
    from ophsd.models.checkpoint import CheckpointError, _reason

    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"{path}: unreadable ({_reason(e)})") from e


def collective(fn, *args):
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


@dataclass
class CheckpointContents:
    """What one checkpoint holds. ``trainer_state`` is called on rank 0 only (the harness lives there)."""

    module: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: object
    spec: object
    dtype: torch.dtype
    step: int
    trainer_state: Callable[[], dict]
    hf_files: dict[str, bytes] | None  # the model directory's HF files (None: write them from source/tokenizer)
    source: object = None
    tokenizer: object = None


class RunCheckpoints:
    """The checkpoints of one run directory (``run_dir`` None: no checkpoints are written)."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir

    def save(self, contents: CheckpointContents, reason: str = "interval") -> Path | None:
        """Never loses the checkpoint ``latest`` names, whenever the process dies: everything goes to
        ``iter_N.tmp`` (the manifest last), which is renamed into place; only then is ``latest``
        switched and what it replaced removed. Re-saving an existing iteration (a resumed finished
        run, SIGTERM right after an interval save) first moves the old copy aside as ``iter_N.old``,
        which :func:`find_checkpoint` resumes if the process dies before the new one is in place.
        A failed write (disk full) removes the partial copy and raises; the previous checkpoint stays."""
        from ophsd.models.checkpoint import CheckpointError

        if not self.run_dir:
            return None
        final = self.run_dir / f"iter_{contents.step:07d}"
        tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
        try:
            write_checkpoint(tmp, contents)
            collective(lambda: _rank0() and self._commit(tmp, final, old, contents.step))
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

    def _commit(self, tmp: Path, final: Path, old: Path, step: int) -> None:
        """Rank 0: put the complete ``tmp`` in place as ``final`` and point ``latest`` at it. Each
        step leaves a state :func:`find_checkpoint` resumes from, wherever a kill lands."""
        for dirs in iter_dirs(self.run_dir).values():  # debris of an interrupted re-save
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
            f.write(f"{step}\n")
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


def write_checkpoint(tmp: Path, contents: CheckpointContents) -> None:
    """Collective: a complete checkpoint in ``tmp``, its manifest (hashed by all ranks) written last."""
    from ophsd.models import checkpoint

    def fresh():
        if _rank0():
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    collective(fresh)
    checkpoint.save_model(contents.module, tmp / "model")
    if contents.teacher is not None:
        checkpoint.save_model(contents.teacher, tmp / "teacher")
    checkpoint.save_optimizer(contents.optimizer, contents.module, tmp / "optimizer")
    collective(_write_small_files, tmp, contents)
    names = broadcast_from_rank0(checkpoint.list_files(tmp) if _rank0() else None)
    shares = collective(checkpoint.hash_files, tmp, names[dist.get_rank()::dist.get_world_size()])
    collective(lambda: _rank0() and checkpoint.write_manifest(tmp, {k: v for d in shares for k, v in d.items()}))


def _write_small_files(tmp: Path, c: CheckpointContents) -> None:
    from ophsd.models import checkpoint

    (tmp / "rng").mkdir(exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
    if not _rank0():
        return
    (tmp / "hf").mkdir()
    if c.hf_files is not None:
        for name, data in c.hf_files.items():
            (tmp / "hf" / name).write_bytes(data)
    else:
        from ophsd.models.hub import load_config

        load_config(c.source).save_pretrained(tmp / "hf")
        c.tokenizer.save_pretrained(tmp / "hf")
    checkpoint.write_marker(tmp, c.spec, dtype=str(c.dtype).replace("torch.", ""), step=c.step)
    torch.save(c.trainer_state(), tmp / "trainer_state.pt")


def read_trainer_state(ckpt: Path, use_distributed_optimizer: bool, optim) -> dict:
    """The trainer state of ``ckpt``, or a TrainingError naming what does not match (before any model is built).

    ``optim`` (the run's OptimConfig): a learning-rate schedule that differs from the checkpoint's is
    refused unless --override-opt-param-scheduler, because megatron-core would otherwise keep the
    saved schedule and silently ignore the new flags."""
    state = load_file(ckpt / "trainer_state.pt")
    if not (ckpt / "optimizer").is_dir():
        raise TrainingError(f"--load {ckpt}: no optimizer/ checkpoint (written by an older ophsd?); "
                            "start from its model with --load on a converted model directory instead")
    saved_dist = state.get("distributed_optimizer", False)
    if saved_dist != use_distributed_optimizer:
        raise TrainingError(f"--load {ckpt}: saved {'with' if saved_dist else 'without'} "
                            f"--use-distributed-optimizer; resume the same way (megatron-core cannot load "
                            "one optimizer's state into the other)")
    if "scheduler" in state:
        from ophsd.train.update import lr_schedule, schedule_differences

        diffs = schedule_differences(state["scheduler"], lr_schedule(optim))
        if diffs and not optim.override_opt_param_scheduler:
            raise TrainingError(f"--load {ckpt}: the learning-rate schedule differs from the checkpoint's "
                                f"({'; '.join(diffs)}); resume with the saved flags, or pass "
                                f"--override-opt-param-scheduler to follow the new ones from step "
                                f"{state.get('step')} on")
        if diffs:
            _log(f"--override-opt-param-scheduler: from step {state.get('step')} the learning-rate schedule "
                 f"follows the flags ({'; '.join(diffs)})")
    return state


def restore_optimizer_and_rng(ckpt: Path, state: dict, optimizer, module, scheduler, current_layout: dict) -> None:
    """Model and optimizer reshard to any TP/PP/DP; RNG streams return only on the same layout."""
    from ophsd.models import checkpoint

    checkpoint.load_optimizer(optimizer, module, ckpt / "optimizer")
    if scheduler.override_opt_param_scheduler:  # the loaded param groups carry the saved run's lr bounds,
        for group in optimizer.param_groups:  # which the scheduler reads before its own
            group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.load_state_dict(state["scheduler"])
    if state.get("layout") == current_layout:
        rng = load_file(ckpt / "rng" / f"rank{dist.get_rank():05d}.pt")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        _log(f"resuming {ckpt} (saved at {state.get('layout')}) at {current_layout}: weights and optimizer "
             "state are resharded; per-rank RNG streams restart, so results match an uninterrupted run "
             "only up to reduction order")
