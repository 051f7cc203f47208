"""Memory bank of labelled examples with embedding retrieval (the draft-verify harness's memory).

* ``bank.add(texts, labels)`` embeds and stores (labels: a string, or a list for multi-label).
* ``bank.search(query_embs, k)`` -> nearest neighbours (cosine) per query, identical texts excluded.
* ``bank.confirming(q, label, k)`` / ``bank.contrasting(q, label, k)``: nearest neighbours that
  share / do not share the label (contrasting: one per distinct label).
* ``bank.state_dict()`` / ``load_state_dict()``: tensors + lists only, so it travels inside a
  checkpoint loaded with ``torch.load(weights_only=True)``.
* ``bank.save(path)`` / ``MemoryBank.load(path)``: precomputed embeddings as ``.npz``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ophsd.harness.embeddings import Embedder, HashingTfidfEmbedder, get_embedder


def _label_tuple(label) -> tuple[str, ...]:
    if isinstance(label, (list, tuple, set, frozenset)):
        return tuple(str(x) for x in label)
    return (str(label),)


def _norm_text(t: str) -> str:
    return " ".join(str(t).lower().split())


@dataclass
class Neighbour:
    text: str
    label: object  # str, or list[str] for multi-label banks
    score: float
    index: int


class MemoryBank:
    """Thread-safe growing store of (text, label, embedding)."""

    def __init__(self, embedder: str | Embedder = "auto", max_size: int | None = None):
        self.embedder = get_embedder(embedder)
        self.max_size = max_size  # oldest entries are dropped past this size (None: unbounded)
        self.texts: list[str] = []
        self.labels: list[tuple[str, ...]] = []
        self._multi = False
        self._emb = np.zeros((0, self.embedder.dim), dtype=np.float32)
        self._norm_texts: list[str] = []
        self._lock = threading.RLock()

    # -- contents ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    @property
    def embeddings(self) -> np.ndarray:
        return self._emb

    def label_of(self, i: int):
        lab = self.labels[i]
        return list(lab) if self._multi else lab[0]

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.embedder.encode(list(texts), progress=progress)

    def add(self, texts: Sequence[str], labels: Sequence, embeddings: np.ndarray | None = None,
            progress: bool = False) -> None:
        """Append labelled texts (embedding them unless ``embeddings`` is given)."""
        texts = [str(t) for t in texts]
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            return
        if embeddings is None:
            embeddings = self.encode(texts, progress=progress)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(texts), self.embedder.dim):
            raise ValueError(f"embeddings shape {embeddings.shape} != ({len(texts)}, {self.embedder.dim})")
        labs = [_label_tuple(x) for x in labels]
        with self._lock:
            if any(isinstance(x, (list, tuple, set, frozenset)) for x in labels):
                self._multi = True
            self.texts.extend(texts)
            self.labels.extend(labs)
            self._norm_texts.extend(_norm_text(t) for t in texts)
            self._emb = np.concatenate([self._emb, embeddings], axis=0)
            if self.max_size is not None and len(self.texts) > self.max_size:
                drop = len(self.texts) - self.max_size
                del self.texts[:drop], self.labels[:drop], self._norm_texts[:drop]
                self._emb = self._emb[drop:]

    def add_examples(self, examples, task) -> None:
        """Add task examples with their *true* labels (training: after each step)."""
        self.add([task.input_text(e) for e in examples], [e.answer for e in examples])

    # -- retrieval --------------------------------------------------------------------------
    def _scores(self, q: np.ndarray) -> np.ndarray:
        return self._emb @ q.astype(np.float32)

    def _ranked(self, q: np.ndarray, query_text: str | None, exclude_identical: bool):
        scores = self._scores(q)
        order = np.argsort(-scores, kind="stable")
        qn = _norm_text(query_text) if (exclude_identical and query_text is not None) else None
        for i in order:
            if qn is not None and self._norm_texts[i] == qn:
                continue
            yield int(i), float(scores[i])

    def _nb(self, i, s) -> Neighbour:
        return Neighbour(self.texts[i], self.label_of(i), s, i)

    def search(self, queries: np.ndarray, k: int, query_texts: Sequence[str] | None = None,
               exclude_identical: bool = True) -> list[list[Neighbour]]:
        """``k`` nearest neighbours per query row, best first. With ``query_texts``, stored
        copies of the query text itself are skipped (a dev example never retrieves itself)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        out = []
        with self._lock:
            for r, q in enumerate(queries):
                qt = query_texts[r] if query_texts is not None else None
                res = []
                for i, s in self._ranked(q, qt, exclude_identical):
                    res.append(self._nb(i, s))
                    if len(res) >= k:
                        break
                out.append(res)
        return out

    def confirming(self, query: np.ndarray, label, k: int, query_text: str | None = None,
                   exclude_identical: bool = True) -> list[Neighbour]:
        """Nearest neighbours that carry ``label`` (multi-label: share at least one label)."""
        want = set(_label_tuple(label))
        res = []
        with self._lock:
            for i, s in self._ranked(np.asarray(query, np.float32), query_text, exclude_identical):
                if want & set(self.labels[i]):
                    res.append(self._nb(i, s))
                    if len(res) >= k:
                        break
        return res

    def contrasting(self, query: np.ndarray, label, k: int, query_text: str | None = None,
                    exclude_identical: bool = True) -> list[Neighbour]:
        """Nearest neighbours whose labels differ from ``label``: one per distinct label."""
        avoid = set(_label_tuple(label))
        res, seen = [], set()
        with self._lock:
            for i, s in self._ranked(np.asarray(query, np.float32), query_text, exclude_identical):
                lab = self.labels[i]
                if avoid & set(lab) or lab in seen:
                    continue
                seen.add(lab)
                res.append(self._nb(i, s))
                if len(res) >= k:
                    break
        return res

    # -- persistence ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha1(self.embedder.name.encode())
        for t, lab in zip(self.texts, self.labels):
            h.update(t.encode("utf-8", "replace") + b"\0" + "\1".join(lab).encode("utf-8", "replace") + b"\n")
        return h.hexdigest()

    def state_dict(self) -> dict:
        """Checkpoint state: a float32 tensor and plain lists (``torch.load(weights_only=True)`` safe)."""
        import torch

        with self._lock:
            sd = {
                "embedder": self.embedder.name,
                "texts": list(self.texts),
                "labels": [list(x) for x in self.labels],
                "multi_label": self._multi,
                "embeddings": torch.from_numpy(self._emb.copy()),
                "max_size": self.max_size,
            }
            if isinstance(self.embedder, HashingTfidfEmbedder):
                sd["tfidf"] = self.embedder.state_dict()
            return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("embedder") != self.embedder.name:
            raise ValueError(f"bank state was built with embedder {sd.get('embedder')!r}, "
                             f"this bank uses {self.embedder.name!r}")
        emb = sd["embeddings"]
        emb = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
        if emb.shape != (len(sd["texts"]), self.embedder.dim):
            raise ValueError(f"bank state embeddings have shape {emb.shape}, expected "
                             f"({len(sd['texts'])}, {self.embedder.dim})")
        with self._lock:
            if "tfidf" in sd and isinstance(self.embedder, HashingTfidfEmbedder):
                self.embedder.load_state_dict(sd["tfidf"])
            self.texts = list(sd["texts"])
            self.labels = [tuple(x) for x in sd["labels"]]
            self._multi = bool(sd.get("multi_label", False))
            self._norm_texts = [_norm_text(t) for t in self.texts]
            self._emb = emb.astype(np.float32).copy()
            self.max_size = sd.get("max_size", self.max_size)

    def save(self, path: str | os.PathLike) -> Path:
        """Write texts, labels and precomputed embeddings to ``path`` (``.npz``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict()
        meta = {k: sd[k] for k in ("embedder", "texts", "labels", "multi_label", "max_size")}
        meta["fingerprint"] = self.fingerprint()
        if "tfidf" in sd:
            meta["tfidf"] = sd["tfidf"]
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, embeddings=self._emb, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: str | Embedder | None = None) -> "MemoryBank":
        """Read a bank written by :meth:`save`; the embedder must match the one it was built with."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"memory bank file {path} does not exist")
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            emb = z["embeddings"]
        if embedder is None:
            embedder = "tfidf" if str(meta["embedder"]).startswith("tfidf") else "minilm"
        bank = cls(embedder)
        sd = dict(meta, embeddings=emb)
        bank.load_state_dict(sd)
        return bank


def build_bank(examples, task, embedder: str | Embedder = "auto", cache: str | os.PathLike | None = None,
               progress: bool = True) -> MemoryBank:
    """A bank seeded with ``examples`` (true labels). With ``cache``, precomputed embeddings are
    loaded from that file when it holds exactly these texts/labels and embedder, else computed
    and written there."""
    bank = MemoryBank(embedder)
    texts = [task.input_text(e) for e in examples]
    labels = [e.answer for e in examples]
    if cache is not None and Path(cache).is_file():
        try:
            cached = MemoryBank.load(cache, bank.embedder)
        except (ValueError, KeyError, OSError) as e:
            cached = None
            import warnings

            warnings.warn(f"ignoring memory bank cache {cache}: {e}")
        if cached is not None and cached.texts == texts and [list(x) for x in cached.labels] == \
                [list(_label_tuple(x)) for x in labels]:
            return cached
    if isinstance(bank.embedder, HashingTfidfEmbedder):
        bank.embedder.fit(texts)
    bank.add(texts, labels, progress=progress)
    if cache is not None:
        bank.save(cache)
    return bank
