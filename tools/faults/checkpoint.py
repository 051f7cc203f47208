"""Checkpoints under kill -9, truncation and bit flips: none lost, every corruption detected, no orphans.

A tiny random model (made on the fly, no downloads) trains with a checkpoint every step. The
trainer is killed with SIGKILL at random moments (half of them while a checkpoint is being
written, the rest anywhere: start-up, resume, rollouts, saves) and relaunched with ``--load``
until it finishes. After each kill no process of the trainer may survive it (megatron-core's
checkpoint writers used to), and ``latest`` must name a checkpoint that verifies (or, when the
kill interrupted a re-save of that iteration, its ``.old`` copy); each finished run's per-step
losses must equal an uninterrupted run's exactly, each step logged once. Then every file of a
checkpoint is truncated, bit-flipped and deleted in turn: the manifest check must catch each and
name the file; and a run whose latest checkpoint is damaged must resume from the previous one.

Used by ``tools/fault_inject.py checkpoint`` (figures) and ``tests/test_faults_checkpoint.py``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TAG_ENV = "OPHSD_FAULT_TAG"
LATEST = "latest_checkpointed_iteration.txt"
TRAIN_FLAGS = ["--rollout-batch-size", "2", "--micro-batch-size", "2", "--max-response-length", "12",
               "--plan-tokens", "12", "--skip-eval", "--no-tensorboard", "--lr", "1e-3", "--save-interval", "1"]


def add_args(p) -> None:
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs to inject into training runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and corrupted bytes")
    p.add_argument("--train-iters", type=int, default=4, help="steps of each run (a checkpoint every step)")
    p.add_argument("--workdir", help="where runs go (default: a temporary directory, removed afterwards)")


# ----------------------------------------------------------------------------- processes


def trainer_env(tag: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not Path("/dev/nvidia0").exists():
        env.setdefault("TRITON_INTERPRET", "1")
    if tag:
        env[TAG_ENV] = tag  # inherited by every process the trainer starts: how orphans are found
    return env


def launch(model_dir, run_dir, train_iters: int, tag: str, extra=()) -> subprocess.Popen:
    """The trainer on ``run_dir``, resuming it (``--load``) when it holds a ``latest`` file."""
    run_dir = Path(run_dir)
    load = ["--load", str(run_dir)] if (run_dir / LATEST).is_file() else []
    return subprocess.Popen([sys.executable, "-m", "ophsd.train", "--model", str(model_dir), *TRAIN_FLAGS,
                             "--save", str(run_dir), "--train-iters", str(train_iters), *load, *map(str, extra)],
                            cwd=REPO, env=trainer_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (zombies excluded)."""
    needle = f"{TAG_ENV}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes() and " Z " not in (d / "stat").read_text().split(")", 1)[1][:4]:
                out.append(int(d.name))
        except (OSError, IndexError):
            pass
    return out


def survivors(tag: str, grace: float = 5.0) -> list[int]:
    """Processes of a killed trainer still alive after ``grace`` seconds; they are then killed."""
    deadline = time.time() + grace
    while (left := tagged_pids(tag)) and time.time() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def run_to_end(model_dir, run_dir, train_iters: int, extra=(), timeout: float = 600) -> str:
    p = launch(model_dir, run_dir, train_iters, uuid.uuid4().hex, extra)
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"trainer exited {p.returncode}:\n{out[-3000:]}")
    return out


def training_rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss" in r]


def make_tiny_model(out_dir) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import write_tiny_model

    return write_tiny_model(out_dir, "llama")


# ----------------------------------------------------------------------------- corruption


def corrupt(path: Path, kind: str, rng: random.Random) -> None:
    """truncate (to a random shorter length), flip (up to 64 bytes XOR 0xFF) or delete one file."""
    if kind == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        data = data[: rng.randrange(len(data))] if data else data
    else:
        start = rng.randrange(max(1, len(data) - 64))
        for i in range(start, min(len(data), start + 64)):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def check_every_corruption(ckpt: Path, work: Path, rng: random.Random) -> tuple[int, int, list[str]]:
    """Truncate, flip and delete each file of a copy of ``ckpt`` in turn; the resume check must fail
    naming it. Returns (injected, detected, failures)."""
    from ophsd.models.checkpoint import CheckpointError, list_files, MANIFEST
    from ophsd.train.checkpointing import check_resumable_files

    injected, detected, failures = 0, 0, []
    for name in [*list_files(ckpt), MANIFEST]:
        # (no manifest at all is an older ophsd's checkpoint: loaded with a warning, by design)
        for kind in ("truncate", "flip") if name == MANIFEST else ("truncate", "flip", "delete"):
            copy = work / "corrupt"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ckpt, copy)
            corrupt(copy / name, kind, rng)
            injected += 1
            try:
                check_resumable_files(copy)
            except CheckpointError as e:
                if name == MANIFEST or str(copy / name) in str(e):
                    detected += 1
                else:
                    failures.append(f"{kind} {name}: detected but the message names another file: {e}")
                continue
            failures.append(f"{kind} {name}: not detected")
    return injected, detected, failures


# ----------------------------------------------------------------------------------- run


def _kill_once(model_dir, run_dir, train_iters, rng, span: float) -> tuple[bool, int | None, list[int], str]:
    """Launch, kill -9 at a random moment; returns (killed, latest after, survivors, when: "save" when
    a checkpoint was being written, else "anytime")."""
    tag = uuid.uuid4().hex
    p = launch(model_dir, run_dir, train_iters, tag)
    t0 = time.time()
    if rng.random() < 0.5:
        extra = rng.uniform(0.0, 0.3)
        when = "anytime"
        while p.poll() is None and time.time() - t0 < 600:
            if any(run_dir.glob("iter_*.tmp")) or any(run_dir.glob("iter_*.old")):
                time.sleep(extra)
                when = "save" if any(run_dir.glob("iter_*.tmp")) or any(run_dir.glob("iter_*.old")) else when
                break
            time.sleep(0.002)
    else:
        delay = rng.uniform(0.2, span)
        when = "anytime"
        while p.poll() is None and time.time() - t0 < delay:
            time.sleep(0.01)
    killed = p.poll() is None
    if killed:
        p.kill()  # the trainer process only, as `kill -9 PID` does: its children must not outlive it
    p.communicate()
    left = survivors(tag) if killed else []
    try:
        latest = int((run_dir / LATEST).read_text())
    except (OSError, ValueError):
        latest = None
    return killed, latest, left, when


def run(args) -> dict:
    from ophsd.models.checkpoint import CheckpointError
    from ophsd.train.checkpointing import find_checkpoint

    rng = random.Random(args.seed)
    own = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="ophsd-faults-")) if own else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    figures = {"kills": 0, "kills_during_save": 0, "survived": 0, "orphans": 0, "runs_finished": 0, "runs_identical": 0,
               "corruptions_injected": 0, "corruptions_detected": 0, "fallback_resumes": 0, "failures": []}
    fail = figures["failures"].append
    T = args.train_iters
    try:
        model = make_tiny_model(work / "tiny")
        ref_dir = work / "reference"
        shutil.rmtree(ref_dir, ignore_errors=True)
        t0 = time.time()
        run_to_end(model, ref_dir, T)
        span = time.time() - t0
        ref = {r["step"]: (r["loss"], r.get("grad_norm")) for r in training_rows(ref_dir)}

        # kill -9 at random moments, relaunch until finished; episodes until enough kills
        episode = 0
        while figures["kills"] < args.kills:
            run_dir = work / f"killed{episode}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            for _ in range(4 * args.kills + 8):
                if not (run_dir / LATEST).is_file():
                    for f in run_dir.iterdir():  # killed before the first checkpoint: start afresh
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
                if figures["kills"] >= args.kills:
                    run_to_end(model, run_dir, T)
                    break
                killed, latest, left, when = _kill_once(model, run_dir, T, rng, span)
                if not killed:
                    break  # the run finished first
                figures["kills"] += 1
                figures["kills_during_save"] += when == "save"
                figures["orphans"] += len(left)
                if left:
                    fail(f"kill {figures['kills']} ({when}, seed {args.seed}): {len(left)} processes outlived the trainer")
                ok = True
                if latest is not None:
                    msgs = []
                    try:
                        got = find_checkpoint(run_dir, log=msgs.append)
                        if got.name not in (f"iter_{latest:07d}", f"iter_{latest:07d}.old"):
                            ok = False
                            fail(f"kill {figures['kills']} ({when}, seed {args.seed}): latest names {latest}, resumable is {got.name}")
                    except CheckpointError as e:
                        ok = False
                        fail(f"kill {figures['kills']} ({when}, seed {args.seed}): checkpoint lost: {e}")
                figures["survived"] += ok
            if not ((run_dir / LATEST).is_file() and int((run_dir / LATEST).read_text()) == T):
                fail(f"episode {episode}: the run did not reach step {T}")
            else:
                figures["runs_finished"] += 1
                rows = training_rows(run_dir)
                steps = [r["step"] for r in rows]
                if steps != list(range(1, T + 1)):
                    fail(f"episode {episode}: metrics.jsonl steps {steps}, expected 1..{T} once each")
                got = {r["step"]: (r["loss"], r.get("grad_norm")) for r in rows}
                if got == ref:
                    figures["runs_identical"] += 1
                else:
                    fail(f"episode {episode}: losses differ from the uninterrupted run: {got} vs {ref}")
            episode += 1

        # every file kind truncated / bit-flipped / deleted
        inj, det, fails = check_every_corruption(ref_dir / f"iter_{T:07d}", work, rng)
        figures["corruptions_injected"] += inj
        figures["corruptions_detected"] += det
        figures["failures"] += fails

        # a damaged latest checkpoint: the run resumes from the previous one and matches
        fb = work / "fallback"
        shutil.rmtree(fb, ignore_errors=True)
        shutil.copytree(ref_dir, fb)
        corrupt(fb / f"iter_{T:07d}" / "model" / "__0_0.distcp", "flip", rng)
        figures["corruptions_injected"] += 1
        out = run_to_end(model, fb, T)
        if f"resuming from {fb / f'iter_{T - 1:07d}'} instead" in out and "is damaged" in out:
            figures["corruptions_detected"] += 1
            got = {r["step"]: (r["loss"], r.get("grad_norm")) for r in training_rows(fb)}
            if got == ref:
                figures["fallback_resumes"] += 1
            else:
                fail(f"fallback resume: losses differ from the uninterrupted run: {got} vs {ref}")
        else:
            fail("fallback resume: a damaged latest checkpoint was not reported / not skipped:\n" + out[-1500:])
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return figures
