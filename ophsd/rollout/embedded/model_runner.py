"""The embedded engine's model runner: the forwards (prefill of new prompts, through the prefix
cache when it is on, and decode steps) and the engine-side glue of the prefix cache."""
from __future__ import annotations

import threading

import torch

from ophsd.rollout.embedded.kv_cache import Batch, compact, is_growing, kv_getter, new_kv_cache
from ophsd.rollout.prefix_cache import PrefixCache, common_len, own_copy


class ModelRunner:
    """Runs the model for the scheduler thread. ``prefix_cache`` (``None``: off) is used under
    ``prefix_lock``, which :meth:`flush_prefix_cache` takes too; ``stats`` is the engine's counter
    dict (prefill counters are kept here)."""

    # Shared prefixes shorter than this are left to each row (a separate forward costs more).
    MIN_SHARED_PREFIX = 16

    def __init__(self, model, device: torch.device, prefix_cache: PrefixCache | None, stats: dict):
        self.model = model
        self.device = device
        self.prefix_cache = prefix_cache
        self.prefix_lock = threading.Lock()
        self.prefix_flushes = 0
        self.stats = stats

    def forward(self, **kw):
        try:
            return self.model(**kw, use_cache=True)
        except TypeError:
            kw.pop("logits_to_keep", None)
            return self.model(**kw, use_cache=True)

    def flush_prefix_cache(self) -> int:
        """Drop every cached prefix; returns the tokens dropped. Waits for a prefill in progress."""
        if self.prefix_cache is None:
            return 0
        with self.prefix_lock:
            n = self.prefix_cache.total_tokens
            self.prefix_cache.clear()
            self.prefix_flushes += 1
        return n

    def prefill(self, prompts: list[list[int]]) -> Batch:
        """Prefill new sequences' prompts (one per sequence, repeats allowed) as one batch."""
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        if self.prefix_cache is None:
            return self._prefill_plain(prompts)
        with self.prefix_lock:
            return self._prefill_cached(prompts)

    def decode(self, batch: Batch, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (one per row) to ``batch`` and compute the next logits."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(tokens), 1)], 1)
        batch.last_pos = batch.last_pos + 1
        out = self.forward(input_ids=tokens[:, None], attention_mask=batch.mask,
                           position_ids=batch.last_pos[:, None], past_key_values=batch.cache)
        batch.cache = out.past_key_values
        batch.logits = out.logits[:, -1].float()

    def _prefill_plain(self, prompts: list[list[int]]) -> Batch:
        L = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_kv_cache(self.model.config)
        out = self.forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                           past_key_values=cache, logits_to_keep=1)
        self.stats["prefill_tokens"] += sum(len(p) for p in prompts)
        return Batch(out.logits[:, -1].float(), out.past_key_values, mask, pos[:, -1])

    def _prefill_cached(self, seq_prompts: list[list[int]]) -> Batch:
        pc = self.prefix_cache
        # identical prompts (the n samples of one prompt) are computed once, as one row
        rows: dict[tuple[int, ...], int] = {}
        prompts: list[list[int]] = []
        seq_row = []
        for sp in seq_prompts:
            r = rows.setdefault(tuple(sp), len(prompts))
            if r == len(prompts):
                prompts.append(sp)
            seq_row.append(r)
        # prompts cached whole, with their last logits: rows straight from the tree, no forward
        hits, todo, hit_len = [], [], [0] * len(prompts)
        for r, p in enumerate(prompts):
            path, m = pc.match(p)
            lg = PrefixCache.end_logits(path, m, len(p))
            if lg is not None:
                hits.append((r, path, lg))
                hit_len[r] = len(p)
            else:
                todo.append(r)
        parts, order = [], []
        if hits:
            parts.append(self._rows_from_tree([prompts[r] for r, _, _ in hits],
                                              [(path, len(prompts[r])) for r, path, _ in hits],
                                              torch.stack([lg for _, _, lg in hits])))
            order += [r for r, _, _ in hits]
        if todo:
            todo_prompts = [prompts[r] for r in todo]
            self._share_prefixes(todo_prompts)
            # every row: its longest cached prefix, leaving at least the last token to compute
            matches = [pc.match(p[:-1]) for p in todo_prompts]
            handles = [pc.lock(path) for path, _ in matches]
            try:
                logits, cache, mask, pos = self._prefill_rows(todo_prompts, matches)
                for i, p in enumerate(todo_prompts):
                    pc.insert(p, kv_getter(cache, mask, i), logits=own_copy(logits[i]))
            finally:
                for h in handles:
                    pc.unlock(h)
            parts.append(Batch(logits, cache, mask, pos[:, -1]))
            order += todo
            for r, (_, m) in zip(todo, matches):
                hit_len[r] = m
        self.stats["prefix_hit_tokens"] += sum(hit_len[r] for r in seq_row)
        batch = parts[0] if len(parts) == 1 else Batch.cat(parts)
        row_of = {r: i for i, r in enumerate(order)}
        take = [row_of[r] for r in seq_row]
        if take != list(range(len(order))):
            batch.reorder(torch.tensor(take, device=batch.logits.device))
        return batch

    def _rows_from_tree(self, prompts, matches, logits) -> Batch:
        """Rows for prompts cached whole: their KV copied out of the tree (left-padded), the
        stored logits, no forward."""
        cache, mask = self._past_from_tree(prompts, matches, 0)
        last_pos = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return Batch(logits, cache, mask, last_pos)

    def _past_from_tree(self, prompts, matches, S: int):
        """A KV cache of ``len(prompts)`` rows holding each row's matched KV right-aligned to
        column ``P = max m`` (left padding zero, mask 0), with room for ``S`` more columns; and the
        ``[rows, P + S]`` mask (its last ``S`` columns are left to the caller)."""
        n = len(prompts)
        P = max(m for _, m in matches)
        mask = torch.zeros(n, P + S, dtype=torch.long)
        for i, (_, m) in enumerate(matches):
            mask[i, P - m:P] = 1
        cache = new_kv_cache(self.model.config)
        if P:
            ref = next(path for path, m in matches if m)[0][0].kv
            for layer, (k, v) in zip(cache.layers, ref):
                if is_growing(layer):  # straight into a buffer with room for the tails
                    layer.reserve(n, P, S, k, v)
                else:
                    layer.update(k.new_zeros(n, k.shape[1], P, k.shape[3]), v.new_zeros(n, v.shape[1], P, v.shape[3]))
            past = [(layer.keys, layer.values) for layer in cache.layers]
            for i, (path, m) in enumerate(matches):
                if m:
                    PrefixCache.copy_into(path, past, i, P)
        return cache, mask.to(self.device)

    def _share_prefixes(self, prompts: list[list[int]]) -> None:
        """Compute and cache, once each, the uncached prefixes that several prompts share.

        The branch points of the prompts' trie are the common prefixes of lexicographically
        adjacent prompts; shorter ones go first, so a longer one extends a shorter one's KV.
        """
        if len(prompts) < 2:
            return
        pc = self.prefix_cache
        order = sorted(prompts)
        points = set()
        for a, b in zip(order, order[1:]):
            n = min(common_len(a, b), len(a) - 1, len(b) - 1)
            if n >= self.MIN_SHARED_PREFIX:
                points.add(tuple(a[:n]))
        for point in sorted(points, key=len):
            path, m = pc.match(point)
            if len(point) - m < self.MIN_SHARED_PREFIX:
                continue
            handle = pc.lock(path)
            try:
                _, cache, mask, _ = self._prefill_rows([list(point)], [(path, m)])
                pc.insert(point, kv_getter(cache, mask, 0))
            finally:
                pc.unlock(handle)

    def _prefill_rows(self, prompts: list[list[int]], matches):
        """One forward over the uncached tails ``prompt[m:]`` of the rows, with their cached KV
        as ``past_key_values``. Row ``i`` of the cache/mask is ``[pad][cached m_i][pad][tail]``
        (cached part right-aligned to column ``P = max m``, tails right-aligned to the end);
        padding has mask 0 and the positions are explicit. Returns ``(last logits, cache, mask,
        positions)``, the cache compacted to ``[pad][prompt]`` rows (see :func:`compact`)."""
        n = len(prompts)
        P = max(m for _, m in matches)
        S = max(len(p) - m for p, (_, m) in zip(prompts, matches))
        cache, mask = self._past_from_tree(prompts, matches, S)
        ids = torch.zeros(n, S, dtype=torch.long)
        for i, (p, (_, m)) in enumerate(zip(prompts, matches)):
            ids[i, S - (len(p) - m):] = torch.tensor(p[m:])
            mask[i, P + S - (len(p) - m):] = 1
        ids = ids.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
        out = self.forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                           past_key_values=cache, logits_to_keep=1)
        self.stats["prefill_tokens"] += sum(len(p) - m for p, (_, m) in zip(prompts, matches))
        cache = out.past_key_values
        W = max(len(p) for p in prompts)
        if P + S != W or any(m and len(p) - m < S for p, (_, m) in zip(prompts, matches)):  # mid-row padding
            mask = compact(cache, mask, W)
        return out.logits[:, -1].float(), cache, mask, pos
