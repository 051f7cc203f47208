"""Prefix-tree packing and response-row logits: exactly the unpacked step, at TP=1, TP=2 and PP=2."""
import pytest
import torch

from tests.dist_utils import run_ranks


def _shared_prefix_samples(seed=0):
    """Prompts sharing a task-wide instruction, n=2 samples each (one pair identical), odd lengths,
    one prompt with no common prefix at all, and a student prompt that is a prefix of another."""
    from ophsd.train.pairs import Sample

    g = torch.Generator().manual_seed(seed)

    def r(n):
        return torch.randint(5, 400, (n,), generator=g).tolist()

    instruction, t_instruction = r(23), r(17)
    out = []
    for p in range(3):
        sp = instruction + r(3 + 2 * p)
        tp = t_instruction + r(11 + p)
        first = r(5 + p)
        out.append(Sample(sp, tp, first, weight=1.0 + p))
        out.append(Sample(sp, tp, first if p == 1 else r(4 + 3 * p), weight=1.0 + p))  # p=1: identical pair
    out.append(Sample(r(9), r(13), r(6)))  # nothing shared
    out.append(Sample(instruction[:15], t_instruction + [7], r(3)))  # a prefix of the others' prompts
    return out


def test_tree_layout_reproduces_each_sequence():
    """Every sequence, read along its path, sees exactly its own prefix at its own positions."""
    from ophsd.train.pairs import tree_attention_mask, tree_layout

    seqs = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [9, 8], [1, 2], [1, 2, 3, 4, 6, 7]]
    tokens, depth, end, paths = tree_layout(seqs)
    assert len(tokens) == 9  # distinct prefixes: 1,2,3,4,5,6,7 under [1,2]; 9,8
    vis = ~tree_attention_mask(torch.tensor([end]))[0, 0]
    for s, path in zip(seqs, paths):
        assert [tokens[p] for p in path] == s and [depth[p] for p in path] == list(range(len(s)))
        for d, p in enumerate(path):
            assert set(vis[p].nonzero().flatten().tolist()) == set(path[: d + 1])
    assert paths[0] == paths[2]  # identical sequences share every position


def test_pack_layouts_and_budget():
    from ophsd.train.pairs import layout_stats, pack, packed_length

    samples = _shared_prefix_samples()
    padded = pack(samples, micro_batch_size=3, packed=False)
    tree = pack(samples, packed=True, max_tokens=64)
    assert len(tree) > 1 and all(mb.student.tokens.shape == tree[0].student.tokens.shape for mb in tree)
    for mbs in (padded, tree):
        for name in ("student_prompt", "teacher_prompt"):
            # the logit for response token j sits at the token before it, at position Lp - 1 + j
            want_tok = [t for s in samples for t in [getattr(s, name)[-1]] + s.response[:-1]]
            want_pos = [len(getattr(s, name)) - 1 + j for s in samples for j in range(len(s.response))]
            rows = [mb.student if name == "student_prompt" else mb.teacher for mb in mbs]
            got_tok = torch.cat([r.tokens[r.rows, r.pos] for r in rows])
            got_pos = torch.cat([r.position_ids[r.rows, r.pos] for r in rows])
            live = torch.cat([mb.weights > 0 for mb in mbs])
            assert got_tok[live].tolist() == want_tok and got_pos[live].tolist() == want_pos
    from ophsd.train.pairs import _group_by_budget, _scored

    groups = _group_by_budget(samples, 64)
    for g in groups:  # the budget holds for every micro-batch of more than one sample
        for p in ("student_prompt", "teacher_prompt"):
            size = packed_length([_scored(getattr(s, p), s.response)[0] for s in g])
            assert size <= 64 or len(g) == 1
    assert sum(len(g) for g in groups) == len(samples) and len(groups) == len(tree)
    flat = [t for mb in tree for t in mb.targets.tolist()]
    assert flat == [t for s in samples for t in s.response]
    one = pack(samples, packed=True, max_tokens=10_000)
    assert len(one) == 1
    stats_tree, stats_pad = layout_stats(one), layout_stats(padded)
    n = sum(len(s.response) for s in samples)
    assert stats_tree["layout/response_tokens"] == n
    expect = packed_length([s.student_prompt + s.response[:-1] for s in samples])
    assert one[0].student.tokens.shape[1] == -(-expect // 8) * 8
    assert stats_tree["layout/student_positions"] < stats_pad["layout/student_positions"]


def _pass_worker(rank, world, model_dir, tp, pp, kind, forward_only=False):
    from ophsd.runtime.distributed import comm_device
    from ophsd.train import step
    from ophsd.train.config import TrainConfig, parse_args
    from ophsd.train.pairs import pack
    from ophsd.train.trainer import Trainer

    tr = Trainer(TrainConfig.from_args(parse_args([
        "--model", str(model_dir), "--skip-eval", "--no-tensorboard", "--optimizer", "sgd",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)])))
    samples = _shared_prefix_samples()
    n = sum(len(s.response) for s in samples)
    out = {}
    for packed in (False, True):
        mbs = step.to_device(pack(samples, 4, packed=packed, max_tokens=48), comm_device())
        teacher = step.teacher_response_logits(tr.teacher, mbs, tr.groups)
        base = step.divergence_loss(teacher, tr.groups, kind=kind, beta=0.5, temperature=1.0,
                                    vocab_size=tr.spec.vocab_size, backend="torch")
        seen = []

        def per_token(rows, mb, i, w):
            v = base(rows, mb, i, w)
            seen.append(v.detach().double())
            return v

        tr.model.zero_grad_buffer()
        res = step.student_pass(tr.model, mbs, per_token, [mb.weights for mb in mbs], tr.groups,
                                forward_only=forward_only)
        grads = {k: p.main_grad.detach().double().clone() for k, p in tr.module.named_parameters()}
        last = teacher[0] is not None
        out[packed] = dict(loss=res["loss"], grads=grads, n_mb=len(mbs),
                           per_token=torch.cat(seen)[:n] if last else None,
                           teacher=torch.cat(teacher)[:n].double() if last else None)
    tr.close()
    a, b = out[False], out[True]
    rel = {k: float((b["grads"][k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in a["grads"].items()
           if not forward_only}
    res = dict(loss=(a["loss"], b["loss"]), grad_rel=rel, n_mb=(a["n_mb"], b["n_mb"]),
               grad_norm=sum(float(g.norm()) for g in a["grads"].values()))
    if a["per_token"] is not None:
        res["per_token"] = (a["per_token"], b["per_token"])
        res["teacher_max_diff"] = float((a["teacher"] - b["teacher"]).abs().max())
    return res


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_packed_pass_equals_unpacked(tiny_model_dir, tp, pp):
    """Per-token divergence, loss and every parameter gradient match the padded layout (fp32,
    relative 1e-5; only attention reduction order differs). Student and teacher prompts share
    prefixes within a prompt group and across prompts; several packed micro-batches."""
    d = str(tiny_model_dir("llama"))
    results = run_ranks(_pass_worker, tp * pp, d, tp, pp, "reverse_kl")
    for r in results:
        assert r["n_mb"][1] > 1  # several packed micro-batches (padded to one length)
        assert r["loss"][0] > 1e-3 and r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5)
        assert r["grad_norm"] > 0
        worst = max(r["grad_rel"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, worst
        if "per_token" in r:
            ref, got = r["per_token"]
            assert ref.abs().max() > 1e-3
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
            assert r["teacher_max_diff"] < 1e-4


def test_packed_jsd_qwen3(tiny_model_dir):
    """QK-norm and Qwen's RoPE theta through the explicit-position RoPE; JSD's third pass."""
    (r,) = run_ranks(_pass_worker, 1, str(tiny_model_dir("qwen3")), 1, 1, "jsd")
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5)
    assert max(r["grad_rel"].values()) < 1e-5
    torch.testing.assert_close(r["per_token"][1], r["per_token"][0], rtol=1e-5, atol=1e-7)


def test_flex_tree_attention_matches_dense():
    """The block-sparse FlexAttention path (the CUDA default) computes the dense-mask attention,
    forward and backward, with GQA, two rows and padding (eager flex on CPU)."""
    import torch.nn.functional as F

    from ophsd.models.megatron import tree_flex_attention
    from ophsd.train.pairs import tree_attention_mask, tree_layout

    torch.manual_seed(0)
    L = 48
    ends = []
    for seqs in ([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8], [9, 9, 9], [1, 2, 3, 4, 5, 6, 1, 1]], [[5] * 30, [5] * 20 + [6]]):
        end = tree_layout(seqs)[2]
        ends.append(end + [len(end) + i + 1 for i in range(L - len(end))])  # padding sees itself
    end = torch.tensor(ends)
    q = torch.randn(2, 4, L, 16, dtype=torch.float64)
    k = torch.randn(2, 2, L, 16, dtype=torch.float64)
    v = torch.randn(2, 2, L, 16, dtype=torch.float64)
    got = tree_flex_attention(q, k, v, end, scale=0.25)  # forward only: CPU flex has no backward
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=~tree_attention_mask(end), scale=0.25)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    wrong = end.clone()
    wrong[0, 3] += 1  # one token visible one position too far: the comparison must notice
    assert not torch.allclose(tree_flex_attention(q, k, v, wrong, scale=0.25), ref)


def test_packed_pass_with_flex_attention(tiny_model_dir, monkeypatch):
    """The packed teacher and student forward through the FlexAttention core attention (block-sparse,
    megatron's schedule) equal the padded layout's. Forward only: FlexAttention has no CPU
    backward; tests/test_divergence_gpu.py-style CUDA runs check the backward on a GPU."""
    monkeypatch.setenv("OPHSD_TREE_ATTENTION", "flex")
    (r,) = run_ranks(_pass_worker, 1, str(tiny_model_dir("llama")), 1, 1, "reverse_kl", True)
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-5)
    assert r["teacher_max_diff"] < 1e-4
    torch.testing.assert_close(r["per_token"][1], r["per_token"][0], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled FlexAttention, backward included")
def test_packed_pass_with_flex_attention_cuda(tiny_model_dir):
    (r,) = run_ranks(_pass_worker, 1, str(tiny_model_dir("llama")), 1, 1, "reverse_kl")
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-4)
    assert max(r["grad_rel"].values()) < 1e-4
