"""EmbeddedEngine against plain transformers on tiny random models (fp32, CPU).

Tolerance: the engine runs left-padded batches with a shared KV cache; in fp32 its logits
differ from an unpadded single-sequence forward by float rounding only, so log-probabilities
are compared with atol 1e-4 and greedy tokens must be identical.
"""
import threading
import time

import pytest
import torch

from ophsd.rollout import EngineError, InvalidRequestError, SamplingParams
from ophsd.rollout.embedded import EmbeddedEngine

ATOL = 1e-4


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 400, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _hf_logprobs(model, prompt, output, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)[len(prompt) - 1:-1]
    return lp.gather(1, torch.tensor(output)[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def engine(llama):
    eng = EmbeddedEngine(str(llama), seed=0)
    yield eng
    eng.close()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, return_logprob=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_greedy_equals_hf_one_at_a_time(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    model = _hf(path)
    prompts = _prompts([3, 17, 1, 9, 30])
    with EmbeddedEngine(str(path)) as eng:
        res = eng.generate(prompts, GREEDY)
        stats = eng.stats()
    assert stats["max_batch"] == len(prompts) and stats["prefills"] == 1  # one batch, not a loop
    for p, (c,) in zip(prompts, res):
        assert c.output_ids == _hf_greedy(model, p, 10)
        assert c.finish_reason == "length" and c.weight_version == 0 and c.prompt_ids == p
        ref = _hf_logprobs(model, p, c.output_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=ATOL)


def test_logprob_modes_follow_sglang(llama, engine):
    model = _hf(llama)
    p = _prompts([8])[0]
    sp = SamplingParams(temperature=0.7, max_new_tokens=6, seed=3, return_logprob=True, ignore_eos=True)
    (c,), = engine.generate([p], sp)
    # default ("temperature"): log_softmax(logits / T), before top-k/top-p
    assert torch.allclose(torch.tensor(c.logprobs), _hf_logprobs(model, p, c.output_ids, 0.7), atol=ATOL)
    with EmbeddedEngine.from_pretrained_objects(_hf(llama), engine.tokenizer, logprob_mode="original") as orig:
        (c2,), = orig.generate([p], sp)
    assert c2.output_ids == c.output_ids  # same seed -> same tokens
    assert torch.allclose(torch.tensor(c2.logprobs), _hf_logprobs(model, p, c.output_ids, 1.0), atol=ATOL)
    (c3,), = engine.generate([p], SamplingParams(temperature=0.7, max_new_tokens=6, seed=3, ignore_eos=True))
    assert c3.logprobs is None and c3.output_ids == c.output_ids


def test_concurrent_callers_are_batched_and_match_single_results(engine):
    prompts = _prompts([5, 11, 2, 20, 7, 13], seed=1)
    single = [engine.generate([p], GREEDY)[0][0].output_ids for p in prompts]
    before = engine.stats()
    results, errors = {}, []

    def worker(i):
        try:
            time.sleep(0.002 * (i % 4))  # staggered arrivals exercise admission into a running batch
            results[i] = engine.generate([prompts[i % 6]], GREEDY)[0][0].output_ids
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = engine.stats()
    assert not errors
    assert all(results[i] == single[i % 6] for i in range(18))
    assert after["prefills"] - before["prefills"] < 18  # requests shared forwards
    assert after["max_batch"] > 1


def test_seeds_n_samples_and_top_k(engine):
    prompts = _prompts([6, 4], seed=2)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, max_new_tokens=8, seed=11, n=3, ignore_eos=True)
    a = engine.generate(prompts, sp)
    b = engine.generate(prompts[::-1], sp)  # other batch order, same seeds
    assert [c.output_ids for c in a[0]] == [c.output_ids for c in b[1]]
    assert len(a[0]) == 3 and len({tuple(c.output_ids) for c in a[0]}) > 1  # n samples differ
    other = engine.generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=8, seed=12, ignore_eos=True))
    assert other[0][0].output_ids != a[0][0].output_ids
    greedy = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    top1 = engine.generate(prompts[:1], SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8, ignore_eos=True))
    assert greedy[0][0].output_ids == top1[0][0].output_ids


def test_stop_strings_token_ids_eos_and_length(engine):
    p = _prompts([9], seed=4)[0]
    free = SamplingParams(temperature=1.0, seed=5, max_new_tokens=24, ignore_eos=True)
    (ref,), = engine.generate([p], free)
    assert ref.finish_reason == "length" and len(ref.output_ids) == 24 and ref.meta["finish_reason"]["length"] == 24
    # stop token id: the 4th generated token
    stop_id = ref.output_ids[3]
    first = ref.output_ids.index(stop_id)
    (c,), = engine.generate([p], SamplingParams(temperature=1.0, seed=5, max_new_tokens=24, stop_token_ids=[stop_id]))
    assert c.finish_reason == "stop" and c.output_ids == ref.output_ids[: first + 1]
    assert c.meta["finish_reason"]["matched"] == stop_id
    assert c.text == engine.tokenizer.decode(ref.output_ids[:first], skip_special_tokens=True)
    # stop string: a piece of the text generated after the first few tokens
    text = ref.text
    assert len(text) > 8
    stop = text[len(text) // 2: len(text) // 2 + 3]
    (s,), = engine.generate([p], SamplingParams(temperature=1.0, seed=5, max_new_tokens=24, stop=stop, ignore_eos=True))
    assert s.finish_reason == "stop" and s.meta["finish_reason"]["matched"] == stop
    assert s.text == text[: text.index(stop)] and stop not in s.text
    assert s.output_ids == ref.output_ids[: len(s.output_ids)] and len(s.output_ids) < 24
    # EOS: pretend the 3rd generated token is the model's EOS
    saved = engine.eos_token_ids
    engine.eos_token_ids = [ref.output_ids[2]]
    try:
        (e,), = engine.generate([p], SamplingParams(temperature=1.0, seed=5, max_new_tokens=24))
        (ig,), = engine.generate([p], free)
    finally:
        engine.eos_token_ids = saved
    assert e.finish_reason == "stop" and e.output_ids == ref.output_ids[: ref.output_ids.index(ref.output_ids[2]) + 1]
    assert ig.output_ids == ref.output_ids  # ignore_eos


def test_abort_queued_and_running(engine):
    p = _prompts([5], seed=6)[0]
    engine.pause_generation()
    try:
        futs = engine.submit(p, SamplingParams(max_new_tokens=5), rid="queued-1")
        assert engine.abort("queued") == 1
    finally:
        engine.continue_generation()
    c = futs[0].result(timeout=30)
    assert c.finish_reason == "abort" and c.output_ids == [] and c.meta["rid"] == "queued-1"
    long = SamplingParams(temperature=1.0, max_new_tokens=240, ignore_eos=True)
    futs = engine.submit(p, long, rid="running-1")
    deadline = time.time() + 30
    while engine.stats()["running"] == 0 and time.time() < deadline:
        time.sleep(0.001)
    engine.abort("running-1")
    c = futs[0].result(timeout=60)
    assert c.finish_reason == "abort" and len(c.output_ids) < 240


def test_invalid_requests_raise_clear_errors(engine):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.generate([[1, 2, 400]], GREEDY)
    with pytest.raises(InvalidRequestError, match="context length"):
        engine.generate([[5] * engine.max_context], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        engine.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert engine.generate([[5, 6]], GREEDY)[0][0].finish_reason == "length"  # still serving


def test_chat_template(engine, llama):
    from transformers import AutoTokenizer

    msgs = [{"role": "user", "content": "what is 2 plus 3?"}]
    ids = engine.apply_chat_template(msgs)
    ref = AutoTokenizer.from_pretrained(str(llama)).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref)
    (c,), = engine.generate_chat([msgs], GREEDY)
    assert c.prompt_ids == ids and len(c.output_ids) == 10


def test_update_weights_atomic_and_versioned(tiny_model_dir, llama):
    from tests.tiny_models import write_tiny_model

    other_dir = write_tiny_model(llama.parent / "llama_seed1", "llama", seed=1, tokenizer_dir=llama)
    base, other = _hf(llama), _hf(other_dir)
    prompts = _prompts([4, 12], seed=7)
    with EmbeddedEngine(str(llama)) as eng:
        before = [c.output_ids for (c,) in eng.generate(prompts, GREEDY)]
        assert before == [_hf_greedy(base, p, 10) for p in prompts]
        sd = other.state_dict()
        # failures: unknown name, wrong shape, NaN, iterator that breaks -> old weights, old version
        bad_sets = [
            [("model.embed_tokens.weight", sd["model.embed_tokens.weight"]), ("model.nope.weight", torch.zeros(1))],
            [("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))],
            [("model.norm.weight", torch.full_like(sd["model.norm.weight"], float("nan")))],
        ]
        for bad in bad_sets:
            with pytest.raises(InvalidRequestError, match="keeps weight version 0"):
                eng.update_weights(iter(bad), version=1)

        def broken():
            yield "model.norm.weight", sd["model.norm.weight"]
            raise OSError("gather failed")

        with pytest.raises(EngineError, match="gather failed"):
            eng.update_weights(broken(), version=1)
        assert eng.weight_version == 0
        assert [c.output_ids for (c,) in eng.generate(prompts, GREEDY)] == before

        eng.update_weights(((k, v.to(torch.bfloat16).float()) for k, v in sd.items()), version=1)
        eng.update_weights(iter(sd.items()), version=2)  # exact fp32 values
        assert eng.weight_version == 2
        res = eng.generate(prompts, GREEDY)
        for p, (c,) in zip(prompts, res):
            assert c.weight_version == 2
            assert c.output_ids == _hf_greedy(other, p, 10)
            assert torch.allclose(torch.tensor(c.logprobs), _hf_logprobs(other, p, c.output_ids), atol=ATOL)


def test_update_during_concurrent_generation_is_never_mixed(tiny_model_dir, llama):
    """Each completion equals what the model of its reported weight_version generates."""
    from tests.tiny_models import write_tiny_model

    other_dir = write_tiny_model(llama.parent / "llama_seed2", "llama", seed=2, tokenizer_dir=llama)
    models = {0: _hf(llama), 7: _hf(other_dir)}
    prompts = _prompts([3, 6, 9], seed=8)
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    expected = {v: [_hf_greedy(m, p, 20) for p in prompts] for v, m in models.items()}
    with EmbeddedEngine(str(llama)) as eng:
        got = []

        def worker(i):
            for _ in range(3):
                got.append((i, eng.generate([prompts[i]], sp)[0][0]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.01)
        eng.update_weights(models[7].state_dict().items(), version=7)
        for t in threads:
            t.join()
    assert len(got) == 9
    for i, c in got:
        assert c.output_ids == expected[c.weight_version][i]


def test_release_resume_memory_and_health(llama):
    eng = EmbeddedEngine(str(llama))
    assert eng.health()
    eng.release_memory()
    futs = eng.submit([5, 6, 7], GREEDY)
    time.sleep(0.05)
    assert not futs[0].done()  # held while released
    eng.resume_memory()
    assert len(futs[0].result(timeout=30).output_ids) == 10
    eng.close()
    assert not eng.health()
    with pytest.raises(EngineError, match="closed"):
        eng.generate([[5]], GREEDY)


@pytest.mark.slow
def test_real_smollm2_batched_greedy_matches_hf():
    """SmolLM2-135M (GGUF, dequantised, fp32): batched engine greedy == HF greedy up to EOS."""
    from ophsd.models.hub import load_hf_model, load_tokenizer, resolve_model

    src = resolve_model("smollm2-135m")
    model, tok = load_hf_model(src, torch.float32), load_tokenizer(src)
    questions = ["What is 17 plus 25?", "Name three primary colors.", "Translate 'good morning' into French."]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"]) for q in questions]
    with EmbeddedEngine.from_pretrained_objects(model, tok) as eng:
        res = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20, return_logprob=True))
        assert eng.eos_token_ids == [tok.eos_token_id]
    for p, (c,) in zip(prompts, res):
        ref = model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
        assert c.output_ids == ref
        assert c.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
        assert torch.allclose(torch.tensor(c.logprobs), _hf_logprobs(model, p, c.output_ids), atol=1e-3)
