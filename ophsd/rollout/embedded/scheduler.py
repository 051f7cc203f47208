"""The embedded engine's scheduler: the request queue and the one thread that owns the model.

Its loop admits waiting sequences at step boundaries (prefilled by the :class:`ModelRunner` and
merged into the running batch), samples one token per running row, ends finished and aborted
rows and runs the next decode forward. Everything shared with callers' threads is guarded by
``cv``; pausing (weight swaps, memory release) waits until no batch is running.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager

import torch

from ophsd.rollout.base import EngineError
from ophsd.rollout.embedded.kv_cache import Batch
from ophsd.rollout.embedded.model_runner import ModelRunner
from ophsd.rollout.embedded.request import Seq
from ophsd.rollout.sampling import select_tokens

log = logging.getLogger(__name__)


class Scheduler:
    """Continuous batching over ``runner``; ``stats`` is the engine's counter dict. ``mergeable``:
    new sequences may join a running batch (caches whose layers all hold every column)."""

    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: list[int], *, mergeable: bool,
                 max_running: int, max_prefill_tokens: int, batch_window_s: float, logprob_mode: str,
                 stats: dict):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.mergeable = mergeable
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_window_s = batch_window_s
        self.logprob_mode = logprob_mode
        self.stats = stats
        self.version = 0
        self.cv = threading.Condition()
        self.waiting: deque[Seq] = deque()
        self.n_running = 0
        self.pause_count = 0
        self.closed = False
        self._busy = False
        # scheduler-thread state
        self.running: list[Seq] = []
        self._batch: Batch | None = None
        self.thread = threading.Thread(target=self._loop, name="ophsd-embedded-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ callers' side
    def add(self, seqs: list[Seq]) -> None:
        with self.cv:
            if self.closed:
                raise EngineError("engine is closed")
            self.waiting.extend(seqs)
            self.cv.notify_all()

    def abort_where(self, hit_fn, message: str) -> int:
        """Queued sequences end now; running ones at the next decode step."""
        hit = 0
        with self.cv:
            keep = deque()
            for s in self.waiting:
                if hit_fn(s):
                    s.finish = {"type": "abort", "message": message}
                    s.version = self.version
                    s.resolve(self.tokenizer, self.version)
                    hit += 1
                else:
                    keep.append(s)
            self.waiting = keep
            for s in list(self.running):
                if hit_fn(s):
                    s.aborted = message
                    hit += 1
            self.cv.notify_all()
        return hit

    def pause(self, abort: bool = False, timeout: float | None = None) -> None:
        with self.cv:
            self.pause_count += 1
            if abort:
                for s in self.running:
                    s.aborted = "aborted by pause_generation"
            self.cv.notify_all()
            if not self.cv.wait_for(lambda: not self._busy and self.n_running == 0, timeout):
                self.pause_count -= 1
                self.cv.notify_all()
                raise EngineError(f"pause_generation timed out after {timeout}s waiting for running requests")

    def resume(self) -> None:
        with self.cv:
            if self.pause_count > 0:
                self.pause_count -= 1
            self.cv.notify_all()

    @contextmanager
    def paused(self, abort: bool = False):
        self.pause(abort=abort)
        try:
            yield
        finally:
            self.resume()

    def close(self) -> None:
        with self.cv:
            if self.closed:
                return
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=60)
        with self.cv:
            for s in self.waiting:
                if not s.future.done():
                    s.future.set_exception(EngineError("engine closed before the request ran"))
            self.waiting.clear()

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self):
        mode = torch.inference_mode()
        with mode:
            while True:
                with self.cv:
                    self._busy = False
                    self.cv.notify_all()
                    while not self.closed and not self.running and (self.pause_count > 0 or not self.waiting):
                        self.cv.wait()
                    if self.closed:
                        self._fail_running(EngineError("engine closed while the request was running"))
                        return
                    fresh_start = not self.running
                if fresh_start and self.batch_window_s > 0:
                    time.sleep(self.batch_window_s)  # let concurrent callers join the first prefill
                with self.cv:
                    new = [] if self.pause_count > 0 else self._take_new()
                    if not new and not self.running:
                        continue
                    self._busy = True
                try:
                    self._step(new)
                except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                    log.exception("embedded engine step failed")
                    err = EngineError(f"generation failed: {type(e).__name__}: {e}")
                    for s in new:
                        if s not in self.running and not s.future.done():
                            s.future.set_exception(err)
                    self._fail_running(err)
                with self.cv:
                    self.n_running = len(self.running)

    def _take_new(self) -> list[Seq]:
        room = self.max_running - len(self.running)
        if room <= 0 or not self.waiting or (self.running and not self.mergeable):
            return []
        new: list[Seq] = []
        longest = 0
        while self.waiting and len(new) < room:
            s = self.waiting[0]
            L = max(longest, len(s.prompt))
            if new and L * (len(new) + 1) > self.max_prefill_tokens:
                break
            longest = L
            new.append(self.waiting.popleft())
        return new

    def _fail_running(self, err: Exception):
        for s in self.running:
            if not s.future.done():
                s.future.set_exception(err)
        self.running = []
        self._batch = None

    def _step(self, new: list[Seq]):
        if new:
            batch = self.runner.prefill([s.prompt for s in new])
            for s in new:
                s.version = self.version
            self._batch = Batch.cat([self._batch, batch]) if self.running else batch
            self.running.extend(new)
        running = self.running
        self.stats["max_batch"] = max(self.stats["max_batch"], len(running))
        sps = [s.sp for s in running]
        tokens, lps = select_tokens(
            self._batch.logits, [sp.temperature for sp in sps], [sp.top_k for sp in sps],
            [sp.top_p for sp in sps], [s.gen for s in running], self.logprob_mode,
        )
        tokens_l, lps_l = tokens.tolist(), lps.tolist()
        keep, done = [], []
        for i, s in enumerate(running):
            if s.aborted:
                s.finish = {"type": "abort", "message": s.aborted}
            else:
                s.out.append(tokens_l[i])
                s.logprobs.append(lps_l[i])
                s.finish = s.check_finish(self.eos_token_ids, self.tokenizer)
            (done if s.finish else keep).append(i)
        self.stats["steps"] += 1
        self.stats["tokens"] += len(running)
        for i in done:
            running[i].resolve(self.tokenizer, self.version)
        if not keep:
            self.running = []
            self._batch = None
            return
        if done:
            self._batch.select(keep, trim=self.mergeable)
            self.running = [running[i] for i in keep]
        step_tokens = tokens[torch.tensor(keep, device=tokens.device)] if done else tokens
        self.runner.decode(self._batch, step_tokens)
