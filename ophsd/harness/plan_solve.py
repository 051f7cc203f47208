"""Plan-solve harness (math).

Stage 1 (plan): the model writes a concise numbered plan without solving. In training it may
read the example's reference solution (privileged information). ``<think>`` blocks are
stripped from the plan (an unclosed block is kept).
Stage 2 (solve): the model solves following the plan; in training the prompt also carries the
reference answer "for verification only".
Teacher context = the solve stage's messages (problem + plan [+ hint]).
At evaluation (``training=False``) no privileged information is shown, ever.

Modes: ``plan_solve`` (a usable plan), ``solve_only`` (plan call failed or empty: solve without
a plan; the teacher context then holds the problem [+ hint] only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ophsd.harness.base import Harness, HarnessResult, register_harness
from ophsd.harness.options import HarnessContext, HarnessOptions, option
from ophsd.tasks.base import Example
from ophsd.tasks.rewards import strip_think

PLAN_INSTRUCTION = (
    "Write a short numbered plan (at most {max_steps} steps) for solving this problem. "
    "Describe what to compute in each step. Do not carry out the calculations and do not give "
    "the final answer."
)
PLAN_PRIVILEGED = (
    "A reference solution is available to you. Use it to make the plan correct, but do not copy "
    "its numbers or reveal its final answer.\n\nReference solution:\n{solution}"
)
SOLVE_INSTRUCTION = "Solve the problem by following the plan step by step. Put the final answer in \\boxed{}."
SOLVE_NO_PLAN = "Solve the problem step by step. Put the final answer in \\boxed{}."
SOLVE_HINT = "(For verification only: the reference answer is {answer}. Derive it yourself; do not just state it.)"


@dataclass
class PlanSolveOptions(HarnessOptions):
    """``plan_solve``'s CLI options (the solve budget is the CLI's answer budget, if it has one)."""

    plan_tokens: int = option(256, "plan-solve: plan stage token budget", min=1,
                              train=dict(default=192, min=None))

    def harness_kwargs(self, ctx: HarnessContext) -> dict:
        kw = {"plan_tokens": self.plan_tokens}
        if ctx.max_new_tokens:
            kw["solve_tokens"] = ctx.max_new_tokens
        return kw


@register_harness("plan_solve", options=PlanSolveOptions)
class PlanSolveHarness(Harness):
    name = "plan_solve"
    modes = ("plan_solve", "solve_only")

    def __init__(self, task, plan_tokens: int = 256, solve_tokens: int | None = None, max_steps: int = 5,
                 privileged_plan: bool = True, answer_hint: bool = True, max_plan_chars: int = 2000, **kw):
        super().__init__(task, **kw)
        self.plan_tokens = int(plan_tokens)
        self.solve_tokens = int(solve_tokens or task.max_new_tokens)
        self.max_steps = int(max_steps)
        self.privileged_plan = privileged_plan  # training only
        self.answer_hint = answer_hint  # training only
        self.max_plan_chars = int(max_plan_chars)

    # -- prompts ----------------------------------------------------------------------------
    def _system(self) -> list[dict]:
        sp = getattr(self.task, "system_prompt", None)
        return [{"role": "system", "content": sp}] if sp else []

    def plan_messages(self, ex: Example, training: bool) -> list[dict]:
        parts = [f"Problem: {self.task.input_text(ex)}"]
        if training and self.privileged_plan and ex.solution:
            parts.append(PLAN_PRIVILEGED.format(solution=ex.solution.strip()))
        parts.append(PLAN_INSTRUCTION.format(max_steps=self.max_steps))
        return self._system() + [{"role": "user", "content": "\n\n".join(parts)}]

    def solve_messages(self, ex: Example, plan: str | None, training: bool) -> list[dict]:
        parts = [f"Problem: {self.task.input_text(ex)}"]
        if plan:
            parts.append(f"Plan:\n{plan}")
            parts.append(SOLVE_INSTRUCTION)
        else:
            parts.append(SOLVE_NO_PLAN)
        if training and self.answer_hint:
            parts.append(SOLVE_HINT.format(answer=self.task.format_answer(ex.answer)))
        return self._system() + [{"role": "user", "content": "\n\n".join(parts)}]

    def clean_plan(self, text: str | None) -> str:
        plan = strip_think(text or "").strip()
        if len(plan) > self.max_plan_chars:
            plan = plan[: self.max_plan_chars].rsplit("\n", 1)[0].strip()
        return plan

    # -- run --------------------------------------------------------------------------------
    def run(self, examples: Sequence[Example], engine, training: bool = True) -> list[HarnessResult]:
        examples = list(examples)
        plan_convs = [self.plan_messages(e, training) for e in examples]
        plan_calls = self.call_stage(engine, plan_convs, self.sampling(self.plan_tokens), "plan")
        plans = [self.clean_plan(c.text) if c.completion is not None else "" for c in plan_calls]
        for p, c in zip(plans, plan_calls):
            if c.completion is not None and c.completion.text.strip() and not p:
                self.count("plan/empty_after_strip")
        solve_convs = [self.solve_messages(e, p or None, training) for e, p in zip(examples, plans)]
        solve_calls = self.call_stage(engine, solve_convs, self.sampling(self.solve_tokens), "solve")
        results = []
        for ex, pm, pc, plan, sm, sc in zip(examples, plan_convs, plan_calls, plans, solve_convs, solve_calls):
            trace = [self.trace_entry("plan", pm, pc), self.trace_entry("solve", sm, sc)]
            if plan:
                trace[0]["plan"] = plan
            text = sc.text
            results.append(HarnessResult(
                teacher_messages=sm, final_response=text, mode="plan_solve" if plan else "solve_only",
                trace=trace, answer=self.task.extract_answer(text) if text else None, example_id=ex.id,
                response_tokens=len(sc.completion.output_ids) if sc.completion is not None else 0,
            ))
        return self._finish(results)
