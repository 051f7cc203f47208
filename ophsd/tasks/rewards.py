"""Answer extraction and rewards shared by the tasks and the harnesses.

* Math: the last ``\\boxed{...}`` (balanced braces), else ``#### x`` / ``answer is x``, else the
  last number in the text; equivalence with ``math-verify`` (symbolic), falling back to a
  numeric / normalised string comparison when the package is missing.
* Classification: :func:`parse_label` maps free text onto a label set (exact, normalised,
  then the earliest mention); multi-label: :func:`parse_label_set` and :func:`set_f1`.
"""
from __future__ import annotations

import difflib
import re
import threading
import warnings
from functools import lru_cache
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------------- thinking

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE_ONLY = re.compile(r"^.*?</think>", re.DOTALL | re.IGNORECASE)


def strip_think(text: str | None) -> str:
    """Remove closed ``<think>...</think>`` blocks.

    An *unclosed* ``<think>`` block is kept (only its tag is removed): a truncated plan written
    entirely inside a thinking block is still the plan. A stray ``</think>`` without an opening
    tag (templates that open the block in the prompt) drops everything before it.
    """
    if not text:
        return ""
    out = _THINK_BLOCK.sub("", text)
    if "</think>" in out.lower() and not _THINK_OPEN.search(out):
        out = _THINK_CLOSE_ONLY.sub("", out, count=1)
    out = _THINK_OPEN.sub("", out)
    return out.strip()


# ---------------------------------------------------------------------------------- math

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str | None) -> str | None:
    """Content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; else None."""
    if not text:
        return None
    last = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1].strip()
    if last is None:  # "\boxed 5" (no braces)
        m2 = list(re.finditer(r"\\boxed\s+([^\s$]+)", text))
        if m2:
            last = m2[-1].group(1).strip()
    return last or None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?:####|answer\s*(?:is|:)\s*)\s*\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)", re.IGNORECASE)


def extract_math_answer(text: str | None, fallback_last_number: bool = True) -> str | None:
    """The final answer of a math response.

    Order: last ``\\boxed{}``; a ``#### x`` or ``answer is x`` marker; the last number in the
    text (``fallback_last_number``, the usual "flexible" GSM8K extraction). ``<think>`` blocks
    are stripped first.
    """
    if not text:
        return None
    text = strip_think(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    m = _ANSWER_IS.findall(text)
    if m:
        return m[-1].replace(",", "")
    if fallback_last_number:
        nums = _NUMBER.findall(text)
        nums = [n for n in nums if any(ch.isdigit() for ch in n)]
        if nums:
            return nums[-1].rstrip(".").replace(",", "")
    return None


def normalize_number(s: str) -> str:
    """``'1,000'`` -> ``'1000'``, ``'$18.00'`` -> ``'18'``; other strings stripped of spaces/``$``."""
    s = s.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    s = re.sub(r"\\(?:text|mathrm)\{[^}]*\}", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f == int(f) else repr(f)


_MV = None
_MV_WARNED = False


def _math_verify():
    global _MV, _MV_WARNED
    if _MV is None:
        try:
            import math_verify

            _MV = math_verify
        except ImportError:
            _MV = False
            if not _MV_WARNED:
                _MV_WARNED = True
                warnings.warn("math-verify is not installed: math answers are compared numerically "
                              "and as normalised strings only (pip install math-verify)")
    return _MV


@lru_cache(maxsize=65536)
def math_equal(pred: str | None, gold: str | None) -> bool:
    """Is ``pred`` mathematically equivalent to ``gold``? (``math-verify`` when installed)."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    if normalize_number(pred) == normalize_number(gold):
        return True
    mv = _math_verify()
    if not mv:
        try:
            return abs(float(normalize_number(pred)) - float(normalize_number(gold))) < 1e-6
        except ValueError:
            return False
    # math-verify's default timeouts use SIGALRM, which works only in the main thread.
    main = threading.current_thread() is threading.main_thread()
    t = 5 if main else None
    try:
        g = mv.parse(_as_latex(gold), parsing_timeout=t)
        p = mv.parse(_as_latex(pred), parsing_timeout=t)
        if not g or not p:
            return False
        return bool(mv.verify(g, p, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - a checker must never crash a batch
        return False


def _as_latex(s: str) -> str:
    # math-verify extracts from LaTeX environments; wrapping a bare answer in $...$ makes
    # "\frac12", "x^2+1" and "1,000" parse the same way as inside \boxed{}.
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def math_reward(text: str | None, gold: str, fallback_last_number: bool = True) -> float:
    return 1.0 if math_equal(extract_math_answer(text, fallback_last_number), gold) else 0.0


# ---------------------------------------------------------------------------------- labels

def normalize_label(s: str) -> str:
    """Lower case, separators folded to ``_``: ``"Card Arrival"`` -> ``"card_arrival"``."""
    s = s.strip().strip("`'\"*.,;:!?()[]{}<>").lower()
    return re.sub(r"[\s\-_/]+", "_", s).strip("_")


def closest_label(text: str | None, labels: Sequence[str], cutoff: float = 0.8) -> str | None:
    """The label whose normalised name is nearest the answer's first line (difflib ratio >=
    ``cutoff``), else None: reads a misspelt copy ("top_up_revented") as the label it copies.
    The draft-verify harness applies it to the labels it showed; the ablation notes apply it to
    standalone answers to count near-misses (the standalone score itself is exact)."""
    first = next((ln for ln in strip_think(text or "").splitlines() if ln.strip()), "")
    norm = {normalize_label(str(c)): str(c) for c in labels}
    close = difflib.get_close_matches(normalize_label(first), list(norm), n=1, cutoff=cutoff)
    return norm[close[0]] if close else None


class LabelParser:
    """Map free text onto one label of a fixed set.

    ``aliases`` maps a label to other names that count as that label (``"3"`` ->
    ``["c-c bond formation"]``). Rules, in order: (1) the whole answer (or its first line, minus
    a ``Label:`` / ``Intent:`` prefix) equals a label after normalisation; (2) the label
    mentioned *earliest* in the text (``card_arrival``, ``card arrival`` and ``Card-Arrival`` are
    the same mention; the longest label wins ties, so ``card_payment_fee_charged`` beats
    ``card_payment``); else ``None``.
    """

    _PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:label|intent|answer|category|class)"
                         r"(?:\s+is)?\s*[:=]?\s*", re.IGNORECASE)

    def __init__(self, labels: Sequence[str], aliases: dict[str, Sequence[str]] | None = None):
        self.labels = list(dict.fromkeys(str(x) for x in labels))
        if not self.labels:
            raise ValueError("a label parser needs at least one label")
        aliases = aliases or {}
        self._by_norm: dict[str, str] = {}
        self._alt_to_label: dict[str, str] = {}
        for lab in self.labels:
            for name in [lab, *aliases.get(lab, ())]:
                n = normalize_label(name)
                if n:
                    self._by_norm.setdefault(n, lab)
                    self._alt_to_label.setdefault(n.replace("_", " "), lab)
        keys = sorted(self._alt_to_label, key=lambda a: (-len(a), a))
        pattern = "|".join(re.escape(a) for a in keys)
        self._re = re.compile(rf"(?<![a-z0-9])({pattern})(?![a-z0-9])")

    def exact(self, text: str) -> str | None:
        """The label whose normalised name (or alias) equals ``text``; else None."""
        return self._by_norm.get(normalize_label(text))

    @staticmethod
    def _canon(text: str) -> str:
        return re.sub(r"[\s\-_/]+", " ", text.lower())

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return None
        text = strip_think(text).strip()
        if not text:
            return None
        first = text.splitlines()[0]
        for cand in (text, first, self._PREFIX.sub("", first)):
            lab = self._by_norm.get(normalize_label(cand))
            if lab is not None:
                return lab
        m = self._re.search(self._canon(text))  # leftmost; longest alternative first
        return self._alt_to_label[m.group(1)] if m else None

    def find_all(self, text: str | None) -> list[str]:
        """Every label mentioned, in order of first mention (multi-label answers)."""
        if not text:
            return []
        out = []
        for m in self._re.finditer(self._canon(strip_think(text))):
            lab = self._alt_to_label[m.group(1)]
            if lab not in out:
                out.append(lab)
        return out


def label_reward(pred: str | None, gold: str) -> float:
    return 1.0 if pred is not None and normalize_label(pred) == normalize_label(gold) else 0.0


# ---------------------------------------------------------------------------------- sets

def set_f1(pred: Iterable[str], gold: Iterable[str]) -> float:
    """F1 between two label sets (normalised); two empty sets score 1."""
    p = {normalize_label(x) for x in pred if str(x).strip()}
    g = {normalize_label(x) for x in gold if str(x).strip()}
    if not p and not g:
        return 1.0
    tp = len(p & g)
    if tp == 0:
        return 0.0
    prec, rec = tp / len(p), tp / len(g)
    return 2 * prec * rec / (prec + rec)


_SET_SPLIT = re.compile(r"[,;，；、\n]+|\band\b|和")


def split_label_list(text: str) -> list[str]:
    """``"theft, fraud; robbery"`` -> ``["theft", "fraud", "robbery"]`` (also Chinese separators)."""
    parts = [p.strip().strip("[]\"'`*.。").strip() for p in _SET_SPLIT.split(text or "")]
    out = []
    for p in parts:
        p = re.sub(r"^(?:\d+[.)]\s*|[-*•]\s*)", "", p).strip()
        if p and p not in out:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021) from ``n`` samples with ``c`` correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
