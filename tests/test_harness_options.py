"""Harness options come from the harness registry: both CLIs take a newly registered harness's
options without being edited (a toy harness with one option, tests/toy_harness.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy():
    from ophsd.harness import HARNESSES

    import tests.toy_harness as mod

    HARNESSES["toy_echo"] = mod.ToyEchoHarness  # re-register if an earlier test removed it
    yield mod
    HARNESSES.pop("toy_echo", None)


def test_builtin_options_give_the_same_harness_arguments_as_before():
    from ophsd.eval import build_parser as eval_parser
    from ophsd.harness.options import HarnessContext, options_from_args
    from ophsd.train.config import build_parser as train_parser

    class Task:  # only read when a bank file is given
        pass

    ctx = HarnessContext(Task())
    a = train_parser().parse_args([])
    assert options_from_args("plan_solve", a, "train").harness_kwargs(ctx) == {"plan_tokens": 192}
    assert options_from_args("opsd", a, "train").harness_kwargs(ctx) == {}
    a = train_parser().parse_args(["--bank-k", "3"])
    assert options_from_args("draft_verify", a, "train").harness_kwargs(ctx) == {
        "k": 3, "cold_start": 16, "embedder": "auto"}
    e = eval_parser().parse_args(["--task", "arith", "--max-new-tokens", "7"])
    ctx = HarnessContext(Task(), max_new_tokens=7)
    assert options_from_args("plan_solve", e, "eval").harness_kwargs(ctx) == {"plan_tokens": 256, "solve_tokens": 7}
    e = eval_parser().parse_args(["--task", "arith", "--k-neighbours", "2", "--cold-start", "0", "--embedder", "tfidf"])
    assert options_from_args("draft_verify", e, "eval").harness_kwargs(HarnessContext(Task())) == {
        "k": 2, "cold_start": 0, "embedder": "tfidf"}


def test_toy_harness_flags_in_both_clis(toy, capsys):
    from ophsd.eval import build_parser as eval_parser
    from ophsd.eval import main as eval_main
    from ophsd.harness.options import options_from_args
    from ophsd.train.config import build_parser as train_parser
    from ophsd.train.main import main as train_main

    for parser, cli in ((train_parser(), "train"), (eval_parser(), "eval")):
        (action,) = [a for a in parser._actions if "--shout" in a.option_strings]
        assert action.default == 1 and "repeats the question" in action.help and "--shout" in parser.format_help()
        args = parser.parse_args((["--task", "arith"] if cli == "eval" else []) + ["--harness", "toy_echo", "--shout", "4"])
        opts = options_from_args("toy_echo", args, cli)
        assert isinstance(opts, toy.ToyOptions) and opts.shout == 4
        assert options_from_args("toy_echo", parser.parse_args(["--task", "arith"] if cli == "eval" else []), cli).shout == 1
    # min=1 is checked by both CLIs
    assert train_main(["--harness", "toy_echo", "--shout", "0"]) == 2
    assert "--shout must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--shout must be >= 1, got 0"):
        eval_main(["--task", "arith", "--harness", "toy_echo", "--shout", "0", "--no-progress"])


def test_toy_harness_runs_from_eval_with_its_option(toy, tiny_model_dir, tmp_path):
    from ophsd.eval import main

    out = tmp_path / "r.json"
    assert main(["--task", "arith", "--model", str(tiny_model_dir("llama")), "--harness", "toy_echo", "--shout", "3",
                 "--limit", "2", "--max-new-tokens", "3", "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["harness"]["name"] == "toy_echo" and res["harness"]["modes"] == {"shout3": 2}


def test_toy_harness_runs_from_train_with_its_option(tiny_model_dir, tmp_path):
    # `ophsd train` as a user would run it after registering a harness in their own module
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    code = "import sys, tests.toy_harness; from ophsd.train.main import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "--model", str(tiny_model_dir("llama")), "--harness", "toy_echo",
                        "--shout", "3", "--rollout-batch-size", "2", "--micro-batch-size", "2",
                        "--max-response-length", "6", "--train-iters", "1", "--skip-eval", "--no-tensorboard",
                        "--save", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["step"] == 1 and m[-1]["harness/mode/shout3"] == 2
