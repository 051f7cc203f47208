"""The one mapping between Megatron (megatron-core GPTModel) and HuggingFace parameter names.

Used by ``tools/convert_hf.py`` (import/export, single process, full tensors) and by the live
weight sync to generation engines (:func:`iter_hf_tensors`, TP-gathered over the ranks of a
pipeline stage). Layouts (megatron-core >= 0.16):

* ``linear_qkv`` rows are interleaved per query group: for each KV group g,
  ``[q heads of g, k_g, v_g]``; TP ranks hold contiguous groups, so the full tensor is the
  plain concatenation of the rank shards;
* SwiGLU ``linear_fc1`` is ``[gate; up]`` *per TP rank*: gathering takes every rank's gate
  half, then every rank's up half;
* local vs transformer-engine specs differ only in the two pre-norm names
  (``input_layernorm`` / ``pre_mlp_layernorm`` vs ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight``); both are accepted and normalised to the local names;
* the vocabulary dimension is padded in Megatron; HF tensors never carry the padding;
* with tied embeddings there is no HF ``lm_head.weight``; at PP>1 the last stage keeps a
  copy of the embedding as ``output_layer.weight``, which is not exported.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from ophsd.models.megatron import ModelSpec, head_dim

_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

# Per-layer Megatron suffix -> HF suffix for the one-to-one tensors.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """A tensor that could not be mapped, or a parameter left unfilled."""


def normalise_megatron_name(name: str) -> str:
    """TE-spec names -> local-spec names (the canonical form used here)."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_TO_LOCAL:
        return f"decoder.layers.{m.group(1)}.{_TE_TO_LOCAL[m.group(2)]}"
    return name


def _qkv_split(t: torch.Tensor, spec: ModelSpec):
    cfg = spec.hf_config
    heads, groups, hd = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, head_dim(cfg)
    qpg = heads // groups
    rest = t.shape[1:]
    g = t.reshape(groups, (qpg + 2) * hd, *rest)
    q = g[:, : qpg * hd].reshape(heads * hd, *rest)
    k = g[:, qpg * hd: (qpg + 1) * hd].reshape(groups * hd, *rest)
    v = g[:, (qpg + 1) * hd:].reshape(groups * hd, *rest)
    return q, k, v


def _qkv_merge(q, k, v, spec: ModelSpec) -> torch.Tensor:
    cfg = spec.hf_config
    groups, hd = cfg.num_key_value_heads or cfg.num_attention_heads, head_dim(cfg)
    rest = q.shape[1:]
    return torch.cat(
        [q.reshape(groups, -1, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)], dim=1
    ).reshape(-1, *rest)


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise MappingError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_megatron(hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Full HF tensors -> full (TP=1, global layer index) Megatron tensors, consuming every input.

    Raises :class:`MappingError` naming any HF tensor left unconsumed or any expected one missing.
    """
    pending = dict(hf)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in pending:
            raise MappingError(f"HF checkpoint is missing tensor '{name}'")
        return pending.pop(name)

    V = spec.padded_vocab_size
    out["embedding.word_embeddings.weight"] = pad_vocab(take("model.embed_tokens.weight"), V)
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if spec.tie_embeddings:
        pending.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    else:
        out["output_layer.weight"] = pad_vocab(take("lm_head.weight"), V)
    for i in range(spec.num_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for msuf, hsuf in _LAYER_DIRECT.items():
            if msuf.startswith("self_attention.") and "_layernorm" in msuf and spec.arch != "qwen3":
                continue  # QK-norm exists in Qwen3 only
            out[mp + msuf] = take(hp + hsuf)
        out[mp + "self_attention.linear_qkv.weight"] = _qkv_merge(
            take(hp + "self_attn.q_proj.weight"), take(hp + "self_attn.k_proj.weight"),
            take(hp + "self_attn.v_proj.weight"), spec)
        if hp + "self_attn.q_proj.bias" in pending:
            out[mp + "self_attention.linear_qkv.bias"] = _qkv_merge(
                take(hp + "self_attn.q_proj.bias"), take(hp + "self_attn.k_proj.bias"),
                take(hp + "self_attn.v_proj.bias"), spec)
        out[mp + "mlp.linear_fc1.weight"] = torch.cat(
            [take(hp + "mlp.gate_proj.weight"), take(hp + "mlp.up_proj.weight")])
    leftovers = [k for k in pending if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise MappingError(f"{len(leftovers)} HF tensors were not mapped (unsupported?): {sorted(leftovers)[:8]}")
    return out


def megatron_to_hf_one(name: str, t: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One full Megatron tensor (canonical name, global layer index) -> its HF tensor(s)."""
    name = normalise_megatron_name(name)
    V = spec.vocab_size
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", t[:V])]
    if name == "output_layer.weight":
        return [] if spec.tie_embeddings else [("lm_head.weight", t[:V])]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", t)]
    m = _LAYER_RE.match(name)
    if not m:
        raise MappingError(f"unexpected Megatron parameter '{name}'")
    i, suf = m.group(1), m.group(2)
    hp = f"model.layers.{i}."
    if suf in _LAYER_DIRECT:
        return [(hp + _LAYER_DIRECT[suf], t)]
    if suf in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suf.rsplit(".", 1)[1]
        q, k, v = _qkv_split(t, spec)
        return [(hp + f"self_attn.{p}_proj.{kind}", x) for p, x in zip("qkv", (q, k, v))]
    if suf == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2, dim=0)
        return [(hp + "mlp.gate_proj.weight", gate), (hp + "mlp.up_proj.weight", up)]
    raise MappingError(f"unexpected Megatron parameter '{name}'")


def megatron_to_hf(mcore: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in mcore.items():
        if name.endswith("_extra_state"):
            continue
        for k, v in megatron_to_hf_one(name, t, spec):
            out[k] = v
    return out


def expected_hf_names(spec: ModelSpec) -> set[str]:
    """Every tensor name a HF checkpoint of this spec must have (used to check exports)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        names |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                   "self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
                                   "mlp.up_proj.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                   "self_attn.v_proj.weight")}
        if spec.arch == "qwen3":
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        if spec.arch == "qwen2" or getattr(spec.hf_config, "attention_bias", False):
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
    return names


# ---------------------------------------------------------------------------------------------
# Live models: local (TP-sharded, stage-local layer index) parameters -> full HF tensors.


def _global_name(model, local_name: str) -> str:
    """Replace the stage-local layer index by the global one (``layer_number`` is 1-based, global)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


# Which canonical parameters megatron splits over TP, and on which dimension (column-parallel:
# output rows, dim 0; row-parallel: input columns, dim 1; vocab-parallel embedding/output: 0).
_TP_DIM0 = ("embedding.word_embeddings.weight", "output_layer.weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight")
_TP_DIM1 = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _partition_dim(name: str) -> int | None:
    name = normalise_megatron_name(name)
    if name.endswith(_TP_DIM0):
        return 0
    if name.endswith(_TP_DIM1):
        return 1
    return None


def gather_tp(name: str, tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """Full tensor from the TP shards of parameter ``name``'s ``tensor`` (the value or its gradient)."""
    import torch.distributed as dist

    if tp_group is None or dist.get_world_size(tp_group) == 1 or _partition_dim(name) is None:
        return tensor.detach()
    world = dist.get_world_size(tp_group)
    shards = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=tp_group)
    dim = _partition_dim(name)
    if normalise_megatron_name(name).endswith("mlp.linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def iter_full_megatron_tensors(model, tp_group=None, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(global canonical Megatron name, full tensor) for this pipeline stage's parameters.

    With ``grads=True`` the parameters' gradients instead (``main_grad`` under megatron DDP).
    Collective over ``tp_group``: every TP rank of the stage must iterate in step.
    """
    spec = model.ophsd_spec
    for local_name, p in model.named_parameters():
        name = normalise_megatron_name(_global_name(model, local_name))
        if name == "output_layer.weight" and spec.tie_embeddings:
            continue  # the last stage's copy of the tied embedding
        t = (getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad) if grads else p
        if t is None:
            t = torch.zeros_like(p)
        yield name, gather_tp(local_name, t, tp_group)


def iter_hf_tensors(model, tp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this pipeline stage (vocab padding removed)."""
    for name, t in iter_full_megatron_tensors(model, tp_group):
        yield from megatron_to_hf_one(name, t, model.ophsd_spec)


def _tp_dim(full_shape, local_shape, tp_size: int):
    """The dimension a tensor is split on, from the shapes (megatron only sets the
    ``partition_dim`` attribute when it initialises weights itself)."""
    if tuple(full_shape) == tuple(local_shape):
        return None
    dims = [d for d, (f, loc) in enumerate(zip(full_shape, local_shape)) if f != loc]
    if len(full_shape) != len(local_shape) or len(dims) != 1 or full_shape[dims[0]] != local_shape[dims[0]] * tp_size:
        raise MappingError(f"shape mismatch: cannot shard a {tuple(full_shape)} tensor into "
                           f"{tp_size} x {tuple(local_shape)}")
    return dims[0]


def shard_for_rank(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a full canonical Megatron tensor (the inverse of the TP gather)."""
    dim = _tp_dim(full.shape, param.shape, tp_size)
    if dim is None:
        return full
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_tensors(model, full: dict[str, torch.Tensor]) -> None:
    """Fill this rank's parameters from full canonical Megatron tensors; every parameter must be filled."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    spec = model.ophsd_spec
    unfilled = []
    for local_name, p in model.named_parameters():
        name = normalise_megatron_name(_global_name(model, local_name))
        if name == "output_layer.weight" and spec.tie_embeddings:
            name = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        if name not in full:
            unfilled.append(name)
            continue
        shard = shard_for_rank(name, full[name], p, tp_rank, tp_size)
        if shard.shape != p.shape:
            raise MappingError(f"shape mismatch for {name}: checkpoint shard {tuple(shard.shape)} vs model {tuple(p.shape)}")
        p.copy_(shard)
    if unfilled:
        raise MappingError(f"{len(unfilled)} Megatron parameters left unfilled: {unfilled[:8]}")
