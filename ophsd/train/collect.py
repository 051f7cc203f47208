"""Collecting samples (rank 0): the example stream, the student's rollouts on the current weights
and the harness's teacher contexts, turned into :class:`~ophsd.train.pairs.Sample` pairs."""
from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ophsd.runtime.distributed import log_rank0 as _log
from ophsd.runtime.memory import peak_memory
from ophsd.train.errors import TrainingError
from ophsd.train.objective import Objective
from ophsd.train.pairs import Sample, filter_pairs

if TYPE_CHECKING:
    from ophsd.train.config import TrainConfig


def rollout_seed(run_seed: int, step: int, position: int) -> int:
    """Sampling seed of the prompt at data ``position`` (its index in the example stream) in step
    ``step``: a 62-bit hash, so every prompt of a run has its own random streams (the engines
    draw sample ``j`` with ``seed + j``) and a resumed run (same step and position) redraws them."""
    h = hashlib.blake2b(f"ophsd-rollout/{run_seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


class ExampleStream:
    """Deterministic example order: a generator task streams, file data is reshuffled per epoch."""

    def __init__(self, task, data: str | None, seed: int, dev_size: int = 0):
        """``dev_size`` > 0 holds that many examples out (the eval split carved from ``data``)."""
        self.task, self.seed = task, seed
        split = "train" if dev_size > 0 else "all"
        self.examples = None if data is None else list(
            task.dataset(data, split=split, seed=seed, dev_size=max(1, dev_size)))
        if self.examples is not None and not self.examples:
            raise TrainingError(f"no usable training examples in {data}")

    def batch(self, position: int, n: int) -> list:
        if self.examples is None:
            return [self.task.example(i, "train") for i in range(position, position + n)]
        out, N = [], len(self.examples)
        for i in range(position, position + n):
            epoch, j = divmod(i, N)
            out.append(self.examples[int(self._order(epoch)[j])])
        return out

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(len(self.examples), generator=g)


def dev_size(config: TrainConfig) -> int:
    """Examples carved from --data for evaluation (none when --eval-data or --skip-eval)."""
    e = config.eval
    return 0 if (e.eval_data or e.skip_eval or not config.task.data) else e.eval_limit


def eval_examples(task, config: TrainConfig) -> list:
    """--eval-limit examples: a seeded sample of --eval-data (stratified by label for classification,
    :meth:`Task.sample`), else the dev split carved from --data (drawn the same way), else arith's dev stream."""
    e, data, seed = config.eval, config.task.data, config.model.seed
    if e.eval_data:
        return list(task.sample(task.dataset(e.eval_data, split="all"), e.eval_limit, seed))
    if data:
        return list(task.dataset(data, split="dev", seed=seed, dev_size=e.eval_limit))
    return [task.example(i, "dev") for i in range(e.eval_limit)]


@dataclass
class Batch:
    """One step's collected samples."""

    examples: list  # the step's examples (the harness's memory takes every one, rollouts dropped or not)
    samples: list[Sample]  # every pair built
    stats: dict = field(default_factory=dict)  # metrics: rollout/harness times, rewards, drops, skips
    kept: list[Sample] = field(default_factory=list)  # the pairs that fit the length limits
    problem: str | None = None  # every pair was skipped: why, naming the flag to change


class Collector:
    """Rank 0's sample collection over its engine, harness and example stream (--rollout-* flags)."""

    def __init__(self, config: TrainConfig, task, engine, harness, tokenizer, stream: ExampleStream,
                 objective: Objective):
        self.config, self.task, self.engine, self.harness = config, task, engine, harness
        self.tokenizer, self.stream, self.objective = tokenizer, stream, objective

    def collect(self, step_num: int, position: int) -> Batch | None:
        """The pairs of step ``step_num + 1`` (examples from data ``position``): rollouts retried
        up to three times for a failure of the whole batch (None when all three fail), then
        filtered by --max-prompt-length / --max-response-length."""
        r = self.config.rollout
        batch = None
        for attempt in range(3):
            try:
                batch = self.rollout(step_num, position)
                break
            except Exception as e:  # noqa: BLE001 - engine/harness failure for the whole batch
                _log(f"rollout failed for the whole batch (attempt {attempt + 1}/3): {e}")
        if batch is None:
            return None
        kept, skipped = filter_pairs(batch.samples, r.max_prompt_length, r.max_response_length + 1)
        batch.stats.update(skipped, pairs_kept=len(kept), pairs_total=len(batch.samples))
        batch.kept = kept
        if batch.samples and not kept:
            batch.problem = self.all_skipped_message(batch.samples, step_num)
        return batch

    def rollout(self, step_num: int, position: int) -> Batch:
        """Student samples on the current weights + teacher contexts from the harness (``offpolicy``:
        the harness's final responses, no student samples)."""
        from ophsd.rollout import SamplingParams

        r, seed = self.config.rollout, self.config.model.seed
        stats: dict = {}
        examples = all_examples = self.stream.batch(position, r.rollout_batch_size)
        prompts = [self.engine.apply_chat_template(self.task.student_messages(e)) for e in examples]
        t0, mem = time.perf_counter(), peak_memory()
        mem.mark()
        # Each prompt samples with its own seed (sample j: seed + j), a function of the run seed,
        # the step and its data position: distinct streams per prompt, the same ones after a resume.
        sampling = [SamplingParams(temperature=r.rollout_temperature, top_p=r.rollout_top_p,
                                   max_new_tokens=r.max_response_length, n=r.n_samples_per_prompt,
                                   seed=rollout_seed(seed, step_num, position + i))
                    for i in range(len(examples))]
        if self.objective.distill:
            from ophsd.harness.base import call_isolated
            from ophsd.rollout.base import EngineError

            # One engine call for the batch; if it fails, prompt by prompt: a prompt that still
            # fails is dropped (counted), a batch where every prompt fails raises (retried by the caller).
            calls = call_isolated(self.engine, [self.task.student_messages(e) for e in examples], sampling,
                                  chunk_size=len(examples), max_workers=1)
            failed = [c.error for c in calls if c.completion is None]
            if len(failed) == len(calls):
                raise EngineError(f"every student rollout failed ({failed[0]})")
            if failed:
                _log(f"step {step_num + 1}: {len(failed)} student rollout(s) failed and are dropped "
                     f"(first: {failed[0]})")
                stats["dropped/rollout_failed"] = len(failed)
            keep = [i for i, c in enumerate(calls) if c.completion is not None]
            examples, prompts = [examples[i] for i in keep], [prompts[i] for i in keep]
            completions = [calls[i].completions for i in keep]
        else:
            completions = [[None] for _ in prompts]
        stats["time/rollout"] = time.perf_counter() - t0
        mem.lap("rollout", stats)
        t0 = time.perf_counter()
        self.harness.reset_stats()
        results = self.harness.run(examples, self.engine, training=True)
        stats["time/harness"] = time.perf_counter() - t0
        mem.lap("harness", stats)
        for k, v in self.harness.stats().items():
            stats[f"harness/{k}"] = v
        samples = []
        for ex, prompt, comps, res in zip(examples, prompts, completions, results):
            harness_reward = self.task.reward(res.final_response, ex) if res.final_response else 0.0
            weight = (0.1 + 0.9 * harness_reward) if self.config.distill.reward_weighting else 1.0
            if not self.objective.distill:
                resp = list(self.tokenizer.encode(res.final_response, add_special_tokens=False)) if res.final_response else []
                if resp and self.tokenizer.eos_token_id is not None:
                    resp.append(self.tokenizer.eos_token_id)
                samples.append(Sample(prompt, prompt, resp[: r.max_response_length + 1], weight,
                                      {"harness_reward": harness_reward, "example_id": ex.id, "mode": res.mode}))
                continue
            teacher_prompt = self.engine.apply_chat_template(res.teacher_messages)
            for c in comps:
                samples.append(Sample(prompt, teacher_prompt, list(c.output_ids), weight,
                                      {"student_reward": self.task.reward(c.text, ex), "harness_reward": harness_reward,
                                       "example_id": ex.id, "mode": res.mode}))
        if samples:
            stats["reward/student"] = sum(s.meta.get("student_reward", 0.0) for s in samples) / len(samples)
            stats["reward/harness"] = sum(s.meta["harness_reward"] for s in samples) / len(samples)
        return Batch(all_examples, samples, stats)

    def end_step(self, batch: Batch) -> None:
        """After the update: the harness learns from the step's examples (its memory bank takes every true label)."""
        self.harness.update(batch.examples)

    def probe_samples(self, examples: list) -> list[Sample]:
        """A fixed probe batch: greedy student responses and harness teacher contexts on ``examples``,
        filtered by length and trimmed to whole micro-batches."""
        from ophsd.rollout import SamplingParams

        r = self.config.rollout
        prompts = [self.engine.apply_chat_template(self.task.student_messages(e)) for e in examples]
        outs = self.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=r.max_response_length))
        results = self.harness.run(examples, self.engine, training=True)
        samples = [Sample(p, self.engine.apply_chat_template(r.teacher_messages), list(o[0].output_ids))
                   for p, o, r in zip(prompts, outs, results)]
        probe = filter_pairs(samples, r.max_prompt_length, r.max_response_length + 1)[0]
        mbs = self.config.model.micro_batch_size
        return probe[: len(probe) - len(probe) % mbs] or probe

    def derived_max_prompt_length(self) -> int:
        """--max-prompt-length from the task (its longest student/teacher prompt on this data)."""
        flags = self.config.task.harness_flags  # the task sizes prompts by these, whichever harness runs
        examples = self.stream.examples if self.stream.examples is not None else self.stream.batch(0, 256)
        n = self.task.default_max_prompt_length(lambda m: len(self.engine.apply_chat_template(m)), examples,
                                                k_neighbours=flags["bank_k"], plan_tokens=flags["plan_tokens"],
                                                label_list=bool(flags.get("harness_label_list")))
        _log(f"--max-prompt-length {n}: derived from the task (the longest student prompt or teacher context "
             f"it builds on this data, +{self.task.prompt_length_margin - 1:.0%})")
        return n

    def all_skipped_message(self, samples: list[Sample], step_num: int) -> str:
        """Why every pair of step ``step_num + 1`` was skipped, naming the flag to change and the lengths seen."""
        r = self.config.rollout
        prompt = [max(len(s.student_prompt), len(s.teacher_prompt)) for s in samples if s.response]
        long_p = [n for n in prompt if n > r.max_prompt_length]
        long_r = [len(s.response) for s in samples if len(s.response) > r.max_response_length + 1]
        empty = sum(not s.response for s in samples)
        why = []
        if long_p:
            why.append(f"prompts (student prompt or teacher context) of {min(long_p)}-{max(long_p)} tokens exceed "
                       f"--max-prompt-length {r.max_prompt_length}; raise it (left unset, it is derived from the task)")
        if long_r:
            why.append(f"responses of {min(long_r)}-{max(long_r)} tokens exceed --max-response-length "
                       f"{r.max_response_length}; raise it")
        if empty:
            why.append(f"{empty} empty responses (the model answered nothing: check --max-response-length, the "
                       "model and its chat template)")
        return f"step {step_num + 1}: all {len(samples)} pairs skipped: " + "; ".join(why)
