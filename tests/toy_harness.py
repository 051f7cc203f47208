"""A toy harness with one option of its own, registered on import (tests/test_harness_options.py).

Its teacher context repeats the question ``--shout`` times and every result's mode is
``shout<N>``, so a run's mode counters show which value reached the harness.
"""
from __future__ import annotations

from dataclasses import dataclass

from ophsd.harness import Harness, HarnessResult, register_harness
from ophsd.harness.options import HarnessOptions, option


@dataclass
class ToyOptions(HarnessOptions):
    shout: int = option(1, "toy: how many times the teacher context repeats the question", min=1)


@register_harness("toy_echo", options=ToyOptions)
class ToyEchoHarness(Harness):
    def __init__(self, task, shout: int = 1, **kw):
        super().__init__(task, **kw)
        self.shout = int(shout)

    def run(self, examples, engine, training=True):
        mode = f"shout{self.shout}"
        convs = []
        for e in examples:
            msgs = [dict(m) for m in self.task.student_messages(e)]
            msgs[-1]["content"] = "\n".join([msgs[-1]["content"]] * self.shout)
            convs.append(msgs)
        if training:
            return self._finish([HarnessResult(m, "", mode, [], None, e.id) for e, m in zip(examples, convs)])
        calls = self.call_stage(engine, convs, self.sampling(4), "answer")
        return self._finish([
            HarnessResult(m, c.text, mode, [self.trace_entry("answer", m, c)],
                          self.task.extract_answer(c.text) if c.text else None, e.id,
                          len(c.completion.output_ids) if c.completion is not None else 0)
            for e, m, c in zip(examples, convs, calls)])
