"""Paired sequences with aligned response positions, packed into micro-batches.

A sample is ``[student prompt | response]`` and ``[teacher prompt | response]``. Logit at
position p predicts token p+1, so for response token j the student logit sits at
``Ls - 1 + j`` and the teacher logit at ``Lt - 1 + j``. Pairs that do not fit the length
limits are skipped and counted: response tokens are never dropped silently.

Two layouts, one per pass (student, teacher), same response-token order in both:

* **prefix-tree packing** (default, :func:`pack_tree`): the sequences of a micro-batch go into
  one row as a flattened prefix tree, so a prefix they share (the n samples of one prompt; a
  task-wide instruction such as BANKING77's 77-label list) is computed once. Tokens are laid
  out in depth-first order, which makes every node's subtree a contiguous range: token j is
  visible to token i iff ``j <= i < subtree_end[j]`` (one int per token describes the whole
  tree-causal mask), and a token's position id is its depth. Sequences without a common
  prefix become separate roots in the same row: variable lengths are packed, not padded.
  Gradients through a shared prefix accumulate from every branch, so losses and gradients
  are exactly those of the unpacked batch.
* **right-padded rows** (``--no-pack-sequences``, :func:`pack_padded`): one sequence per row,
  plain causal attention (the layout transformer-engine's fused attention takes).

Only the logits at ``pos`` (the rows the divergence reads) are computed: the model selects
those hidden states before the output layer (``ophsd.models.forward``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

import torch

from ophsd.rollout.prefix_cache import common_len


@dataclass
class Sample:
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    weight: float = 1.0
    meta: dict = field(default_factory=dict)


@dataclass
class TokenRows:
    """One pass's input rows and where the response logits sit in them."""

    tokens: torch.Tensor  # [b, L] int64
    position_ids: torch.Tensor  # [b, L] int64
    subtree_end: torch.Tensor | None  # [b, L] int64 tree-causal mask (None: plain causal)
    rows: torch.Tensor  # [n] row of the logit predicting response token k
    pos: torch.Tensor  # [n] its position in that row

    def to(self, device) -> "TokenRows":
        return TokenRows(**{f.name: (None if getattr(self, f.name) is None
                                     else getattr(self, f.name).to(device, non_blocking=True)) for f in fields(self)})

    @property
    def computed_positions(self) -> int:
        return int(self.tokens.numel())


@dataclass
class MicroBatch:
    """Student and teacher rows for the same samples, plus per-response-token targets/weights."""

    student: TokenRows
    teacher: TokenRows
    targets: torch.Tensor  # [n] the response token ids
    weights: torch.Tensor  # [n] float32 per-token weights (sample weight)

    def to(self, device) -> "MicroBatch":
        return MicroBatch(self.student.to(device), self.teacher.to(device),
                          self.targets.to(device, non_blocking=True), self.weights.to(device, non_blocking=True))


def filter_pairs(samples: list[Sample], max_prompt_length: int, max_response_length: int):
    """(kept samples, counters): skip empty responses and pairs longer than the limits."""
    kept, skipped = [], {"skipped/empty_response": 0, "skipped/too_long": 0}
    for s in samples:
        if not s.response:
            skipped["skipped/empty_response"] += 1
        elif (max(len(s.student_prompt), len(s.teacher_prompt)) > max_prompt_length
              or len(s.response) > max_response_length):
            skipped["skipped/too_long"] += 1
        else:
            kept.append(s)
    return kept, skipped


def _pad_to(n: int, multiple: int = 8) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def _scored(prompt: list[int], response: list[int]) -> tuple[list[int], int]:
    """The tokens a pass needs (the last response token predicts nothing we read) and the
    index of the first logit read (the one at the last prompt token)."""
    return prompt + response[:-1], len(prompt) - 1


# ------------------------------------------------------------------------ prefix trees


def tree_layout(seqs: list[list[int]]):
    """Flatten the prefix tree of ``seqs`` depth-first.

    Returns ``(tokens, depth, subtree_end, paths)``: flat lists over the packed row, and for
    each input sequence the packed positions of its tokens (``paths[k][d]`` holds token d of
    sequence k). Identical sequences share every position.
    """
    order = sorted(range(len(seqs)), key=lambda k: seqs[k])
    tokens: list[int] = []
    depth: list[int] = []
    end: list[int] = []
    path: list[int] = []  # packed positions of the current root-to-node path
    prev: list[int] = []
    paths: list[list[int]] = [[] for _ in seqs]
    for k in order:
        s = seqs[k]
        lcp = common_len(prev, s)
        for p in path[lcp:]:  # everything below the branch point is finished
            end[p] = len(tokens)
        del path[lcp:]
        for d in range(lcp, len(s)):
            path.append(len(tokens))
            tokens.append(s[d])
            depth.append(d)
            end.append(-1)
        paths[k] = list(path)
        prev = s
    for p in path:
        end[p] = len(tokens)
    return tokens, depth, end, paths


def packed_length(seqs: list[list[int]]) -> int:
    """Tokens in the flattened prefix tree of ``seqs`` (distinct prefixes)."""
    total, prev = 0, []
    for x in sorted(seqs):
        total += len(x) - common_len(prev, x)
        prev = x
    return total


def tree_attention_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """[b, 1, L, L] bool, True = masked out (megatron's convention), from ``subtree_end`` [b, L]."""
    L = subtree_end.shape[-1]
    i = torch.arange(L, device=subtree_end.device)
    visible = (i[None, :, None] >= i[None, None, :]) & (i[None, :, None] < subtree_end[:, None, :])
    return ~visible[:, None]


def _tree_rows(seqs_and_starts: list[tuple[list[int], int, int]], length: int, pad_id: int) -> TokenRows:
    """One packed row of ``length`` from (sequence, first logit index, number of logits)."""
    tokens, depth, end, paths = tree_layout([s for s, _, _ in seqs_and_starts])
    pos = []
    for (s, start, n), path in zip(seqs_and_starts, paths):
        pos += path[start: start + n]
    n_pad = length - len(tokens)
    ar = len(tokens) + torch.arange(n_pad)
    tok = torch.cat([torch.tensor(tokens, dtype=torch.long), torch.full((n_pad,), pad_id, dtype=torch.long)])
    # padding: position 0, sees itself only (never a fully masked attention row)
    dep = torch.cat([torch.tensor(depth, dtype=torch.long), torch.zeros(n_pad, dtype=torch.long)])
    en = torch.cat([torch.tensor(end, dtype=torch.long), ar + 1])
    return TokenRows(tok[None], dep[None], en[None], torch.zeros(len(pos), dtype=torch.long),
                     torch.tensor(pos, dtype=torch.long))


class _PrefixCounter:
    """Tokens in the prefix tree of the sequences added so far, updated per insertion:
    a new sequence adds its length minus its longest common prefix with any sequence
    already in, which is reached at a lexicographic neighbour."""

    def __init__(self):
        self.seqs: list[tuple[int, ...]] = []
        self.total = 0

    def cost(self, seq: list[int]) -> tuple[int, int]:
        t = tuple(seq)
        i = bisect.bisect_left(self.seqs, t)
        best = 0
        for j in (i - 1, i):
            if 0 <= j < len(self.seqs):
                best = max(best, common_len(self.seqs[j], t))
        return len(t) - best, i

    def add(self, seq: list[int]) -> None:
        extra, i = self.cost(seq)
        self.seqs.insert(i, tuple(seq))
        self.total += extra


def _group_by_budget(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Consecutive samples per micro-batch while both packed passes stay within ``max_tokens``
    (a sample longer than the budget gets a micro-batch of its own)."""
    passes = ("student_prompt", "teacher_prompt")
    groups: list[list[Sample]] = []
    cur: list[Sample] = []
    counters = {p: _PrefixCounter() for p in passes}
    for s in samples:
        seqs = {p: _scored(getattr(s, p), s.response)[0] for p in passes}
        fits = all(counters[p].total + counters[p].cost(seqs[p])[0] <= max_tokens for p in passes)
        if cur and not fits:
            groups.append(cur)
            cur, counters = [], {p: _PrefixCounter() for p in passes}
        cur.append(s)
        for p in passes:
            counters[p].add(seqs[p])
    if cur:
        groups.append(cur)
    return groups


def pack_tree(samples: list[Sample], max_tokens: int = 4096, pad_id: int = 0) -> list[MicroBatch]:
    """Prefix-tree packed micro-batches (one row each) of at most ``max_tokens`` per pass.

    Every micro-batch of a pass is padded to the same length (megatron's pipeline schedule
    sends one activation shape per step), a multiple of 8.
    """
    if not samples:
        return []
    groups = _group_by_budget(samples, max_tokens)
    parts = {}
    for p in ("student_prompt", "teacher_prompt"):
        per_group = [[(*_scored(getattr(s, p), s.response), len(s.response)) for s in g] for g in groups]
        L = _pad_to(max(packed_length([x[0] for x in g]) for g in per_group))
        parts[p] = [_tree_rows(g, L, pad_id) for g in per_group]
    out = []
    for gi, g in enumerate(groups):
        out.append(MicroBatch(parts["student_prompt"][gi], parts["teacher_prompt"][gi],
                              torch.tensor([t for s in g for t in s.response], dtype=torch.long),
                              torch.tensor([float(s.weight) for s in g for _ in s.response], dtype=torch.float32)))
    return out


# ------------------------------------------------------------------------ padded rows


def _padded_rows(chunk: list[tuple[list[int], int, int]], length: int, pad_id: int) -> TokenRows:
    tok = torch.full((len(chunk), length), pad_id, dtype=torch.long)
    rows, pos = [], []
    for b, (seq, start, n) in enumerate(chunk):
        tok[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        rows += [b] * n
        pos += range(start, start + n)
    position_ids = torch.arange(length).expand(len(chunk), length).contiguous()
    return TokenRows(tok, position_ids, None, torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long))


def pack_padded(samples: list[Sample], micro_batch_size: int, pad_id: int = 0) -> list[MicroBatch]:
    """Fixed [micro_batch_size, L] right-padded blocks, one sequence per row.

    The last micro-batch is filled with zero-weight copies of the first sample when the
    number of samples is not a multiple of ``micro_batch_size``.
    """
    if not samples:
        return []
    filler = Sample(samples[0].student_prompt, samples[0].teacher_prompt, samples[0].response, weight=0.0)
    padded = samples + [filler] * (-len(samples) % micro_batch_size)
    lengths = {p: _pad_to(max(len(_scored(getattr(s, p), s.response)[0]) for s in samples))
               for p in ("student_prompt", "teacher_prompt")}
    out = []
    for start in range(0, len(padded), micro_batch_size):
        chunk = padded[start: start + micro_batch_size]
        rows = {p: _padded_rows([(*_scored(getattr(s, p), s.response), len(s.response)) for s in chunk],
                                lengths[p], pad_id) for p in lengths}
        out.append(MicroBatch(rows["student_prompt"], rows["teacher_prompt"],
                              torch.tensor([t for s in chunk for t in s.response], dtype=torch.long),
                              torch.tensor([float(s.weight) for s in chunk for _ in s.response], dtype=torch.float32)))
    return out


def pack(samples: list[Sample], micro_batch_size: int = 4, pad_id: int = 0, *, packed: bool = True,
         max_tokens: int = 4096) -> list[MicroBatch]:
    """Micro-batches for one step: prefix-tree packed by token budget, or padded by sample count."""
    if packed:
        return pack_tree(samples, max_tokens=max_tokens, pad_id=pad_id)
    return pack_padded(samples, micro_batch_size, pad_id=pad_id)


def layout_stats(mbs: list[MicroBatch]) -> dict:
    """Computed positions per loss-carrying token (the waste the packing removes)."""
    tokens = sum(int(mb.targets.numel()) for mb in mbs)
    live = sum(int((mb.weights > 0).sum()) for mb in mbs)
    s = sum(mb.student.computed_positions for mb in mbs)
    t = sum(mb.teacher.computed_positions for mb in mbs)
    return {"layout/student_positions": s, "layout/teacher_positions": t, "layout/response_tokens": tokens,
            "layout/student_positions_per_token": s / max(live, 1),
            "layout/teacher_positions_per_token": t / max(live, 1)}
