"""KV-cache layout of the embedded engine: rows are left-padded (``[pad][prompt][generated]``,
padding has mask 0), one transformers ``DynamicCache`` per batch whose full-attention layers
grow in place (:func:`new_kv_cache`), and the row operations on a batch (:class:`Batch`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ophsd.rollout.prefix_cache import own_copy


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns.

        ``DynamicLayer.update`` concatenates: every decode step copies the whole cache of every
        layer into fresh memory. Here a step writes its column in place and only a full buffer
        (every ``GROW`` steps) or a tensor set from outside (the engine's merge/select assign
        ``keys``/``values``) is copied into a new buffer. Callers never write into ``keys``.
        """

        GROW = 64

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._kbuf = self._vbuf = None

        def _backed(self) -> bool:
            k, b = self.keys, self._kbuf
            return (b is not None and k.data_ptr() == b.data_ptr() and k.shape[:2] == b.shape[:2]
                    and k.stride() == b.stride() and self.values.data_ptr() == self._vbuf.data_ptr())

        def reserve(self, batch: int, length: int, extra: int, like_k, like_v, zero: bool = True) -> None:
            """Start as ``batch`` rows of ``length`` zero columns (filled in place by the caller)
            with room for ``extra`` more."""
            cap = length + extra + self.GROW
            self._kbuf = like_k.new_empty(batch, like_k.shape[1], cap, like_k.shape[3])
            self._vbuf = like_v.new_empty(batch, like_v.shape[1], cap, like_v.shape[3])
            if zero:
                self._kbuf[:, :, :length].zero_()
                self._vbuf[:, :, :length].zero_()
            self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]
            self.device, self.is_initialized = like_k.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.device = key_states.device
                self.is_initialized = True
                self.keys = self.values = None
                n = 0
            else:
                n = self.keys.shape[-2]
            add = key_states.shape[-2]
            if n == 0 or not self._backed() or self._kbuf.shape[-2] < n + add:
                b, h, _, d = key_states.shape
                kb = key_states.new_empty(b, h, n + add + self.GROW, d)
                vb = value_states.new_empty(b, h, n + add + self.GROW, value_states.shape[-1])
                if n:
                    kb[:, :, :n] = self.keys
                    vb[:, :, :n] = self.values
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[:, :, n:n + add] = key_states
            self._vbuf[:, :, n:n + add] = value_states
            self.keys = self._kbuf[:, :, :n + add]
            self.values = self._vbuf[:, :, :n + add]
            return self.keys, self.values

    return GrowingLayer


_GrowingLayer = None  # made on first use: transformers is imported lazily


def new_kv_cache(config):
    """A transformers ``DynamicCache`` for ``config`` whose plain full-attention layers append
    in place (:func:`_growing_layer_class`); other layer kinds are left as transformers makes them."""
    global _GrowingLayer
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _GrowingLayer is None:
        _GrowingLayer = _growing_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def is_growing(layer) -> bool:
    return _GrowingLayer is not None and isinstance(layer, _GrowingLayer)


@dataclass(eq=False)
class Batch:
    """Rows being decoded together: next-token logits ``[B, V]`` fp32, their KV cache, the
    attention mask ``[B, L]`` and each row's last position ``[B]``."""

    logits: torch.Tensor
    cache: object
    mask: torch.Tensor
    last_pos: torch.Tensor

    @staticmethod
    def cat(parts: list[Batch]) -> Batch:
        """Concatenate batches along the rows, left-padding the caches and masks to a common
        length (the first part's cache object is reused)."""
        L = max(b.mask.shape[1] for b in parts)
        cache = parts[0].cache
        for i, layer in enumerate(cache.layers):
            for attr in ("keys", "values"):
                setattr(layer, attr, torch.cat([F.pad(getattr(b.cache.layers[i], attr), (0, 0, L - b.mask.shape[1], 0))
                                                 for b in parts], 0))
        mask = torch.cat([F.pad(b.mask, (L - b.mask.shape[1], 0)) for b in parts], 0)
        return Batch(torch.cat([b.logits for b in parts]), cache, mask, torch.cat([b.last_pos for b in parts]))

    def reorder(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` in that order."""
        self.logits, self.mask, self.last_pos = self.logits[idx], self.mask[idx], self.last_pos[idx]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)

    def select(self, keep: list[int], trim: bool) -> None:
        """Keep rows ``keep`` (finished rows leave); with ``trim``, drop the leading columns that
        are padding in every kept row (only for caches whose layers all hold every column)."""
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        cols = mask.any(0).nonzero()
        start = int(cols[0]) if trim and len(cols) else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self.mask = mask[:, start:]
        self.last_pos = self.last_pos[idx]


def compact(cache, mask, width: int):
    """Move every row's real columns together at the right end of ``width`` columns (the
    engine's usual left-padded layout, the same as a prompt prefilled whole or read from the
    tree), dropping mid-row padding; returns the new mask."""
    n = mask.shape[0]
    idx = torch.zeros(n, width, dtype=torch.long, device=mask.device)
    new_mask = torch.zeros(n, width, dtype=mask.dtype, device=mask.device)
    for i in range(n):
        cols = mask[i].nonzero().squeeze(1)
        idx[i, width - len(cols):] = cols
        new_mask[i, width - len(cols):] = 1
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        gk = k.gather(2, idx[:, None, :, None].expand(n, k.shape[1], width, k.shape[3]))
        gv = v.gather(2, idx[:, None, :, None].expand(n, v.shape[1], width, v.shape[3]))
        if is_growing(layer):
            layer.reserve(n, width, 0, gk, gv, zero=False)
            layer.keys.copy_(gk)
            layer.values.copy_(gv)
        else:
            layer.keys, layer.values = gk, gv
    return new_mask


def kv_getter(cache, mask, row: int):
    """``kv_fn`` for :meth:`PrefixCache.insert`: the KV of row ``row``'s prompt positions
    ``start:end`` (its real, unmasked columns in order), as new tensors."""
    cols = mask[row].nonzero().squeeze(1)

    def kv_fn(start, end):
        c = cols[start:end]
        a, b = int(c[0]), int(c[-1]) + 1
        if b - a == end - start:  # contiguous columns: slice
            return [(own_copy(layer.keys[row:row + 1, :, a:b]), own_copy(layer.values[row:row + 1, :, a:b]))
                    for layer in cache.layers]
        return [(layer.keys[row:row + 1].index_select(2, c), layer.values[row:row + 1].index_select(2, c))
                for layer in cache.layers]

    return kv_fn
