"""In-process generation engine on a transformers causal LM with a KV cache.

One scheduler thread owns the model. Callers (any number of threads: the trainer, harness
workers, the HTTP server's request threads) enqueue sequences and wait on futures. The
scheduler runs *continuous batching*:

* requests that arrive while the engine is idle are collected for ``batch_window_s`` and
  prefilled together as one left-padded batch;
* requests that arrive while a batch is running are prefilled at the next step boundary and
  merged into the running batch (both KV caches are left-padded to a common length and
  concatenated), so nobody waits for the whole batch to finish;
* finished rows leave the batch at every step (their cache rows are dropped and columns that
  only hold padding are trimmed).

A *prefix cache* (:class:`PrefixCache`, a radix tree over token ids whose nodes own the KV of
their tokens, as SGLang's RadixAttention) lets a prefill compute only what is new: each prompt
takes its longest cached prefix, prompts of one batch that share an uncached prefix (the ``n``
samples of a prompt; a long instruction common to all prompts) have it computed once, and every
prefilled prompt is inserted for later calls. It is cleared whenever the weights change.

Weight updates drain the running batch first, so every completion is produced by exactly
one weight version (``Completion.weight_version``); new requests wait in the queue while the
weights change. See :mod:`ophsd.rollout.sampling` for the sampling and log-probability
semantics (SGLang's).

One role per module, as SGLang's runtime: :mod:`.engine` (:class:`EmbeddedEngine`, the public
façade), :mod:`.scheduler` (queue, loop thread, admission, steps, abort/pause),
:mod:`.request` (a sequence, its finish checks and result), :mod:`.model_runner` (forwards,
prefill through the prefix cache), :mod:`.kv_cache` (cache layout, batch rows) and
:mod:`.weights` (weight staging and swap, memory release).
"""
from ophsd.rollout.embedded.engine import EmbeddedEngine, parse_dtype

__all__ = ["EmbeddedEngine", "parse_dtype"]
