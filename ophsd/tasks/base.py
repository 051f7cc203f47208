"""Task = data loader + bare (student) prompt + answer extraction + reward.

A task never talks to a model. Harnesses and the trainer ask it for:

* ``task.load(path)``                -> :class:`Dataset` of :class:`Example` (bad rows skipped,
  counted and warned about with ``file:line``; a file with no usable row is an error),
* ``task.student_messages(example)``  -> the bare chat prompt the student answers,
* ``task.extract_answer(text)``       -> the parsed answer (``None`` when unparsable),
* ``task.reward(text, example)``      -> a float in [0, 1] (1 = correct),
* ``task.reference_text(example)``    -> the privileged ground truth (OPSD teacher, training hints).
"""
from __future__ import annotations

import csv
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

Messages = list[dict]


class TaskDataError(ValueError):
    """A data file that cannot be used (missing, wrong format, no usable rows)."""


class BadRowWarning(UserWarning):
    """A row skipped while loading a task file (the message starts with ``file:line``)."""


@dataclass
class Example:
    """One task instance.

    ``answer`` is the gold target: a final-answer string for math tasks, a label string for
    single-label classification, a list of labels for multi-label tasks. ``solution`` is a
    worked reference (privileged: only harnesses in training mode and the OPSD teacher see it).
    ``source`` is ``file:line`` (or ``generator:seed:index``) for error messages.
    """

    id: str
    question: str
    answer: Any
    solution: str | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)


class Dataset(list):
    """A list of examples that remembers where it came from and which rows were skipped."""

    def __init__(self, items: Iterable[Example] = (), path: str | None = None,
                 bad_rows: Sequence[tuple[str, str]] = ()):
        super().__init__(items)
        self.path = path
        self.bad_rows = list(bad_rows)  # [(file:line, reason)]


MAX_ROW_WARNINGS = 10


def report_bad_rows(path: str, bad_rows: list[tuple[str, str]], n_good: int) -> None:
    """Warn once per bad row (first ``MAX_ROW_WARNINGS``) plus a summary; error if nothing usable."""
    for loc, reason in bad_rows[:MAX_ROW_WARNINGS]:
        warnings.warn(f"{loc}: skipped row: {reason}", BadRowWarning, stacklevel=3)
    if len(bad_rows) > MAX_ROW_WARNINGS:
        warnings.warn(
            f"{path}: skipped {len(bad_rows)} bad rows in all ({len(bad_rows) - MAX_ROW_WARNINGS} "
            f"more not shown; first at {bad_rows[0][0]})", BadRowWarning, stacklevel=3,
        )
    if n_good == 0:
        first = f"; first problem: {bad_rows[0][0]}: {bad_rows[0][1]}" if bad_rows else ""
        raise TaskDataError(f"{path}: no usable rows ({len(bad_rows)} bad{first})")


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TaskDataError(f"data file {p} does not exist")
    if p.is_dir():
        raise TaskDataError(f"data path {p} is a directory; give a file")
    return p


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, record_or_exception)`` for a JSONL file or a JSON list file.

    Undecodable lines yield the exception instead of raising, so the caller counts them.
    """
    p = _check_file(path)
    with open(p, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):  # one JSON array (the paper's .json files)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
        # json gives no line numbers per element: report the element index instead.
        for i, rec in enumerate(data):
            yield f"{p}:[{i}]", rec
        return
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{lineno}", ValueError(f"invalid JSON ({e.msg})")


def iter_csv_records(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, dict_or_exception)`` for a CSV file with a header row."""
    p = _check_file(path)
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise TaskDataError(
                f"{p}:1: CSV header {header} lacks column(s) {missing} (expected {list(required)})"
            )
        for row in reader:
            loc = f"{p}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                yield loc, ValueError(f"wrong number of fields ({len(row)} columns)")
            else:
                yield loc, row


def split_dev(examples: Sequence[Example], dev_size: int | float = 0.1, seed: int = 0):
    """Carve a dev split from a training file: ``(train, dev)`` with a fixed-seed permutation.

    ``dev_size`` is a count (int) or a fraction (float in (0, 1)). The same seed and file give
    the same split on every machine (``random.Random`` is platform independent).
    """
    n = len(examples)
    if isinstance(dev_size, float):
        if not 0 < dev_size < 1:
            raise ValueError(f"dev_size fraction must be in (0, 1), got {dev_size}")
        k = max(1, round(n * dev_size))
    else:
        if dev_size < 1:
            raise ValueError(f"dev_size must be >= 1, got {dev_size}")
        k = min(int(dev_size), n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    dev_idx = set(order[:k])
    train = [e for i, e in enumerate(examples) if i not in dev_idx]
    dev = [examples[i] for i in order[:k]]
    path = getattr(examples, "path", None)
    bad = getattr(examples, "bad_rows", ())
    return Dataset(train, path, bad), Dataset(dev, path, bad)


class Task:
    """Base class. Subclasses set ``name``, ``kind`` and implement the hooks below."""

    name: str = "task"
    kind: str = "math"  # "math" | "classification"
    default_harness: str = "plan_solve"
    max_new_tokens: int = 512  # default budget for the answer
    system_prompt: str | None = None

    # -- data -------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike | None = None, limit: int | None = None) -> Dataset:
        raise NotImplementedError

    def dataset(self, path=None, split: str = "all", dev_size: int | float = 500, seed: int = 0,
                limit: int | None = None) -> Dataset:
        """Load ``path`` and select ``split`` in {"all", "train", "dev"}; then keep ``limit``."""
        if split not in ("all", "train", "dev"):
            raise ValueError(f"split must be all, train or dev, got {split!r}")
        data = self.load(path)
        if split != "all":
            train, dev = split_dev(data, dev_size, seed)
            data = dev if split == "dev" else train
        if limit is not None:
            data = Dataset(data[:limit], data.path, data.bad_rows)
        return data

    # -- prompts ----------------------------------------------------------------------------
    def input_text(self, ex: Example) -> str:
        """The text a harness retrieves neighbours with / shows as the problem."""
        return ex.question

    def student_messages(self, ex: Example) -> Messages:
        raise NotImplementedError

    def _with_system(self, user: str) -> Messages:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    # -- answers ----------------------------------------------------------------------------
    def extract_answer(self, text: str | None):
        raise NotImplementedError

    def score_answer(self, pred, ex: Example) -> float:
        raise NotImplementedError

    def reward(self, text: str | None, ex: Example) -> float:
        """Reward of a response text: 1.0 correct, 0.0 wrong (F1 in [0, 1] for set tasks)."""
        pred = self.extract_answer(text)
        if pred is None:
            return 0.0
        return float(self.score_answer(pred, ex))

    def format_answer(self, answer) -> str:
        """Gold answer as text (prompts, tables)."""
        if isinstance(answer, (list, tuple)):
            return ", ".join(str(a) for a in answer)
        return str(answer)

    def reference_text(self, ex: Example) -> str:
        """Privileged ground truth for the OPSD teacher: worked solution (if any) + answer."""
        ans = self.format_answer(ex.answer)
        if ex.solution:
            return f"{ex.solution.strip()}\n\nFinal answer: {ans}"
        return f"Final answer: {ans}"

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"
