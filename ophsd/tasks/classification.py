"""Classification tasks: ``banking77`` (77 intents), ``lawbench`` (CAIL charges, set F1), ``uspto``
(reaction class 1..10). Reward: exact label match (set F1 for multi-label)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from ophsd.tasks.base import (
    Dataset, Example, Task, TaskDataError, iter_csv_records, iter_json_records, report_bad_rows,
)
from ophsd.tasks.rewards import LabelParser, set_f1, split_label_list


class ClassificationTask(Task):
    """A fixed label set (given, read from a labels file, or collected from the data file).

    Subclasses implement :meth:`_records` (yield ``(loc, Example | Exception)``).
    """

    kind = "classification"
    default_harness = "draft_verify"
    max_new_tokens = 24
    multi_label = False
    label_noun = "label"
    input_noun = "Message"
    instruction = "Classify the message."
    label_system_prompt: str | None = None  # the draft-verify harness's system message

    def __init__(self, labels: Sequence[str] | str | os.PathLike | None = None,
                 list_labels_in_prompt: bool = True, max_new_tokens: int | None = None):
        self._fixed_labels = labels is not None
        self.labels: list[str] = self._read_labels(labels) if labels is not None else []
        self.list_labels_in_prompt = list_labels_in_prompt
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)
        self._parser = None

    # -- labels -----------------------------------------------------------------------------
    @staticmethod
    def _read_labels(labels) -> list[str]:
        if isinstance(labels, (str, os.PathLike)) and Path(labels).is_file():
            try:
                data = json.loads(Path(labels).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{labels}:{e.lineno}: labels file is not valid JSON") from None
            except (ValueError, RecursionError) as e:  # not UTF-8, nested too deeply
                raise TaskDataError(f"{labels}: labels file is not readable JSON ({type(e).__name__})") from None
            if not isinstance(data, list) or not all(isinstance(x, (str, int)) for x in data):
                raise TaskDataError(f"{labels}: labels file must hold a JSON list of strings")
            return [str(x) for x in data]
        if isinstance(labels, str):
            raise TaskDataError(f"labels file {labels} does not exist")
        return [str(x) for x in labels]

    def label_aliases(self) -> dict[str, list[str]]:
        return {}

    def display_label(self, label: str) -> str:
        return label

    @property
    def parser(self) -> LabelParser:
        if not self.labels:
            raise TaskDataError(f"task {self.name!r} has no label set yet: load a data file first "
                                f"or pass labels=")
        if self._parser is None or self._parser.labels != self.labels:
            self._parser = LabelParser(self.labels, self.label_aliases())
        return self._parser

    def set_labels(self, labels: Sequence[str]) -> None:
        self.labels = list(dict.fromkeys(str(x) for x in labels))
        self._parser = None

    # -- data -------------------------------------------------------------------------------
    def _records(self, path):
        raise NotImplementedError

    def load(self, path=None, limit=None) -> Dataset:
        if path is None:
            raise TaskDataError(f"task {self.name!r} needs a data file (--data FILE)")
        self._before_load(path)
        good, bad = [], []
        known = set(self.labels) if self._fixed_labels else None
        for loc, item in self._records(path):
            if isinstance(item, Exception):
                bad.append((loc, str(item)))
                continue
            gold = item.answer if isinstance(item.answer, list) else [item.answer]
            if known is not None:
                unknown = [g for g in gold if g not in known]
                if unknown:
                    bad.append((loc, f"unknown {self.label_noun} {unknown[0]!r} (not in the label set)"))
                    continue
            good.append(item)
            if limit is not None and len(good) >= limit:
                break
        report_bad_rows(str(path), bad, len(good))
        if not self._fixed_labels:
            seen = []
            for ex in good:
                for g in (ex.answer if isinstance(ex.answer, list) else [ex.answer]):
                    seen.append(g)
            self.set_labels(sorted(set(seen), key=self._label_sort_key))
        return Dataset(good, str(path), bad)

    def _before_load(self, path) -> None:
        """Hook: e.g. read a labels file that lies beside the data file."""

    @staticmethod
    def _label_sort_key(x: str):
        return (0, int(x), "") if x.isdigit() else (1, 0, x)

    def stratum(self, ex: Example):
        """Seeded samples stratify on the gold label (the first one for multi-label tasks)."""
        if isinstance(ex.answer, (list, tuple)):
            return ex.answer[0] if ex.answer else None
        return ex.answer

    def prompt_contexts(self, ex, k_neighbours=5, plan_tokens=256, label_list=False):
        """Adds draft-verify's draft and verify contexts at their largest: every shot's text at the
        harness's clip length (this example's text repeated) with the longest labels (and the
        whole label list in the system message with ``label_list``: --harness-label-list)."""
        from ophsd.harness.draft_verify import DraftVerifyHarness
        from ophsd.harness.memory_bank import MemoryBank, Neighbour

        out = super().prompt_contexts(ex, k_neighbours, plan_tokens, label_list)
        h = DraftVerifyHarness(self, bank=MemoryBank("tfidf"), k=k_neighbours, progress=False, label_list=label_list)
        text = " ".join(self.input_text(ex).split()) or "x"
        filler = " ".join([text] * (h.max_text_chars // len(text) + 1))[: h.max_text_chars]
        labels = sorted(self.labels, key=lambda x: len(self.format_answer(x)), reverse=True) or [ex.answer]

        def shots(n):
            return [Neighbour(filler, labels[i % len(labels)], 1.0, i) for i in range(n)]

        out.append((h.draft_messages(ex, shots(h.k)), 0))
        out.append((h.verify_messages(ex, labels[0], shots(h.n_confirm), shots(h.n_contrast)), 0))
        return out

    # -- prompts ----------------------------------------------------------------------------
    def label_list_text(self) -> str:
        return "\n".join(f"- {self.display_label(x)}" for x in self.labels)

    def answer_instruction(self) -> str:
        if self.multi_label:
            return f"Answer with the {self.label_noun}s only, separated by commas."
        return f"Answer with the {self.label_noun} only."

    def student_messages(self, ex: Example):
        parts = [self.instruction]
        if self.list_labels_in_prompt and self.labels:
            parts.append(f"Possible {self.label_noun}s:\n{self.label_list_text()}")
        parts.append(f"{self.input_noun}: {self.input_text(ex)}")
        parts.append(self.answer_instruction())
        return self._with_system("\n\n".join(parts))

    # -- answers ----------------------------------------------------------------------------
    def extract_answer(self, text):
        if self.multi_label:
            if not text:
                return None
            found = []
            for part in split_label_list(text):  # exact items first, then any mention
                lab = self.parser.exact(part)
                if lab is not None and lab not in found:
                    found.append(lab)
            for lab in self.parser.find_all(text):
                if lab not in found:
                    found.append(lab)
            return found or None
        return self.parser(text)

    def score_answer(self, pred, ex):
        if self.multi_label:
            return set_f1(pred or [], ex.answer)
        return 1.0 if pred == ex.answer else 0.0

    def format_answer(self, answer) -> str:
        if isinstance(answer, (list, tuple)):
            return ", ".join(self.display_label(a) for a in answer)
        return self.display_label(answer)


class Banking77Task(ClassificationTask):
    """CSV ``text,category`` (BANKING77). Labels: ``labels=`` (list or JSON file), else a
    ``categories.json`` beside the CSV, else the categories present in the file."""

    name = "banking77"
    label_noun = "intent"
    input_noun = "Message"
    instruction = "Classify the intent of this banking customer message."
    label_system_prompt = "You label banking customer messages with their intent. Reply with the intent label only."

    def _before_load(self, path):
        if not self._fixed_labels:
            beside = Path(path).expanduser().parent / "categories.json"
            if beside.is_file():
                self.labels = self._read_labels(beside)
                self._fixed_labels = True
                self._parser = None

    def _records(self, path):
        for loc, row in iter_csv_records(path, ("text", "category")):
            if isinstance(row, Exception):
                yield loc, row
                continue
            text, cat = (row.get("text") or "").strip(), (row.get("category") or "").strip()
            if not text:
                yield loc, ValueError("empty 'text'")
            elif not cat:
                yield loc, ValueError("empty 'category'")
            else:
                yield loc, Example(id=loc.rsplit(":", 1)[-1], question=text, answer=cat, source=loc)


_CHARGE_SUFFIX = re.compile(r"罪$")


def _clean_charge(x) -> str:
    s = str(x).strip().strip("[]【】").strip()
    return _CHARGE_SUFFIX.sub("", s)


class LawBenchTask(ClassificationTask):
    """The paper's CAIL charge-prediction schema (JSON list or JSONL): ``instruction``,
    ``question``, ``fact``, ``accusations`` (list). Multi-label; reward = set F1 over charges
    (a trailing 罪 is ignored on both sides)."""

    name = "lawbench"
    multi_label = True
    label_noun = "charge"
    input_noun = "Facts"
    instruction = "Read the facts of the criminal case and name the charges (罪名)."
    label_system_prompt = "You name the charges (罪名) for the facts of a criminal case. Reply with the charges only."
    max_new_tokens = 48

    def input_text(self, ex):
        return ex.meta.get("fact") or ex.question

    def student_messages(self, ex):
        instr = ex.meta.get("instruction") or self.instruction
        parts = [instr]
        if self.list_labels_in_prompt and self.labels:
            parts.append(f"Possible {self.label_noun}s: " + ", ".join(self.labels))
        parts.append(ex.question if ex.question else f"{self.input_noun}: {self.input_text(ex)}")
        parts.append(self.answer_instruction())
        return self._with_system("\n\n".join(parts))

    def _records(self, path):
        for loc, rec in iter_json_records(path):
            if isinstance(rec, Exception):
                yield loc, rec
                continue
            if not isinstance(rec, dict):
                yield loc, ValueError(f"expected a JSON object, got {type(rec).__name__}")
                continue
            acc = rec.get("accusations", rec.get("accusation"))
            if isinstance(acc, str):
                acc = split_label_list(acc)
            if not isinstance(acc, list) or not acc:
                yield loc, ValueError("missing or empty 'accusations' list")
                continue
            fact = str(rec.get("fact") or "").strip()
            question = str(rec.get("question") or "").strip()
            if not fact and not question:
                yield loc, ValueError("missing 'fact' and 'question'")
                continue
            charges = list(dict.fromkeys(c for c in (_clean_charge(a) for a in acc) if c))
            yield loc, Example(
                id=str(rec.get("id", loc.rsplit(":", 1)[-1])), question=question or f"{self.input_noun}: {fact}",
                answer=charges, source=loc,
                meta={"fact": fact or question, "instruction": str(rec.get("instruction") or "").strip()},
            )


USPTO_CLASSES = {
    "1": "heteroatom alkylation and arylation",
    "2": "acylation and related processes",
    "3": "C-C bond formation",
    "4": "heterocycle formation",
    "5": "protections",
    "6": "deprotections",
    "7": "reductions",
    "8": "oxidations",
    "9": "functional group interconversion (FGI)",
    "10": "functional group addition (FGA)",
}


class USPTOTask(ClassificationTask):
    """The paper's USPTO-50K schema (JSON list, JSONL or CSV): ``rxn_smiles`` and ``class`` 1..10."""

    name = "uspto"
    label_noun = "reaction class"
    input_noun = "Reaction"
    instruction = "Classify the chemical reaction (reactants>>products SMILES) into its reaction class."
    label_system_prompt = ("You classify chemical reactions (reactants>>products SMILES) into reaction classes "
                           "1-10. Reply with the class only.")
    max_new_tokens = 16

    def __init__(self, labels=None, **kw):
        super().__init__(labels=list(USPTO_CLASSES) if labels is None else labels, **kw)

    def display_label(self, label):
        name = USPTO_CLASSES.get(str(label))
        return f"{label} ({name})" if name else str(label)

    def label_aliases(self):
        out = {}
        for k, v in USPTO_CLASSES.items():
            short = re.sub(r"\s*\(.*\)", "", v)
            acr = re.findall(r"\((\w+)\)", v)
            out[k] = [v, short, f"class {k}", *acr]
        return out

    def answer_instruction(self):
        return "Answer with the class number only."

    def _records(self, path):
        p = str(path)
        it = (iter_csv_records(path, ("rxn_smiles", "class")) if p.endswith(".csv")
              else iter_json_records(path))
        for loc, rec in it:
            if isinstance(rec, Exception):
                yield loc, rec
                continue
            if not isinstance(rec, dict):
                yield loc, ValueError(f"expected a JSON object, got {type(rec).__name__}")
                continue
            smi = str(rec.get("rxn_smiles") or "").strip()
            if ">" not in smi:
                yield loc, ValueError("missing or malformed 'rxn_smiles' (no '>>')")
                continue
            cls = rec.get("class")
            try:
                c = int(str(cls).strip())
            except (TypeError, ValueError):
                yield loc, ValueError(f"'class' must be an integer 1..10, got {cls!r}")
                continue
            if str(c) not in USPTO_CLASSES:
                yield loc, ValueError(f"'class' must be in 1..10, got {c}")
                continue
            yield loc, Example(id=str(rec.get("id", loc.rsplit(":", 1)[-1])), question=smi,
                               answer=str(c), source=loc)
