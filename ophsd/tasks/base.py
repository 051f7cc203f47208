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
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def _not_text(p: Path) -> TaskDataError:
    return TaskDataError(f"{p}: not UTF-8 text; is this the right file?")


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, record_or_exception)`` for a JSONL file or a JSON list file.

    Undecodable lines yield the exception instead of raising, so the caller counts them; a file
    that is not text, or a JSON list too deeply nested to parse, raises :class:`TaskDataError`.
    """
    p = _check_file(path)
    try:
        with open(p, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except UnicodeDecodeError:
        raise _not_text(p) from None
    if head.startswith("["):  # one JSON array (the paper's .json files)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
        except UnicodeDecodeError:
            raise _not_text(p) from None
        except (RecursionError, ValueError) as e:  # deep nesting; an integer of > 4300 digits
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise TaskDataError(f"{p}: cannot parse the JSON ({why})") from None
        # json gives no line numbers per element: report the element index instead.
        for i, rec in enumerate(data):
            yield f"{p}:[{i}]", rec
        return
    lineno = 0
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rec = ValueError(f"invalid JSON ({e.msg})")
                except RecursionError:
                    rec = ValueError("invalid JSON (nested too deeply)")
                except ValueError as e:
                    rec = ValueError(f"invalid JSON ({e})")
                yield f"{p}:{lineno}", rec
    except UnicodeDecodeError:
        raise TaskDataError(f"{p}:{lineno + 1}: not UTF-8 text; is this the right file?") from None


def iter_csv_records(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, dict_or_exception)`` for a CSV file with a header row."""
    p = _check_file(path)
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
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
        except UnicodeDecodeError:
            raise TaskDataError(f"{p}:{reader.line_num + 1}: not UTF-8 text; is this the right file?") from None
        except csv.Error as e:
            raise TaskDataError(f"{p}:{reader.line_num}: not a readable CSV file ({e})") from None


def sample_indices(n: int, k: int, seed: int = 0, keys: Sequence | None = None) -> list[int]:
    """``min(k, n)`` distinct indices of ``range(n)``: a seeded random sample, in draw order.

    Without ``keys``: the first ``k`` of a seeded permutation. With ``keys`` (one stratum per
    item, e.g. its label): stratified round-robin. The strata are visited in a seeded random
    order, each stratum's items in a seeded random order, and round ``r`` takes the ``r``-th item
    of every stratum that still has one: every label appears once before any appears twice, and
    the counts per label differ by at most one unless a label runs out (equal allocation, not
    proportional: an eval of 100 BANKING77 messages sees all 77 intents).

    Samples nest (the sample of ``j < k`` is the first ``j`` of the sample of ``k``), and the same
    seed gives the same sample on every machine (``random.Random`` is platform independent).
    """
    k = max(0, min(int(k), n))
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    if keys is None:
        return order[:k]
    groups: dict = {}
    for i in order:  # each stratum's items in the permutation's (random) order
        groups.setdefault(keys[i], []).append(i)
    strata = sorted(groups, key=repr)
    rng.shuffle(strata)
    out: list[int] = []
    r = 0
    while len(out) < k:
        for s in strata:
            if r < len(groups[s]):
                out.append(groups[s][r])
                if len(out) == k:
                    break
        r += 1
    return out


def split_dev(examples: Sequence[Example], dev_size: int | float = 0.1, seed: int = 0, key=None):
    """Carve a dev split from a training file: ``(train, dev)``, the dev part drawn by
    :func:`sample_indices` (``key(example)``: its stratum, e.g. the label; None: plain random).

    ``dev_size`` is a count (int) or a fraction (float in (0, 1)). The same seed and file give
    the same split on every machine. Train keeps the file order, dev is in draw order.
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
    keys = [key(e) for e in examples] if key is not None else None
    if keys is not None and all(x is None for x in keys):
        keys = None
    dev_order = sample_indices(n, k, seed, keys)
    dev_idx = set(dev_order)
    train = [e for i, e in enumerate(examples) if i not in dev_idx]
    dev = [examples[i] for i in dev_order]
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
            train, dev = split_dev(data, dev_size, seed, key=self.stratum)
            data = dev if split == "dev" else train
        if limit is not None:
            data = Dataset(data[:limit], data.path, data.bad_rows)
        return data

    def stratum(self, ex: Example):
        """What seeded samples stratify on (:func:`sample_indices`): None for tasks without labels."""
        return None

    def sample(self, examples: Sequence[Example], k: int, seed: int = 0) -> Dataset:
        """A seeded random sample of ``k`` examples in draw order, stratified by label for
        classification tasks (see :func:`sample_indices`); ``k >= len(examples)``: all of them, in
        their own order."""
        if k >= len(examples):
            return Dataset(examples, getattr(examples, "path", None), getattr(examples, "bad_rows", ()))
        keys = [self.stratum(e) for e in examples]
        idx = sample_indices(len(examples), k, seed, None if all(x is None for x in keys) else keys)
        return Dataset([examples[i] for i in idx], getattr(examples, "path", None),
                       getattr(examples, "bad_rows", ()))

    # -- prompts ----------------------------------------------------------------------------
    def input_text(self, ex: Example) -> str:
        """The text a harness retrieves neighbours with / shows as the problem."""
        return ex.question

    def student_messages(self, ex: Example) -> Messages:
        raise NotImplementedError

    def _with_system(self, user: str) -> Messages:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    # -- prompt length ----------------------------------------------------------------------
    prompt_length_margin = 1.25

    def prompt_contexts(self, ex: Example, k_neighbours: int = 5, plan_tokens: int = 256,
                        label_list: bool = False) -> list[tuple[Messages, int]]:
        """Every prompt training pairs a response with for ``ex``, as ``(messages, tokens generated
        into it)``: the student prompt and each built-in harness's teacher context (here OPSD's:
        the prompt + the reference; subclasses add theirs). Built with the harnesses' own code."""
        from ophsd.harness.opsd import opsd_teacher_messages

        return [(self.student_messages(ex), 0), (opsd_teacher_messages(self, ex), 0)]

    def default_max_prompt_length(self, count_tokens: Callable[[Messages], int], examples: Sequence[Example],
                                  k_neighbours: int = 5, plan_tokens: int = 256, n_longest: int = 8,
                                  label_list: bool = False) -> int:
        """``--max-prompt-length`` when none is given: the longest prompt training builds
        (:meth:`prompt_contexts`: student prompt and teacher contexts) over the ``n_longest``
        examples with the longest texts and the ``n_longest`` with the longest references, in
        tokens of ``count_tokens(messages)`` (the engine's chat template), times
        ``prompt_length_margin`` and rounded up to a multiple of 64."""
        examples = list(examples)
        if not examples:
            raise ValueError("default_max_prompt_length needs at least one example")
        by_text = sorted(examples, key=lambda e: len(self.input_text(e)) + len(e.question), reverse=True)
        by_ref = sorted(examples, key=lambda e: len(self.reference_text(e)), reverse=True)
        picked = list({id(e): e for e in by_text[:n_longest] + by_ref[:n_longest]}.values())
        need = max(count_tokens(m) + extra for e in picked
                   for m, extra in self.prompt_contexts(e, k_neighbours, plan_tokens, label_list))
        return int(math.ceil(need * self.prompt_length_margin / 64) * 64)

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
