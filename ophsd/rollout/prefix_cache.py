"""A radix-tree prefix cache of per-layer KV for the embedded engine (SGLang's RadixAttention,
on dense per-node tensors instead of a paged pool). Used by :mod:`ophsd.rollout.embedded`."""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

import torch


class _Node:
    """A radix-tree node: the tokens of its edge and their KV, one ``(keys, values)`` pair per
    layer, each ``[1, kv_heads, len(key), head_dim]`` (the HF cache layout); ``logits`` (fp32
    ``[vocab]``) after its last token when a prompt that ends here was prefilled."""

    __slots__ = ("key", "kv", "children", "parent", "last_access", "lock_ref", "logits")

    def __init__(self, key=(), kv=None, parent=None):
        self.key: tuple[int, ...] = tuple(key)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = kv
        self.children: dict[int, _Node] = {}
        self.parent: _Node | None = parent
        self.last_access = 0
        self.lock_ref = 0
        self.logits: torch.Tensor | None = None


def own_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no storage with ``t`` (a slice would pin its whole base)."""
    return t.clone(memory_format=torch.contiguous_format)


def common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Radix tree over prompt token ids whose nodes own the KV of their tokens (SGLang's
    RadixAttention, on dense per-node tensors instead of a paged pool).

    * :meth:`match` finds the longest cached prefix of a token sequence (it may end inside an
      edge; nothing is split) and :meth:`gather` copies its KV out, per layer;
    * :meth:`insert` adds a sequence, splitting an edge where the sequence leaves it and
      asking ``kv_fn(start, end)`` only for the tokens not yet cached, and can keep the logits
      after its last token: a later prompt equal to a cached one then needs no forward at all
      (:meth:`end_logits`), and repeats of a prompt give bitwise-identical results;
    * at most ``max_tokens`` tokens stay cached: after an insert, unlocked leaves are evicted
      least recently used first. A kept logits vector counts as the tokens whose KV takes as
      many bytes (``logits_tokens``; ~4 for SmolLM2 and Qwen3). :meth:`lock` / :meth:`unlock`
      pin a matched path.

    Every KV in the tree was computed at the absolute positions of its tokens (prompts start at
    position 0), so a cached prefix is valid for any prompt that starts with it, under the
    weights it was computed with: the engine clears the cache whenever weights change.
    Not thread-safe; the engine's scheduler thread is its only user (``flush`` is locked).
    """

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError("PrefixCache needs max_tokens >= 1")
        self.max_tokens = int(max_tokens)
        self._clock = itertools.count(1)
        self.evicted_tokens = 0
        self.evictions = 0
        self.clear()

    def clear(self) -> None:
        self.root = _Node()
        self.root.lock_ref = 1  # never evicted
        self.total_tokens = 0
        self.logits_tokens = 0
        self.n_nodes = 0

    # -- lookup --------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[list[tuple[_Node, int]], int]:
        """``([(node, tokens used of its edge), ...], matched length)`` for the longest cached
        prefix of ``tokens``; touches the path (LRU)."""
        node, pos, path = self.root, 0, []
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            c = common_len(child.key, tokens[pos:pos + len(child.key)])
            child.last_access = now
            path.append((child, c))
            pos += c
            if c < len(child.key):
                break
            node = child
        return path, pos

    @staticmethod
    def end_logits(path, matched: int, length: int) -> torch.Tensor | None:
        """The logits cached after the last of ``length`` tokens, if the match covers them all
        and ends where such logits were stored."""
        if matched != length or not path:
            return None
        node, c = path[-1]
        return node.logits if c == len(node.key) else None

    @staticmethod
    def gather(path, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The KV of a matched path, per layer ``[1, kv_heads, matched, head_dim]`` (a copy)."""
        out = []
        for layer in range(n_layers):
            ks = [node.kv[layer][0][:, :, :c] for node, c in path]
            vs = [node.kv[layer][1][:, :, :c] for node, c in path]
            out.append((torch.cat(ks, 2), torch.cat(vs, 2)))
        return out

    @staticmethod
    def copy_into(path, dst: list[tuple[torch.Tensor, torch.Tensor]], row: int, end: int) -> None:
        """Write the KV of a matched path into ``dst`` (per layer ``[B, H, T, D]``) at batch row
        ``row``, right-aligned to end at column ``end``."""
        col = end - sum(c for _, c in path)
        for node, c in path:
            for (dk, dv), (k, v) in zip(dst, node.kv):
                dk[row, :, col:col + c] = k[0, :, :c]
                dv[row, :, col:col + c] = v[0, :, :c]
            col += c

    def lock(self, path) -> _Node | None:
        """Pin a matched path (its deepest node and every ancestor) against eviction; returns
        the handle for :meth:`unlock`, which stays right if an insert splits an edge meanwhile
        (a split's upper half inherits the lock count)."""
        node = path[-1][0] if path else None
        n = node
        while n is not None and n is not self.root:
            n.lock_ref += 1
            n = n.parent
        return node

    def unlock(self, node: _Node | None) -> None:
        while node is not None and node is not self.root:
            node.lock_ref -= 1
            node = node.parent

    # -- insertion and eviction ----------------------------------------------------------
    def insert(self, tokens: Sequence[int], kv_fn, logits: torch.Tensor | None = None) -> int:
        """Cache ``tokens``; ``kv_fn(start, end)`` gives per-layer ``(keys, values)``
        ``[1, H, end - start, D]`` for the token positions ``start:end`` (called once, for the
        uncached tail, if any; the tree keeps those tensors, so they must own their storage).
        ``logits``: the model's logits after the last token, kept on the node where ``tokens``
        end. Returns how many tokens were added; evicts down to the bound."""
        tokens = tuple(tokens)
        node, pos = self.root, 0
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            c = common_len(child.key, tokens[pos:pos + len(child.key)])
            if c < len(child.key):
                child = self._split(child, c)
            child.last_access = now
            node, pos = child, pos + c
        added = len(tokens) - pos
        if added:
            kv = list(kv_fn(pos, len(tokens)))
            leaf = _Node(tokens[pos:], kv, node)
            leaf.last_access = now
            node.children[tokens[pos]] = leaf
            self.total_tokens += added
            self.n_nodes += 1
            node = leaf
        if logits is not None and node is not self.root and node.logits is None:
            node.logits = logits
            self.logits_tokens += self._logits_cost(node)
        self.evict(self.max_tokens)
        return added

    @staticmethod
    def _logits_cost(node: _Node) -> int:
        """A node's logits in tokens of KV of the same bytes (rounded up)."""
        per_token = sum((k.numel() + v.numel()) * k.element_size() for k, v in node.kv) // max(1, len(node.key))
        size = node.logits.numel() * node.logits.element_size()
        return -(-size // max(1, per_token))

    def _split(self, child: _Node, c: int) -> _Node:
        """Cut ``child``'s edge after ``c`` tokens; returns the new upper node."""
        parent = child.parent
        upper = _Node(child.key[:c], [(own_copy(k[:, :, :c]), own_copy(v[:, :, :c])) for k, v in child.kv], parent)
        upper.last_access = child.last_access
        upper.lock_ref = child.lock_ref
        parent.children[child.key[0]] = upper
        child.key = child.key[c:]
        child.kv = [(own_copy(k[:, :, c:]), own_copy(v[:, :, c:])) for k, v in child.kv]
        child.parent = upper
        upper.children[child.key[0]] = child
        self.n_nodes += 1
        return upper

    def evict(self, max_tokens: int) -> int:
        """Drop unlocked leaves, least recently used first, until at most ``max_tokens`` stay
        (KV tokens plus ``logits_tokens``)."""
        if self.total_tokens + self.logits_tokens <= max_tokens:
            return 0

        heap, tie = [], itertools.count()
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n.lock_ref == 0:
                heap.append((n.last_access, next(tie), n))
        heapq.heapify(heap)
        freed = 0
        while self.total_tokens + self.logits_tokens > max_tokens and heap:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            del parent.children[n.key[0]]
            if n.logits is not None:
                self.logits_tokens -= self._logits_cost(n)
            self.total_tokens -= len(n.key)
            self.n_nodes -= 1
            self.evicted_tokens += len(n.key)
            self.evictions += 1
            freed += len(n.key)
            n.kv = n.logits = None
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        return freed
