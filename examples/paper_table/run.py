#!/usr/bin/env python
"""The paper's comparison in one command: every (task, method, seed) as an ordinary trainer run,
then the table.

    bash examples/paper_table/run.sh                      # --budget cpu, banking77 + arith, seeds 0 1 2
    bash examples/paper_table/run.sh --budget gpu         # one H100/H200
    bash examples/paper_table/run.sh --dry-run            # print the commands, run nothing
    bash examples/paper_table/run.sh --tasks banking77 --methods base opsd ophsd --seeds 0

Each run is ``python -m ophsd.train ... --save RUNS_ROOT/<task>/<method>/seed<k>`` (one process).
A run whose ``metrics.jsonl`` has its final ("after") eval row is skipped; one with
``latest_checkpointed_iteration.txt`` is resumed with ``--load`` on the same directory (the
trainer restores weights, optimizer, scheduler, data position, RNG and memory bank, and appends
to ``metrics.jsonl``); one that died before its first checkpoint starts again (its partial
``metrics.jsonl`` is kept aside as ``metrics.jsonl.stale-<time>``). Ctrl-C (or SIGTERM) asks
every running trainer to finish its step and checkpoint; run the same command again to continue.

Rows ``base``, ``base+harness`` and ``ophsd+harness`` need no runs of their own: they are the
trainer's "before" evaluation (step 0: the untrained model, standalone and harness-attached) and
the OPHSD run's "after" harness-attached evaluation. The table is rebuilt at the end by
``build_table.py`` from the run directories alone.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import build_table as bt  # noqa: E402

SHARED_DATA = Path(os.environ.get("OPHSD_SHARED_DATA", REPO.parent / "shared" / "data"))
LATEST = "latest_checkpointed_iteration.txt"

# ================================================================================== the knobs
# Learning rate per budget (a preset's own ``lr`` wins): the one knob most worth sweeping (for the
# 135M model the design notes put it well above 1e-6: 1e-5..1e-4). `--lr X` overrides both (and
# writes to a separate runs root).
LEARNING_RATE = {"cpu": 5e-5, "gpu": 3e-5}

# Trainer flags per budget and task (names as in `python -m ophsd.train --help`, dashes as
# underscores; True = a bare switch). The learning rate comes from LEARNING_RATE.
#   cpu: a 2-core CPU machine. BANKING77: 12 steps x 8 prompts x 2 samples (192 on-policy samples,
#        ~60 s/step expected), answers cut at 24 tokens (the task's own eval budget: a label is
#        ~5-10 tokens), 300 held-out messages evaluated before and after. The evaluations, not
#        the steps, dominate: see README.md for the time estimate.
#   gpu: one H100/H200, all runs of a task concurrently (--jobs); bf16, larger packed micro-batches.
PRESETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "banking77": dict(train_iters=12, rollout_batch_size=8, n_samples_per_prompt=2, micro_batch_size=4,
                          max_prompt_length=1024, max_response_length=24, eval_limit=300, eval_interval=0,
                          save_interval=4, lr_warmup_iters=0, lr_decay_style="constant"),
        "arith": dict(train_iters=10, rollout_batch_size=4, n_samples_per_prompt=2, micro_batch_size=4,
                      max_prompt_length=1024, max_response_length=128, plan_tokens=128, eval_limit=100,
                      eval_interval=0, save_interval=5, lr_warmup_iters=0, lr_decay_style="constant"),
        "gsm8k": dict(train_iters=10, rollout_batch_size=4, n_samples_per_prompt=2, micro_batch_size=4,
                      max_prompt_length=1024, max_response_length=192, plan_tokens=128, eval_limit=100,
                      eval_interval=0, save_interval=5, lr_warmup_iters=0, lr_decay_style="constant"),
    },
    "gpu": {
        # BANKING77 on a GPU takes what the CPU ablations found (examples/paper_table/RESULTS.md): the
        # intent list in the harness prompts (+10 points at equal steps), lr 1e-4, and a WSD decay to
        # 0 over the last third (+5 points on 2 seeds). 30 x 32 x 2 = 1,920 samples, the CPU's
        # 120-step run. OPSD's harness takes no label list (run_config drops it).
        "banking77": dict(train_iters=30, rollout_batch_size=32, n_samples_per_prompt=2, micro_batch_size=16,
                          max_prompt_length=2048, max_response_length=24, eval_limit=500, eval_interval=10,
                          save_interval=10, lr_warmup_iters=0, lr=1e-4, lr_decay_style="WSD",
                          lr_wsd_decay_iters=10, harness_label_list=True, bf16=True,
                          max_tokens_per_micro_batch=16384),
        "arith": dict(train_iters=20, rollout_batch_size=16, n_samples_per_prompt=2, micro_batch_size=8,
                      max_prompt_length=1024, max_response_length=192, plan_tokens=192, eval_limit=200,
                      eval_interval=10, save_interval=10, lr_warmup_iters=0, lr_decay_style="constant", bf16=True,
                      max_tokens_per_micro_batch=16384),
        "gsm8k": dict(train_iters=20, rollout_batch_size=16, n_samples_per_prompt=2, micro_batch_size=8,
                      max_prompt_length=1024, max_response_length=256, plan_tokens=192, eval_limit=200,
                      eval_interval=10, save_interval=10, lr_warmup_iters=0, lr_decay_style="constant", bf16=True,
                      max_tokens_per_micro_batch=16384),
    },
}
JOBS = {"cpu": 1, "gpu": 9}  # trainer processes at once

# Tasks: the harness that is the OPHSD teacher, and the data file under ../shared/data (none:
# generated). A dev split of DEV_SIZE is carved once (ophsd.tasks.split_dev, seeded random); the
# evaluation set is a seeded sample of it (stratified by label for classification), written to a
# file of exactly --eval-limit rows so every method and seed evaluates the same examples.
TASKS = {
    "banking77": {"harness": "draft_verify", "data": "banking77/train.csv"},
    "arith": {"harness": "plan_solve", "data": None},
    "gsm8k": {"harness": "plan_solve", "data": "gsm8k/train.jsonl"},
}
DEFAULT_TASKS = ("banking77", "arith")
DEV_SIZE, SPLIT_SEED, EVAL_SAMPLE_SEED = 500, 0, 0

# Methods that are runs of their own, as flags on top of the preset.
# The untrained model is evaluated once, by one run (``base_eval_run``: the lowest requested seed of
# the first method in BASE_EVAL_METHODS that is run); its "before" row gives base and base+harness.
# That evaluation is greedy decoding of the same initial weights on the same examples and bank: the
# seed does not enter it, so every other run skips it (``--skip-eval-before``, ~17 min of a 2-core
# CPU per BANKING77 run) and the table reports the base rows as deterministic.
METHOD_FLAGS = {
    "ophsd": dict(objective="distill", divergence="reverse_kl", teacher="initial"),
    "ophsd_jsd": dict(objective="distill", divergence="jsd", beta=0.5, teacher="initial"),
    "opsd": dict(objective="distill", harness="opsd", divergence="reverse_kl", teacher="initial"),
    # One target per prompt (the harness's final response): one sample per prompt.
    "offpolicy_sft": dict(objective="offpolicy", n_samples_per_prompt=1),
}
# Which run evaluates the untrained model: the first of these that is run (opsd's harness holds the
# ground truth, so its before-eval gives base but not base+harness).
BASE_EVAL_METHODS = ("ophsd", "offpolicy_sft", "ophsd_jsd", "opsd")
# Flags that do not change what a run trains: a run started with another value is still resumed.
NOT_TRAINING_FLAGS = ("skip_eval_before", "eval_batch_size")
# =============================================================================================


@dataclass
class Planned:
    task: str
    method: str
    seed: int
    run_dir: Path
    config: dict
    argv: list[str]
    state: str  # finished | resume | restart | fresh
    resume_step: int | None = None
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"


class PlanError(RuntimeError):
    pass


def default_runs_root(budget: str, lr: float | None = None) -> Path:
    """In the repository: the small files of every run (metrics.jsonl, args, the run record,
    report) are tracked, so a finished run is skipped and its numbers kept by the next clone;
    checkpoints, TensorBoard logs, per-example files and the data split are git-ignored
    (``runs/.gitignore``)."""
    name = budget if lr is None else f"{budget}-lr{lr:g}"
    return HERE / "runs" / name


def run_methods_for(rows) -> list[str]:
    """The trained runs the requested rows need (base rows: the first trained run requested that
    has a before-eval with that metric, else ophsd)."""
    rows = list(rows)
    wanted = [r for r in rows if bt.ROWS[r]["tag"] == "after"]
    direct = list(dict.fromkeys(bt.ROWS[r]["run"][0] for r in wanted))
    for r in rows:
        if bt.ROWS[r]["tag"] == "before" and not any(m in direct for m in bt.ROWS[r]["run"]):
            direct.append(bt.ROWS[r]["run"][0])
    order = list(METHOD_FLAGS)
    return sorted(direct, key=order.index)


def base_eval_run(methods, seeds) -> tuple[str, int] | None:
    """(method, seed) of the one run whose "before" eval gives the base rows."""
    m = next((m for m in BASE_EVAL_METHODS if m in methods), None)
    return (m, min(seeds)) if m is not None and seeds else None


def run_config(budget: str, task: str, method: str, seed: int, lr: float | None = None,
               model: str | None = None, extra=(), eval_before: bool | None = None) -> dict:
    """The trainer flags of one run, without paths (what must not change on resume).

    ``eval_before``: whether this run evaluates the untrained model (``plan`` decides, see
    ``base_eval_run``; None leaves the trainer's default)."""
    if task not in PRESETS[budget]:
        raise PlanError(f"no {budget} preset for task {task!r}; known: {', '.join(PRESETS[budget])}")
    preset = PRESETS[budget][task]
    cfg = {"task": task, "harness": TASKS[task]["harness"], "seed": seed, **preset,
           "lr": preset.get("lr", LEARNING_RATE[budget]) if lr is None else lr, **METHOD_FLAGS[method]}
    if cfg["harness"] != "draft_verify":  # a draft-verify option: OPSD's harness has no label list
        cfg.pop("harness_label_list", None)
    if eval_before is not None:
        cfg["skip_eval_before"] = not eval_before
    if model:
        cfg["model"] = model
    rest = fold_flags(cfg, extra)
    if rest:
        cfg["extra_args"] = rest
    return cfg


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fold_flags(cfg: dict, extra) -> list[str]:
    """Fold the trainer flags after ``--`` into ``cfg`` (``--train-iters 36`` sets ``train_iters``,
    a bare ``--skip-eval-before`` sets True, ``--pass-ks 1 4`` a list), so that what they change is what the run's state,
    data files and resume check see (``-- --train-iters 36`` used to leave the preset's 12 there:
    a 36-step run counted as finished at step 12). Returns what is not ``--flag [value]``."""
    toks, rest, i = [str(t) for t in extra], [], 0
    while i < len(toks):
        t = toks[i]
        if not t.startswith("--") or t == "--":
            rest.append(t)
            i += 1
            continue
        key, eq, val = t[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            cfg[key], i = _value(val), i + 1
        else:
            j = i + 1
            while j < len(toks) and not toks[j].startswith("--"):
                j += 1
            vals = [_value(v) for v in toks[i + 1: j]]
            cfg[key] = True if not vals else vals[0] if len(vals) == 1 else vals  # several: nargs="+"
            i = j
    return rest


def flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        if k == "extra_args" or v is None or v is False:
            continue
        out.append("--" + k.replace("_", "-"))
        if isinstance(v, list):
            out.extend(map(str, v))
        elif v is not True:
            out.append(str(v))
    return out


def data_paths(runs_root: Path, task: str, n_eval: int) -> dict:
    """Where prepare_data puts the task's files (deterministic; nothing is written here)."""
    src = TASKS[task]["data"]
    if src is None:
        return {}
    d = Path(runs_root) / "data" / task
    suffix = Path(src).suffix
    return {"dir": d, "source": SHARED_DATA / src, "train": d / f"train{suffix}",
            "eval": d / f"eval-{n_eval}{suffix}", "manifest": d / "split.json"}


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / bt.RECORD).read_text())
    except (OSError, ValueError):
        return {}


def run_state(run_dir: Path, train_iters: int) -> tuple[str, int | None]:
    """finished (final eval row present) | resume (a checkpoint) | restart (partial, no checkpoint) | fresh."""
    run_dir = Path(run_dir)
    info = bt.read_run(run_dir)
    if info["after"] is not None and int(info["after"]["step"]) >= train_iters:
        return "finished", None
    latest = run_dir / LATEST
    if latest.is_file():
        try:
            return "resume", int(latest.read_text().strip())
        except ValueError:
            pass
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "restart", None
    return "fresh", None


def plan(budget: str = "cpu", tasks=DEFAULT_TASKS, rows=bt.DEFAULT_ROWS, seeds=(0, 1, 2),
         runs_root: Path | None = None, lr: float | None = None, model: str | None = None,
         extra=(), python: str | None = None, check_config: bool = True) -> list[Planned]:
    """Every run the table needs, with its trainer argv and its state on disk (nothing is written)."""
    runs_root = Path(runs_root or default_runs_root(budget, lr)).resolve()
    python = python or sys.executable
    out = []
    for task in tasks:
        if task not in TASKS:
            raise PlanError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        methods = run_methods_for(rows)
        base_run = base_eval_run(methods, seeds)
        # Seed-major: every method of seed 0 first, so a partial table already compares methods.
        for seed in seeds:
            for method in methods:
                cfg = run_config(budget, task, method, seed, lr, model, extra,
                                 eval_before=(method, seed) == base_run)
                run_dir = runs_root / task / method / f"seed{seed}"
                paths = data_paths(runs_root, task, cfg["eval_limit"])
                files = []
                if paths:
                    files = ["--data", str(paths["train"]), "--eval-data", str(paths["eval"])]
                    if cfg["harness"] == "draft_verify":
                        files += ["--bank-data", str(paths["train"])]  # the bank: the training part
                state, step = run_state(run_dir, cfg["train_iters"])
                if check_config and state != "fresh":
                    rec = read_record(run_dir)
                    diff = sorted(k for k in set(rec.get("config") or {}) | set(cfg)
                                  if k not in NOT_TRAINING_FLAGS and _norm(rec["config"].get(k)) != _norm(cfg.get(k))
                                  and not _extends(rec["config"], cfg, k)
                                  ) if rec.get("config") is not None else []
                    if diff:
                        raise PlanError(
                            f"{run_dir} was run with other flags ({', '.join(diff)}: "
                            + "; ".join(f"{k} {rec['config'].get(k)!r} -> {cfg.get(k)!r}" for k in diff)
                            + "); use another --runs-root, or delete that directory")
                argv = [python, "-m", "ophsd.train", *flags(cfg),
                        *files, "--save", str(run_dir)]
                if state == "resume":
                    argv += ["--load", str(run_dir)]
                argv += list(cfg.get("extra_args", []))  # last: they win
                out.append(Planned(task, method, seed, run_dir, cfg, argv, state, step, paths))
    return out


def _norm(x):
    return json.dumps(x, sort_keys=True)


# What a resumed run may change when it asks the trainer for --override-opt-param-scheduler: the
# learning-rate schedule from the checkpoint's step on (e.g. a WSD decay after a constant-lr run).
SCHEDULE_KEYS = ("lr_decay_style", "lr_wsd_decay_iters", "lr_wsd_decay_style", "min_lr",
                 "override_opt_param_scheduler")


def _extends(old: dict, new: dict, key: str) -> bool:
    """More steps of a constant-learning-rate run are the same run, longer (its schedule up to the
    old last step does not depend on --train-iters): resumed, not refused. A decaying schedule is not,
    unless the new flags say --override-opt-param-scheduler: then the run continues on the new
    schedule from its checkpoint (the trainer logs the change; the record keeps both attempts)."""
    longer = isinstance(old.get("train_iters"), int) and isinstance(new.get("train_iters"), int) \
        and new["train_iters"] > old["train_iters"]
    if new.get("override_opt_param_scheduler") is True:
        return key in SCHEDULE_KEYS or (key == "train_iters" and longer)
    return key == "train_iters" and old.get("lr_decay_style") == new.get("lr_decay_style") == "constant" and longer


# ----------------------------------------------------------------------------- data

def split_description(task: str, n_eval: int, n_train: int | None = None, source: Path | None = None) -> str:
    if TASKS[task]["data"] is None:
        return (f"{n_eval} problems of the {task} dev stream (generator seed 0, as the trainer picks "
                f"--eval-limit {n_eval}); training draws the train stream (disjoint generator keys)")
    bank = " and memory bank" if TASKS[task]["harness"] == "draft_verify" else ""
    rest = f"the other {n_train} rows" if n_train is not None else "the rest"
    how = "stratified by label, " if TASKS[task]["harness"] == "draft_verify" else ""
    return (f"{n_eval} examples sampled ({how}seed {EVAL_SAMPLE_SEED}) from a {DEV_SIZE}-example dev split "
            f"carved from {Path(source).name if source else TASKS[task]['data']} (random, seed {SPLIT_SEED}); "
            f"training stream{bank}: {rest}")


def prepare_data(runs_root: Path, task: str, n_eval: int, source: Path | None = None) -> dict:
    """Write the task's training part and evaluation sample under RUNS_ROOT/data/<task>/ (once)."""
    paths = data_paths(runs_root, task, n_eval)
    if not paths:
        return {"split": split_description(task, n_eval)}
    src = Path(source or paths["source"])
    if not src.is_file():
        raise PlanError(f"{task}: data file {src} not found (set OPHSD_SHARED_DATA to the directory holding "
                        f"{TASKS[task]['data']})")
    want = {"source": str(src.resolve()), "source_bytes": src.stat().st_size, "dev_size": DEV_SIZE,
            "split_seed": SPLIT_SEED}
    man = {}
    if paths["manifest"].is_file():
        man = json.loads(paths["manifest"].read_text())
        if {k: man.get(k) for k in want} != want:
            raise PlanError(f"{paths['dir']} was prepared from other data ({man.get('source')}, "
                            f"{man.get('source_bytes')} bytes); delete it to re-split")
    if paths["train"].is_file() and paths["eval"].is_file() and str(n_eval) in man.get("eval_files", {}):
        return {**paths, "split": man["eval_files"][str(n_eval)]}
    from ophsd.tasks import get_task, split_dev

    t = get_task(task)
    data = t.load(str(src))
    train, dev = split_dev(data, DEV_SIZE, SPLIT_SEED)
    if n_eval > len(dev):
        raise PlanError(f"{task}: --eval-limit {n_eval} exceeds the {len(dev)}-example dev split")
    pick = eval_sample(dev, n_eval, EVAL_SAMPLE_SEED, stratified=getattr(t, "kind", None) == "classification")
    paths["dir"].mkdir(parents=True, exist_ok=True)
    if src.suffix == ".csv":
        beside = src.parent / "categories.json"
        if beside.is_file():  # banking77 reads its label order from here
            shutil.copyfile(beside, paths["dir"] / "categories.json")
    _write_examples(paths["train"], src, train)
    _write_examples(paths["eval"], src, [dev[i] for i in pick])
    desc = split_description(task, n_eval, len(train), src)
    man = {**want, "source_rows": len(data), "train_rows": len(train),
           "eval_files": {**man.get("eval_files", {}), str(n_eval): desc}, "eval_sample_seed": EVAL_SAMPLE_SEED}
    bt._atomic_write(paths["manifest"], json.dumps(man, indent=2) + "\n")
    return {**paths, "split": desc}


def eval_sample(examples, n: int, seed: int, stratified: bool) -> list[int]:
    """Indices of a seeded sample of ``n`` examples (file order). Stratified: round-robin over the
    labels in a seeded order, each label's examples in a seeded order, so every label appears once
    before any appears twice (300 BANKING77 messages cover all 77 intents when the dev split does)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if not stratified:
        return sorted(order[:n])
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(json.dumps(examples[i].answer, sort_keys=True), []).append(i)
    labels = sorted(groups)
    rng.shuffle(labels)
    out, r = [], 0
    while len(out) < min(n, len(examples)):
        for lab in labels:
            if r < len(groups[lab]) and len(out) < n:
                out.append(groups[lab][r])
        r += 1
    return sorted(out)


def _write_examples(path: Path, src: Path, examples) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if src.suffix == ".csv":  # banking77: text,category
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for e in examples:
                w.writerow([e.question, e.answer])
    else:  # JSONL: the source lines themselves (Example.source is "file:line")
        lines = src.read_text(encoding="utf-8").splitlines()
        with open(tmp, "w", encoding="utf-8") as f:
            for e in examples:
                loc = e.source.rsplit(":", 1)[1]
                if not loc.isdigit():
                    raise PlanError(f"{src}: only JSONL (one record per line) can be split here")
                f.write(lines[int(loc) - 1].rstrip("\n") + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running

def machine() -> str:
    from ophsd.runtime.machine import cpu_name

    s = f"{cpu_name()} ({os.cpu_count()} CPUs)"
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=20).stdout.split("\n")
            gpus = [g.strip() for g in gpus if g.strip()]
            if gpus:
                s = f"{gpus[0]} x{len(gpus)} GPU; {s}"
        except (OSError, subprocess.SubprocessError):
            pass
    return s


def _iter_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).glob("iter_*"):
        tail = p.name[5:]
        if p.is_dir() and tail.isdigit():
            out.append((int(tail), p))
    return sorted(out)


def prune_checkpoints(run_dir: Path, keep: str, finished: bool) -> None:
    """keep: all | last (resumable) | model (finished runs: the final weights only) | none.
    Checkpoints older than the latest are never read again and go unless keep == all."""
    run_dir = Path(run_dir)
    if keep == "all":
        return
    latest_file = run_dir / LATEST
    try:
        latest = int(latest_file.read_text().strip())
    except (OSError, ValueError):
        return
    for it, p in _iter_dirs(run_dir):
        if it < latest:
            shutil.rmtree(p, ignore_errors=True)
    if not finished:
        return
    final = run_dir / f"iter_{latest:07d}"
    if keep == "model" and final.is_dir():
        for sub in ("optimizer", "teacher", "rng"):
            shutil.rmtree(final / sub, ignore_errors=True)
    elif keep == "none":
        shutil.rmtree(final, ignore_errors=True)
        latest_file.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_record(p: Planned, rec: dict) -> None:
    p.run_dir.mkdir(parents=True, exist_ok=True)
    bt._atomic_write(p.run_dir / bt.RECORD, json.dumps(rec, indent=2) + "\n")


class Runner:
    def __init__(self, jobs: int, keep: str, stream: bool, budget: str):
        self.jobs, self.keep, self.stream, self.budget = max(1, jobs), keep, stream, budget
        self.running: list[dict] = []
        self.stopping = 0
        self.results: dict[str, str] = {}
        self.machine = machine()

    def _on_signal(self, signum, frame):
        self.stopping += 1
        if self.stopping == 1:
            print(f"\n[paper_table] {signal.Signals(signum).name}: asking {len(self.running)} trainer(s) to checkpoint "
                  "and stop (again to kill); rerun the same command to continue", flush=True)
            sig = signal.SIGTERM
        else:
            sig = signal.SIGKILL
        for r in self.running:
            try:
                os.killpg(r["proc"].pid, sig)
            except ProcessLookupError:
                pass

    def start(self, p: Planned) -> None:
        state, step = run_state(p.run_dir, p.config["train_iters"])
        p.run_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if state == "restart" and (p.run_dir / "metrics.jsonl").is_file():
            (p.run_dir / "metrics.jsonl").rename(p.run_dir / f"metrics.jsonl.stale-{stamp}")
        rec = read_record(p.run_dir)
        rec.update(task=p.task, method=p.method, seed=p.seed, budget=self.budget, config=p.config,
                   split=p.data.get("split"))
        attempt = {"start": _dt.datetime.now().isoformat(timespec="seconds"), "end": None, "elapsed_s": 0.0,
                   "rc": None, "state": state, "resumed_from_step": step, "machine": self.machine,
                   "argv": p.argv}
        rec.setdefault("attempts", []).append(attempt)
        _write_record(p, rec)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        env.pop("RANK", None)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        log = open(p.run_dir / "train.log", "a", encoding="utf-8")
        log.write(f"\n==== {attempt['start']} {state}: {shlex.join(p.argv)}\n")
        log.flush()
        proc = subprocess.Popen(p.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        th = threading.Thread(target=self._pump, args=(proc, log, p.name), daemon=True)
        th.start()
        print(f"[paper_table] start {p.name} ({state}{f' from step {step}' if step else ''}); log {p.run_dir / 'train.log'}",
              flush=True)
        self.running.append({"p": p, "proc": proc, "t0": time.monotonic(), "log": log, "thread": th, "rec": rec,
                             "attempt": attempt, "last_write": time.monotonic()})

    def _pump(self, proc, log, name):
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if self.stream:
                sys.stdout.write(line)
                sys.stdout.flush()

    def _update(self, r: dict, rc=None) -> None:
        a = r["attempt"]
        a["elapsed_s"] = round(time.monotonic() - r["t0"], 1)
        if rc is not None:
            a["rc"], a["end"] = rc, _dt.datetime.now().isoformat(timespec="seconds")
        _write_record(r["p"], r["rec"])

    def finish(self, r: dict, rc: int) -> None:
        r["thread"].join(timeout=30)
        r["log"].close()
        self._update(r, rc)
        p = r["p"]
        state, _ = run_state(p.run_dir, p.config["train_iters"])
        if state == "finished":
            prune_checkpoints(p.run_dir, self.keep, finished=True)
            outcome = "finished"
        elif rc == 0 and self.stopping:
            outcome = "interrupted (checkpointed)"
        else:
            outcome = f"FAILED (exit {rc}; see {p.run_dir / 'train.log'})"
        self.results[p.name] = outcome
        print(f"[paper_table] {p.name}: {outcome} after {r['attempt']['elapsed_s'] / 60:.1f} min", flush=True)

    def run(self, queue: list[Planned]) -> dict[str, str]:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            queue = list(queue)
            while self.running or (queue and not self.stopping):
                while queue and len(self.running) < self.jobs and not self.stopping:
                    self.start(queue.pop(0))
                time.sleep(1.0)
                for r in list(self.running):
                    rc = r["proc"].poll()
                    if rc is None:
                        if time.monotonic() - r["last_write"] > 60:
                            self._update(r)
                            r["last_write"] = time.monotonic()
                            prune_checkpoints(r["p"].run_dir, self.keep, finished=False)
                        continue
                    self.running.remove(r)
                    self.finish(r, rc)
            for p in queue:
                self.results[p.name] = "not started"
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.results


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="examples/paper_table/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Arguments after `--` go to every trainer run last (they win), e.g. `-- --teacher current`.")
    ap.add_argument("--budget", choices=list(PRESETS), default="cpu")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=list(bt.DEFAULT_ROWS), choices=list(bt.ROWS),
                    help="table rows; base, base+harness and ophsd+harness come from the trained runs' evals")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lr", type=float, help="override LEARNING_RATE[budget] (default runs root gets a -lr suffix)")
    ap.add_argument("--runs-root", help="default: examples/paper_table/runs/<budget>[-lr<lr>]")
    ap.add_argument("--out-dir", help="where results.json, RESULTS.md and curves.png go (default: "
                                      "examples/paper_table for the default runs root, else the runs root)")
    ap.add_argument("--jobs", type=int, help="trainer processes at once (default: 1 on cpu, 9 on gpu)")
    ap.add_argument("--model", help="base model for every run (trainer --model; default: the trainer's)")
    ap.add_argument("--keep-checkpoints", choices=["all", "last", "model", "none"], default="model",
                    help="what a finished run keeps: all checkpoints, the last (resumable), the final model "
                         "weights only, or none (metrics and report always stay)")
    ap.add_argument("--dry-run", action="store_true", help="print each run's state and command; run nothing")
    ap.add_argument("--no-table", action="store_true", help="do not rebuild the table at the end")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    custom_root = a.runs_root is not None or a.lr is not None
    runs_root = Path(a.runs_root).resolve() if a.runs_root else default_runs_root(a.budget, a.lr)
    out_dir = Path(a.out_dir) if a.out_dir else (runs_root if custom_root else HERE)
    try:
        planned = plan(a.budget, a.tasks, a.methods, a.seeds, runs_root, a.lr, a.model, extra)
    except PlanError as e:
        print(f"paper_table: error: {e}", file=sys.stderr)
        return 2
    todo = [p for p in planned if p.state != "finished"]
    derived = [r for r in a.methods if r not in METHOD_FLAGS]
    print(f"[paper_table] budget {a.budget}, runs root {runs_root}: {len(planned)} runs "
          f"({len(planned) - len(todo)} finished, {len(todo)} to run; jobs {a.jobs or JOBS[a.budget]})")
    if derived:
        print(f"[paper_table] rows read from the trained runs' evaluations: {', '.join(derived)}")
    if a.dry_run:
        for p in planned:
            print(f"# {p.name}: {p.state}{f' (from step {p.resume_step})' if p.resume_step else ''}")
            if p.state != "finished":
                print(shlex.join(p.argv))
        for task in a.tasks:
            d = data_paths(runs_root, task, PRESETS[a.budget][task]["eval_limit"])
            if d:
                print(f"# data for {task}: {d['train']} and {d['eval']} (written from {d['source']} before the first run)")
        return 0
    try:
        splits = {}
        for task in a.tasks:
            splits[task] = prepare_data(runs_root, task, PRESETS[a.budget][task]["eval_limit"])
    except PlanError as e:
        print(f"paper_table: error: {e}", file=sys.stderr)
        return 2
    for p in planned:
        p.data = splits[p.task]
    for task in a.tasks:
        bt.record_requested(runs_root / task, a.methods, a.seeds)
    results = Runner(a.jobs or JOBS[a.budget], a.keep_checkpoints, stream=(a.jobs or JOBS[a.budget]) == 1,
                     budget=a.budget).run(todo)
    rc = 0
    bad = {k: v for k, v in results.items() if v != "finished"}
    if bad:
        print("[paper_table] not finished: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
        rc = 1
    if not a.no_table:
        bt.build(runs_root, out_dir, a.tasks, a.methods, a.seeds)
    return rc


if __name__ == "__main__":
    sys.exit(main())
