"""examples/paper_table: the table builder (from fixture run directories written in the trainer's
metrics format) and run.py's command construction, resume/skip logic, data split and runner."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PT = REPO / "examples" / "paper_table"


def _load(name):
    if str(PT) not in sys.path:
        sys.path.insert(0, str(PT))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bt = _load("build_table")
R = _load("run")


# ----------------------------------------------------------------------------- fixtures

def _args_json(run_dir: Path, **flags) -> dict:
    """args.json exactly as the trainer writes it: vars() of its own parser's namespace."""
    from ophsd.train.config import build_parser

    argv = []
    for k, v in flags.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = build_parser().parse_args(argv + ["--save", str(run_dir)])
    return vars(args)


def _train_row(step: int, time_step: float = 60.0, pairs: int = 16) -> dict:
    # The keys Trainer.train_step / Updater.train / Collector.rollout produce (after log_metrics' scalar filter).
    return {"loss": 0.5 / step, "divergence/reverse_kl": 0.5 / step, "tokens": 400, "tokens_weighted": 400.0,
            "time/teacher_forward": 3.0, "time/student_fwd_bwd": 9.0, "grad_norm": 1.2, "lr": 5e-5,
            "time/sync": 0.5, "skipped/empty_response": 0, "skipped/too_long": 0, "pairs_kept": pairs,
            "pairs_total": pairs, "time/rollout": 20.0, "time/harness": 25.0, "harness/mode/full": 8,
            "reward/student": 0.0, "reward/harness": 0.9, "time/step": time_step,
            "tokens_per_s": 400 / time_step, "step": step, "total/skipped/too_long": 0}


def _eval_row(step: int, tag: str, sa: float, ha: float | None, n: int) -> dict:
    # Trainer.evaluate's row.
    row = {"step": step, "tag": tag, "eval/standalone_accuracy": sa, "eval/n": n}
    if ha is not None:
        row["eval/harness_accuracy"] = ha
    row["eval/probe_divergence"] = 0.61
    return row


def write_run(run_dir: Path, *, before=(0.01, 0.89), after=None, steps=12, upto=None, rollout=8, n_samples=2,
              n_eval=300, time_step=60.0, elapsed=None, machine=None, split=None, harness=True, extra_rows=()):
    """A run directory as the trainer leaves it: metrics.jsonl (+ args.json, + run.py's record)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [_eval_row(0, "before", before[0], before[1] if harness else None, n_eval)]
    last = steps if after is not None else (upto or 0)
    rows += [_train_row(s, time_step) for s in range(1, last + 1)]
    rows += list(extra_rows)
    if after is not None:
        rows.append(_eval_row(steps, "after", after[0], after[1] if harness else None, n_eval))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "args.json").write_text(json.dumps(_args_json(
        run_dir, train_iters=steps, rollout_batch_size=rollout, n_samples_per_prompt=n_samples,
        micro_batch_size=min(4, rollout * n_samples), eval_limit=n_eval, lr=5e-5), indent=2))
    if elapsed is not None or split is not None:
        rec = {"task": "banking77", "method": run_dir.parent.name, "seed": int(run_dir.name[4:]), "budget": "cpu",
               "config": {}, "split": split,
               "attempts": [{"elapsed_s": e, "machine": machine, "rc": 0} for e in elapsed or []]}
        (run_dir / bt.RECORD).write_text(json.dumps(rec))
    return run_dir


SPLIT = "300 examples sampled (seed 0) from the 500-example dev split of train.csv"


@pytest.fixture()
def table_root(tmp_path):
    root = tmp_path / "runs"
    b = root / "banking77"
    for s, (sa, ha) in enumerate([(0.40, 0.88), (0.50, 0.90), (0.45, 0.86)]):
        write_run(b / "ophsd" / f"seed{s}", after=(sa, ha),
                  elapsed=[1000.0, 500.5] if s == 0 else None, machine="Test CPU @ 2GHz (2 CPUs)", split=SPLIT)
    write_run(b / "opsd" / "seed0", after=(0.10, None), harness=False, split=SPLIT)
    write_run(b / "opsd" / "seed1", after=(0.20, None), harness=False, split=SPLIT)
    write_run(b / "opsd" / "seed2", upto=5, harness=False, split=SPLIT)  # interrupted at step 5
    write_run(b / "offpolicy_sft" / "seed0", after=(0.05, 0.87), n_samples=1, split=SPLIT)
    return root


# ----------------------------------------------------------------------------- builder

def test_trainer_report_reads_the_fixture_format(table_root):
    """The fixture rows are what the trainer's own report understands (same keys)."""
    from ophsd.train.report import write_report

    text = write_report(table_root / "banking77" / "ophsd" / "seed0").read_text()
    assert "| after | 12 | 40.0% | 88.0% | 300 |" in text


def test_builder_values(table_root, tmp_path):
    out = tmp_path / "out"
    res = bt.build(table_root, out, seeds=[0, 1, 2])
    t = res["tasks"]["banking77"]
    m = t["methods"]

    o = m["ophsd"]
    assert o["accuracies"] == [0.40, 0.50, 0.45]
    assert o["mean"] == pytest.approx(0.45)
    assert o["std"] == pytest.approx(math.sqrt(((0.40 - 0.45) ** 2 + (0.50 - 0.45) ** 2 + 0) / 2))  # = 0.05
    assert o["n_seeds"] == 3 and o["missing_seeds"] == []
    assert o["n"] == 300 and o["steps"] == 12
    assert o["samples_seen"] == 12 * 8 * 2
    s0, s1 = o["per_seed"][0], o["per_seed"][1]
    assert s0["wall_time_s"] == pytest.approx(1500.5) and s0["wall_time_source"].startswith("run.py")
    assert s1["wall_time_s"] == pytest.approx(12 * 60.0) and "time/step" in s1["wall_time_source"]
    assert s0["machine"] == "Test CPU @ 2GHz (2 CPUs)" and s1["machine"] is None
    assert s0["pairs_trained"] == 12 * 16 and s0["train_time_s"] == pytest.approx(720.0)
    assert o["split"] == SPLIT and t["split"] == SPLIT
    # Without run.py's record (a run made by hand) the split is told from the trainer's args.json.
    a = {"eval_data": "/x/eval-300.csv", "eval_limit": 300, "data": "/x/train.csv", "seed": 0}
    assert bt._split({"record": {}, "args": a}, "banking77") == "--eval-data eval-300.csv (--eval-limit 300)"
    a = {"eval_data": None, "eval_limit": 16, "data": "/x/train.csv", "seed": 3}
    assert bt._split({"record": {}, "args": a}, "banking77") == "dev split of --eval-limit 16 carved from train.csv with --seed 3"

    h = m["ophsd+harness"]
    assert h["accuracies"] == [0.88, 0.90, 0.86]
    assert h["std"] == pytest.approx(math.sqrt((0 + 0.02 ** 2 + 0.02 ** 2) / 2))
    assert h["steps"] == 12

    base, bh = m["base"], m["base+harness"]
    assert base["accuracies"] == [0.01] * 3 and base["std"] == 0.0 and base["steps"] == 0
    assert base["samples_seen"] == 0
    assert [e["source_run"] for e in base["per_seed"]] == [f"banking77/ophsd/seed{s}" for s in range(3)]
    assert bh["mean"] == pytest.approx(0.89)

    p = m["opsd"]
    assert p["n_seeds"] == 2 and p["missing_seeds"] == [2]
    assert p["mean"] == pytest.approx(0.15) and p["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    inc = p["per_seed"][2]
    assert inc["status"] == "incomplete" and inc["accuracy"] is None and inc["last_step"] == 5

    f = m["offpolicy_sft"]
    assert f["n_seeds"] == 1 and f["std"] is None and f["missing_seeds"] == [1, 2]
    assert [e["status"] for e in f["per_seed"]] == ["finished", "missing", "missing"]
    assert f["samples_seen"] == 12 * 8 * 1

    # JSON on disk: the schema, and missing cells are null, never 0.
    js = json.loads((out / "results.json").read_text())
    assert js["schema"] == "ophsd-paper-table/1"
    assert list(js["tasks"]["banking77"]["methods"]) == list(bt.DEFAULT_ROWS)
    for row in js["tasks"]["banking77"]["methods"].values():
        for k in ("accuracies", "mean", "std", "n_seeds", "seeds_requested", "missing_seeds", "n", "split",
                  "steps", "samples_seen", "wall_time_s", "machine", "per_seed"):
            assert k in row
        for e in row["per_seed"]:
            assert {"seed", "status", "accuracy"} <= set(e)
            if e["status"] != "finished":
                assert e["accuracy"] is None
            else:
                assert {"n", "split", "steps", "samples_seen", "wall_time_s", "machine"} <= set(e)
    assert js["tasks"]["banking77"]["methods"]["offpolicy_sft"]["per_seed"][1]["accuracy"] is None

    md = (out / "RESULTS.md").read_text()
    assert "| ophsd | 45.0 ± 5.0 | 3/3 |" in md
    assert "| opsd | 15.0 ± 7.1 | 2/3 | s0: 10.0, s1: 20.0, s2: *incomplete at step 5* |" in md
    assert "| offpolicy_sft | 5.0 ± n/a (1 seed) | 1/3 | s0: 5.0, s1: *missing*, s2: *missing* |" in md
    assert "The table is incomplete: 3 cell(s)" in md
    assert "banking77/offpolicy_sft/seed2 (missing" in md and "banking77/opsd/seed2 (incomplete" in md
    assert "Machine: Test CPU @ 2GHz (2 CPUs)" in md and SPLIT in md
    assert "| 300 | 12 | 192 |" in md
    assert "OPHSD − opsd: +30.0 points (2 x the larger std = 14.1 points: clears it)" in md
    assert "| 300 | 12 | 192 | 16m20s † |" in md and "† some seeds have no run.py record" in md
    assert "Harness gap closed by OPHSD: 50% (base 1.0 -> OPHSD 45.0, base+harness 89.0)" in md
    assert "OPHSD − offpolicy_sft: +40.0 points (fewer than 2 seeds" in md
    assert bt.OUTCOME_PLACEHOLDER in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "curves.png").stat().st_size > 0
    assert [tuple(x) for x in res["tasks"]["banking77"]["curves"]["ophsd"]["0"]] == [(0, 0.01), (12, 0.40)]


def test_outcome_section_is_kept_on_rebuild(table_root, tmp_path):
    out = tmp_path / "out"
    bt.build(table_root, out)
    md = (out / "RESULTS.md").read_text().replace(bt.OUTCOME_PLACEHOLDER, "OPHSD beat OPSD; lr 5e-5 worked.")
    (out / "RESULTS.md").write_text(md)
    bt.build(table_root, out)
    md = (out / "RESULTS.md").read_text()
    assert "OPHSD beat OPSD; lr 5e-5 worked." in md and bt.OUTCOME_PLACEHOLDER not in md


def test_resumed_run_rows_are_deduplicated(tmp_path):
    """Resumed from the step-4 checkpoint after dying at step 6: steps 5-6 are logged twice; a
    line cut short by the kill is ignored; the last row per step wins."""
    d = tmp_path / "runs" / "banking77" / "ophsd" / "seed0"
    write_run(d, after=(0.30, 0.85), steps=8, time_step=10.0)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    first = [json.loads(x) for x in lines]
    before, train, after = first[0], first[1:9], first[9]
    dead = [json.dumps(r) for r in [before] + [_train_row(s, 99.0) for s in range(1, 7)]] + ['{"loss": 0.1, "ti']
    resumed = [json.dumps(r) for r in train[4:]] + [json.dumps(after)]
    (d / "metrics.jsonl").write_text("\n".join(dead + resumed) + "\n")
    run = bt.read_run(d)
    assert [r["step"] for r in run["steps"]] == list(range(1, 9))
    assert [r["time/step"] for r in run["steps"]] == [99.0] * 4 + [10.0] * 4
    e = bt.row_entry(tmp_path / "runs", "banking77", "ophsd", 0, {})
    assert e["status"] == "finished" and e["accuracy"] == 0.30 and e["steps"] == 8
    assert e["pairs_trained"] == 8 * 16
    assert e["train_time_s"] == pytest.approx(4 * 99.0 + 4 * 10.0)


def test_nothing_run_yet(tmp_path):
    res = bt.build(tmp_path / "empty", tmp_path / "out", tasks=["banking77"])
    m = res["tasks"]["banking77"]["methods"]
    assert all(v["mean"] is None and v["n_seeds"] == 0 and v["missing_seeds"] == [0, 1, 2] for v in m.values())
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "**no finished run**" in md and "The table is incomplete: 18 cell(s)" in md
    assert "No finished OPHSD run" in md


def test_rows_not_requested_are_left_out_not_missing(tmp_path):
    """A task run with a subset of the methods (arith: base, OPSD, OPHSD) lists only those rows; the
    others are named as not requested, not counted as missing. Requests accumulate over invocations."""
    root = tmp_path / "runs"
    a = root / "arith"
    bt.record_requested(a, ["base", "opsd"], [0, 1])
    rec = bt.record_requested(a, ["ophsd+harness", "ophsd", "base"], [2])
    assert rec == {"rows": ["base", "opsd", "ophsd", "ophsd+harness"], "seeds": [0, 1, 2]}
    for s in range(3):
        write_run(a / "ophsd" / f"seed{s}", after=(0.03, 0.03), n_eval=100)
        write_run(a / "opsd" / f"seed{s}", after=(0.02, None), harness=False, n_eval=100)
    res = bt.build(root, tmp_path / "out", tasks=["arith"])
    t = res["tasks"]["arith"]
    assert list(t["methods"]) == ["base", "opsd", "ophsd", "ophsd+harness"]
    assert t["rows_not_requested"] == ["base+harness", "offpolicy_sft"]
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "Not run for this task (not requested of run.py): base+harness, offpolicy_sft" in md
    assert "Every requested run finished." in md and "OPHSD vs offpolicy_sft: not run for this task." in md


@pytest.mark.parametrize("base, with_harness, n", [
    (0.0, 0.01, 100),     # arith's 1 point at n=100: 2 SE = 2.0 points, within
    (0.0, 0.03, 100),     # 3 points at n=100: 2 SE = 3.4 points, still within
    (0.017, 0.853, 300),  # BANKING77's gap: far outside
    (0.10, 0.20, 300),    # 10 points at n=300: 2 SE = 5.8 points, outside
])
def test_harness_gap_within_sampling_noise_is_not_a_percentage(tmp_path, base, with_harness, n):
    se = math.sqrt((base * (1 - base) + with_harness * (1 - with_harness)) / n)
    within = abs(with_harness - base) <= 2 * se  # the float64 reference decides the case
    root = tmp_path / "runs"
    for s in range(3):
        write_run(root / "arith" / "ophsd" / f"seed{s}", before=(base, with_harness), after=(0.05, 0.05), n_eval=n)
    md = "\n".join(bt._claims(bt.collect(root, tasks=["arith"])["tasks"]["arith"]))
    if within:
        assert f"within 2 binomial standard errors (±{200 * se:.1f} points at n={n})" in md
        assert "Harness gap closed" not in md
    else:
        assert "Harness gap closed by OPHSD" in md and "binomial" not in md


def test_base_rows_are_evaluated_once_and_shared(tmp_path):
    """run.py evaluates the untrained model once (greedy, seed-independent): the other seeds' runs
    skip the before-eval; their base cells are 'shared', not missing, and the claims treat the base
    row's std as 0."""
    root = tmp_path / "runs"
    b = root / "banking77"
    write_run(b / "ophsd" / "seed0", before=(0.02, 0.85), after=(0.40, 0.86))
    for s, acc in ((1, 0.50), (2, 0.45)):
        d = write_run(b / "ophsd" / f"seed{s}", after=(acc, 0.87))
        lines = (d / "metrics.jsonl").read_text().splitlines()[1:]  # no before row: --skip-eval-before
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    res = bt.build(root, tmp_path / "out", tasks=["banking77"], rows=["base", "base+harness", "ophsd"])
    m = res["tasks"]["banking77"]["methods"]
    for row, acc in (("base", 0.02), ("base+harness", 0.85)):
        assert m[row]["deterministic"] and m[row]["missing_seeds"] == [] and m[row]["accuracies"] == [acc]
        assert [e["status"] for e in m[row]["per_seed"]] == ["finished", "shared", "shared"]
        assert m[row]["per_seed"][2]["evaluated_by_seed"] == 0 and m[row]["per_seed"][2]["accuracy"] == acc
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "| base | 2.0 (deterministic) | 1/3 | s0: 2.0, s1: = s0, s2: = s0 |" in md
    assert "Every requested run finished." in md
    std = math.sqrt(((0.40 - 0.45) ** 2 + (0.50 - 0.45) ** 2) / 2)
    assert f"OPHSD − base: +43.0 points (2 x the larger std = {200 * std:.1f} points: clears it)" in md
    # No base evaluation anywhere: still missing, never shared.
    res = bt.collect(root, tasks=["banking77"], rows=["base"], seeds=[3])
    assert res["tasks"]["banking77"]["methods"]["base"]["per_seed"][0]["status"] == "missing"


# ----------------------------------------------------------------------------- run.py

def _fixture_csv(tmp_path, n=700, labels=7) -> Path:
    d = tmp_path / "shared" / "banking77"
    d.mkdir(parents=True)
    names = [f"intent_{i}" for i in range(labels)]
    (d / "categories.json").write_text(json.dumps(names))
    rows = ["text,category"] + [f"message number {i} about thing {i % labels},{names[i % labels]}" for i in range(n)]
    (d / "train.csv").write_text("\n".join(rows) + "\n")
    return d / "train.csv"


def test_run_methods_for_rows():
    assert R.run_methods_for(bt.DEFAULT_ROWS) == ["ophsd", "opsd", "offpolicy_sft"]
    assert R.run_methods_for(["base"]) == ["ophsd"]
    assert R.run_methods_for(["base", "opsd"]) == ["opsd"]  # opsd's before-eval is the base model
    assert R.run_methods_for(["base+harness", "opsd"]) == ["ophsd", "opsd"]  # opsd evaluates no harness
    assert R.run_methods_for(["ophsd+harness", "ophsd_jsd"]) == ["ophsd", "ophsd_jsd"]


def test_prepare_data_split(tmp_path):
    src = _fixture_csv(tmp_path)
    root = tmp_path / "runs"
    d = R.prepare_data(root, "banking77", 300, source=src)
    from ophsd.tasks import get_task, split_dev

    t = get_task("banking77")
    train, ev = t.load(str(d["train"])), t.load(str(d["eval"]))
    assert len(train) == 700 - R.DEV_SIZE and len(ev) == 300
    assert not {e.question for e in train} & {e.question for e in ev}
    _, dev = split_dev(t.load(str(src)), R.DEV_SIZE, R.SPLIT_SEED)
    assert {e.question for e in ev} <= {e.question for e in dev}
    counts = sorted(sum(e.answer == lab for e in ev) for lab in {e.answer for e in dev})
    assert counts[-1] - counts[0] <= 1  # stratified: 300 over 7 labels, 42 or 43 each
    assert (d["dir"] / "categories.json").read_text() == (src.parent / "categories.json").read_text()
    assert "300 examples sampled (stratified by label, seed 0)" in d["split"] and "the other 200 rows" in d["split"]
    before = d["eval"].read_bytes()
    d["eval"].unlink()
    assert R.prepare_data(root, "banking77", 300, source=src)["eval"].read_bytes() == before  # deterministic
    with open(src, "a") as f:
        f.write("one more message,intent_0\n")
    with pytest.raises(R.PlanError, match="other data"):
        R.prepare_data(root, "banking77", 300, source=src)


def test_plan_commands_resume_and_skip(tmp_path):
    from ophsd.train.config import TrainConfig, build_parser

    src = _fixture_csv(tmp_path)
    root = (tmp_path / "runs").resolve()
    R.prepare_data(root, "banking77", R.PRESETS["cpu"]["banking77"]["eval_limit"], source=src)
    b = root / "banking77"
    cfg = R.run_config("cpu", "banking77", "ophsd", 1)
    # seed 1: interrupted after its step-4 checkpoint -> resumed with --load on the same directory
    write_run(b / "ophsd" / "seed1", upto=6)
    (b / "ophsd" / "seed1" / R.LATEST).write_text("4\n")
    (b / "ophsd" / "seed1" / bt.RECORD).write_text(json.dumps({"config": cfg, "attempts": []}))
    # seed 2: finished (final eval row at the preset's last step) -> skipped
    write_run(b / "ophsd" / "seed2", after=(0.3, 0.8), steps=cfg["train_iters"])
    # opsd seed 0: died before any checkpoint -> started again from scratch
    write_run(b / "opsd" / "seed0", upto=2, harness=False)

    planned = R.plan("cpu", ["banking77"], bt.DEFAULT_ROWS, [0, 1, 2], root)
    by = {p.name: p for p in planned}
    assert len(planned) == 9
    assert [p.name for p in planned[:3]] == [f"banking77/{m}/seed0" for m in ("ophsd", "opsd", "offpolicy_sft")]
    assert by["banking77/ophsd/seed2"].state == "finished"
    r1 = by["banking77/ophsd/seed1"]
    assert r1.state == "resume" and r1.resume_step == 4
    i = r1.argv.index("--load")
    assert r1.argv[i + 1] == str(b / "ophsd" / "seed1") == r1.argv[r1.argv.index("--save") + 1]
    assert by["banking77/opsd/seed0"].state == "restart" and "--load" not in by["banking77/opsd/seed0"].argv
    f0 = by["banking77/ophsd/seed0"]
    assert f0.state == "fresh" and "--load" not in f0.argv
    # The untrained model is evaluated once: by the lowest seed's ophsd run, no other run.
    evaluating = [p.name for p in planned if "--skip-eval-before" not in p.argv]
    assert evaluating == ["banking77/ophsd/seed0"]
    assert R.base_eval_run(["opsd"], [2, 1]) == ("opsd", 1)  # --methods base opsd: opsd evaluates it
    assert R.base_eval_run(["opsd", "offpolicy_sft"], [0]) == ("offpolicy_sft", 0)

    def opt(p, flag):
        return p.argv[p.argv.index(flag) + 1]

    assert f0.argv[1:3] == ["-m", "ophsd.train"]
    assert opt(f0, "--harness") == "draft_verify" and opt(f0, "--divergence") == "reverse_kl"
    assert opt(f0, "--bank-data") == opt(f0, "--data") == str(root / "data" / "banking77" / "train.csv")
    assert opt(f0, "--eval-limit") == "300" and opt(f0, "--eval-data").endswith("eval-300.csv")
    assert opt(f0, "--lr") == str(R.LEARNING_RATE["cpu"]) and opt(f0, "--seed") == "0"
    o = by["banking77/opsd/seed1"]
    assert opt(o, "--harness") == "opsd" and "--bank-data" not in o.argv
    s = by["banking77/offpolicy_sft/seed2"]
    assert opt(s, "--objective") == "offpolicy" and opt(s, "--n-samples-per-prompt") == "1"
    # Every flag exists in the trainer and every combination passes its validation.
    for p in planned:
        config = TrainConfig.from_args(build_parser().parse_args(p.argv[3:]))
        assert config.logging.save == str(p.run_dir)

    # A run directory made with other flags is never resumed or skipped silently.
    with pytest.raises(R.PlanError, match="lr"):
        R.plan("cpu", ["banking77"], ["ophsd"], [1], root, lr=1e-4)
    # ... but a flag that changes only how it is evaluated (a smaller eval batch, for memory) is resumed
    again = R.plan("cpu", ["banking77"], ["ophsd"], [1], root, extra=["--eval-batch-size", "16"])
    assert again[0].state == "resume" and opt(again[0], "--eval-batch-size") == "16"


def test_flags_after_the_separator_are_folded_into_the_run_config(tmp_path):
    """``-- --train-iters 36 ...``: the run's state, eval file and resume check see 36, not the
    preset's 12 (a 36-step run used to count as finished once its step-12 row was there)."""
    from ophsd.train.config import TrainConfig, build_parser

    extra = ["--train-iters", "36", "--teacher", "current", "--skip-eval-before", "--eval-limit=100",
             "--lr", "3e-4", "--pass-ks", "1", "4"]
    cfg = R.run_config("cpu", "banking77", "ophsd", 0, extra=extra)
    assert cfg["train_iters"] == 36 and cfg["teacher"] == "current" and cfg["skip_eval_before"] is True
    assert cfg["eval_limit"] == 100 and cfg["lr"] == 3e-4 and cfg["pass_ks"] == [1, 4]
    assert "extra_args" not in cfg
    argv = R.flags(cfg)
    assert argv.count("--train-iters") == 1 and argv[argv.index("--train-iters") + 1] == "36"
    assert argv[argv.index("--pass-ks") + 1: argv.index("--pass-ks") + 3] == ["1", "4"]
    cfg.pop("pass_ks")  # a flag of ophsd.eval, not of the trainer
    assert TrainConfig.from_args(build_parser().parse_args(R.flags(cfg) + ["--save", str(tmp_path), "--data", str(_fixture_csv(tmp_path))])).optim.train_iters == 36
    run = tmp_path / "banking77" / "ophsd" / "seed0"
    write_run(run, after=(0.3, 0.8), steps=12)
    (run / R.LATEST).write_text("12\n")
    assert R.run_state(run, cfg["train_iters"]) == ("resume", 12)
    assert R.run_state(run, 12)[0] == "finished"
    # A finished constant-lr run asked for more steps is resumed (the same run, longer); a decaying
    # schedule, or fewer steps, is refused.
    (run / bt.RECORD).write_text(json.dumps({"config": R.run_config("cpu", "banking77", "ophsd", 0,
                                                                     extra=["--train-iters", "12"]), "attempts": []}))
    longer = R.plan("cpu", ["banking77"], ["ophsd"], [0], tmp_path, extra=["--train-iters", "36"])[0]
    assert longer.state == "resume" and longer.resume_step == 12 and "--load" in longer.argv
    for extra in (["--train-iters", "6"], ["--train-iters", "36", "--lr-decay-style", "cosine"]):
        with pytest.raises(R.PlanError, match="train_iters|lr_decay_style"):
            R.plan("cpu", ["banking77"], ["ophsd"], [0], tmp_path, extra=extra)
    # ... unless the trainer is told to follow the new schedule from the checkpoint on; the lr and
    # the method stay what they were.
    wsd = ["--train-iters", "36", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "24",
           "--override-opt-param-scheduler"]
    decayed = R.plan("cpu", ["banking77"], ["ophsd"], [0], tmp_path, extra=wsd)[0]
    assert decayed.state == "resume" and decayed.resume_step == 12 and "--override-opt-param-scheduler" in decayed.argv
    assert decayed.argv[decayed.argv.index("--lr-decay-style") + 1] == "WSD"
    with pytest.raises(R.PlanError, match=r"\(lr: lr 5e-05 -> 0.0003\)"):
        R.plan("cpu", ["banking77"], ["ophsd"], [0], tmp_path, extra=[*wsd, "--lr", "3e-4"])


def test_presets_fit_trainer_constraints():
    """Global batch = rollout x samples must divide by the micro-batch for every method."""
    for budget, tasks in R.PRESETS.items():
        assert budget in R.LEARNING_RATE and budget in R.JOBS
        for task in tasks:
            for method in R.METHOD_FLAGS:
                c = R.run_config(budget, task, method, 0)
                assert (c["rollout_batch_size"] * c["n_samples_per_prompt"]) % c["micro_batch_size"] == 0
                assert c["eval_limit"] >= (300 if task == "banking77" else 100)


def test_every_preset_run_is_a_valid_trainer_command(tmp_path):
    """The trainer's own config check accepts every (budget, task, method) run's flags: a preset
    flag one method's harness does not take (the label list for OPSD) would stop that run."""
    from ophsd.train.config import TrainConfig, parse_args

    data = _fixture_csv(tmp_path)
    for budget, tasks in R.PRESETS.items():
        for task in tasks:
            for method in R.METHOD_FLAGS:
                cfg = R.run_config(budget, task, method, 0)
                argv = R.flags(cfg) + ["--save", str(tmp_path / "run")] + ([] if task == "arith" else ["--data", str(data)])
                TrainConfig.from_args(parse_args(argv))  # raises ConfigError naming the flag
    gpu = R.run_config("gpu", "banking77", "ophsd", 0)
    assert gpu["harness_label_list"] is True and gpu["lr"] == 1e-4 and gpu["lr_decay_style"] == "WSD"
    assert "harness_label_list" not in R.run_config("gpu", "banking77", "opsd", 0)
    assert R.run_config("gpu", "banking77", "ophsd", 0, lr=3e-5)["lr"] == 3e-5  # --lr still wins
    assert R.run_config("cpu", "banking77", "ophsd", 0)["lr"] == R.LEARNING_RATE["cpu"]


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    assert R.main(["--dry-run", "--runs-root", str(root), "--tasks", "arith", "--seeds", "0", "1",
                   "--methods", "base", "ophsd", "--", "--teacher", "current"]) == 0
    out = capsys.readouterr().out
    assert not root.exists()
    cmds = [line for line in out.splitlines() if "-m ophsd.train" in line]
    assert len(cmds) == 2 and all("--task arith" in c and "--teacher current" in c and "initial" not in c for c in cmds)
    assert "arith/ophsd/seed1: fresh" in out


def test_prune_checkpoints(tmp_path):
    d = tmp_path / "run"
    for it in (4, 8):
        for sub in ("model", "optimizer", "teacher", "rng", "hf"):
            (d / f"iter_{it:07d}" / sub).mkdir(parents=True)
    (d / "iter_0000012.tmp").mkdir()
    (d / R.LATEST).write_text("8\n")
    R.prune_checkpoints(d, "model", finished=False)
    assert not (d / "iter_0000004").exists() and (d / "iter_0000008" / "optimizer").is_dir()
    assert (d / "iter_0000012.tmp").is_dir()  # being written: never touched
    R.prune_checkpoints(d, "model", finished=True)
    assert sorted(p.name for p in (d / "iter_0000008").iterdir()) == ["hf", "model"]
    R.prune_checkpoints(d, "none", finished=True)
    assert not (d / "iter_0000008").exists() and not (d / R.LATEST).exists()


FAKE_TRAINER = r'''
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); mode = sys.argv[2]
d.mkdir(parents=True, exist_ok=True)
(d / "args.json").write_text(json.dumps({"rollout_batch_size": 2, "n_samples_per_prompt": 2, "eval_limit": 5}))
with open(d / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 0, "tag": "before", "eval/standalone_accuracy": 0.2, "eval/n": 5,
                        "eval/harness_accuracy": 0.6}) + "\n")
    f.write(json.dumps({"loss": 1.0, "time/step": 1.0, "pairs_kept": 4, "step": 1}) + "\n")
    if mode == "fail":
        sys.exit(3)
    f.write(json.dumps({"step": 1, "tag": "after", "eval/standalone_accuracy": 0.4, "eval/n": 5,
                        "eval/harness_accuracy": 0.6}) + "\n")
(d / "iter_0000001" / "optimizer").mkdir(parents=True, exist_ok=True)
(d / "iter_0000001" / "model").mkdir(parents=True, exist_ok=True)
(d / "latest_checkpointed_iteration.txt").write_text("1\n")
print("fake trainer done")
'''


def test_runner_records_attempts_and_skips_finished(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    root = tmp_path / "runs"
    cfg = {"train_iters": 1}

    def planned(seed, mode):
        d = root / "arith" / "ophsd" / f"seed{seed}"
        return R.Planned("arith", "ophsd", seed, d, cfg, [sys.executable, str(fake), str(d), mode], "fresh",
                         data={"split": "arith dev stream, problems 0..4"})

    runner = R.Runner(jobs=2, keep="model", stream=False, budget="cpu")
    res = runner.run([planned(0, "ok"), planned(1, "fail")])
    assert res["arith/ophsd/seed0"] == "finished"
    assert res["arith/ophsd/seed1"].startswith("FAILED (exit 3")
    d0 = root / "arith" / "ophsd" / "seed0"
    rec = json.loads((d0 / bt.RECORD).read_text())
    assert rec["split"] == "arith dev stream, problems 0..4" and rec["config"] == cfg
    (a,) = rec["attempts"]
    assert a["rc"] == 0 and a["elapsed_s"] > 0 and a["machine"] and a["state"] == "fresh"
    assert "fake trainer done" in (d0 / "train.log").read_text()
    assert sorted(p.name for p in (d0 / "iter_0000001").iterdir()) == ["model"]  # keep=model
    assert R.run_state(d0, 1)[0] == "finished"
    assert R.run_state(root / "arith" / "ophsd" / "seed1", 1)[0] == "restart"

    e = bt.row_entry(root, "arith", "ophsd", 0, {})
    assert e["accuracy"] == 0.4 and e["wall_time_s"] == a["elapsed_s"] and e["machine"] == a["machine"]
    assert e["split"] == "arith dev stream, problems 0..4" and e["samples_seen"] == 4


def test_ablation_label_answers_and_standard_error(tmp_path):
    """ablations.py's diagnosis columns: answers that are a label (and right) at the last eval,
    read from eval_predictions/ rows as the Evaluator writes them; binomial s.e. in points."""
    ab = _load("ablations")
    rel = "root/banking77/ophsd/seed0"
    run = tmp_path / rel
    assert ab.last_predictions(run) is None  # no predictions: an empty cell, not a crash
    pred = run / "eval_predictions"
    pred.mkdir(parents=True)
    rows_old = [{"step": 12, "standalone_answer": "a", "standalone_correct": True}] * 4
    rows_last = [{"step": 24, "standalone_answer": "card_arrival", "standalone_correct": True},
                 {"step": 24, "standalone_answer": "top_up_limits", "standalone_correct": False},
                 {"step": 24, "standalone_answer": None, "standalone_correct": False},
                 {"step": 24, "standalone_answer": None, "standalone_correct": False}]
    (pred / "step_0000012.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_old))
    (pred / "step_0000024.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_last))
    step, rows = ab.last_predictions(run)
    assert step == 24 and ab.label_answers(rows) == (2, 1, 4)
    rows_last[2]["standalone"], rows_last[2]["gold"] = "top_up_limit", "top_up_limits"  # a near-copy of gold
    rows_last[3]["standalone"], rows_last[3]["gold"] = "top_up_limit", "card_arrival"  # a near-copy, not gold
    (pred / "step_0000024.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_last))
    assert ab.near_copy_correct(ab.last_predictions(run)[1], ["card_arrival", "top_up_limits"]) == 2
    # A clone has no per-example files: the counts saved by the last rebuild are used, at the same step only.
    (tmp_path / "root/data/banking77").mkdir(parents=True)
    (tmp_path / "root/data/banking77/categories.json").write_text(json.dumps(["card_arrival", "top_up_limits"]))
    got = ab.diagnose(tmp_path, rel, 24, {})
    assert got == {"eval_step": 24, "label_answers": [2, 1, 4], "near_copy": 2, "most_common": [2, 2]}
    assert ab.most_common_answer([{"standalone": "x "}, {"standalone": "x"}, {"standalone": None}]) == (2, 2)
    cached = {rel: got}
    import shutil
    shutil.rmtree(pred)
    assert ab.diagnose(tmp_path, rel, 24, cached) == got
    assert ab.diagnose(tmp_path, rel, 36, cached)["label_answers"] is None  # stale counts are not shown
    assert ab.std_error(15.0, 300) == pytest.approx(100 * math.sqrt(0.15 * 0.85 / 300), abs=1e-12)
    assert ab.std_error(0.0, 300) == 0.0
