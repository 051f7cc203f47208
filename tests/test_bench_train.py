"""tools/bench_train.py: the FLOPs formula against torch's FlopCounterMode and Megatron-LM's
expression, CPU smoke runs (two backends side by side, TP=2 under torchrun), user errors."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "bench_train.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bt = _load()


def _llama_gqa_untied():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=512)


CONFIGS = {"qwen3-tiny": lambda: bt.tiny_config(), "llama-gqa-untied": _llama_gqa_untied}


def _hf_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # Eager attention: explicit matmuls for Q K^T and A V over the full s x s square (the causal
    # mask is added, not skipped), which FlopCounterMode counts. (CPU SDPA dispatches to
    # _scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode does not count at all;
    # its CUDA SDPA formulas count the full square too.)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")


# ------------------------------------------------------------------------------------ FLOPs
# Tolerance 0.1%: the formula counts every matmul of the HF forward (projections, attention
# square, SwiGLU, logits over the true vocabulary); norms, RoPE and softmax are no matmuls.
# Measured: exact equality for both configs.
FLOPS_RTOL = 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_flops_match_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = CONFIGS[name]()
    model = _hf_model(cfg)
    b, s = 2, 40
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    counted = fc.get_total_flops()
    ours = bt.forward_flops(cfg, s, b * s)  # HF config: the true vocabulary, what HF computes
    assert ours["total"] == pytest.approx(counted, rel=FLOPS_RTOL), (ours, fc.get_flop_counts())
    # The attention square alone is what the bmm's count (eager: Q K^T and A V per head).
    bmm = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "bmm" in str(k))
    assert ours["attention_scores"] == pytest.approx(bmm, rel=FLOPS_RTOL)
    # causal=True halves exactly that term
    half = bt.forward_flops(cfg, s, b * s, causal=True)
    assert half["total"] == pytest.approx(ours["total"] - ours["attention_scores"] / 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_is_twice_forward(name):
    """FlopCounterMode over forward+backward = 3x forward (dgrad + wgrad per GEMM): the 3 passes."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = CONFIGS[name]()
    model = _hf_model(cfg)
    b, s = 2, 24
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with FlopCounterMode(display=False) as fc:
        model(ids).logits.float().pow(2).mean().backward()
    counted = fc.get_total_flops()
    step = bt.train_step_flops(cfg, s, b * s)
    assert step["student"] == pytest.approx(counted, rel=FLOPS_RTOL)
    assert step["student"] == 3 * step["student_forward"] and step["teacher"] == 0


def _megatron_lm(seq_length, num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                 kv_channels, padded_vocab_size, batch_size, causal=False):
    """Megatron-LM megatron/training/training.py ``num_floating_point_operations`` (dense, SwiGLU,
    GQA, no MoE/MLA), transcribed; ``causal`` is the ``/ 2`` newer releases put on the square."""
    query_projection_to_hidden_size_ratio = kv_channels * num_attention_heads / hidden_size
    gated_linear_multiplier = 3 / 2
    expansion_factor = 3 * 2 * 2
    return (
        expansion_factor * batch_size * seq_length * num_layers * hidden_size * hidden_size * (
            ((1 + num_query_groups / num_attention_heads + seq_length / hidden_size / (2 if causal else 1))
             * query_projection_to_hidden_size_ratio)
            + (ffn_hidden_size / hidden_size) * gated_linear_multiplier
            + padded_vocab_size / (2 * num_layers * hidden_size)
        )
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_matches_megatron_lm_formula(causal, tp):
    from ophsd.models.megatron import model_spec_from_hf

    spec = model_spec_from_hf(bt.qwen3_1p7b_config(), tp, 1)
    b, s = 3, 4096
    ref = _megatron_lm(s, 28, 2048, 6144, 16, 8, 128, spec.padded_vocab_size, b, causal)
    got = bt.train_step_flops(spec, s, b * s, causal=causal)  # spec: padded vocabulary
    assert got["student"] == pytest.approx(ref, rel=1e-12)
    # A teacher with a longer context: one forward over its own tokens and sequence length.
    t = s + 512
    got = bt.train_step_flops(spec, s, b * s, teacher_seq_len=t, teacher_tokens=b * t, causal=causal)
    ref_t = _megatron_lm(t, 28, 2048, 6144, 16, 8, 128, spec.padded_vocab_size, b, causal) / 3
    assert got["teacher"] == pytest.approx(ref_t, rel=1e-12)
    assert got["total"] == pytest.approx(ref + ref_t, rel=1e-12)


def test_param_count_matches_hf():
    for make in (bt.tiny_config, _llama_gqa_untied):
        cfg = make()
        assert bt.param_count(cfg) == sum(p.numel() for p in _hf_model(cfg).parameters())
    assert abs(bt.param_count(bt.qwen3_1p7b_config()) - 1.72e9) < 0.01e9  # Qwen3-1.7B: 1.7B (1.4B non-embedding)


# ------------------------------------------------------------------------ the shared update


def test_bench_and_trainer_call_the_same_update_function(monkeypatch):
    """The benchmark's step and the trainer's update both go through ``ophsd.train.update.update_step``."""
    from collections import Counter
    from types import SimpleNamespace

    from ophsd.train import update

    class Called(Exception):
        pass

    calls = []

    def fake(model, module, optimizer, mbs, objective, teacher, **kw):
        calls.append((model, mbs, objective.kind, teacher))
        raise Called

    monkeypatch.setattr(update, "update_step", fake)
    args = SimpleNamespace(divergence="reverse_kl", beta=0.5, distill_temperature=1.0, _layout="packed")
    with pytest.raises(Called):
        bt.timed_step("model", "module", "opt", "teacher", ["mb"], None, args, SimpleNamespace(vocab_size=10), "torch",
                      "groups")
    u = update.Updater("model", "module", "opt", "sched", update.Objective(), "teacher", update.Packing(2), Counter(),
                       "groups")
    monkeypatch.setattr(u, "_share", lambda samples, count_remainder: samples)
    monkeypatch.setattr(u, "_pack", lambda mine: ["mb"])
    with pytest.raises(Called):
        u.train(["sample"], step_num=0)
    assert calls == [("model", ["mb"], "distill", "teacher")] * 2


# ------------------------------------------------------------------------------ smoke runs


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


SMALL = ["--seq-length", "128", "--response-length", "64", "--teacher-extra-length", "32"]


def _bench(out, *extra, torchrun=0):
    cmd = [sys.executable, str(SCRIPT)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), str(SCRIPT)]
    cmd += ["--model", "tiny", "--steps", "2", "--warmup-steps", "1", "--kernel-backend", "cpp,torch",
            "--out", str(out), "--no-progress", *SMALL, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "bench_train.json").read_text()), r


def _cpp_built():
    from ophsd_kernels import backend_status

    mod, why = backend_status("cpp", "cpu")
    if mod is None:
        pytest.skip(f"the smoke runs compare the cpp and torch backends: {why}")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    _cpp_built()
    out = tmp_path_factory.mktemp("bench_tp1")
    return (*_bench(out), out)


def test_cpu_smoke_two_backends(tp1):
    data, r, out = tp1
    meta, res = data["meta"], data["results"]
    assert [x["backend"] for x in res] == ["cpp", "torch"]
    assert meta["device"].startswith("CPU: ") and meta["device"] in (out / "bench_train.md").read_text()
    assert "tools/bench_train.py --model tiny" in meta["command"]
    mbs, nmb, seq = 1, 2, 128
    assert meta["tokens_per_step"] == mbs * seq * nmb * 1 and meta["teacher_tokens_per_step"] == mbs * 160 * nmb
    flops = bt.train_step_flops(bt.tiny_config(), seq, mbs * seq * nmb, 160, mbs * 160 * nmb, vocab_size=1024)
    assert meta["flops_per_step"] == pytest.approx(flops)
    for x in res:
        assert x["tokens_per_step"] == mbs * seq * nmb
        assert len(x["step_s"]) == 2 and len(x["losses"]) == 3 and x["step_s_median"] > 0
        assert x["tokens_per_s_per_gpu"] == pytest.approx(x["tokens_per_step"] / x["step_s_median"])
        assert x["student_tflops_per_gpu"] == pytest.approx(flops["student"] / x["step_s_median"] / 1e12)
        assert x["mfu"] is None  # no peak on CPU unless --peak-tflops
        assert x["teacher_s_median"] > 0 and x["peak_memory_gib"] > 0
        assert all(math.isfinite(v) and v > 0 for v in x["losses"])
    # same weights, same data: the first step's loss is backend-independent (then Adam moves on)
    a, b = res[0]["first_loss"], res[1]["first_loss"]
    assert a > 1e-3 and abs(a - b) <= 1e-4 * abs(a), (a, b)
    assert meta["first_loss_max_rel_diff"] <= 1e-4
    md = (out / "bench_train.md").read_text()
    assert md.count("\n| padded | cpp |") == 1 and md.count("\n| padded | torch |") == 1
    assert "| padded | cpp |" in r.stdout and "max relative difference" in r.stdout


def test_cpu_tp2_torchrun_matches_tp1(tp1, tmp_path):
    """TP=2 on two gloo ranks: same random weights (CPU init splits one master weight) and data,
    so the first-step losses equal TP=1's."""
    data, _ = _bench(tmp_path, "--tensor-model-parallel-size", "2", torchrun=2)
    meta, res = data["meta"], data["results"]
    assert meta["tp"] == 2 and meta["world_size"] == 2 and meta["command"].startswith("torchrun --nproc-per-node 2")
    assert res[0]["tokens_per_s_per_gpu"] == pytest.approx(res[0]["tokens_per_step"] / res[0]["step_s_median"] / 2)
    ref = tp1[0]["results"][0]["first_loss"]
    for x in res:
        assert x["first_loss"] == pytest.approx(ref, rel=1e-5)


def test_cpu_no_teacher_distributed_optimizer(tmp_path):
    """--no-teacher (fixed random teacher rows, no teacher forward) with the distributed optimizer."""
    data, _ = _bench(tmp_path, "--no-teacher", "--use-distributed-optimizer", "--kernel-backend", "torch",
                     "--steps", "1", "--warmup-steps", "0", "--peak-tflops", "1")
    meta, (x,) = data["meta"], data["results"]
    assert not meta["teacher"] and meta["teacher_tokens_per_step"] == 0 and meta["flops_per_step"]["teacher"] == 0
    assert x["teacher_s_median"] < x["student_fwd_bwd_s_median"] and x["first_loss"] > 0.1
    assert x["mfu"] == pytest.approx(x["student_tflops_per_gpu"]) and x["mfu"] == x["mfu_incl_teacher"]


# ------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize("argv, msg", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--model", "tiny", "--tensor-model-parallel-size", "3"],
     "TP=3 does not divide the attention heads (4) and KV heads (2) of this model; valid TP sizes: [1, 2]"),
    (["--model", "tiny", "--tensor-model-parallel-size", "2"], "does not divide the 1 launched ranks"),
    (["--model", "tiny", "--pipeline-model-parallel-size", "3"], "PP=3 does not divide the 2 layers"),
    (["--model", "qwen3-17b"], "model 'qwen3-17b' not found"),
    (["--kernel-backend", "cpp,fast"], "unknown backend 'fast'"),
    (["--kernel-backend", "cpp,cpp"], "lists a backend twice"),
    (["--seq-length", "64", "--response-length", "64"], "--seq-length (64) must exceed --response-length (64)"),
    (["--model", "tiny", "--seq-length", "40000"], "exceeds the model's max_position_embeddings (32768)"),
])
def test_user_errors_are_one_line(argv, msg, capsys):
    assert bt.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_train.py: error: ") and msg in err and err.count("\n") == 1, err


def test_user_error_in_a_subprocess_has_no_traceback():
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "/nonexistent/dir"], capture_output=True,
                       text=True, cwd=REPO, env=_env(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench_train.py: error: --model: model '/nonexistent/dir'")


def test_task_shape_layouts_agree(tmp_path):
    """BANKING77-shaped step: the three layouts compute the same first loss (the packed one is the
    trainer's default), and packing cuts computed positions per loss-carrying token below 4."""
    data, r = _bench(tmp_path, "--shape", "banking77", "--layouts", "full-logits,padded,packed",
                     "--kernel-backend", "torch", "--micro-batch-size", "4")
    meta, res = data["meta"], data["results"]
    assert [x["layout"] for x in res] == ["full-logits", "padded", "packed"]
    assert meta["first_loss_max_rel_diff"] <= 1e-5, [x["first_loss"] for x in res]
    by = {x["layout"]: x for x in res}
    assert by["padded"]["student_positions_per_token"] == by["full-logits"]["student_positions_per_token"] > 20
    assert by["packed"]["student_positions_per_token"] < 4
    assert by["packed"]["teacher_positions_per_token"] < by["padded"]["teacher_positions_per_token"] / 3
    assert by["packed"]["tokens_per_step"] < by["padded"]["tokens_per_step"] / 5
    assert "| packed | torch |" in (tmp_path / "bench_train.md").read_text()
