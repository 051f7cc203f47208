"""The HF <-> Megatron mapping registry, without megatron-core: every architecture's mapping
objects round-trip a random state dict exactly (HF -> Megatron -> HF, and through TP=1/TP=2
shards), and cover every HF parameter of a tiny model of that architecture."""
import pytest
import torch

from tests.tiny_models import tiny_config

ARCHS = ["llama", "llama-untied", "qwen2", "qwen3"]


def _hf_params(cfg) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return {k: tuple(p.shape) for k, p in model.named_parameters()}  # a tied lm_head is listed once


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp", [1, 2])
def test_registry_roundtrip_exact(arch, tp):
    from ophsd.models import mapping
    from ophsd.models.megatron import model_spec_from_hf

    cfg = tiny_config(arch)
    spec = model_spec_from_hf(cfg, tp=tp)
    shapes = _hf_params(cfg)
    assert mapping.expected_hf_names(spec) == set(shapes), "the registry must name every HF parameter"
    g = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

    mc = mapping.hf_to_megatron(dict(hf), spec)
    assert mc["embedding.word_embeddings.weight"].shape[0] == spec.padded_vocab_size
    assert set(mc) == {m.megatron for m in mapping._resolved(spec) if m.hf}
    back = mapping.megatron_to_hf(mc, spec)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)

    # TP: each rank's shard, then the gather of all shards, gives back the full tensor
    gathered = {}
    for name, full in mc.items():
        m = mapping.mapping_for(name, spec)
        shards = [mapping.shard_for_rank(name, full, r, tp, spec) for r in range(tp)]
        if m.tp_dim is None or tp == 1:
            assert all(s is full for s in shards)
        else:
            assert all(s.shape[m.tp_dim] * tp == full.shape[m.tp_dim] for s in shards), name
        if isinstance(m, mapping.GatedMLPMapping) and tp > 1:  # rank r holds [gate_r; up_r]
            gate, up = full.chunk(2)
            assert torch.equal(shards[1], torch.cat([gate.chunk(tp)[1], up.chunk(tp)[1]]))
        gathered[name] = m.gather(shards)
        assert torch.equal(gathered[name], full), name
    back = mapping.megatron_to_hf(gathered, spec)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_registry_split_dimensions_and_features():
    from ophsd.models import mapping
    from ophsd.models.megatron import SUPPORTED_ARCHITECTURES, model_spec_from_hf

    assert set(mapping.ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)
    spec = model_spec_from_hf(tiny_config("qwen3"), tp=2)
    dims = {m.megatron.split(".{i}.")[-1]: m.tp_dim for m in mapping.mappings(spec)}
    assert dims == {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": None,
                    "output_layer.weight": 0, "input_layernorm.weight": None, "pre_mlp_layernorm.weight": None,
                    "self_attention.linear_proj.weight": 1, "mlp.linear_fc2.weight": 1,
                    "self_attention.linear_qkv.weight": 0, "mlp.linear_fc1.weight": 0,
                    "self_attention.q_layernorm.weight": None, "self_attention.k_layernorm.weight": None}
    cases = [(a, {}) for a in ARCHS] + [("llama", {"attention_bias": True}), ("qwen3", {"attention_bias": True})]
    feats = {f"{a}{o}": mapping.model_features(model_spec_from_hf(tiny_config(a, **o))) for a, o in cases}
    assert feats == {
        "llama{}": {"add_qkv_bias": False, "qk_layernorm": False},
        "llama-untied{}": {"add_qkv_bias": False, "qk_layernorm": False},
        "llama{'attention_bias': True}": {"add_qkv_bias": True, "qk_layernorm": False},
        "qwen2{}": {"add_qkv_bias": True, "qk_layernorm": False},
        "qwen3{}": {"add_qkv_bias": False, "qk_layernorm": True},
        "qwen3{'attention_bias': True}": {"add_qkv_bias": True, "qk_layernorm": True},
    }
    # TE-spec names map like the local ones; the tied output copy has no HF tensor
    assert mapping.mapping_for("decoder.layers.3.mlp.linear_fc1.layer_norm_weight", spec).hf == (
        "model.layers.3.post_attention_layernorm.weight",)
    assert mapping.megatron_to_hf_one("output_layer.weight", torch.zeros(512, 64), spec) == []


def test_mapping_errors():
    from ophsd.models import mapping
    from ophsd.models.megatron import model_spec_from_hf

    cfg = tiny_config("llama")
    spec = model_spec_from_hf(cfg)
    hf = {k: torch.zeros(s) for k, s in _hf_params(cfg).items()}
    mapping.hf_to_megatron({**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}, spec)  # tied copy: dropped
    with pytest.raises(mapping.MappingError, match="missing tensor 'model.layers.0.mlp.up_proj.weight'"):
        mapping.hf_to_megatron({k: v for k, v in hf.items() if k != "model.layers.0.mlp.up_proj.weight"}, spec)
    with pytest.raises(mapping.MappingError, match="1 HF tensors were not mapped"):
        mapping.hf_to_megatron({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, spec)
    # attention_bias=True Llama/Qwen3 also bias o_proj, which megatron-core cannot (only all linears)
    biased = tiny_config("llama", attention_bias=True)
    with pytest.raises(mapping.MappingError, match="4 HF tensors were not mapped.*o_proj.bias"):
        mapping.hf_to_megatron({k: torch.zeros(s) for k, s in _hf_params(biased).items()}, model_spec_from_hf(biased))
    with pytest.raises(mapping.MappingError, match="unexpected Megatron parameter 'decoder.layers.0.foo.weight'"):
        mapping.megatron_to_hf_one("decoder.layers.0.foo.weight", torch.zeros(1), spec)
