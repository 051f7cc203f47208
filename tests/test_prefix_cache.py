"""The embedded engine's radix prefix cache: outputs with the cache equal outputs without it.

Tiny random models, fp32, CPU. A cached prefix's KV was computed in another forward (other
batch shape, other sequence length), so logits agree with the uncached engine up to float
reassociation: greedy tokens must be identical, log-probabilities within ATOL, and seeded
sampling (same generator, logits equal to ~1e-6) gives identical tokens on these prompts.
"""
import threading
import time

import pytest
import torch

from ophsd.rollout import SamplingParams
from ophsd.rollout.embedded import EmbeddedEngine
from ophsd.rollout.prefix_cache import PrefixCache

ATOL = 1e-5
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, return_logprob=True)
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, return_logprob=True, seed=7, n=2)


def _rand(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 400, (n,), generator=g).tolist()


def _shared_prompts(prefix_len=120, suffix_lens=(3, 10, 25, 1), seed=0):
    prefix = _rand(prefix_len, seed)
    return [prefix + _rand(n, seed + 1 + i) for i, n in enumerate(suffix_lens)]


@pytest.fixture(scope="module")
def plain(llama):
    eng = EmbeddedEngine(str(llama), prefix_cache_tokens=0)
    yield eng
    eng.close()


def _assert_same(got, ref):
    assert len(got) == len(ref)
    for g_group, r_group in zip(got, ref):
        assert len(g_group) == len(r_group)
        for g, r in zip(g_group, r_group):
            assert g.output_ids == r.output_ids
            assert g.finish_reason == r.finish_reason
            if r.logprobs is not None:
                assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=ATOL, rtol=0), (
                    (torch.tensor(g.logprobs) - torch.tensor(r.logprobs)).abs().max())


def _compare(cached, plain, prompts, sp=GREEDY):
    ref = plain.generate(prompts, sp)
    got = cached.generate(prompts, sp)
    _assert_same(got, ref)
    return got


def test_cache_is_on_by_default_and_off_with_zero(llama, plain):
    with EmbeddedEngine(str(llama)) as eng:
        assert eng.stats()["prefix_cache_max_tokens"] == 32768
    assert plain.stats()["prefix_cache_max_tokens"] == 0
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        EmbeddedEngine(str(llama), prefix_cache_tokens=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shared_prefix_is_prefilled_once_and_outputs_match(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = _shared_prompts()
    with EmbeddedEngine(str(path), prefix_cache_tokens=0) as ref_eng, EmbeddedEngine(str(path)) as eng:
        _compare(eng, ref_eng, prompts)
        st = eng.stats()
        # the 120-token prefix ran once (a batch-1 forward), then only each prompt's tail
        assert st["prefill_tokens"] == 120 + sum(len(p) - 120 for p in prompts)
        assert st["prompt_tokens"] == sum(len(p) for p in prompts)
        assert st["prefix_hit_tokens"] == 120 * len(prompts)
        assert st["prefix_cached_tokens"] == 120 + sum(len(p) - 120 for p in prompts)
        assert st["prefills"] == 1
        _compare(eng, ref_eng, prompts, SAMPLED)


def test_n_samples_of_one_prompt_share_one_row(llama, plain):
    prompt = _rand(60, 3)
    with EmbeddedEngine(str(llama)) as eng:
        got = _compare(eng, plain, [prompt], SAMPLED)
        assert len({tuple(c.output_ids) for c in got[0]}) == 2  # the two samples differ
        assert eng.stats()["prefill_tokens"] == 60  # computed once for both samples
        _compare(eng, plain, [prompt], SamplingParams(temperature=0.0, max_new_tokens=8, n=3, ignore_eos=True,
                                                      return_logprob=True))
        assert eng.stats()["prefill_tokens"] == 60  # a repeat: KV and last logits from the tree, no forward


def test_prompt_that_is_a_prefix_of_another(llama, plain):
    short = _rand(40, 4)
    long = short + _rand(30, 5)
    with EmbeddedEngine(str(llama)) as eng:
        _compare(eng, plain, [short, long])  # same batch
    with EmbeddedEngine(str(llama)) as eng:
        _compare(eng, plain, [short])
        _compare(eng, plain, [long])  # extends the cached short prompt
        assert eng.stats()["prefix_hit_tokens"] == 40
    with EmbeddedEngine(str(llama)) as eng:
        _compare(eng, plain, [long])
        _compare(eng, plain, [short])  # ends inside the cached edge of the long prompt
        st = eng.stats()
        assert st["prefix_hit_tokens"] == 39 and st["prefill_tokens"] == 70 + 1
        _compare(eng, plain, [short[:20] + _rand(15, 6)])  # leaves it mid-edge: the edge is split
        assert eng.stats()["prefix_cached_tokens"] == 70 + 15


def test_repeated_calls_hit_the_cache(llama, plain):
    prompts = _shared_prompts(80, (5, 9, 2), seed=10)
    with EmbeddedEngine(str(llama)) as eng:
        _compare(eng, plain, prompts)
        before = eng.stats()
        _compare(eng, plain, prompts)
        _compare(eng, plain, prompts, SAMPLED)
        after = eng.stats()
    n = sum(len(p) for p in prompts)
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 3 * n  # whole prompts (n=2: counted twice)
    assert after["prefill_tokens"] == before["prefill_tokens"]  # no prompt token computed again


def test_repeats_are_bitwise_identical(llama):
    """A prompt cached whole (KV and last logits) gives exactly what its first call gave."""
    prompts = _shared_prompts(70, (4, 9), seed=12)
    with EmbeddedEngine(str(llama)) as eng:
        for sp in (GREEDY, SAMPLED):
            first = eng.generate(prompts, sp)
            again = eng.generate(prompts, sp)
            assert [[(c.output_ids, c.logprobs) for c in g] for g in again] == \
                [[(c.output_ids, c.logprobs) for c in g] for g in first]
        (one,), = eng.generate([prompts[0]], GREEDY)
        (two,), = eng.generate([prompts[0]], GREEDY)
        assert (one.output_ids, one.logprobs) == (two.output_ids, two.logprobs)


def test_mixed_batch_of_cached_new_and_repeated_prompts(llama, plain):
    base = _shared_prompts(64, (5, 8, 2), seed=14)
    with EmbeddedEngine(str(llama)) as eng:
        _compare(eng, plain, base[:2])
        mixed = [base[2], base[0], _rand(33, 15), base[1], base[0][:40], base[2]]
        _compare(eng, plain, mixed, SAMPLED)
        _compare(eng, plain, mixed[::-1])


def test_continuous_batching_with_the_cache(llama, plain):
    prompts = _shared_prompts(90, (4, 12, 7, 20, 1, 9), seed=20)
    ref = [plain.generate([p], GREEDY)[0][0] for p in prompts]
    with EmbeddedEngine(str(llama)) as eng:
        # one long request runs; the others arrive while it decodes and are merged into its batch
        long_sp = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True, return_logprob=True)
        first = eng.submit(prompts[0], long_sp)[0]
        deadline = time.time() + 30
        while eng.stats()["running"] == 0 and time.time() < deadline:
            time.sleep(0.001)
        results, errors = {}, []

        def worker(i):
            try:
                time.sleep(0.003 * (i % 3))
                results[i] = eng.generate([prompts[i % len(prompts)]], GREEDY)[0][0]
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        long_c = first.result(timeout=60)
        assert not errors and eng.stats()["max_batch"] > 1 and eng.stats()["prefix_hit_tokens"] > 0
    _assert_same([[results[i]] for i in range(12)], [[ref[i % len(prompts)]] for i in range(12)])
    (long_ref,), = plain.generate([prompts[0]], long_sp)
    _assert_same([[long_c]], [[long_ref]])


def test_eviction_under_a_tiny_bound(llama, plain):
    prompts = _shared_prompts(50, (6, 11, 3), seed=30) + [_rand(45, 31), _rand(20, 32)]
    with EmbeddedEngine(str(llama), prefix_cache_tokens=64) as eng:
        for _ in range(2):
            _compare(eng, plain, prompts)
            _compare(eng, plain, prompts[::-1], SAMPLED)
            st = eng.stats()
            assert st["prefix_cached_tokens"] <= 64
        assert st["prefix_evictions"] > 0 and st["prefix_evicted_tokens"] > 0
    with EmbeddedEngine(str(llama), prefix_cache_tokens=1) as eng:  # nothing fits
        _compare(eng, plain, prompts)
        assert eng.stats()["prefix_cached_tokens"] <= 1


def test_weight_update_never_serves_stale_kv(llama, tiny_model_dir):
    from tests.tiny_models import write_tiny_model

    other = write_tiny_model(llama.parent / "llama_prefix_other", "llama", seed=5, tokenizer_dir=llama)
    from transformers import AutoModelForCausalLM

    new_sd = AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32).state_dict()
    prompts = _shared_prompts(100, (7, 3, 15), seed=40)
    with EmbeddedEngine(str(llama)) as eng, EmbeddedEngine(str(other), prefix_cache_tokens=0) as fresh:
        eng.generate(prompts, GREEDY)  # fills the cache with version-0 KV
        assert eng.stats()["prefix_cached_tokens"] > 0
        hits = eng.stats()["prefix_hit_tokens"]
        eng.update_weights(new_sd.items(), version=1)
        st = eng.stats()
        assert st["prefix_cached_tokens"] == 0 and st["prefix_flushes"] == 1
        got = _compare(eng, fresh, prompts)
        assert all(c.weight_version == 1 for (c,) in got)
        # only the batch's own shared prefix was reused after the update, nothing from before it
        assert eng.stats()["prefix_hit_tokens"] - hits == 100 * len(prompts)
        _compare(eng, fresh, prompts, SAMPLED)  # hits the new-weight KV


def test_flush_and_release_memory_clear_the_cache(llama):
    with EmbeddedEngine(str(llama)) as eng:
        eng.generate([_rand(30, 50)], GREEDY)
        assert eng.flush_cache() == 30 and eng.stats()["prefix_cached_tokens"] == 0
        eng.generate([_rand(30, 50)], GREEDY)
        eng.release_memory()
        assert eng.stats()["prefix_cached_tokens"] == 0
        eng.resume_memory()
        assert len(eng.generate([_rand(30, 50)], GREEDY)[0][0].output_ids) == 8


# ---------------------------------------------------------------------- the tree itself
def _kv(tokens, start=0, layers=2):
    """Fake per-layer KV whose values encode (layer, token id, position)."""
    t = torch.tensor(tokens, dtype=torch.float32)
    p = torch.arange(start, start + len(tokens), dtype=torch.float32)
    return [((t + 1000 * p + 0.5 * layer).view(1, 1, -1, 1).expand(1, 2, -1, 3).clone(),
             (-t - 1000 * p - 0.5 * layer).view(1, 1, -1, 1).expand(1, 2, -1, 3).clone()) for layer in range(layers)]


def _insert(pc, tokens):
    return pc.insert(tokens, lambda a, b: _kv(tokens[a:b], a))


def test_radix_tree_match_split_gather_and_lru_eviction():
    pc = PrefixCache(max_tokens=20)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [1, 2, 3, 4, 9, 9]
    c = [5, 5, 5, 5]
    assert _insert(pc, a) == 8 and pc.total_tokens == 8 and pc.n_nodes == 1
    assert _insert(pc, b) == 2 and pc.total_tokens == 10 and pc.n_nodes == 3  # split after 4 tokens
    assert _insert(pc, a) == 0
    path, m = pc.match([1, 2, 3, 4, 5, 6, 0])
    assert m == 6 and [n.key for n, _ in path] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    kv = pc.gather(path, 2)
    for layer, (k, v) in enumerate(kv):  # the gathered KV is the KV of positions 0..5, in order
        assert torch.equal(k, _kv(a[:6], 0, 2)[layer][0]) and torch.equal(v, _kv(a[:6], 0, 2)[layer][1])
    dst = [(torch.zeros(2, 2, 9, 3), torch.zeros(2, 2, 9, 3)) for _ in range(2)]
    PrefixCache.copy_into(path, dst, 1, 8)
    assert torch.equal(dst[0][0][1, :, 2:8], kv[0][0][0]) and dst[0][0][1, :, :2].abs().sum() == 0
    assert dst[0][0][0].abs().sum() == 0 and dst[0][0][1, :, 8:].abs().sum() == 0
    assert pc.match([7])[1] == 0 and pc.match([])[1] == 0

    assert _insert(pc, c) == 4 and pc.total_tokens == 14
    pc.match(b)  # b's leaf is now more recent than a's; c is the newest insert
    pc.match(c)
    assert _insert(pc, [6] * 9) == 9  # 23 > 20: the least recently used leaf (a's tail) goes
    assert pc.total_tokens == 19 and pc.evictions == 1 and pc.evicted_tokens == 4
    assert pc.match(a)[1] == 4 and pc.match(b)[1] == 6 and pc.match(c)[1] == 4

    # a locked path survives; eviction then takes other leaves, and an inner node once bare
    handle = pc.lock(pc.match(b)[0])
    assert _insert(pc, [8] * 12) == 12
    assert pc.match(b)[1] == 6 and pc.total_tokens <= 20
    assert pc.evictions >= 3
    pc.unlock(handle)
    assert all(n.lock_ref == 0 for n in _nodes(pc))
    pc.evict(0)
    assert pc.total_tokens == 0 and pc.n_nodes == 0 and not pc.root.children


def test_tree_keeps_end_logits_across_splits_and_drops_them_on_eviction():
    pc = PrefixCache(max_tokens=100)
    lg = torch.arange(5.0)
    pc.insert([1, 2, 3, 4], lambda a, b: _kv([1, 2, 3, 4][a:b], a), logits=lg)
    path, m = pc.match([1, 2, 3, 4])
    assert PrefixCache.end_logits(path, m, 4) is lg
    assert pc.logits_tokens == 1  # 20 bytes of logits, 96 bytes of KV per token: counts as 1 token
    assert PrefixCache.end_logits(*pc.match([1, 2, 3]), 3) is None  # ends inside the edge
    assert PrefixCache.end_logits(*pc.match([1, 2, 3, 4, 5]), 5) is None  # not all matched
    pc.insert([1, 2], lambda a, b: _kv([1, 2][a:b], a), logits=-lg)  # splits: logits stay where they belong
    assert torch.equal(PrefixCache.end_logits(*pc.match([1, 2]), 2), -lg)
    assert PrefixCache.end_logits(*pc.match([1, 2, 3, 4]), 4) is lg
    assert pc.logits_tokens == 2
    pc.evict(0)
    assert PrefixCache.end_logits(*pc.match([1, 2]), 2) is None and pc.total_tokens == 0
    assert pc.logits_tokens == 0
    small = PrefixCache(max_tokens=5)  # 4 KV tokens + 1 for the logits fit, twice that does not
    small.insert([1, 2, 3, 4], lambda a, b: _kv([1, 2, 3, 4][a:b], a), logits=lg)
    assert small.total_tokens == 4 and small.evictions == 0
    small.insert([7, 8, 9, 10], lambda a, b: _kv([7, 8, 9, 10][a:b], a), logits=lg)
    assert small.total_tokens == 4 and small.logits_tokens == 1 and small.evictions == 1
    assert small.match([7, 8, 9, 10])[1] == 4 and small.match([1, 2, 3, 4])[1] == 0


def test_lock_survives_a_split_of_the_locked_edge():
    pc = PrefixCache(max_tokens=100)
    _insert(pc, [1, 2, 3, 4, 5, 6])
    path, m = pc.match([1, 2, 3, 4, 5])
    handle = pc.lock(path)
    _insert(pc, [1, 2, 9])  # splits the locked edge after 2 tokens
    assert [n.lock_ref for n in _nodes(pc) if n.key == (1, 2)] == [1]
    pc.evict(0)  # the locked path stays, the unlocked leaf goes
    assert pc.match([1, 2, 3, 4, 5, 6])[1] == 6 and pc.match([1, 2, 9])[1] == 2
    pc.unlock(handle)
    assert all(n.lock_ref == 0 for n in _nodes(pc))
    pc.evict(0)
    assert pc.total_tokens == 0


def _nodes(pc):
    out, stack = [], list(pc.root.children.values())
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children.values())
    return out
