"""Bad input files and flags: YAML configs, data files, output paths (trainer, eval, convert_hf).

Each case runs the real command line in a subprocess and must end with its exit code (2: usage
error) and one ``error:`` line naming the file or flag, no traceback, and before any model is
loaded. ``tests/test_faults_inputs.py`` runs the same cases (in-process where it can).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class InputCase:
    """``prog`` is ``train``, ``eval`` or ``convert``; the command must exit ``code`` with ``needle``
    in its last stderr line."""

    name: str
    prog: str
    argv: list
    needle: str
    code: int = 2
    in_process: bool = True  # False: it gets as far as torch.distributed (trainer data errors)


def _write(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return str(path)


def cases(tmp: str | os.PathLike) -> list[InputCase]:
    """The cases of issue 14 (items 5, 6, 8), their files written under ``tmp``."""
    t = Path(tmp)
    binary = bytes(range(256)) * 8
    deep = "[" * 100_000 + "]" * 100_000 + "\n"
    afile = _write(t / "afile", "not a directory\n")

    def cfg(name, text):
        return ["--config", _write(t / f"{name}.yaml", text), "--skip-eval"]

    deep_json = _write(t / "deep.json", deep)
    garbage_bin = _write(t / "garbage.jsonl", binary)
    return [
        InputCase("yaml syntax error", "train", cfg("syntax", "lr: [1e-5\ntrain_iters: 3\n"), "YAML syntax error at line"),
        InputCase("yaml binary file", "train", ["--config", _write(t / "bin.yaml", binary)], "not a YAML file"),
        InputCase("yaml train_iters: [1,2]", "train", cfg("list", "train_iters: [1,2]\n"),
                  "--train-iters takes one number, got list [1, 2]"),
        InputCase("yaml lr: null", "train", cfg("null", "lr: null\n"), "--lr needs a value (null given"),
        InputCase("yaml train_iters: 1.5", "train", cfg("float", "train_iters: 1.5\n"),
                  "argument --train-iters: invalid int value: '1.5'"),
        InputCase("yaml divergence: bogus", "train", cfg("choice", "divergence: bogus\n"),
                  "argument --divergence: invalid choice: 'bogus'"),
        InputCase("yaml bf16: yes-string", "train", cfg("switch", "bf16: 'on'\n"), "--bf16 is a switch"),
        InputCase("yaml unknown key", "train", cfg("unknown", "learning_rate: 1\n"), "unknown setting 'learning_rate'"),
        InputCase("yaml not a mapping", "train", cfg("seq", "- 1\n- 2\n"), "expected a mapping"),
        InputCase("yaml deeply nested", "train", cfg("deepyaml", "lr: " + "[" * 5000 + "]" * 5000 + "\n"),
                  "YAML nested too deeply"),
        InputCase("flag --train-iters 1.5", "train", ["--train-iters", "1.5"],
                  "argument --train-iters: invalid int value: '1.5'"),
        InputCase("--save under a file", "train", ["--save", f"{afile}/run"], f"--save {afile}/run: {afile} is not a directory"),
        InputCase("trainer: deeply nested JSON data", "train",
                  ["--task", "gsm8k", "--data", deep_json, "--skip-eval", "--model", "/nonexistent-model"],
                  f"{deep_json}: cannot parse the JSON (nested too deeply)", code=2, in_process=False),
        InputCase("eval: binary data", "eval", ["--task", "gsm8k", "--data", garbage_bin], f"{garbage_bin}: not UTF-8 text"),
        InputCase("eval: text that is not JSON", "eval",
                  ["--task", "gsm8k", "--data", _write(t / "text.jsonl", "hello\nworld\n")], "no usable rows"),
        InputCase("eval: binary CSV", "eval", ["--task", "banking77", "--data", _write(t / "garbage.csv", binary)],
                  "garbage.csv:1: not UTF-8 text"),
        InputCase("eval: deeply nested JSON data", "eval", ["--task", "gsm8k", "--data", deep_json],
                  f"{deep_json}: cannot parse the JSON (nested too deeply)"),
        InputCase("eval: --dev-size 0", "eval", ["--task", "arith", "--split", "dev", "--dev-size", "0"],
                  "--dev-size must be >= 1, got 0"),
        InputCase("eval: --max-new-tokens -3", "eval", ["--task", "arith", "--max-new-tokens", "-3"],
                  "--max-new-tokens must be >= 1, got -3"),
        InputCase("eval: --output under a file", "eval", ["--task", "arith", "--output", f"{afile}/r.json"],
                  f"--output {afile}/r.json: {afile} is not a directory"),
        InputCase("eval: --output is a directory", "eval", ["--task", "arith", "--output", str(t)],
                  f"--output {t}: is a directory"),
        InputCase("verify --pp 0", "convert", ["verify", "--model", "x", "--megatron-dir", str(t), "--pp", "0"],
                  "argument --pp: must be >= 1, got 0"),
        InputCase("verify --tp two", "convert", ["verify", "--model", "x", "--megatron-dir", str(t), "--tp", "two"],
                  "argument --tp: expected an integer >= 1, got 'two'"),
    ]


COMMANDS = {"train": [sys.executable, "-m", "ophsd.train"], "eval": [sys.executable, "-m", "ophsd.eval", "--no-progress"],
            "convert": [sys.executable, str(REPO / "tools" / "convert_hf.py")]}


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def run_case(case: InputCase, timeout: float = 120) -> tuple[int | None, str, float]:
    """``(exit code, stderr, seconds)`` of the case's command in a subprocess (one rank, no torchrun);
    exit code None when it was still running after ``timeout`` (it took the bad input and went on)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    try:
        r = subprocess.run(COMMANDS[case.prog] + case.argv, capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err, time.monotonic() - t0
    return r.returncode, r.stderr, time.monotonic() - t0


def judge(case: InputCase, code: int, err: str) -> str | None:
    """A failure line, or None when the command ended as it must."""
    if code is None:
        return f"{case.name}: still running after the timeout: the bad input was taken and the job went on"
    if "Traceback" in err:
        return f"{case.name}: traceback: {last_line(err)[:200]}"
    if "Loading weights" in err or "loaded in" in err:
        return f"{case.name}: a model was loaded before the error"
    if code != case.code or case.needle not in last_line(err):
        return f"{case.name}: expected exit {case.code} with {case.needle!r}, got {code}: {last_line(err)[:200]!r}"
    return None


def add_args(p):
    p.add_argument("--only", help="run the cases whose name contains this text")


def run(args) -> dict:
    failures, clean, tracebacks, n = [], 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="ophsd-inputs-") as tmp:
        for case in cases(tmp):
            if args.only and args.only not in case.name:
                continue
            n += 1
            code, err, _ = run_case(case)
            tracebacks += "Traceback" in err
            f = judge(case, code, err)
            if f:
                failures.append(f)
            else:
                clean += 1
    return {"cases": n, "clean_errors": clean, "tracebacks": tracebacks, "failures": failures}
