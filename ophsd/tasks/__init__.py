"""Tasks: data + bare prompt + reward. ``get_task(name, **kw)`` builds one by name.

=========== ==================================================== ======================
name        data                                                 reward
=========== ==================================================== ======================
arith       generated (seeded, endless; the offline default)      math-verify
gsm8k       JSONL ``question``/``answer`` (``#### final``)          math-verify
math        JSONL ``problem``/``answer``/``solution``?              math-verify
deepmath    JSON(L) ``question``/``answer``/``solution``?           math-verify
banking77   CSV ``text,category`` (+ ``categories.json`` beside)    exact label
lawbench    JSON(L) ``instruction``/``question``/``fact``/``accusations`` set F1
uspto       JSON(L)/CSV ``rxn_smiles``/``class`` (1..10)            exact label
=========== ==================================================== ======================

Register your own with ``@register_task("name")`` on a :class:`Task` subclass.
"""
from __future__ import annotations

from ophsd.tasks.arith import ArithTask
from ophsd.tasks.base import (
    BadRowWarning, Dataset, Example, Task, TaskDataError, split_dev,
)
from ophsd.tasks.classification import Banking77Task, ClassificationTask, LawBenchTask, USPTOTask
from ophsd.tasks.math_tasks import DeepMathTask, GSM8KTask, MATHTask, MathTask

TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: make a :class:`Task` subclass available to ``get_task(name)``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) expects a Task subclass, got {cls!r}")
        TASKS[name] = cls
        return cls

    return deco


for _cls in (ArithTask, GSM8KTask, MATHTask, DeepMathTask, Banking77Task, LawBenchTask, USPTOTask):
    register_task(_cls.name)(_cls)


def get_task(name: str | Task, **kwargs) -> Task:
    """A task instance by registered name (an instance passes through unchanged)."""
    if isinstance(name, Task):
        return name
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
    return cls(**kwargs)


def list_tasks() -> list[str]:
    return sorted(TASKS)


__all__ = [
    "ArithTask", "BadRowWarning", "Banking77Task", "ClassificationTask", "Dataset", "DeepMathTask",
    "Example", "GSM8KTask", "LawBenchTask", "MATHTask", "MathTask", "TASKS", "Task", "TaskDataError",
    "USPTOTask", "get_task", "list_tasks", "register_task", "split_dev",
]
