"""Build a megatron-core ``GPTModel`` from a HuggingFace config (Llama / SmolLM2, Qwen2, Qwen3).

Every architectural setting comes from the HF config; megatron-core's defaults (dropout 0.1,
LayerNorm, GELU, biases, learned positions) are all wrong for these models and never used.
The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * TP`` as in
Megatron-LM; :class:`ModelSpec` exposes the true vocabulary size so that padded logit
columns are excluded downstream (divergence kernel, sampling, verification).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM (Llama 2/3, SmolLM2)",
    "qwen2": "Qwen2ForCausalLM (Qwen2, Qwen2.5)",
    "qwen3": "Qwen3ForCausalLM (Qwen3 dense)",
}


class UnsupportedModelError(ValueError):
    """The HF config describes an architecture or setting this backend does not implement."""


def _rope_theta(hf_config) -> float:
    # transformers 5 moves rope settings into ``rope_parameters``; 4.x has ``rope_theta``.
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(hf_config, "rope_theta", None)
    return float(theta) if theta is not None else 10000.0


def _rope_scaling(hf_config) -> dict | None:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    return dict(params, rope_type=rope_type)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class ModelSpec:
    """Everything needed to rebuild the same Megatron model from an HF config at any TP/PP."""

    hf_config: object
    arch: str
    vocab_size: int  # true vocabulary size (columns >= this are padding)
    padded_vocab_size: int
    tp: int = 1
    pp: int = 1
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers


def model_spec_from_hf(hf_config, tp: int = 1, pp: int = 1, make_vocab_size_divisible_by: int = 128) -> ModelSpec:
    """Validate the HF config against the backend and the requested parallel layout."""
    arch = getattr(hf_config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = "; ".join(SUPPORTED_ARCHITECTURES.values())
        raise UnsupportedModelError(
            f"unsupported architecture '{arch}' ({getattr(hf_config, 'architectures', None)}); "
            f"supported: {supported}"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act '{hf_config.hidden_act}' is not supported (SwiGLU/silu only)")
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    scaling = _rope_scaling(hf_config)
    if scaling is not None and scaling["rope_type"] != "llama3":
        raise UnsupportedModelError(f"rope scaling '{scaling['rope_type']}' is not supported (default, llama3)")
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
    layers = hf_config.num_hidden_layers
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if heads % tp or groups % tp:
        ok = [d for d in range(1, math.gcd(heads, groups) + 1) if heads % d == 0 and groups % d == 0]
        raise ValueError(
            f"TP={tp} does not divide the attention heads ({heads}) and KV heads ({groups}) of "
            f"this model; valid TP sizes: {ok}"
        )
    if layers % pp:
        ok = [d for d in range(1, layers + 1) if layers % d == 0]
        raise ValueError(f"PP={pp} does not divide the {layers} layers of this model; valid PP sizes: {ok}")
    if (hf_config.intermediate_size % tp):
        raise ValueError(f"TP={tp} does not divide intermediate_size {hf_config.intermediate_size}")
    return ModelSpec(
        hf_config=hf_config,
        arch=arch,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=padded_vocab_size(hf_config.vocab_size, tp, make_vocab_size_divisible_by),
        tp=tp,
        pp=pp,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _mapped_features(spec: ModelSpec) -> dict:
    """Which optional parameters (QKV bias, QK-norm) the architecture has: read from its
    HF <-> Megatron mapping registry (:data:`ophsd.models.mapping.ARCHITECTURES`)."""
    from ophsd.models.mapping import model_features

    return model_features(spec)


def transformer_config(spec: ModelSpec, params_dtype: torch.dtype = torch.float32, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = spec.hf_config
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads or cfg.num_attention_heads,
        kv_channels=head_dim(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        **_mapped_features(spec),  # add_qkv_bias, qk_layernorm: the parameters the mapping registry has
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=spec.tp,
        pipeline_model_parallel_size=spec.pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        # Fusions need CUDA/apex; the SDPA attention and torch RMSNorm are used instead.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def te_available() -> bool:
    """transformer-engine is used only with CUDA and when it imports cleanly."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


@functools.lru_cache(maxsize=None)
def sdpa_attention_class():
    """megatron's ``DotProductAttention`` with the math done by ``F.scaled_dot_product_attention``.

    megatron's own implementation allocates from a CUDA global memory buffer; this one runs
    on any device and keeps the module's parameters and sharded state identical.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class _SDPAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **unused):
            if packed_seq_params is not None or attention_bias is not None:
                raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
            # [s, b, heads, d] -> [b, heads, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            inputs = getattr(self, "ophsd_inputs", None)
            if inputs is not None and inputs.subtree_end is not None:
                out = tree_flex_attention(q, k, v, inputs.subtree_end, self.softmax_scale, inputs)
                b, h, s, d = out.shape
                return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
            rep = q.shape[1] // k.shape[1]
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            mask = None
            if attention_mask is not None:
                mask = ~attention_mask.bool()  # megatron: True = masked out; SDPA: True = attend
                if causal:
                    sq, sk = q.shape[2], k.shape[2]
                    mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                    causal = False
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.softmax_scale
            )
            b, h, s, d = out.shape
            return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    _SDPAttention.__name__ = _SDPAttention.__qualname__ = "SDPAttention"
    return _SDPAttention


def layer_spec(spec: ModelSpec, use_te: bool | None = None):
    """TE spec with CUDA + transformer-engine, else the local spec with SDPA core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = te_available() if use_te is None else use_te
    qk = _mapped_features(spec)["qk_layernorm"]
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    layer = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
    layer.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
    return layer


def build_model(spec: ModelSpec, params_dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                pre_process: bool | None = None, post_process: bool | None = None, **config_overrides):
    """The local pipeline stage of the GPT model (megatron parallel state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if ps.get_tensor_model_parallel_world_size() != spec.tp or ps.get_pipeline_model_parallel_world_size() != spec.pp:
        raise RuntimeError(
            f"model spec wants TP={spec.tp} PP={spec.pp} but megatron parallel state has "
            f"TP={ps.get_tensor_model_parallel_world_size()} PP={ps.get_pipeline_model_parallel_world_size()}"
        )
    config = transformer_config(spec, params_dtype, **config_overrides)
    scaling = _rope_scaling(spec.hf_config)
    kwargs = {}
    if scaling is not None:  # llama3-style frequency scaling (Llama 3.1+)
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(scaling.get("factor", 8.0)))
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, use_te),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.hf_config.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=_rope_theta(spec.hf_config),
        **kwargs,
    )
    # The local spec's torch norms ignore params_dtype and come out fp32. Megatron-LM casts the
    # whole module (Float16Module); we cast those parameters only (buffers such as RoPE
    # frequencies keep their precision). A mixed model would also break megatron-core's
    # bf16 optimizer checkpoints, which map only its 16-bit parameters.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != params_dtype:
                p.data = p.data.to(params_dtype)
    model.ophsd_spec = spec  # true vocab size travels with the module
    model.ophsd_inputs = _install_forward_inputs(model)
    return model


class ForwardInputs:
    """Per-call inputs that ``GPTModel.forward`` has no argument for, set around one forward.

    * ``position_ids`` [b, s]: RoPE positions. megatron-core computes RoPE for 0..s-1 and uses
      ``position_ids`` only for learned absolute embeddings; packed prefix trees restart
      positions on every branch.
    * ``logit_index`` (rows, pos): only these hidden states reach the output layer, so the
      logits are ``[1, n, V/TP]`` for the n positions the loss reads instead of ``[b, s, V/TP]``.
    * ``subtree_end`` [b, s]: a prefix-tree mask handed to the core attention directly (the
      ``flex`` backend; the ``dense`` one gets megatron's ``attention_mask`` instead).

    All None (the default) leaves megatron-core's behaviour unchanged. ``tree_backend`` says how
    this model's core attention takes a prefix-tree mask (:func:`tree_attention_backend`).
    """

    def __init__(self, tree_backend: str | None = None):
        self.tree_backend = tree_backend
        self.position_ids: torch.Tensor | None = None
        self.logit_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.subtree_end: torch.Tensor | None = None
        self.block_mask = None  # built once per forward by the first layer, shared by the others

    @contextlib.contextmanager
    def use(self, position_ids=None, logit_index=None, subtree_end=None):
        self.position_ids, self.logit_index, self.subtree_end = position_ids, logit_index, subtree_end
        try:
            yield
        finally:
            self.position_ids = self.logit_index = self.subtree_end = self.block_mask = None


TREE_ATTENTION_ENV = "OPHSD_TREE_ATTENTION"


def tree_attention_backend(model) -> str | None:
    """How the core attention takes a prefix-tree mask: ``flex`` (FlexAttention with a block-sparse
    ``BlockMask`` built from ``subtree_end``: no s x s mask; the default on CUDA), ``dense`` (an
    s x s boolean mask through SDPA; the default on CPU), or None when it cannot (transformer-
    engine's fused kernels take cu_seqlens-style packing, which cannot express a shared prefix).
    ``OPHSD_TREE_ATTENTION=dense|flex`` overrides the choice."""
    m = model
    while hasattr(m, "module"):
        m = m.module
    layers = getattr(getattr(m, "decoder", None), "layers", None)
    if layers and not isinstance(layers[0].self_attention.core_attention, sdpa_attention_class()):
        return None
    choice = os.environ.get(TREE_ATTENTION_ENV, "auto")
    if choice not in ("auto", "dense", "flex"):
        raise ValueError(f"{TREE_ATTENTION_ENV}={choice!r}: use auto, dense or flex")
    if choice != "auto":
        return choice
    return "flex" if torch.cuda.is_available() and _flex_available() else "dense"


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def tree_flex_attention(q, k, v, subtree_end: torch.Tensor, scale: float, inputs: ForwardInputs | None = None):
    """Attention under the prefix-tree mask (token j visible to token i iff j <= i < end[j]).

    q ``[b, hq, s, d]``, k/v ``[b, hkv, s, d]`` (GQA). Compiled on CUDA; eager on CPU (the
    unfused reference, for tests)."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bm = inputs.block_mask if inputs is not None else None
    if bm is None:
        end = subtree_end.to(q.device)
        L = end.shape[-1]

        def visible(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < end[b, kv_idx])

        bm = create_block_mask(visible, B=end.shape[0], H=None, Q_LEN=L, KV_LEN=L, device=q.device)
        if inputs is not None:
            inputs.block_mask = bm
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _rope_at(rope, position_ids: torch.Tensor) -> torch.Tensor:
    """megatron's RoPE embedding ``[s, b, 1, dim]`` at explicit positions ``[b, s]``."""
    inv = rope.inv_freq.to(position_ids.device)
    pos = position_ids.t().to(inv.dtype)
    if rope.seq_len_interpolation_factor is not None:
        pos = pos * (1 / rope.seq_len_interpolation_factor)
    freqs = pos[..., None] * inv  # [s, b, dim/2], the same products as torch.outer(arange, inv)
    if rope.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


def _install_forward_inputs(model) -> ForwardInputs:
    inputs = ForwardInputs(tree_backend=tree_attention_backend(model))
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        layer.self_attention.core_attention.ophsd_inputs = inputs  # the flex backend reads subtree_end
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None:
        default_forward = rope.forward

        def rope_forward(*args, **kwargs):
            if inputs.position_ids is None:
                return default_forward(*args, **kwargs)
            return _rope_at(rope, inputs.position_ids)

        rope.forward = rope_forward
    out = getattr(model, "output_layer", None)
    if out is not None:
        def select_rows(module, args, kwargs):
            if inputs.logit_index is None:
                return None
            if model.config.sequence_parallel:
                raise NotImplementedError("response-row logits with sequence parallelism")
            rows, pos = inputs.logit_index
            hidden = args[0]  # [s, b, h]
            return (hidden[pos, rows].unsqueeze(1), *args[1:]), kwargs

        out.register_forward_pre_hook(select_rows, with_kwargs=True)
    return inputs
