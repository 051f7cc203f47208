"""The harness API: an inference-time procedure whose last stage is the teacher's context.

``harness.run(examples, engine, training) -> list[HarnessResult]``, one result per example, in
order. A stage's prompts go to the engine together (chunks submitted from a thread pool, so
the engine batches them), with a tqdm progress bar. A call that raises or returns nothing is
retried alone; if it still fails only that sample degrades to the next-best mode (counted in
``harness.stats()``); a batch never crashes because of one sample.

Hooks the trainer uses:

* ``harness.run(examples, engine, training=True)`` -> teacher messages per example,
* ``harness.update(examples)`` after each optimisation step (memory banks grow with the
  batch's true labels; a no-op for stateless harnesses),
* ``harness.state_dict()`` / ``harness.load_state_dict(sd)`` for checkpoints.

Register your own: ``@register_harness("mine", options=MineOptions)`` on a :class:`Harness`
subclass, then ``get_harness("mine", task=task, **options)``. ``MineOptions`` (a
:class:`~ophsd.harness.options.HarnessOptions` dataclass) gives its flags to ``ophsd train`` and
``ophsd.eval`` (:mod:`ophsd.harness.options`).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Sequence

from ophsd.harness.options import HarnessOptions
from ophsd.rollout.base import Completion, Engine, SamplingParams
from ophsd.tasks.base import Example, Task

Messages = list[dict]


@dataclass
class HarnessResult:
    """What a harness produced for one example.

    ``teacher_messages``: the chat context the teacher is conditioned on (the last stage's
    messages). ``final_response``: the harness's final answer text ("" when the harness made no
    call or every call failed). ``mode``: which path the sample took (e.g. ``plan_solve``,
    ``solve_only``, ``full``, ``draft_only``, ``cold_start``). ``trace``: every call, in order,
    as ``{"stage", "messages", "response", "finish_reason", "num_tokens", "error"}``.
    ``answer``: the task's parse of ``final_response``.
    """

    teacher_messages: Messages
    final_response: str
    mode: str
    trace: list[dict] = field(default_factory=list)
    answer: Any = None
    example_id: str | None = None
    response_tokens: int = 0  # tokens of the final response


@dataclass
class CallResult:
    """One stage call for one sample (``completion`` is None when it failed)."""

    completion: Completion | None
    error: str | None = None
    completions: list[Completion] = field(default_factory=list)  # all ``sampling.n`` of them

    @property
    def text(self) -> str:
        return self.completion.text if self.completion is not None else ""

    @property
    def ok(self) -> bool:
        return self.completion is not None and bool(self.completion.text.strip())


class Harness:
    """Base class: subclasses implement :meth:`run` using :meth:`call_stage`."""

    name = "harness"
    modes: tuple[str, ...] = ()
    Options: type[HarnessOptions] = HarnessOptions  # its CLI options (set by ``register_harness(options=)``)

    def __init__(self, task: Task, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 chunk_size: int = 8, max_workers: int = 8, progress: bool = True, retry_failed: bool = True):
        self.task = task
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.chunk_size = max(1, int(chunk_size))
        self.max_workers = max(1, int(max_workers))
        self.progress = progress
        self.retry_failed = retry_failed
        self._stats: Counter = Counter()
        self._stats_lock = threading.Lock()

    # -- API --------------------------------------------------------------------------------
    def run(self, examples: Sequence[Example], engine: Engine, training: bool = True) -> list[HarnessResult]:
        raise NotImplementedError

    def update(self, examples: Sequence[Example]) -> None:
        """Called with the batch's examples (true labels) after each training step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        if sd:
            raise ValueError(f"harness {self.name!r} keeps no state but got keys {sorted(sd)}")

    # -- counters ---------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def stats(self) -> dict[str, int]:
        """Counters since the last :meth:`reset_stats`: ``mode/<m>``, ``<stage>/failed``, ..."""
        with self._stats_lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats.clear()

    def _finish(self, results: list[HarnessResult]) -> list[HarnessResult]:
        for r in results:
            self.count(f"mode/{r.mode}")
        return results

    # -- engine calls -----------------------------------------------------------------------
    def sampling(self, max_new_tokens: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=int(max_new_tokens), **kw)

    def call_stage(self, engine: Engine, conversations: Sequence[Messages], sampling: SamplingParams,
                   stage: str) -> list[CallResult]:
        """Run one stage for many samples (:func:`call_isolated`); never raises for a failing sample.

        Counted: ``<stage>/calls``, ``<stage>/ms``, ``<stage>/failed`` (errors), ``<stage>/empty``.
        """
        t0 = time.perf_counter()
        out = call_isolated(engine, conversations, sampling, chunk_size=self.chunk_size,
                            max_workers=self.max_workers, retry_failed=self.retry_failed,
                            desc=f"{self.name}:{stage}" if self.progress else None)
        self.count(f"{stage}/calls", len(out))
        self.count(f"{stage}/ms", int(1000 * (time.perf_counter() - t0)))
        for r in out:
            if r.completion is None:
                self.count(f"{stage}/failed")
            elif not r.completion.text.strip():
                self.count(f"{stage}/empty")
        return out

    @staticmethod
    def trace_entry(stage: str, messages: Messages, call: CallResult) -> dict:
        c = call.completion
        return {
            "stage": stage,
            "messages": messages,
            "response": c.text if c is not None else None,
            "finish_reason": c.finish_reason if c is not None else None,
            "num_tokens": len(c.output_ids) if c is not None else 0,
            "error": call.error if c is None else (None if c.text.strip() else "empty response"),
        }

    def __repr__(self):
        return f"<{type(self).__name__} task={self.task.name}>"


def call_isolated(engine: Engine, conversations: Sequence[Messages],
                  sampling: SamplingParams | Sequence[SamplingParams],
                  chunk_size: int = 8, max_workers: int = 8, retry_failed: bool = True,
                  desc: str | None = None) -> list[CallResult]:
    """``engine.generate_chat`` over many conversations, one :class:`CallResult` each, in order.

    ``sampling``: one :class:`SamplingParams` for all, or one per conversation (e.g. a seed per
    prompt; sent with ``engine.generate_chat_many``).

    Chunks of ``chunk_size`` conversations are submitted concurrently (``max_workers`` threads)
    so a batching engine sees them together. A chunk that raises is retried one conversation
    at a time; what still fails becomes ``CallResult(None, error)``. ``desc``: tqdm bar title
    (None: no bar). ``completion`` is the first of the ``sampling.n`` completions, ``completions`` all.
    """
    n = len(conversations)
    out: list[CallResult | None] = [None] * n
    if n == 0:
        return []
    bar = None
    if desc:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="call", leave=False)
    chunk_size = max(1, int(chunk_size))
    chunks = [list(range(s, min(n, s + chunk_size))) for s in range(0, n, chunk_size)]
    per_conversation = not isinstance(sampling, SamplingParams)
    if per_conversation and len(sampling) != n:
        raise ValueError(f"{n} conversations but {len(sampling)} sampling params")

    def run_chunk(idx: list[int]):
        try:
            if per_conversation:
                res = engine.generate_chat_many([conversations[i] for i in idx], [sampling[i] for i in idx])
            else:
                res = engine.generate_chat([conversations[i] for i in idx], sampling)
            if len(res) != len(idx):
                raise RuntimeError(f"engine returned {len(res)} results for {len(idx)} prompts")
            return idx, [CallResult(r[0] if r else None, None if r else "no completion", list(r or []))
                         for r in res]
        except Exception as e:  # noqa: BLE001 - isolate the failing sample below
            if len(idx) == 1 or not retry_failed:
                return idx, [CallResult(None, f"{type(e).__name__}: {e}") for _ in idx]
            results = []
            for i in idx:
                results.extend(run_chunk([i])[1])
            return idx, results

    with ThreadPoolExecutor(max_workers=max(1, min(int(max_workers), len(chunks)))) as pool:
        futures = [pool.submit(run_chunk, c) for c in chunks]
        for fut in as_completed(futures):
            idx, res = fut.result()
            for i, r in zip(idx, res):
                out[i] = r
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


HARNESSES: dict[str, type[Harness]] = {}


def register_harness(name: str, options: type[HarnessOptions] | None = None):
    """Class decorator: ``@register_harness("mine")`` makes ``get_harness("mine", task=...)`` work.

    ``options``: the harness's options dataclass (:class:`HarnessOptions` subclass), whose fields
    become flags of ``ophsd train`` and ``ophsd.eval`` (default: the class's ``Options``)."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Harness)):
            raise TypeError(f"register_harness({name!r}) expects a Harness subclass, got {cls!r}")
        if options is not None:
            if not (isinstance(options, type) and issubclass(options, HarnessOptions)):
                raise TypeError(f"register_harness({name!r}, options=) expects a HarnessOptions subclass, "
                                f"got {options!r}")
            cls.Options = options
        HARNESSES[name] = cls
        if cls.name == Harness.name:
            cls.name = name
        return cls

    return deco


def get_harness(name: str | Harness, task: Task | str | None = None, **kwargs) -> Harness:
    """A harness by registered name for ``task`` (a Task or a task name)."""
    if isinstance(name, Harness):
        return name
    try:
        cls = HARNESSES[name]
    except KeyError:
        raise ValueError(f"unknown harness {name!r}; known: {', '.join(sorted(HARNESSES))}") from None
    if task is None:
        raise ValueError(f"get_harness({name!r}) needs task= (a Task or a task name)")
    if isinstance(task, str):
        from ophsd.tasks import get_task

        task = get_task(task)
    return cls(task=task, **kwargs)


def list_harnesses() -> list[str]:
    return sorted(HARNESSES)
