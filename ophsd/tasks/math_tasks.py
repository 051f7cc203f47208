"""Math tasks: ``gsm8k``, ``math`` (MATH-500 / AIME / HMMT style), ``deepmath``; reward = math-verify."""
from __future__ import annotations

import re

from ophsd.tasks.base import Dataset, Example, Task, TaskDataError, iter_json_records, report_bad_rows
from ophsd.tasks.rewards import extract_boxed, extract_math_answer, math_equal

MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


class MathTask(Task):
    """Shared prompt/answer logic. Subclasses implement :meth:`parse_record`."""

    kind = "math"
    default_harness = "plan_solve"
    max_new_tokens = 512
    fields: tuple[str, ...] = ()

    def __init__(self, fallback_last_number: bool = True, max_new_tokens: int | None = None):
        # fallback_last_number: without a \boxed{} answer, take "#### x" / "answer is x" / the last
        # number (the usual flexible GSM8K extraction). Same rule for student and harness.
        self.fallback_last_number = fallback_last_number
        if max_new_tokens is not None:
            self.max_new_tokens = int(max_new_tokens)

    def parse_record(self, rec: dict) -> tuple[str, str, str | None]:
        """``(question, final_answer, solution_or_None)``; raise ValueError for a bad row."""
        raise NotImplementedError

    def load(self, path=None, limit=None) -> Dataset:
        if path is None:
            raise TaskDataError(f"task {self.name!r} needs a data file (--data FILE)")
        good, bad = [], []
        for loc, rec in iter_json_records(path):
            if isinstance(rec, Exception):
                bad.append((loc, str(rec)))
                continue
            if not isinstance(rec, dict):
                bad.append((loc, f"expected a JSON object, got {type(rec).__name__}"))
                continue
            try:
                q, a, sol = self.parse_record(rec)
            except (ValueError, TypeError, KeyError) as e:
                bad.append((loc, str(e)))
                continue
            good.append(Example(id=str(rec.get("id", loc.rsplit(":", 1)[-1])), question=q, answer=a,
                                solution=sol, source=loc))
            if limit is not None and len(good) >= limit:
                break
        report_bad_rows(str(path), bad, len(good))
        return Dataset(good, str(path), bad)

    @staticmethod
    def _text(rec: dict, key: str, required: bool = True) -> str | None:
        v = rec.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            if required:
                raise ValueError(f"missing field {key!r}")
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
        return v.strip()

    def student_messages(self, ex: Example):
        return self._with_system(f"{ex.question}\n\n{MATH_INSTRUCTION}")

    def prompt_contexts(self, ex, k_neighbours=5, plan_tokens=256, label_list=False):
        """Adds plan-solve's solve context (problem + plan + hint) with a plan of ``plan_tokens``."""
        from ophsd.harness.plan_solve import PlanSolveHarness

        h = PlanSolveHarness(self, plan_tokens=plan_tokens, progress=False)
        return super().prompt_contexts(ex, k_neighbours, plan_tokens, label_list) + [
            (h.solve_messages(ex, "1.", training=True), h.plan_tokens)]

    def extract_answer(self, text):
        return extract_math_answer(text, self.fallback_last_number)

    def score_answer(self, pred, ex):
        return 1.0 if math_equal(pred, ex.answer) else 0.0


class GSM8KTask(MathTask):
    """JSONL ``{"question", "answer"}``; the answer is a worked solution ending ``#### <final>``."""

    name = "gsm8k"
    max_new_tokens = 384

    def parse_record(self, rec):
        q = self._text(rec, "question")
        ans = self._text(rec, "answer")
        if "####" not in ans:
            raise ValueError("answer has no '#### <final answer>' line")
        sol, final = ans.rsplit("####", 1)
        final = final.strip().replace(",", "").rstrip(".")
        if not final:
            raise ValueError("empty final answer after '####'")
        if not re.fullmatch(r"-?\$?\d+(?:\.\d+)?(?:/\d+)?", final):
            raise ValueError(f"final answer {final!r} is not a number")
        sol = re.sub(r"<<[^>]*>>", "", sol).strip()  # calculator annotations
        return q, final.lstrip("$"), sol or None


class MATHTask(MathTask):
    """JSONL ``{"problem", "answer", "solution"?}`` (MATH-500, AIME, HMMT); ``answer`` may be
    omitted when the solution has a ``\\boxed{}`` answer."""

    name = "math"
    max_new_tokens = 1024
    question_key = "problem"

    def parse_record(self, rec):
        q = self._text(rec, self.question_key)
        sol = self._text(rec, "solution", required=False)
        ans = self._text(rec, "answer", required=False)
        if ans is None and sol is not None:
            ans = extract_boxed(sol)
        if ans is None:
            raise ValueError("missing field 'answer' (and no \\boxed{} answer in 'solution')")
        boxed = extract_boxed(ans)  # "\boxed{3}" given as the answer
        return q, (boxed or ans), sol


class DeepMathTask(MATHTask):
    """The paper's DeepMath JSON/JSONL: ``{"question", "answer", "solution"?}``."""

    name = "deepmath"
    question_key = "question"
