"""OPSD baseline teacher context: the problem plus the ground-truth answer/solution, no harness.

Same concept as a harness (a teacher-context provider), so it has the same interface: in
training ``run`` makes no engine call and returns, per example, the teacher messages = the
task's bare prompt with the reference (worked solution + final answer) attached. At
evaluation no ground truth may be shown, so it answers the bare prompt (= standalone).
"""
from __future__ import annotations

from typing import Sequence

from ophsd.harness.base import Harness, HarnessResult, register_harness
from ophsd.tasks.base import Example

OPSD_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution:\n{reference}\n\n"
    "After understanding the reference solution, solve the problem yourself in your own words."
)


def opsd_teacher_messages(task, ex: Example, template: str = OPSD_TEMPLATE) -> list[dict]:
    """The task's student messages with the privileged reference appended to the last user turn."""
    msgs = [dict(m) for m in task.student_messages(ex)]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = template.format(prompt=msgs[last]["content"], reference=task.reference_text(ex))
    return msgs


@register_harness("opsd")
class OPSDTeacher(Harness):
    name = "opsd"
    modes = ("opsd", "standalone")

    def __init__(self, task, template: str = OPSD_TEMPLATE, max_new_tokens: int | None = None, **kw):
        super().__init__(task, **kw)
        self.template = template
        self.max_new_tokens = int(max_new_tokens or task.max_new_tokens)

    def teacher_messages(self, ex: Example) -> list[dict]:
        return opsd_teacher_messages(self.task, ex, self.template)

    def run(self, examples: Sequence[Example], engine=None, training: bool = True) -> list[HarnessResult]:
        examples = list(examples)
        if training:
            return self._finish([HarnessResult(self.teacher_messages(e), "", "opsd", [], None, e.id)
                                 for e in examples])
        convs = [self.task.student_messages(e) for e in examples]
        calls = self.call_stage(engine, convs, self.sampling(self.max_new_tokens), "answer")
        return self._finish([
            HarnessResult(m, c.text, "standalone", [self.trace_entry("answer", m, c)],
                          self.task.extract_answer(c.text) if c.text else None, e.id,
                          len(c.completion.output_ids) if c.completion is not None else 0)
            for e, m, c in zip(examples, convs, calls)
        ])
