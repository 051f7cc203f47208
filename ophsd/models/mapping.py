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

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ophsd.models.megatron import ModelSpec, head_dim

_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
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


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise MappingError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ---------------------------------------------------------------------------------------------
# Mapping objects: one Megatron parameter <-> its HF tensor(s), both directions and the TP layout.
# Names are templates: ``{i}`` is the (global) layer index.


@dataclass(frozen=True)
class AutoMapping:
    """One Megatron tensor <-> one HF tensor, unchanged.

    ``tp_dim``: the dimension megatron-core splits it on over TP (0: column-parallel output
    rows and the vocab-parallel embedding/output; 1: row-parallel input columns), None when it
    is replicated. ``when``: the mapping applies only to specs it accepts (e.g. untied output).
    """

    megatron: str
    hf: tuple[str, ...]
    tp_dim: int | None = None
    when: Callable[[ModelSpec], bool] | None = None

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))

    # -- names ------------------------------------------------------------------------------
    def at(self, layer: int) -> "AutoMapping":
        """This mapping with ``{i}`` replaced by ``layer``."""
        if "{i}" not in self.megatron:
            return self
        return dataclasses.replace(self, megatron=self.megatron.format(i=layer),
                                   hf=tuple(h.format(i=layer) for h in self.hf))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    def applies(self, spec: ModelSpec) -> bool:
        return self.when is None or bool(self.when(spec))

    # -- values -----------------------------------------------------------------------------
    def to_megatron(self, hf: Sequence[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
        """The full Megatron tensor from the full HF tensors (in ``self.hf`` order)."""
        (t,) = hf
        return t

    def to_hf(self, t: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
        """The full HF tensors (in ``self.hf`` order) from the full Megatron tensor."""
        return [t]

    # -- tensor parallelism -----------------------------------------------------------------
    def gather(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from the TP ranks' shards, in rank order."""
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(list(shards), dim=self.tp_dim)

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s shard of the full tensor (the inverse of :meth:`gather`)."""
        if self.tp_dim is None or tp_size == 1:
            return full
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]


@dataclass(frozen=True)
class VocabMapping(AutoMapping):
    """A vocabulary-sized tensor (embedding, output layer): Megatron pads the rows to the padded
    vocabulary size; HF tensors never carry the padding."""

    def to_megatron(self, hf, spec):
        (t,) = hf
        return pad_vocab(t, spec.padded_vocab_size)

    def to_hf(self, t, spec):
        return [t[: spec.vocab_size]]


@dataclass(frozen=True)
class TiedMapping(AutoMapping):
    """A Megatron copy of another parameter with no HF tensor of its own (the last pipeline
    stage's ``output_layer.weight`` under tied embeddings): filled from ``tied_to``, never
    exported; a stored HF copy (``drop``) is accepted and discarded."""

    tied_to: str = ""
    drop: tuple[str, ...] = ()

    def to_hf(self, t, spec):
        return []


@dataclass(frozen=True)
class QKVMapping(AutoMapping):
    """HF ``q``/``k``/``v`` projections <-> Megatron's fused ``linear_qkv``, whose rows are
    interleaved per query group (``[q heads of g, k_g, v_g]`` for each KV group g). TP ranks
    hold contiguous groups, so the TP layout is a plain split of dim 0."""

    tp_dim: int | None = 0

    def to_megatron(self, hf, spec):
        q, k, v = hf
        cfg = spec.hf_config
        groups, hd = cfg.num_key_value_heads or cfg.num_attention_heads, head_dim(cfg)
        rest = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, -1, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)], dim=1
        ).reshape(-1, *rest)

    def to_hf(self, t, spec):
        cfg = spec.hf_config
        heads, groups, hd = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, head_dim(cfg)
        qpg = heads // groups
        rest = t.shape[1:]
        g = t.reshape(groups, (qpg + 2) * hd, *rest)
        q = g[:, : qpg * hd].reshape(heads * hd, *rest)
        k = g[:, qpg * hd: (qpg + 1) * hd].reshape(groups * hd, *rest)
        v = g[:, (qpg + 1) * hd:].reshape(groups * hd, *rest)
        return [q, k, v]


@dataclass(frozen=True)
class GatedMLPMapping(AutoMapping):
    """HF ``gate``/``up`` projections <-> Megatron's SwiGLU ``linear_fc1`` = ``[gate; up]``.
    Under TP each rank holds ``[gate_r; up_r]``, so the full tensor takes every rank's gate half,
    then every rank's up half."""

    tp_dim: int | None = 0

    def to_megatron(self, hf, spec):
        gate, up = hf
        return torch.cat([gate, up])

    def to_hf(self, t, spec):
        return list(t.chunk(2, dim=0))

    def gather(self, shards):
        if len(shards) == 1:
            return shards[0]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def shard(self, full, tp_rank, tp_size):
        if tp_size == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


# ---------------------------------------------------------------------------------------------
# One registry per architecture (the names of ``megatron.SUPPORTED_ARCHITECTURES``).


def _tied(spec: ModelSpec) -> bool:
    return spec.tie_embeddings


def _untied(spec: ModelSpec) -> bool:
    return not spec.tie_embeddings


def _attention_bias(spec: ModelSpec) -> bool:
    return bool(getattr(spec.hf_config, "attention_bias", False))


_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
EMBEDDING = VocabMapping("embedding.word_embeddings.weight", "model.embed_tokens.weight", tp_dim=0)
MODEL_MAPPINGS = (
    EMBEDDING,
    AutoMapping("decoder.final_layernorm.weight", "model.norm.weight"),
    VocabMapping("output_layer.weight", "lm_head.weight", tp_dim=0, when=_untied),
    TiedMapping("output_layer.weight", (), tp_dim=0, when=_tied, tied_to=EMBEDDING.megatron,
                drop=("lm_head.weight",)),  # some tied checkpoints store the copy anyway
)
DECODER_LAYER_MAPPINGS = (
    AutoMapping(_L + "input_layernorm.weight", _H + "input_layernorm.weight"),
    AutoMapping(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight"),
    AutoMapping(_L + "self_attention.linear_proj.weight", _H + "self_attn.o_proj.weight", tp_dim=1),
    AutoMapping(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", tp_dim=1),
    QKVMapping(_L + "self_attention.linear_qkv.weight",
               tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv")),
    GatedMLPMapping(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight")),
)
QKV_BIAS = QKVMapping(_L + "self_attention.linear_qkv.bias", tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"))
QK_NORM = (
    AutoMapping(_L + "self_attention.q_layernorm.weight", _H + "self_attn.q_norm.weight"),
    AutoMapping(_L + "self_attention.k_layernorm.weight", _H + "self_attn.k_norm.weight"),
)

ARCHITECTURES: dict[str, tuple[AutoMapping, ...]] = {
    # Llama 2/3, SmolLM2: QKV biases only when the config asks for them
    "llama": (*MODEL_MAPPINGS, *DECODER_LAYER_MAPPINGS, dataclasses.replace(QKV_BIAS, when=_attention_bias)),
    # Qwen2 / Qwen2.5: always QKV biases
    "qwen2": (*MODEL_MAPPINGS, *DECODER_LAYER_MAPPINGS, QKV_BIAS),
    # Qwen3 dense: QK-norm
    "qwen3": (*MODEL_MAPPINGS, *DECODER_LAYER_MAPPINGS, *QK_NORM,
              dataclasses.replace(QKV_BIAS, when=_attention_bias)),
}


def mappings(spec: ModelSpec) -> list[AutoMapping]:
    """The mapping objects that apply to ``spec`` (name templates, ``{i}`` per layer)."""
    try:
        registry = ARCHITECTURES[spec.arch]
    except KeyError:
        raise MappingError(f"no HF <-> Megatron mapping for architecture {spec.arch!r}; "
                           f"known: {', '.join(sorted(ARCHITECTURES))}") from None
    return [m for m in registry if m.applies(spec)]


def _resolved(spec: ModelSpec) -> Iterator[AutoMapping]:
    """Every mapping of ``spec`` with concrete names: the model-level ones, then layer by layer."""
    ms = mappings(spec)
    yield from (m for m in ms if not m.per_layer)
    for i in range(spec.num_layers):
        yield from (m.at(i) for m in ms if m.per_layer)


def _template(name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.match(name)
    return (f"decoder.layers.{{i}}.{m.group(2)}", int(m.group(1))) if m else (name, None)


def mapping_for(name: str, spec: ModelSpec) -> AutoMapping:
    """The mapping of one Megatron parameter (any spec's name, global layer index), names resolved."""
    template, layer = _template(normalise_megatron_name(name))
    for m in mappings(spec):
        if m.megatron == template:
            return m if layer is None else m.at(layer)
    raise MappingError(f"unexpected Megatron parameter '{name}'")


def model_features(spec: ModelSpec) -> dict:
    """megatron-core layer options that create the parameters the registry maps for ``spec``."""
    templates = {m.megatron for m in mappings(spec)}
    return {"add_qkv_bias": QKV_BIAS.megatron in templates,
            "qk_layernorm": QK_NORM[0].megatron in templates}


# ---------------------------------------------------------------------------------------------
# Full tensors (single process): import and export.


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

    for m in _resolved(spec):
        for name in getattr(m, "drop", ()):
            pending.pop(name, None)
        if m.hf:
            out[m.megatron] = m.to_megatron([take(h) for h in m.hf], spec)
    leftovers = [k for k in pending if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise MappingError(f"{len(leftovers)} HF tensors were not mapped (unsupported?): {sorted(leftovers)[:8]}")
    return out


def megatron_to_hf_one(name: str, t: torch.Tensor, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """One full Megatron tensor (canonical name, global layer index) -> its HF tensor(s)."""
    m = mapping_for(name, spec)
    return list(zip(m.hf, m.to_hf(t, spec)))


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
    return {h for m in _resolved(spec) for h in m.hf}


# ---------------------------------------------------------------------------------------------
# Live models: local (TP-sharded, stage-local layer index) parameters -> full HF tensors.


def _global_name(model, local_name: str) -> str:
    """Replace the stage-local layer index by the global one (``layer_number`` is 1-based, global)."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def gather_tp(name: str, tensor: torch.Tensor, tp_group, spec: ModelSpec) -> torch.Tensor:
    """Full tensor from the TP shards of parameter ``name``'s ``tensor`` (the value or its gradient).

    Collective over ``tp_group`` for parameters split over TP (every rank must call it)."""
    import torch.distributed as dist

    m = mapping_for(name, spec)
    if tp_group is None or dist.get_world_size(tp_group) == 1 or m.tp_dim is None:
        return tensor.detach()
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, tensor.detach().contiguous(), group=tp_group)
    return m.gather(shards)


def iter_full_megatron_tensors(model, tp_group=None, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(global canonical Megatron name, full tensor) for this pipeline stage's parameters.

    With ``grads=True`` the parameters' gradients instead (``main_grad`` under megatron DDP).
    Collective over ``tp_group``: every TP rank of the stage must iterate in step.
    """
    spec = model.ophsd_spec
    for local_name, p in model.named_parameters():
        name = normalise_megatron_name(_global_name(model, local_name))
        if isinstance(mapping_for(name, spec), TiedMapping):
            continue  # e.g. the last stage's copy of the tied embedding
        t = (getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad) if grads else p
        if t is None:
            t = torch.zeros_like(p)
        yield name, gather_tp(name, t, tp_group, spec)


def iter_hf_tensors(model, tp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of this pipeline stage (vocab padding removed)."""
    for name, t in iter_full_megatron_tensors(model, tp_group):
        yield from megatron_to_hf_one(name, t, model.ophsd_spec)


def shard_for_rank(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, spec: ModelSpec) -> torch.Tensor:
    """This TP rank's shard of a full canonical Megatron tensor (the inverse of :func:`gather_tp`)."""
    return mapping_for(name, spec).shard(full, tp_rank, tp_size)


@torch.no_grad()
def load_full_tensors(model, full: dict[str, torch.Tensor]) -> None:
    """Fill this rank's parameters from full canonical Megatron tensors; every parameter must be filled."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    spec = model.ophsd_spec
    unfilled = []
    for local_name, p in model.named_parameters():
        name = normalise_megatron_name(_global_name(model, local_name))
        m = mapping_for(name, spec)
        if isinstance(m, TiedMapping):
            name = m.tied_to  # e.g. the last stage's copy of the tied embedding
        if name not in full:
            unfilled.append(name)
            continue
        shard = shard_for_rank(name, full[name], tp_rank, tp_size, spec)
        if shard.shape != p.shape:
            raise MappingError(f"shape mismatch for {name}: checkpoint shard {tuple(shard.shape)} vs model {tuple(p.shape)}")
        p.copy_(shard)
    if unfilled:
        raise MappingError(f"{len(unfilled)} Megatron parameters left unfilled: {unfilled[:8]}")
