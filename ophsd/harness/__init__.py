"""Harnesses: inference-time procedures whose last stage is the teacher's context.

=============== ========================== ==================================================
name            tasks                      teacher context / modes
=============== ========================== ==================================================
plan_solve      math (gsm8k, math, ...)    solve messages: problem + plan [+ answer hint in
                                           training]; ``plan_solve`` / ``solve_only``
draft_verify    classification             verify messages: confirming + contrasting
                                           neighbours from a memory bank; ``full`` /
                                           ``draft_only`` / ``cold_start``
opsd            any                        problem + ground-truth reference (training only);
                                           the OPSD baseline, no harness calls
=============== ========================== ==================================================

Trainer-facing API::

    task = get_task("banking77")
    harness = get_harness("draft_verify", task=task, bank=build_bank(train, task))
    results = harness.run(batch, engine, training=True)   # -> [HarnessResult]
    teacher = [r.teacher_messages for r in results]
    student = [task.student_messages(e) for e in batch]
    reward = task.reward(response_text, example)
    harness.update(batch)                                  # after the optimiser step
    ckpt["harness"] = harness.state_dict()                 # bank persisted with checkpoints
"""
from ophsd.harness.base import (
    HARNESSES, CallResult, Harness, HarnessResult, get_harness, list_harnesses, register_harness,
)
from ophsd.harness.draft_verify import DraftVerifyHarness
from ophsd.harness.embeddings import Embedder, HashingTfidfEmbedder, MiniLMEmbedder, get_embedder
from ophsd.harness.memory_bank import MemoryBank, Neighbour, build_bank
from ophsd.harness.opsd import OPSDTeacher, opsd_teacher_messages
from ophsd.harness.plan_solve import PlanSolveHarness

__all__ = [
    "CallResult", "DraftVerifyHarness", "Embedder", "HARNESSES", "Harness", "HarnessResult",
    "HashingTfidfEmbedder", "MemoryBank", "MiniLMEmbedder", "Neighbour", "OPSDTeacher", "PlanSolveHarness",
    "build_bank", "get_embedder", "get_harness", "list_harnesses", "opsd_teacher_messages", "register_harness",
]
