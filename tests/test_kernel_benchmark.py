"""tools/bench_kernel.py on CPU: every row is checked against ours before it is timed.

A row that computes another function (log-probabilities rounded to bf16, the gradient w.r.t.
log-probabilities instead of logits, a wrong beta) must be labelled ``no (why)`` in the
``equivalent`` column; the chunked-PyTorch row, which computes our function, ``yes``. The
Liger rows need CUDA; their situations are reproduced here with a pure-PyTorch JSD on
log-probabilities (Liger's formula: beta weights the teacher, beta=1 is reverse KL, beta=0
forward KL, mean over rows). Tolerances: ``bench_kernel.LOSS_RTOL`` / ``GRAD_RTOL`` (their
comment says why).
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_kernel as bm  # noqa: E402  (tools/ is not a package)


def logprob_jsd(log_q, log_p, beta):
    """Liger-Kernel's generalized JSD on log-probabilities (student q, teacher p), fp32 inside,
    mean over rows."""
    lq, lp = log_q.float(), log_p.float()
    if beta == 0.0:
        per = (lp.exp() * (lp - lq)).sum(-1)
    elif beta == 1.0:
        per = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        per = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    return per.mean()


def _liger_like(k, b):
    return {"jsd": b, "reverse_kl": 1.0, "forward_kl": 0.0}[k]


# The Liger rows' situations, on CPU:
LIKE_LIGER = {
    # liger_jsd: log_softmax in the logits' dtype inside the row, gradient back to the logits
    "like_liger_jsd": bm.Impl(
        lambda s, t, k, b, T, ctx: logprob_jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                               _liger_like(k, b)),
        inputs="log-probabilities in the logits' dtype"),
    # liger_jsd_fp32: the same on fp32 log-probabilities: our function
    "like_liger_jsd_fp32": bm.Impl(
        lambda s, t, k, b, T, ctx: logprob_jsd(torch.log_softmax(s.float(), -1),
                                               torch.log_softmax(t.float(), -1), _liger_like(k, b)),
        inputs="fp32 log-probabilities"),
    # liger_jsd_kernel: precomputed log-probabilities, differentiated w.r.t. them
    "like_liger_jsd_kernel": bm.Impl(
        lambda s, t, k, b, T, ctx: logprob_jsd(s, t, _liger_like(k, b)),
        prepare=bm._log_softmax_pair, grad_wrt="log-probabilities",
        inputs="precomputed log-probabilities in the logits' dtype"),
    # the other KL direction (a plain bug: the right shapes, the wrong function)
    "wrong_direction": bm.Impl(
        lambda s, t, k, b, T, ctx: bm.torch_chunked(
            s, t, "forward_kl" if k == "reverse_kl" else "reverse_kl", b, T)),
}


@pytest.fixture
def impls(monkeypatch):
    for name, spec in LIKE_LIGER.items():
        monkeypatch.setitem(bm.IMPLS, name, spec)


def logits(n, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = 0.5 * s + torch.randn(n, v, generator=g) * scale
    return s.to(dtype), t.to(dtype)


def check(impl, kind, dtype, mode, beta=0.3, n=16, v=3001, seed=0):
    s, t = logits(n, v, dtype, seed)
    s0, t0 = s.clone(), t.clone()
    out = bm.check_equivalence(impl, kind, s, t, mode, beta, 1.0, {"backend": "auto", "liger": None},
                               rows=12)
    assert torch.equal(s, s0) and torch.equal(t, t0), "the check modified the inputs"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_torch_chunked_is_equivalent(kind, dtype):
    for mode in ("fwd", "fwd+bwd"):
        label, loss_rel, grad_rel = check("torch_chunked", kind, dtype, mode)
        assert label == "yes", (kind, dtype, mode, label)
        assert loss_rel < 1e-5
        if mode == "fwd":
            assert grad_rel is None
        else:
            assert grad_rel < (1e-5 if dtype == torch.float32 else bm.GRAD_RTOL["bf16"])


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_logprob_rows_equivalent_only_in_fp32_and_wrt_logits(impls, kind):
    # fp32 log-probabilities, differentiated back to the logits: our function
    label, loss_rel, grad_rel = check("like_liger_jsd_fp32", kind, torch.bfloat16, "fwd+bwd")
    assert label == "yes" and loss_rel < 1e-5 and grad_rel < bm.GRAD_RTOL["bf16"], label
    # bf16 log-probabilities (liger_jsd as benchmarked): the loss is another number
    label, loss_rel, _ = check("like_liger_jsd", kind, torch.bfloat16, "fwd")
    assert loss_rel > bm.LOSS_RTOL
    assert label.startswith("no (loss off by") and "fed log-probabilities in the logits' dtype" in label
    # the kernel alone: loss on bf16 log-probabilities and the gradient w.r.t. them
    label, _, grad_rel = check("like_liger_jsd_kernel", kind, torch.bfloat16, "fwd+bwd")
    assert label.startswith("no (") and "gradient w.r.t. log-probabilities, not the logits" in label
    assert grad_rel is None
    # in fp32 the kernel-alone row's loss is ours, but its gradient still is not
    label, loss_rel, _ = check("like_liger_jsd_kernel", kind, torch.float32, "fwd")
    assert label == "yes" and loss_rel < 1e-5, label
    label, _, _ = check("like_liger_jsd_kernel", kind, torch.float32, "fwd+bwd")
    assert label == "no (gradient w.r.t. log-probabilities, not the logits; fed precomputed " \
                    "log-probabilities in the logits' dtype)", label


def test_wrong_function_is_not_equivalent(impls):
    for kind in ("reverse_kl", "forward_kl"):
        label, loss_rel, grad_rel = check("wrong_direction", kind, torch.float32, "fwd+bwd")
        assert loss_rel > 1e-2 and grad_rel > 1e-2, (kind, loss_rel, grad_rel)
        assert label.startswith("no (loss off by") and "gradient off by" in label, label
        assert "fed" not in label  # it reads the logits: no input caveat
        label, _, grad_rel = check("wrong_direction", kind, torch.float32, "fwd")
        assert label.startswith("no (loss off by") and grad_rel is None


def test_table_labels_rows_and_reports_both_floors(impls, tmp_path, capsys):
    rc = bm.main(["--device", "cpu", "--tokens", "24", "--vocab", "1000", "--dtype", "bf16",
                  "--kinds", "jsd", "--modes", "fwd+bwd", "--cpu-reps", "1", "--equiv-rows", "16",
                  "--impls", "ours-torch,torch_chunked,like_liger_jsd,like_liger_jsd_kernel",
                  "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "read-only bandwidth" in text and "equivalent" in text and "floor_read_ms" in text
    rows, meta = bm.load_csv(tmp_path / "bench_t.csv")
    assert float(meta["read_tbps"]) > 0 and float(meta["copy_tbps"]) > 0
    by = {r.impl: r for r in rows}
    assert set(by) == {"ours-torch", "torch_chunked", "like_liger_jsd", "like_liger_jsd_kernel"}
    ref = bm.ref_backend(torch.device("cpu"))
    assert by["ours-torch"].equivalent == ("reference" if ref == "torch" else "yes")
    assert by["torch_chunked"].equivalent == "yes"
    assert by["like_liger_jsd"].equivalent.startswith("no (loss off by")
    assert "gradient w.r.t. log-probabilities" in by["like_liger_jsd_kernel"].equivalent
    for r in rows:
        assert r.ms > 0 and r.floor_ms > 0 and r.floor_read_ms > 0
        assert r.x_floor_read == pytest.approx(r.ms / r.floor_read_ms)
    # the CSV keeps the label whole (it holds commas and semicolons)
    with open(tmp_path / "bench_t.csv") as f:
        recs = list(csv.DictReader(line for line in f if not line.startswith("# ")))
    assert {r["impl"]: r["equivalent"] for r in recs}["like_liger_jsd"] == by["like_liger_jsd"].equivalent


def test_unknown_impl_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown --impls"):
        bm.main(["--device", "cpu", "--tokens", "4", "--vocab", "64", "--impls", "nope",
                 "--out", str(tmp_path)])


def test_append_merges_runs_and_recomputes_speedups(tmp_path):
    """gpu_validate.sh's headline step measures torch.compile in a second invocation with
    --append: one CSV, speed-ups against the first run's torch_chunked rows."""
    common = ["--device", "cpu", "--tokens", "8", "--vocab", "500", "--kinds", "reverse_kl",
              "--modes", "fwd", "--cpu-reps", "1", "--equiv-rows", "4", "--out", str(tmp_path),
              "--tag", "h"]
    assert bm.main(common + ["--impls", "torch_chunked"]) == 0
    assert bm.main(common + ["--impls", "ours-torch", "--append"]) == 0
    rows, meta = bm.load_csv(tmp_path / "bench_h.csv")
    assert [r.impl for r in rows] == ["torch_chunked", "ours-torch"]
    base, ours = rows
    assert ours.speedup_vs_torch_chunked == pytest.approx(base.cpu_ms / ours.cpu_ms, rel=1e-3)
    assert "read_tbps" in meta and not list(tmp_path.glob("*.tmp"))


def test_runbook_scripts_parse():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for script in ("kernels/gpu_validate.sh", "examples/h100/device_check.sh",
                   "examples/h100/device_prepare.sh"):
        r = subprocess.run(["bash", "-n", str(root / script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
