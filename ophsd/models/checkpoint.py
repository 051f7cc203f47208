"""Megatron model directories: a megatron-core distributed checkpoint plus the HF config/tokenizer.

Layout (written by ``tools/convert_hf.py import`` and by the trainer)::

    DIR/ophsd_megatron.json   format marker: arch, true vocab size, dtype, source
    DIR/hf/                   HF config.json + tokenizer files (rebuild the model, chat template)
    DIR/model/                megatron-core dist checkpoint (torch_dist), loadable at any TP/PP
    DIR/ophsd_manifest.json   size + sha256 of every other file, written last (a directory
                              without it is incomplete, or from an older ophsd)

The vocabulary dimension is stored padded for the TP it was saved with; megatron-core's
``allow_shape_mismatch`` on the embedding/output tensors re-pads on load at another TP.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import queue
import signal
import sys
from pathlib import Path

import torch

from ophsd.models.megatron import ModelSpec, model_spec_from_hf

MARKER = "ophsd_megatron.json"
FORMAT_VERSION = 1
# Same keys Megatron-LM passes; identical at save and load.
OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                           "singleton_local_shards": False}


MANIFEST = "ophsd_manifest.json"
# What a Megatron *model* directory needs (a trainer checkpoint also has optimizer/, rng/, ...).
MODEL_PARTS = ("model", "hf", MARKER)


class CheckpointError(RuntimeError):
    """A Megatron directory that is missing, incomplete or corrupted."""


def _reason(e: BaseException) -> str:
    """One line for an error from torch/megatron checkpointing: the innermost cause of the first
    failing rank (``CheckpointException.__str__`` is a multi-line traceback per rank)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, OSError) else f"{e.__class__.__name__}: {text}".rstrip(": ")


# ------------------------------------------------------------------------------- manifest


def list_files(root: str | os.PathLike) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted POSIX paths relative to it."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and p.name != MANIFEST + ".tmp")


def hash_files(root: str | os.PathLike, names) -> dict[str, dict]:
    """Size and sha256 of each file (streamed in chunks: ~1 GB/s, a 135M checkpoint in ~2 s)."""
    out = {}
    for name in names:
        path = Path(root, name)
        with open(path, "rb") as f:
            out[name] = {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return out


def write_manifest(root: str | os.PathLike, entries: dict[str, dict] | None = None) -> None:
    """Write the manifest *last*: its presence says every listed file was complete (fsynced)."""
    root = Path(root)
    entries = hash_files(root, list_files(root)) if entries is None else entries
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "ophsd-manifest", "version": 1, "files": entries}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def _selected(names, parts) -> list[str]:
    if parts is None:
        return sorted(names)
    return sorted(n for n in names if any(n == p or n.startswith(p + "/") for p in parts))


def check_manifest(root: str | os.PathLike, parts=None, share: tuple[int, int] = (0, 1)) -> list[str] | None:
    """Problems with the files of ``root`` listed in its manifest (restricted to ``parts``, top-level
    names; this caller's ``share`` = (index, count) of them), one line each; None when there is no
    manifest. A manifest that cannot be read is itself a problem."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        names = _selected(files, parts)
        expected = {n: (int(files[n]["size"]), str(files[n]["sha256"])) for n in names}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{path}: unreadable manifest ({e.__class__.__name__})"]
    if parts is not None and not names:
        return [f"{root}: the manifest lists no {'/'.join(parts)} files"]
    problems = []
    i, n = share
    for name in names[i::n]:
        size, digest = expected[name]
        p = root / name
        try:
            actual = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        if actual != size:
            problems.append(f"{p}: {actual} bytes, the manifest says {size} (truncated or incomplete)")
        elif hash_files(root, [name])[name]["sha256"] != digest:
            problems.append(f"{p}: contents do not match the manifest's sha256 (corrupted)")
    return problems


_WARNED_UNVERIFIED: set[str] = set()


def verify(root: str | os.PathLike, parts=None) -> bool:
    """Check ``root``'s files against its manifest; raise a one-line CheckpointError naming the
    first damaged file. False (after a one-time warning) when there is no manifest (written by an
    older ophsd). Collective when torch.distributed is initialised: each rank hashes a share."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = check_manifest(root, parts, (rank, world))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = None if any(p is None for p in gathered) else [x for p in gathered for x in p]
    if problems is None:
        if str(root) not in _WARNED_UNVERIFIED and rank == 0:
            print(f"[ophsd] warning: {root} has no {MANIFEST} (written by an older ophsd): loaded without "
                  "an integrity check", file=sys.stderr, flush=True)
        _WARNED_UNVERIFIED.add(str(root))
        return False
    if problems:
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {root} is damaged: {problems[0]}{more}")
    return True


# ------------------------------------------------------------------- checkpoint writer processes

_saving_pid = None


def _die_with_saver() -> None:
    """In a child forked while saving (megatron-core's writer processes): be killed with the
    trainer (Linux PR_SET_PDEATHSIG), instead of being reparented to init and living on."""
    if _saving_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _saving_pid:  # the trainer died before prctl took effect
        os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_saver)


@contextlib.contextmanager
def _writer_processes_die_with_us():
    """Sync saves without orphans. megatron-core's sync save forks one writer per file bucket, and
    keeps its results in a queue of a multiprocessing *Manager* (a spawned server process that
    nothing stops when the trainer is killed). Our saves are synchronous: the results are put and
    read in this process, so a plain thread queue does, and no Manager is started; the forked
    writers get PR_SET_PDEATHSIG (see :func:`_die_with_saver`)."""
    global _saving_pid
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None


def _save(sharded, ckpt_dir: Path, what: str) -> None:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with _writer_processes_die_with_us():
            dist_checkpointing.save(sharded, str(ckpt_dir))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot write the {what} checkpoint {ckpt_dir}: {_reason(e)}") from e


def write_marker(out_dir: str | os.PathLike, spec: ModelSpec, **extra) -> None:
    meta = {"format": "ophsd-megatron", "version": FORMAT_VERSION, "arch": spec.arch,
            "vocab_size": spec.vocab_size, **extra}
    Path(out_dir, MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def read_marker(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir, MARKER)
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} is not a Megatron model directory (no {MARKER}); create one with "
            f"`python tools/convert_hf.py import --hf-dir ... --output {model_dir}`"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "ophsd-megatron":
        raise CheckpointError(f"{path} is not an ophsd Megatron marker")
    return meta


def load_spec(model_dir: str | os.PathLike, tp: int = 1, pp: int = 1) -> ModelSpec:
    """The model spec of a Megatron directory at the requested TP/PP (validates divisibility)."""
    from transformers import AutoConfig

    read_marker(model_dir)
    return model_spec_from_hf(AutoConfig.from_pretrained(Path(model_dir, "hf")), tp, pp)


def save_model(model, ckpt_dir: str | os.PathLike) -> None:
    """Collective over all ranks: write this rank's shards into ``ckpt_dir`` (created empty)."""
    _save(model.sharded_state_dict(), Path(ckpt_dir), "model")


def load_model(model, ckpt_dir: str | os.PathLike, verify_files: bool = True) -> None:
    """Collective: fill every parameter of the local stage from a dist checkpoint.

    Any parameter missing from the checkpoint, or a checkpoint tensor the model does not
    have, is an error (never a silently random-initialised weight). ``verify_files``: check
    ``ckpt_dir``'s files against the manifest of the directory above it first (callers that
    verified the whole directory already pass False).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-core distributed checkpoint (no metadata.json)")
    if verify_files:
        verify(ckpt_dir.parent, (ckpt_dir.name,))
    sharded = model.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.RAISE_ALL)
    except (Exception, CheckpointException) as e:  # torch raises many types for bad files, some BaseException
        raise CheckpointError(f"failed to load the distributed checkpoint in {ckpt_dir}: {_reason(e)}") from e
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} left parameters unfilled: {missing[:8]}")


def save_optimizer(optimizer, model, ckpt_dir: str | os.PathLike) -> None:
    """Collective: the megatron-core optimizer state (incl. fp32 master weights) as a dist checkpoint.

    Written in megatron-core's ``fully_reshardable`` format (Megatron-LM's
    ``--dist-ckpt-optim-fully-reshardable``): one canonical state per model parameter, so it
    reloads at another TP/PP/DP layout and with or without the distributed optimizer.
    """
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False,
                                           metadata=OPTIMIZER_CKPT_METADATA)
    _save(sharded, Path(ckpt_dir), "optimizer")


def _init_empty_adam_state(optimizer) -> None:
    """Give a fresh torch Adam(W) its state tensors (step 0) so it can be loaded into.

    megatron-core's distributed optimizer reads ``state["step"]`` of every parameter while
    building its load-time state dict; on the TE/Apex fused Adam this exists from the start,
    on torch's Adam (the CPU path) only after a first step.  Every value is overwritten by
    the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def load_optimizer(optimizer, model, ckpt_dir: str | os.PathLike) -> None:
    """Collective: restore the state written by :func:`save_optimizer` into ``optimizer``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-core distributed optimizer checkpoint "
                              "(no metadata.json)")
    _init_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                           metadata=OPTIMIZER_CKPT_METADATA)
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    except (Exception, CheckpointException) as e:  # torch raises many types for bad files, some BaseException
        raise CheckpointError(f"failed to load the optimizer checkpoint in {ckpt_dir}: {_reason(e)}") from e
    with _torch_adam_load_fixes(optimizer):
        optimizer.load_state_dict(loaded)


@contextlib.contextmanager
def _torch_adam_load_fixes(optimizer):
    """Work around two megatron-core 0.16 bugs loading distributed-optimizer state into torch's
    Adam (no TE/Apex: the CPU path).  No-op with TE/Apex fused Adam, which keeps no per-param step.

    1. The ``fully_reshardable`` loader drops the per-parameter ``step`` from the checkpoint
       tensors, then copies every key of the destination state, which includes ``step`` ->
       KeyError.  ``load_state_dict`` has already set that step from the param groups, so we
       hand the destination's own value back.
    2. ``load_state_dict`` gives every parameter the *same* step tensor; torch's foreach Adam
       increments each list entry in place, so the shared step would advance by the number of
       parameters per iteration and corrupt the bias correction.  Each state gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        orig = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, orig=orig):
            gi, go = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[gi]["params"][go]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            return orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in patched:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def build_and_load(model_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                   params_dtype: torch.dtype = torch.float32, verify_files: bool = True):
    """Build the local stage at the current parallel state and load it from ``model_dir``
    (its model files checked against the manifest first, unless the caller did)."""
    from ophsd.models.megatron import build_model

    if verify_files:
        verify(model_dir, MODEL_PARTS)
    spec = load_spec(model_dir, tp, pp)
    model = build_model(spec, params_dtype=params_dtype, perform_initialization=False)
    load_model(model, Path(model_dir, "model"), verify_files=False)
    return model


def load_as_hf_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A transformers model with the weights of a Megatron directory (for eval and engines).

    Runs megatron-core in this process (a one-rank group when none exists) at TP=PP=1.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ophsd.models import mapping
    from ophsd.runtime import distributed

    distributed.initialize(1, 1)
    model = build_and_load(model_dir, 1, 1, params_dtype=torch.float32)
    spec = model.ophsd_spec
    hf_state = mapping.megatron_to_hf(dict(mapping.iter_full_megatron_tensors(model)), spec)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(Path(model_dir, "hf")), dtype=dtype)
    missing, unexpected = hf.load_state_dict({k: v.to(dtype) for k, v in hf_state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and spec.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: HF model left {missing[:5]} unfilled / got unexpected {unexpected[:5]}")
    if spec.tie_embeddings:
        hf.tie_weights()
    return hf.eval()
