"""Checkpoint faults (issue 14): kill -9 during saves, crashes at every step of a save, damaged
files of every kind, a full disk, orphaned writer processes, resume fallback, converter errors.

The loop of >= 20 kills at random moments is the slow test; the default ones are targeted.
The helpers (launch, kill, corrupt, find orphans) are the fault-injection suite's own,
``tools/faults/checkpoint.py``, also run by ``tools/fault_inject.py checkpoint``.
"""
import argparse
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_ranks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from faults import checkpoint as fc  # noqa: E402

ITERS = 3


def _ref(run_dir):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in fc.training_rows(run_dir)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run, a checkpoint every step."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    fc.run_to_end(tiny_model_dir("llama"), run, ITERS)
    return run


def test_kill_during_save_leaves_no_orphan_and_a_damaged_latest_falls_back(reference, tiny_model_dir, tmp_path):
    """kill -9 while the last checkpoint is written: no process of the trainer survives it (the
    megatron-core writer's Manager process used to), ``latest`` names a checkpoint; flip 64 bytes
    of that checkpoint's model shard: the relaunch says so in one line, resumes from the one
    before, and the run ends bit-identical to the uninterrupted one, each step logged once."""
    model, run, tag = tiny_model_dir("llama"), tmp_path / "run", uuid.uuid4().hex
    p = fc.launch(model, run, ITERS, tag)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline and not (run / f"iter_{ITERS:07d}.tmp").exists():
        time.sleep(0.002)
    assert p.poll() is None, "the run ended before the kill: the test would be vacuous"
    p.kill()
    p.communicate()
    assert fc.survivors(tag) == []
    latest = int((run / fc.LATEST).read_text())
    assert latest in (ITERS - 1, ITERS)
    bad = run / f"iter_{latest:07d}"
    fc.corrupt(bad / "model" / "__0_0.distcp", "flip", random.Random(0))
    out = fc.run_to_end(model, run, ITERS)
    assert (f"[ophsd] checkpoint {bad} is damaged: {bad / 'model' / '__0_0.distcp'}: contents do not match the "
            f"manifest's sha256 (corrupted); resuming from {run / f'iter_{latest - 1:07d}'} instead, the newest "
            "checkpoint that verifies") in out.splitlines()
    assert "Traceback" not in out
    assert [r["step"] for r in fc.training_rows(run)] == [1, 2, 3]
    assert _ref(run) == _ref(reference)
    from ophsd.train.checkpointing import find_checkpoint

    assert find_checkpoint(run) == run / f"iter_{ITERS:07d}"  # the damaged copy was replaced
    assert sorted(p.name for p in run.glob("iter_*")) == [f"iter_{i:07d}" for i in range(1, ITERS + 1)]


def test_forked_checkpoint_writer_dies_with_the_trainer():
    """megatron-core's sync save forks its file writers; a trainer killed while one runs must not
    leave it behind (it can block forever on its result queue): PR_SET_PDEATHSIG while saving."""
    import subprocess

    script = ("import multiprocessing as mp, os, sys, time\n"
              "from ophsd.models import checkpoint\n"
              "with checkpoint._writer_processes_die_with_us():\n"
              "    p = mp.get_context('fork').Process(target=time.sleep, args=(60,)); p.start()\n"
              "print(p.pid, flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    tag = uuid.uuid4().hex
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=fc.trainer_env(tag), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9 and r.stdout.strip().isdigit(), r.stderr[-2000:]
    assert fc.survivors(tag, grace=3.0) == []


class _Killed(BaseException):
    """SIGKILL at that instant: none of the trainer's error handling runs."""


def _crash_worker(rank, world, model_dir, run_dir):
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from ophsd.models.checkpoint import CheckpointError
    from ophsd.train.config import TrainConfig, parse_args
    from ophsd.train.checkpointing import LATEST, find_checkpoint, load_file
    from ophsd.train.trainer import Trainer

    run = Path(run_dir)
    tr = Trainer(TrainConfig.from_args(parse_args([
        "--model", model_dir, "--rollout-batch-size", "2", "--micro-batch-size", "2", "--max-response-length", "8",
        "--plan-tokens", "8", "--skip-eval", "--no-tensorboard", "--save", run_dir])))
    tr.train_step()
    tr.save_checkpoint()
    tr.train_step()
    out = {}

    def listing():
        return (run / LATEST).read_text().strip(), sorted(p.name for p in run.glob("iter_*"))

    # a full disk while the model shards are written, then while the trainer state is
    real_write, real_save = filesystem_async._write_item, torch.save

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_fails(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    for name, patch in (("shards", lambda: setattr(filesystem_async, "_write_item", no_space)),
                        ("state", lambda: setattr(torch, "save", save_fails))):
        patch()
        try:
            tr.save_checkpoint()
            out[name] = None
        except CheckpointError as e:
            out[name] = str(e)
        finally:
            filesystem_async._write_item, torch.save = real_write, real_save
        out[name + "_after"] = listing()

    # a crash before / after each step that touches the run directory (not files inside iter_N.tmp)
    real = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}

    def attempt(crash_at):
        calls = [0]

        def wrap(fn):
            def w(*a, **k):
                if Path(a[0]).parent != run:
                    return fn(*a, **k)
                i, calls[0] = calls[0], calls[0] + 1
                if crash_at == 2 * i:
                    raise _Killed
                r = fn(*a, **k)
                if crash_at == 2 * i + 1:
                    raise _Killed
                return r
            return w

        os.rename, os.replace, shutil.rmtree = (wrap(real[k]) for k in ("rename", "replace", "rmtree"))
        try:
            tr.save_checkpoint()
            return True
        except _Killed:
            return False
        finally:
            os.rename, os.replace, shutil.rmtree = real["rename"], real["replace"], real["rmtree"]

    def state(log):
        ckpt = find_checkpoint(run, log=log.append)  # raises when nothing is resumable
        return ckpt.name, int(load_file(ckpt / "trainer_state.pt")["step"]), (run / LATEST).read_text().strip()

    out["new"], out["resave"] = [], []
    for scenario in ("new", "resave"):
        k = 0
        while True:
            if scenario == "new":  # iteration 2 not saved yet
                for d in run.glob("iter_0000002*"):
                    shutil.rmtree(d)
                (run / LATEST).write_text("1\n")
            log = []
            done = attempt(k)
            out[scenario].append((k, done, *state(log), log))
            if done:
                break
            if scenario == "resave":
                tr.save_checkpoint()  # the relaunched run saves again: debris is tidied
                out[scenario][-1] += (listing(),)
            k += 1
    out["end"] = listing()
    tr.close()
    return out


def test_crash_at_every_step_of_a_save_keeps_a_resumable_checkpoint(tiny_model_dir, tmp_path):
    """A new iteration and a re-save of one (a resumed finished run, SIGTERM right after an
    interval save): a crash before or after each step that touches the run directory always
    leaves ``latest`` resolvable to a complete checkpoint of that iteration or the one before.
    A full disk leaves the previous checkpoint named and no partial directory."""
    run = tmp_path / "run"
    r = run_ranks(_crash_worker, 1, str(tiny_model_dir("llama")), str(run))[0]
    intact = ["1", ["iter_0000001"]]
    assert r["shards"] == (f"could not save checkpoint {run}/iter_0000002 (interval): cannot write the model checkpoint "
                           f"{run}/iter_0000002.tmp/model: RuntimeError: Worker failure: [Errno 28] No space left on "
                           "device; iteration 1, the "
                           "previous checkpoint, is intact")
    assert r["state"] == (f"could not save checkpoint {run}/iter_0000002 (interval): PytorchStreamWriter failed "
                          "writing file data/0: file write failed; iteration 1, the previous checkpoint, is intact")
    assert list(r["shards_after"]) == intact and list(r["state_after"]) == intact
    new, resave = r["new"], r["resave"]
    assert len(new) == 7 and len(resave) == 9  # 3 and 4 steps, each crashed before and after, then no crash
    for k, done, name, step, latest, log in new:
        assert (name, step) == (("iter_0000002", 2) if latest == "2" else ("iter_0000001", 1)), (k, name, latest)
        assert log == []
    assert [row[4] for row in new] == ["1", "1", "1", "2", "2", "2", "2"]  # `latest` switches after the rename
    for k, done, name, step, latest, log, *tidied in resave:
        assert step == 2 and latest == "2", (k, name)
        if name == "iter_0000002.old":  # killed between moving the old copy aside and the new one in
            assert k in (1, 2) and log == [f"{run}/{fc.LATEST} names iteration 2 but {run}/iter_0000002 does not "
                                           f"exist; resuming from {run}/iter_0000002.old instead, the newest "
                                           "checkpoint that verifies"]
        else:
            assert name == "iter_0000002" and log == [], (k, name, log)
        assert all(list(t) == ["2", ["iter_0000001", "iter_0000002"]] for t in tidied)
    assert sum(row[2] == "iter_0000002.old" for row in resave) == 2
    assert list(r["end"]) == ["2", ["iter_0000001", "iter_0000002"]]


def test_every_damaged_file_is_named_and_resume_falls_back(reference, tmp_path, capsys):
    from ophsd.models.checkpoint import MANIFEST, CheckpointError
    from ophsd.train.checkpointing import check_resumable_files, find_checkpoint, load_file

    ckpt = reference / f"iter_{ITERS:07d}"
    injected, detected, failures = fc.check_every_corruption(ckpt, tmp_path, random.Random(0))
    assert failures == [] and injected == detected > 60  # ~25 files x truncate/flip/delete
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = run / "iter_0000003" / "trainer_state.pt"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        check_resumable_files(run / "iter_0000003")
    assert str(e.value) == (f"checkpoint {run}/iter_0000003 is damaged: {state}: 100 bytes, the manifest says "
                            f"{size} (truncated or incomplete)")
    # `latest` naming an iteration that is gone: the newest older one that verifies, said once
    shutil.rmtree(run / "iter_0000003")
    log = []
    assert find_checkpoint(run, log=log.append) == run / "iter_0000002"
    assert log == [f"{run}/{fc.LATEST} names iteration 3 but {run}/iter_0000003 does not exist; resuming from "
                   f"{run}/iter_0000002 instead, the newest checkpoint that verifies"]
    (run / "iter_0000002" / "rng" / "rank00000.pt").write_bytes(b"")
    (run / "iter_0000001" / "optimizer" / "common.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        find_checkpoint(run)
    assert str(e.value) == (f"--load {run}: no checkpoint to resume: {run}/{fc.LATEST} names iteration 3 but "
                            f"{run}/iter_0000003 does not exist; 2 older checkpoints are damaged too")
    # an older ophsd's checkpoint (no manifest) loads with a warning; a damaged file is still one line
    (run / "iter_0000002" / MANIFEST).unlink()
    capsys.readouterr()
    assert find_checkpoint(run) == run / "iter_0000002"
    assert f"{run}/iter_0000002 has no {MANIFEST} (written by an older ophsd)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"^\S+/rng/rank00000.pt: unreadable \(EOFError: .*\)$"):
        load_file(run / "iter_0000002" / "rng" / "rank00000.pt")
    (run / fc.LATEST).write_text("garbage")
    log = []
    assert find_checkpoint(run, log=log.append) == run / "iter_0000002"
    assert log[0].startswith(f"{run}/{fc.LATEST} is unreadable; resuming from {run}/iter_0000002 instead")


def _convert(*argv):
    sys.path.insert(0, str(REPO / "tools"))
    import convert_hf

    return convert_hf.main([str(a) for a in argv])


def test_convert_errors_are_one_line(reference, tiny_model_dir, tmp_path, capsys):
    """export of a damaged directory fails before writing anything; import onto a path that cannot
    be created or from a 100-byte GGUF: exit 2, one line, no traceback, no partial output."""
    meg = tmp_path / "meg"
    shutil.copytree(reference / f"iter_{ITERS:07d}", meg)
    shard = meg / "model" / "__0_1.distcp"
    fc.corrupt(shard, "flip", random.Random(1))
    assert _convert("export", "--megatron-dir", meg, "--output", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err == (f"convert_hf.py export: error: checkpoint {meg} is damaged: {shard}: contents do not match the "
                   "manifest's sha256 (corrupted)\n")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()
    (tmp_path / "afile").write_text("x")
    ro = Path("/sys/ophsd-test-output") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        ro.parent.mkdir()
        ro.parent.chmod(0o555)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(96)))
    hf = tiny_model_dir("llama")
    for argv, msg in [
        (["--hf-dir", hf, "--output", tmp_path / "afile" / "out"],
         f"--output {tmp_path}/afile/out: cannot create {tmp_path}/afile/out.partial: Not a directory"),
        (["--hf-dir", hf, "--output", ro], f"--output {ro}: cannot create {ro}.partial: "),
        (["--gguf", gguf, "--output", tmp_path / "g"], f"{gguf}"),
    ]:
        assert _convert("import", *argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"convert_hf.py import: error: {msg}") and err.count("\n") == 1, err
        assert "Traceback" not in err


@pytest.mark.slow
def test_random_kills_lose_nothing(tmp_path):
    """>= 20 kill -9 at random moments (seeded), every file kind corrupted: the suite's figures."""
    args = argparse.Namespace(kills=20, seed=0, train_iters=4, workdir=str(tmp_path))
    f = fc.run(args)
    assert f["failures"] == []
    assert f["kills"] == f["survived"] == 20 and f["orphans"] == 0
    assert f["corruptions_detected"] == f["corruptions_injected"] > 60
    assert f["runs_identical"] == f["runs_finished"] >= 1 and f["fallback_resumes"] == 1
