"""The OPHSD trainer: flags, pair alignment, TP/PP step equivalence, learning, teacher modes, resume."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_ranks

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv,msg", [
    (["--divergence", "jsd", "--beta", "0"], "--beta must be in (0, 1)"),
    (["--task", "gsm8k"], "--task gsm8k needs --data FILE"),
    (["--task", "nope"], "--task 'nope' is unknown"),
    (["--no-pack-sequences", "--micro-batch-size", "3"], "must be a multiple of --micro-batch-size"),
    (["--max-tokens-per-micro-batch", "0"], "--max-tokens-per-micro-batch must be >= 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--global-batch-size", "5"], "--global-batch-size (5) must equal"),
    (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
    (["--rollout-engine", "sglang"], "--rollout-engine sglang needs --sglang-url"),
    (["--entropy-weighting"], "--entropy-weighting needs --token-sampling-ratio < 1"),
    (["--save-interval", "2"], "--save-interval needs --save DIR"),
    (["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: no such directory"),
    (["--weight-sync", "tensor"], "--weight-sync/--weight-sync-dir apply to --rollout-engine sglang only"),
    (["--rollout-engine", "sglang", "--sglang-url", "http://127.0.0.1:1", "--rollout-dtype", "bfloat16"],
     "--rollout-dtype applies to the embedded engine"),
])
def test_bad_flags_fail_fast(argv, msg, capsys):
    from ophsd.train.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_yaml_config_defaults_and_cli_wins(tmp_path):
    from ophsd.train.config import ConfigError, TrainConfig, parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3.0e-4\ndivergence: jsd\nbeta: 0.25\nrollout-batch-size: 4\n")
    a = TrainConfig.from_args(parse_args(["--config", str(cfg), "--beta", "0.75"]))
    assert (a.optim.lr, a.distill.divergence, a.distill.beta, a.rollout.rollout_batch_size,
            a.model.global_batch_size) == (3e-4, "jsd", 0.75, 4, 4)
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        parse_args(["--config", str(cfg)])


# ------------------------------------------------------------------------------ pairs


def test_pairs_alignment_and_skips():
    from ophsd.train.pairs import Sample, filter_pairs, pack

    s1 = Sample([1, 2, 3], [4, 5, 6, 7, 8], [9, 10], weight=2.0)
    s2 = Sample([1, 2], [4], [11, 12, 13])
    long = Sample(list(range(50)), [1], [2])
    empty = Sample([1], [1], [])
    kept, skipped = filter_pairs([s1, s2, long, empty], max_prompt_length=10, max_response_length=5)
    assert kept == [s1, s2] and skipped == {"skipped/empty_response": 1, "skipped/too_long": 1}
    (mb,) = pack(kept, micro_batch_size=2, packed=False)
    st, tt = mb.student.tokens, mb.teacher.tokens
    assert mb.student.subtree_end is None and mb.teacher.subtree_end is None  # plain causal rows
    for r, sp, tp, tgt in zip(mb.student.rows, mb.student.pos, mb.teacher.pos, mb.targets):
        # logit at position p predicts token p + 1, in both sequences (the last response token
        # predicts nothing that is read, so it is not computed)
        if sp + 1 < st.shape[1] and st[r, sp + 1] != 0:
            assert st[r, sp + 1] == tgt and tt[r, tp + 1] == tgt
    assert mb.student.rows.tolist() == [0, 0, 1, 1, 1] and mb.teacher.rows.tolist() == [0, 0, 1, 1, 1]
    assert mb.student.pos.tolist() == [2, 3, 1, 2, 3] and mb.teacher.pos.tolist() == [4, 5, 0, 1, 2]
    assert st[0, :4].tolist() == [1, 2, 3, 9] and st[1, :4].tolist() == [1, 2, 11, 12]
    assert mb.weights.tolist() == [2.0, 2.0, 1.0, 1.0, 1.0]
    mbs = pack([s1, s2, s1], micro_batch_size=2, packed=False)  # filler sample has weight 0
    assert len(mbs) == 2 and mbs[1].weights[2:].sum() == 0 and mbs[0].student.tokens.shape == mbs[1].student.tokens.shape


# ------------------------------------------------------------------------------ steps


def _fixed_samples(n=4, same_context=False):
    from ophsd.train.pairs import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        sp = torch.randint(5, 400, (6 + i,), generator=g).tolist()
        tp = sp if same_context else torch.randint(5, 400, (9 + 2 * i,), generator=g).tolist()
        out.append(Sample(sp, tp, torch.randint(5, 400, (5 + i,), generator=g).tolist()))
    return out


def _args(model_dir, *extra):
    from ophsd.train.config import TrainConfig, parse_args

    return TrainConfig.from_args(parse_args(["--model", str(model_dir), "--rollout-batch-size", "4",
                                             "--micro-batch-size", "2", "--skip-eval", "--no-tensorboard", *extra]))


def _steps_worker(rank, world, model_dir, extra, n_steps, same_context):
    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, *extra))
    # same_context: a bool, or one bool per step (teacher prompt == student prompt)
    schedule = same_context if isinstance(same_context, list) else [same_context] * n_steps
    losses, teacher_changed = [], None
    t0 = [p.detach().clone() for p in tr.teacher.parameters()] if tr.teacher is not None else None
    for same in schedule:
        losses.append(tr.update_on(_fixed_samples(same_context=same))["loss"])
        tr.step_num += 1
        tr.sync_weights()
    if t0 is not None:
        teacher_changed = any(not torch.equal(a, b) for a, b in zip(t0, tr.teacher.parameters()))
    weights = {k: v.clone() for k, v in tr.engine.model.state_dict().items()} if rank == 0 else None
    version = tr.engine.weight_version if rank == 0 else None
    tr.close()
    return dict(losses=losses, weights=weights, teacher_changed=teacher_changed, version=version)


def _rollout_dtype_worker(rank, world, model_dir):
    """A bf16 engine beside the fp32 trainer: one step on fixed samples, the sync, then rollouts."""
    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, "--lr", "1e-3", "--rollout-dtype", "bfloat16", "--max-response-length", "6"))
    student_dtype = next(tr.model.parameters()).dtype
    loss = tr.update_on(_fixed_samples())["loss"]
    tr.step_num += 1
    tr.sync_weights()
    batch = tr.collector.rollout(tr.step_num, tr.data_position)
    out = dict(loss=loss, student_dtype=student_dtype, weights={k: v.clone() for k, v in tr.engine.model.state_dict().items()},
               responses=[len(s.response) for s in batch.samples])
    tr.close()
    return out


def test_rollout_dtype_bfloat16_runs_a_bf16_engine_on_fp32_weights(tiny_model_dir):
    """--rollout-dtype bfloat16 on a CPU: the trainer stays fp32, the engine holds exactly the
    trainer's weights rounded to bf16 after the sync, and it generates; the default stays fp32."""
    d = str(tiny_model_dir("llama"))
    ref = run_ranks(_steps_worker, 1, d, ["--lr", "1e-3"], 1, False)[0]
    got = run_ranks(_rollout_dtype_worker, 1, d)[0]
    assert got["student_dtype"] == torch.float32 and got["loss"] == pytest.approx(ref["losses"][0], rel=1e-6)
    assert all(w.dtype == torch.float32 for w in ref["weights"].values())  # default: fp32 on a CPU
    assert ref["weights"].keys() == got["weights"].keys()
    for k, w in got["weights"].items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, ref["weights"][k].to(torch.bfloat16)), k
    assert got["responses"] and all(n >= 1 for n in got["responses"])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_step_matches_single_rank(tiny_model_dir, tp, pp):
    """One SGD step at TP=2 / PP=2 gives the TP=1 loss and updated weights.

    float32; the only differences are reduction orders: loss rtol 1e-5, weights atol 1e-6.
    """
    d = str(tiny_model_dir("llama"))
    extra = ["--optimizer", "sgd", "--lr", "0.5", "--clip-grad", "0"]
    ref = run_ranks(_steps_worker, 1, d, extra, 1, False)[0]
    par = run_ranks(_steps_worker, tp * pp, d, extra + ["--tensor-model-parallel-size", str(tp),
                                                      "--pipeline-model-parallel-size", str(pp)], 1, False)[0]
    assert ref["losses"][0] > 0.01
    assert par["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-5)
    from tests.tiny_models import write_tiny_model  # noqa: F401  (engine weights = HF layout)

    moved = 0
    for k, w in ref["weights"].items():
        torch.testing.assert_close(par["weights"][k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(d).state_dict()
    moved = sum(not torch.equal(init[k], ref["weights"][k]) for k in ref["weights"] if k in init)
    assert moved > 10, "the step did not change the weights (test would be vacuous)"
    assert ref["version"] == par["version"] == 1


def test_divergence_falls_and_teacher_modes(tiny_model_dir):
    d = str(tiny_model_dir("llama"))
    r = run_ranks(_steps_worker, 1, d, ["--lr", "1e-3"], 5, False)[0]
    assert r["losses"][0] > 0.01 and r["losses"][-1] < 0.5 * r["losses"][0], r["losses"]
    assert r["teacher_changed"] is False  # frozen initial copy
    # One step on harness-style pairs moves the weights; then score pairs whose teacher context
    # equals the student prompt: the current-weights teacher *is* the student there, so the
    # divergence is exactly 0, while the frozen initial teacher now differs from the student.
    cur = run_ranks(_steps_worker, 1, d, ["--lr", "1e-3", "--teacher", "current"], 2, [False, True])[0]
    ini = run_ranks(_steps_worker, 1, d, ["--lr", "1e-3", "--teacher", "initial"], 2, [False, True])[0]
    assert cur["losses"][0] > 0.01 and abs(cur["losses"][1]) < 1e-6, cur["losses"]
    assert ini["losses"][1] > 1e-4, ini["losses"]


# ------------------------------------------------------------------------------ end to end


def _train(model_dir, run_dir, *extra, skip_eval=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "ophsd.train", "--model", str(model_dir), "--rollout-batch-size", "2",
                        "--micro-batch-size", "2", "--max-response-length", "12", "--plan-tokens", "12",
                        *(["--skip-eval"] if skip_eval else []), "--no-tensorboard", "--save", str(run_dir),
                        "--lr", "1e-3", *map(str, extra)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_next_step(tiny_model_dir, tmp_path):
    d = tiny_model_dir("llama")
    full = _train(d, tmp_path / "a", "--train-iters", 3)
    part = _train(d, tmp_path / "b", "--train-iters", 2)
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not list((tmp_path / "b").glob("*.tmp"))
    resumed = _train(d, tmp_path / "b", "--train-iters", 3, "--load", tmp_path / "b")[len(part):]
    assert [m["step"] for m in part + resumed] == [1, 2, 3]
    assert part[1]["loss"] == pytest.approx(full[1]["loss"], rel=1e-6)
    assert resumed[-1]["loss"] == pytest.approx(full[2]["loss"], rel=1e-5)
    assert (tmp_path / "b" / "report.md").read_text().count("| 3 |") == 1


def test_sigterm_saves_and_resume_matches(tiny_model_dir, tmp_path):
    """SIGTERM mid-run (Slurm preemption): the step finishes, a checkpoint is saved, exit 0;
    resuming from it gives the same next-step loss as an uninterrupted run."""
    import signal
    import time

    d = tiny_model_dir("llama")
    full = _train(d, tmp_path / "full", "--train-iters", 5)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "ophsd.train", "--model", str(d), "--rollout-batch-size", "2",
                          "--micro-batch-size", "2", "--max-response-length", "12", "--plan-tokens", "12",
                          "--skip-eval", "--no-tensorboard", "--save", str(run), "--lr", "1e-3",
                          "--train-iters", "50"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    k = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= k < 5, k
    resumed = _train(d, run, "--train-iters", k + 1, "--load", run)
    assert resumed[-1]["step"] == k + 1
    assert resumed[-1]["loss"] == pytest.approx(full[k]["loss"], rel=1e-5)


def test_draft_verify_training_with_seeded_bank(tiny_model_dir, tmp_path):
    rows = [("how do I top up my card", "top_up"), ("my card payment failed", "card_payment_failed"),
            ("I want to top up again", "top_up"), ("why was my card payment declined", "card_payment_failed")] * 6
    csv = tmp_path / "train.csv"
    csv.write_text("text,category\n" + "".join(f"{t} {i},{c}\n" for i, (t, c) in enumerate(rows)))
    m = _train(tiny_model_dir("llama"), tmp_path / "run", "--task", "banking77", "--data", csv,
               "--harness", "draft_verify", "--bank-data", csv, "--bank-k", 2, "--train-iters", 1)
    assert m[-1]["step"] == 1 and m[-1]["pairs_total"] == 2
    assert m[-1]["pairs_kept"] == 2  # the default --max-prompt-length is derived from the task: it fits
    modes = {k: v for k, v in m[-1].items() if k.startswith("harness/mode/")}
    assert sum(modes.values()) == 2 and "harness/mode/cold_start" not in modes  # the seeded bank is used
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["harness_mode"] in ("full", "draft_only") and r["kept"] for r in rows)
    # the teacher context is the draft/verify stage's few-shot chat: labelled neighbours as assistant turns
    assert all("<|im_start|>assistant\ntop_up<|im_end|>" in r["teacher_context"] or
               "<|im_start|>assistant\ncard_payment_failed<|im_end|>" in r["teacher_context"] for r in rows)


# ------------------------------------------------------------------- distributed optimizer


def _opt_ckpt_worker(rank, world, model_dir, run_dir, extra, load):
    """Without ``load``: step, save, step.  With ``load``: resume from ``run_dir``, step.
    Returns the last step's loss and the full weights after it (rank 0)."""
    from ophsd.models import mapping
    from ophsd.train.trainer import Trainer

    argv = [*extra, "--save", run_dir] + (["--load", run_dir] if load else [])
    tr = Trainer(_args(model_dir, "--optimizer", "adam", "--lr", "1e-2", *argv))
    if not load:
        tr.update_on(_fixed_samples())
        tr.step_num = 1
        tr.save_checkpoint()
    assert tr.step_num == 1
    loss = tr.update_on(_fixed_samples())["loss"]
    full = {k: v.clone() for k, v in mapping.iter_full_megatron_tensors(tr.module, tr.groups.tp)}
    tr.close()
    return dict(loss=loss, weights=full if rank == 0 else None)


def test_distributed_optimizer_checkpoint_reshards(tiny_model_dir, tmp_path):
    """Adam with the distributed optimizer at DP=2: save after one step, then resume (a) at the
    same layout and (b) at TP=2 (DP=1).  The second step's weights must equal the uninterrupted
    run's: they depend on Adam's moments and step count, so a lost or mis-sharded optimizer state
    shows up as an lr-sized difference (lr 1e-2).  Same layout: bitwise; TP=2: reduction order only
    (atol 1e-5 on float32 weights: DP=2 packs each rank's 2 samples into one row, TP=2 all 4, so the
    GEMM shapes differ, and Adam's m/sqrt(v) amplifies the rounding of near-zero gradients to ~3e-6;
    a mis-sharded state would be ~1e-2)."""
    d, run = str(tiny_model_dir("llama")), str(tmp_path / "run")
    dist_opt = ["--use-distributed-optimizer"]
    a = run_ranks(_opt_ckpt_worker, 2, d, run, dist_opt, False)[0]
    assert (tmp_path / "run" / "iter_0000001" / "optimizer" / "metadata.json").is_file()
    same = run_ranks(_opt_ckpt_worker, 2, d, run, dist_opt, True)[0]
    tp2 = run_ranks(_opt_ckpt_worker, 2, d, run, dist_opt + ["--tensor-model-parallel-size", "2"], True)[0]
    assert same["loss"] == a["loss"]
    assert tp2["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for k, w in a["weights"].items():
        assert torch.equal(same["weights"][k], w), k
        torch.testing.assert_close(tp2["weights"][k], w, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # Resuming without the flag is refused up front, naming it.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "ophsd.train", "--model", d, "--load", run, "--skip-eval"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 1 and "saved with --use-distributed-optimizer; resume the same way" in r.stderr


# --------------------------------------------------------------- SGLang engine path


@pytest.mark.parametrize("weight_sync", ["disk", "tensor"])
def test_training_through_sglang_api_server(tiny_model_dir, tmp_path, weight_sync):
    """``--rollout-engine sglang`` against a server speaking SGLang's HTTP API (the embedded
    server): rollouts and harness calls over HTTP, weights pushed after every step.  The run
    must match the in-process engine run step for step (same seeds -> same samples -> same
    losses, rel 1e-5), and afterwards the server must hold exactly the trained weights: its
    logprobs for a fixed continuation equal those of the final checkpoint (atol 1e-5)."""
    from ophsd.models.checkpoint import load_as_hf_model
    from ophsd.rollout import SamplingParams
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.rollout.serve import EmbeddedServer

    d = tiny_model_dir("llama")
    # The server starts from other weights: the trainer's version-0 push must replace them.
    from tests.tiny_models import write_tiny_model

    other = write_tiny_model(tmp_path / "other", "llama", seed=5, tokenizer_dir=d)
    srv = EmbeddedServer(EmbeddedEngine(str(other), seed=0)).start()
    try:
        via_server = _train(d, tmp_path / "srv", "--train-iters", 2, "--rollout-engine", "sglang",
                            "--sglang-url", srv.url, "--weight-sync", weight_sync)
        in_process = _train(d, tmp_path / "emb", "--train-iters", 2)
        assert [m["step"] for m in via_server] == [1, 2]
        for a, b in zip(via_server, in_process):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["tokens"] == b["tokens"]
        assert srv.engine.weight_version == 2
        prompt = [11, 12, 13, 14]
        sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, return_logprob=True)
        got = srv.engine.generate([prompt], sp)[0][0]
        ref_engine = EmbeddedEngine.from_pretrained_objects(
            load_as_hf_model(tmp_path / "srv" / "iter_0000002"), srv.engine.tokenizer, seed=0)
        ref = ref_engine.generate([prompt], sp)[0][0]
        ref_engine.close()
        assert got.output_ids == ref.output_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), rtol=0, atol=1e-5)
    finally:
        srv.shutdown(close_engine=True)


def test_bad_data_fails_before_the_model_on_every_rank(tiny_model_dir, tmp_path):
    """A data file with no usable rows: every rank exits 2 (a usage error) with the file:line reason (rank 0 reads
    the data and broadcasts the verdict, so no rank waits in a collective)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\nnot json\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ophsd.train",
                        "--model", str(tiny_model_dir("llama")), "--task", "gsm8k", "--data", str(bad),
                        "--pipeline-model-parallel-size", "2", "--rollout-batch-size", "2", "--micro-batch-size", "2",
                        "--skip-eval"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode != 0 and re.search(r"exitcode\s*: 2\b", r.stderr), r.stderr[-1500:]  # torchrun exits 1, the ranks 2
    assert r.stderr.count(f"ophsd train: error: {bad}: no usable rows") == 2, r.stderr[-3000:]
    assert f"{bad}:1: missing field 'answer'" in r.stderr
    assert "Traceback" not in r.stderr.split("ophsd train: error")[0]


def test_bf16_checkpoint_resume_is_exact(tiny_model_dir, tmp_path):
    """--bf16 (megatron-core's bf16 optimizer with fp32 main weights): save after one Adam step,
    resume, and the next step's loss and weights equal the uninterrupted run's bitwise.  Needs
    every parameter in bf16 (the local spec's norms used to come out fp32, which broke the
    optimizer checkpoint) and the fp32 main weights restored (not re-derived from bf16)."""
    d, run = str(tiny_model_dir("llama")), str(tmp_path / "run")
    a = run_ranks(_opt_ckpt_worker, 1, d, run, ["--bf16"], False)[0]
    b = run_ranks(_opt_ckpt_worker, 1, d, run, ["--bf16"], True)[0]
    assert b["loss"] == a["loss"]
    assert all(w.dtype == torch.bfloat16 for w in a["weights"].values())
    for k, w in a["weights"].items():
        assert torch.equal(b["weights"][k], w), k


def _flaky_rollout_worker(rank, world, model_dir):
    """Rollouts where the engine fails every request holding one bad prompt (or every prompt)."""
    from ophsd.rollout.base import EngineError
    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, "--max-response-length", "8", "--plan-tokens", "8", "--n-samples-per-prompt", "2"))
    real_generate = tr.engine.generate
    examples = tr.stream.batch(0, 4)
    bad = {tuple(tr.engine.apply_chat_template(tr.task.student_messages(examples[1])))}

    real_generate = tr.engine.generate_many  # the student rollouts: one sampling (seed) per prompt

    def flaky(requests):
        if any(tuple(p) in bad for p, _ in requests):
            raise EngineError("server dropped the connection")
        return real_generate(requests)

    tr.engine.generate_many = flaky
    batch = tr.collector.rollout(tr.step_num, tr.data_position)
    out = {"n_samples": len(batch.samples), "dropped": batch.stats.get("dropped/rollout_failed"),
           "bank_batch": len(batch.examples)}
    bad.update(tuple(tr.engine.apply_chat_template(tr.task.student_messages(e))) for e in examples)
    try:
        tr.collector.rollout(tr.step_num, tr.data_position)
        out["all_failed"] = None
    except EngineError as e:
        out["all_failed"] = str(e)
    tr.close()
    return out


def test_failed_rollouts_are_dropped_and_counted(tiny_model_dir):
    """One prompt whose request keeps failing: its samples are dropped and counted, the other
    three prompts' samples are kept; every prompt failing raises (the step retries, then stops)."""
    r = run_ranks(_flaky_rollout_worker, 1, str(tiny_model_dir("llama")))[0]
    assert r["dropped"] == 1 and r["n_samples"] == 3 * 2 and r["bank_batch"] == 4
    assert r["all_failed"] and "every student rollout failed" in r["all_failed"]


# ------------------------------------------------- issue 12: defaults, seeds, observability


def test_eval_examples_are_a_seeded_stratified_sample(tmp_path):
    """--eval-data FILE --eval-limit N: a seeded sample covering the labels of a file sorted by
    label (not its first N rows); the dev split carved from --data is drawn the same way and held
    out of training."""

    from ophsd.tasks import get_task
    from ophsd.train.config import TrainConfig, parse_args
    from ophsd.train.collect import ExampleStream, eval_examples

    csv = tmp_path / "sorted.csv"
    csv.write_text("text,category\n" + "".join(f"message {i} on {lab},intent_{lab}\n"
                                                for lab in range(20) for i in range(10)))

    def eval_ids(*argv):
        a = TrainConfig.from_args(parse_args(["--task", "banking77", "--data", str(csv), "--eval-limit", "20", *argv]))
        return [(e.id, e.answer) for e in eval_examples(get_task("banking77"), a)]

    first = eval_ids("--eval-data", str(csv))
    assert len(first) == 20 and len({lab for _, lab in first}) == 20  # the first 20 rows hold 2 intents
    assert eval_ids("--eval-data", str(csv)) == first and eval_ids("--eval-data", str(csv), "--seed", "1") != first
    dev = eval_ids()
    assert len({lab for _, lab in dev}) == 20 and eval_ids("--seed", "1") != dev
    train = ExampleStream(get_task("banking77"), str(csv), 1234, dev_size=20).examples
    assert len(train) == 180 and not {e.id for e in train} & {i for i, _ in dev}
    defaults = parse_args([])
    assert defaults.eval_limit == 100 and defaults.max_prompt_length is None and defaults.log_rollouts == 4


def _skip_worker(rank, world, model_dir, extra):
    from ophsd.train.trainer import Trainer, TrainingError

    tr = Trainer(_args(model_dir, "--max-response-length", "8", "--plan-tokens", "8", *extra))
    out = {"max_prompt_length": tr.config.rollout.max_prompt_length}
    try:
        m = tr.train_step()
        out.update(pairs_kept=m["pairs_kept"], pairs_total=m["pairs_total"], step=tr.step_num)
    except TrainingError as e:
        out.update(error=str(e), step=tr.step_num)
    tr.close()
    return out


def test_all_pairs_skipped_is_an_error_and_the_default_fits(tiny_model_dir):
    import re

    d = str(tiny_model_dir("llama"))
    r = run_ranks(_skip_worker, 1, d, ["--max-prompt-length", "8"])[0]
    m = re.fullmatch(r"step 1: all 4 pairs skipped: prompts \(student prompt or teacher context\) of (\d+)-(\d+) "
                     r"tokens exceed --max-prompt-length 8; raise it \(left unset, it is derived from the task\)",
                     r.get("error", ""))
    assert m, r
    assert 8 < int(m.group(1)) <= int(m.group(2)) and r["step"] == 0
    # no --max-prompt-length: derived from the task (arith: plan-solve's solve context with the plan) and every pair fits
    r = run_ranks(_skip_worker, 1, d, [])[0]
    assert "error" not in r, r
    assert r["max_prompt_length"] % 64 == 0 and int(m.group(2)) < r["max_prompt_length"] <= 1024
    assert r["pairs_kept"] == r["pairs_total"] == 4 and r["step"] == 1


def _seed_worker(rank, world, model_dir, run_dir, load):
    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, "--max-response-length", "6", "--plan-tokens", "6", "--n-samples-per-prompt", "2",
                       "--save", run_dir, *(["--load", run_dir] if load else [])))
    seen = []
    real = tr.engine.generate_many

    def record(requests):
        seen.append([(sp.seed, sp.n) for _, sp in requests])
        return real(requests)

    tr.engine.generate_many = record
    out = {}
    if not load:
        tr.train_step()
        out["step1"] = seen[-1]
        tr.save_checkpoint()
    samples = tr.collector.rollout(tr.step_num, tr.data_position).samples
    out.update(step2=seen[-1], step_num=tr.step_num, position=tr.data_position,
               responses=[s.response for s in samples])
    tr.close()
    return out


def test_rollout_seeds_are_per_prompt_and_survive_resume(tiny_model_dir, tmp_path):
    """Every prompt of a step samples with its own seed (sample j: seed + j), derived from the run
    seed, the step and its data position; a resumed run draws the same seeds (and samples)."""
    from ophsd.train.collect import rollout_seed

    d, run = str(tiny_model_dir("llama")), str(tmp_path / "run")
    a = run_ranks(_seed_worker, 1, d, run, False)[0]
    b = run_ranks(_seed_worker, 1, d, run, True)[0]
    seeds1, seeds2 = [s for s, _ in a["step1"]], [s for s, _ in a["step2"]]
    assert all(n == 2 for _, n in a["step1"] + a["step2"])
    assert seeds1 == [rollout_seed(1234, 0, i) for i in range(4)]
    assert seeds2 == [rollout_seed(1234, 1, 4 + i) for i in range(4)] and (a["step_num"], a["position"]) == (1, 4)
    every = sorted(seeds1 + seeds2)
    assert min(y - x for x, y in zip(every, every[1:])) >= 2  # no prompt meets another's seed + j
    assert b["step2"] == a["step2"] and (b["step_num"], b["position"]) == (1, 4)  # resumed: the same seeds
    assert b["responses"] == a["responses"]


def test_run_dir_logs_rollouts_and_eval_predictions(tiny_model_dir, tmp_path):
    import re

    from ophsd.tasks import get_task

    run = tmp_path / "run"
    # --eval-batch-size 1: each eval example in its own engine batch, predictions still in order
    m = _train(tiny_model_dir("llama"), run, "--train-iters", 1, "--n-samples-per-prompt", 2, "--log-rollouts", 3,
               "--eval-limit", 2, "--eval-batch-size", 1, skip_eval=False)
    assert [r["tag"] for r in m if "tag" in r] == ["before", "after"]
    # every phase's peak RSS is logged: positive, and none above the trainer process's whole-life peak
    import resource
    life_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1024 ** 3
    step_row = next(r for r in m if "loss" in r)
    for phase in ("rollout", "harness", "teacher", "student", "optimizer", "sync"):
        assert 0 < step_row[f"mem/{phase}_peak_gb"] <= life_gb + 1e-3, (phase, step_row)
    assert all(0 < r["mem/eval_peak_gb"] <= life_gb + 1e-3 for r in m if "tag" in r)
    rows = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["step"] for r in rows} == {1}
    assert [r["example_id"] for r in rows] == ["arith-train-0", "arith-train-0", "arith-train-1"]  # 3 of 2 x 2, spread
    for r in rows:
        assert set(r) == {"step", "example_id", "student_prompt", "response", "student_reward", "harness_reward",
                          "harness_mode", "teacher_context", "response_tokens", "student_prompt_tokens",
                          "teacher_prompt_tokens", "kept", "per_token_loss"}
        assert 1 <= r["response_tokens"] <= 12 and r["kept"] is True
        # the student pass's per-token reverse KL of this response: one value per token, >= 0
        assert len(r["per_token_loss"]) == r["response_tokens"] and min(r["per_token_loss"]) >= 0
        assert r["student_reward"] in (0.0, 1.0) and r["harness_reward"] in (0.0, 1.0)
        assert r["harness_mode"] in ("plan_solve", "solve_only")
        for key in ("student_prompt", "teacher_context"):
            cut = re.match(r"\[\.\.\.\d+ chars cut\.\.\.\]", r[key])
            if cut:  # longer than 300 characters: the last 300 after the marker
                assert len(r[key]) - cut.end() == 300, r[key]
            else:
                assert len(r[key]) <= 300 and r[key].startswith("<|im_start|>user\n"), r[key]
            assert r[key].endswith("<|im_start|>assistant\n")
        assert r["teacher_context"].startswith("[...")  # plan-solve's context is over 300 characters
        assert "Put the final answer in \\boxed{}" in r["student_prompt"]
        assert "the reference answer is" in r["teacher_context"]  # plan-solve's training hint
        assert r["teacher_prompt_tokens"] > r["student_prompt_tokens"]
    weighted = sum(sum(r["per_token_loss"]) for r in rows) / sum(r["response_tokens"] for r in rows)
    step_loss = next(r["loss"] for r in m if "loss" in r)
    assert 0 < weighted < 10 * step_loss  # the same scale as the step's mean loss
    arith = get_task("arith")
    for step, tag in ((0, "before"), (1, "after")):
        preds = [json.loads(x) for x in (run / "eval_predictions" / f"step_{step:07d}.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == ["arith-dev-0", "arith-dev-1"]
        assert [p["gold"] for p in preds] == [arith.example(i, "dev").answer for i in range(2)]
        for p in preds:
            assert p["step"] == step and p["tag"] == tag and p["text"] == arith.example(int(p["id"][-1]), "dev").question
            assert p["standalone_correct"] == (p["standalone_answer"] == p["gold"])
            assert p["harness_correct"] == (p["harness_answer"] == p["gold"]) and p["mode"] in ("plan_solve", "solve_only")


def _one_logged_step_worker(rank, world, model_dir, run_dir, extra):
    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, "--save", run_dir, "--log-rollouts", "2", *extra))
    m = tr.train_step()
    tr.close()
    return m["loss"]


def test_per_token_losses_reach_the_rollout_log_at_pp2(tiny_model_dir, tmp_path):
    """At PP=2 the per-token losses live on the last stage (rank 1); rank 0 writes them."""
    d = str(tiny_model_dir("llama"))
    loss = run_ranks(_one_logged_step_worker, 2, d, str(tmp_path / "run"), ["--pipeline-model-parallel-size", "2"])[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert len(r["per_token_loss"]) == r["response_tokens"] and min(r["per_token_loss"]) >= 0
    assert 0 < sum(sum(r["per_token_loss"]) for r in rows) / sum(r["response_tokens"] for r in rows) < 10 * loss


def test_opsd_run_evaluates_standalone_only(tiny_model_dir, tmp_path):
    """--harness opsd has no inference-time harness: the eval rows carry standalone accuracy only
    (a None harness accuracy used to crash the final eval's log line)."""
    m = _train(tiny_model_dir("llama"), tmp_path / "run", "--harness", "opsd", "--train-iters", 1,
               "--eval-limit", 2, "--skip-eval-before", skip_eval=False)
    evals = [r for r in m if "tag" in r]
    assert [r["tag"] for r in evals] == ["after"] and evals[0]["eval/n"] == 2
    assert "eval/harness_accuracy" not in evals[0] and 0.0 <= evals[0]["eval/standalone_accuracy"] <= 1.0


def _resume_then_prune_worker(rank, world, model_dir, run_dir):
    import shutil

    from ophsd.train.trainer import Trainer

    tr = Trainer(_args(model_dir, "--save", run_dir, "--load", run_dir, "--train-iters", "2", "--lr", "1e-3"))  # as saved
    assert tr.step_num == 1
    shutil.rmtree(Path(run_dir) / "iter_0000001")  # pruned while the resumed run goes on
    tr.train_step()
    path = tr.save_checkpoint()
    tr.close()
    return sorted(p.name for p in (path / "hf").iterdir())


def test_resumed_run_saves_after_its_source_checkpoint_is_pruned(tiny_model_dir, tmp_path):
    d, run = tiny_model_dir("llama"), tmp_path / "run"
    _train(d, run, "--train-iters", 1)
    names = sorted(p.name for p in (run / "iter_0000001" / "hf").iterdir())
    assert "config.json" in names
    got = run_ranks(_resume_then_prune_worker, 1, str(d), str(run))[0]
    assert got == names


# ------------------------------------------------------------------------------ structure


def test_train_package_has_one_small_class_per_role_and_no_import_cycle():
    """issue 15: no class in ophsd/train over ~250 lines; the role modules import each other
    without a cycle (module-level imports; function-level ones are lazy by design)."""
    import ast

    pkg = REPO / "ophsd" / "train"
    graph, sizes = {}, {}
    for f in sorted(pkg.glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                sizes[f"{f.stem}.{node.name}"] = node.end_lineno - node.lineno + 1
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ophsd.train"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n.split(".")[2] for n in names if len(n.split(".")) > 2}
        graph[f.stem] = deps & {p.stem for p in pkg.glob("*.py")}
    assert max(sizes.values()) <= 260, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert "update" in graph["trainer"] and "trainer" not in graph["update"]


@pytest.mark.parametrize("mode,harness_tags", [("every", ["before", "interval", "after"]),
                                               ("ends", ["before", "after"]), ("never", [])])
def test_eval_harness_chooses_which_evals_run_the_harness(tiny_model_dir, tmp_path, mode, harness_tags):
    """--eval-harness: interval evals can skip the costly harness-attached half (ends), or every
    eval can (never); standalone accuracy is always measured."""
    m = _train(tiny_model_dir("llama"), tmp_path / "run", "--train-iters", 2, "--eval-interval", 1,
               "--eval-limit", 2, "--eval-harness", mode, skip_eval=False)
    evals = [r for r in m if "tag" in r]
    assert [r["tag"] for r in evals] == ["before", "interval", "after"]
    assert all(0.0 <= r["eval/standalone_accuracy"] <= 1.0 and r["eval/n"] == 2 for r in evals)
    assert [r["tag"] for r in evals if "eval/harness_accuracy" in r] == harness_tags


# ------------------------------------------------------------------------------ schedule and resume


def test_wsd_schedule_matches_float64_reference():
    """--lr-decay-style WSD: constant --lr, then a decay to --min-lr over the last
    --lr-wsd-decay-iters steps (megatron-core's scheduler, checked against a float64 formula)."""
    from ophsd.train.config import ConfigError, TrainConfig, parse_args
    from ophsd.train.update import build_scheduler

    def cfg(*argv):
        return TrainConfig.from_args(parse_args(list(argv))).optim

    o = cfg("--train-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "WSD",
            "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", "cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(opt, o)
    got = []
    for _ in range(10):
        sched.step(increment=1)
        got.append(opt.param_groups[0]["lr"])
    import math

    want = [1e-3 if k <= 6 else 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (k - 6) / 4))
            for k in range(1, 11)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == pytest.approx(1e-4) and got[5] == 1e-3 and got[6] < 1e-3
    with pytest.raises(ConfigError, match="--lr-decay-style WSD needs --lr-wsd-decay-iters"):
        cfg("--lr-decay-style", "WSD")
    with pytest.raises(ConfigError, match=r"--lr-wsd-decay-iters must be in \[1, "):
        cfg("--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "11")
    with pytest.raises(ConfigError, match="applies only with --lr-decay-style WSD"):
        cfg("--lr-wsd-decay-iters", "3")


def test_schedule_differences_name_what_changes_the_lr():
    from ophsd.train.config import TrainConfig, parse_args
    from ophsd.train.update import lr_schedule, schedule_differences

    def sched(*argv):
        return lr_schedule(TrainConfig.from_args(parse_args(["--train-iters", "10", *argv])).optim)

    const = sched("--lr", "1e-4")
    assert schedule_differences(const, lr_schedule(TrainConfig.from_args(
        parse_args(["--train-iters", "40", "--lr", "1e-4"])).optim)) == []  # a longer constant run
    assert schedule_differences(const, sched("--lr", "2e-4")) == ["--lr: 0.0001 -> 0.0002"]
    assert schedule_differences(const, sched("--lr", "1e-4", "--lr-decay-style", "WSD",
                                             "--lr-wsd-decay-iters", "4")) == ["--lr-decay-style: constant -> WSD"]
    wsd = sched("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4")
    assert schedule_differences(wsd, sched("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5")) == \
        ["--lr-wsd-decay-iters: 4 -> 5"]
    lin = sched("--lr-decay-style", "linear")
    assert schedule_differences(lin, lr_schedule(TrainConfig.from_args(
        parse_args(["--train-iters", "20", "--lr-decay-style", "linear"])).optim)) == ["--train-iters: 10 -> 20"]
    old = {k: v for k, v in const.items() if k not in ("wsd_decay_steps", "lr_wsd_decay_style")}
    assert schedule_differences(old, const) == []  # a checkpoint from before the WSD keys


def test_resume_on_a_new_schedule_needs_override(tiny_model_dir, tmp_path):
    """Resuming a constant-lr run with a WSD decay: refused with a message naming
    --override-opt-param-scheduler (megatron-core would silently keep the saved schedule); with it,
    steps 3-4 get the learning rates an uninterrupted WSD run has at steps 3-4."""
    d, run = tiny_model_dir("llama"), tmp_path / "run"
    _train(d, run, "--train-iters", 2)
    wsd = ["--train-iters", 4, "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", 2, "--min-lr", "1e-4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "ophsd.train", "--model", str(d), "--save", str(run), "--load", str(run),
                        "--rollout-batch-size", "2", "--micro-batch-size", "2", "--skip-eval", "--no-tensorboard",
                        "--lr", "1e-3", *map(str, wsd)], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--lr-decay-style: constant -> WSD" in r.stderr and "--override-opt-param-scheduler" in r.stderr
    resumed = _train(d, run, *wsd, "--load", run, "--override-opt-param-scheduler")
    straight = _train(d, tmp_path / "straight", *wsd)
    lr = {m["step"]: m["lr"] for m in resumed if "lr" in m}
    assert [lr[1], lr[2]] == [1e-3, 1e-3]  # the constant part, from before the resume
    assert [lr[3], lr[4]] == pytest.approx([m["lr"] for m in straight if m["step"] in (3, 4) and "lr" in m],
                                           rel=1e-12)
    assert lr[4] == pytest.approx(1e-4) and 1e-4 < lr[3] < 1e-3


def test_resume_redoes_an_interval_eval_the_kill_lost(tiny_model_dir, tmp_path):
    """The checkpoint of an eval step is saved just before its eval: a run killed during that eval
    resumes and evaluates that step first; a run whose eval row exists does not evaluate it twice."""
    import shutil

    d, run = tiny_model_dir("llama"), tmp_path / "run"
    common = ["--eval-interval", 2, "--save-interval", 2, "--eval-limit", 2, "--skip-eval-before",
              "--eval-harness", "never"]
    _train(d, run, "--train-iters", 2, *common, skip_eval=False)
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in rows if "eval/standalone_accuracy" not in x))
    lost = _train(d, run, "--train-iters", 4, *common, "--load", run, skip_eval=False)
    assert [(m["step"], m["tag"]) for m in lost if "eval/standalone_accuracy" in m] == [(2, "interval"), (4, "after")]
    again = _train(d, kept, "--train-iters", 4, *common, "--load", kept, skip_eval=False)
    assert [(m["step"], m["tag"]) for m in again if "eval/standalone_accuracy" in m] == [(2, "after"), (4, "after")]
