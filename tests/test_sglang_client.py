"""SGLangEngine over real HTTP against embedded servers (and stub servers for failures),
plus contract tests pinning the JSON shapes of the targeted SGLang version."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ophsd.rollout import EngineError, InvalidRequestError, SamplingParams
from ophsd.rollout import protocol as P
from ophsd.rollout.embedded import EmbeddedEngine
from ophsd.rollout.serve import EmbeddedServer
from ophsd.rollout.sglang import SGLangEngine, ServerLauncher, free_port
from ophsd.rollout.weight_sync import iter_buckets, push_weights

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, return_logprob=True)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _greedy(model, prompt, n=8):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [9], [100, 200, 300, 12]]


@pytest.fixture(scope="module")
def other(llama, tmp_path_factory):
    from tests.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("other"), "llama", seed=5, tokenizer_dir=llama)


@pytest.fixture(scope="module")
def two_servers(llama):
    servers = [EmbeddedServer(EmbeddedEngine(str(llama), seed=i)).start() for i in range(2)]
    yield servers
    for s in servers:
        s.shutdown(close_engine=True)


@pytest.fixture
def fresh(two_servers, llama):
    """Both servers back on the base weights, version 0, not paused."""
    base = _hf(llama).state_dict()
    for s in two_servers:
        s.engine.update_weights(base.items(), 0)
    yield two_servers


class _Stub(BaseHTTPRequestHandler):
    """A server that answers model info but fails /generate (500) or hangs."""

    mode = "500"
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first (the "hang" stub)

    def do_GET(self):
        if self.path == "/get_weight_version":
            return self._send(200, {"weight_version": "0"})
        self._send(200, {"model_path": "stub", "weight_version": "0"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "hang":
            time.sleep(30)  # far past the client's timeout
        self._send(500, {"object": "error", "message": "boom", "code": 500})


def _stub(mode):
    handler = type("H", (_Stub,), {"mode": mode})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_client_matches_in_process_engine_and_spreads_load(fresh, llama):
    model = _hf(llama)
    before = [s.engine.stats()["tokens"] for s in fresh]
    with SGLangEngine([s.url for s in fresh]) as eng:
        assert eng.weight_version == 0 and eng.health()
        res = eng.generate(PROMPTS * 3, GREEDY)
        chat = eng.generate_chat([[{"role": "user", "content": "hi"}]], GREEDY)
    for p, (c,) in zip(PROMPTS * 3, res):
        assert c.output_ids == _greedy(model, p) and c.weight_version == 0 and c.finish_reason == "length"
        assert len(c.logprobs) == 8 and c.prompt_ids == p
    assert chat[0][0].prompt_ids == fresh[0].engine.apply_chat_template([{"role": "user", "content": "hi"}])
    after = [s.engine.stats()["tokens"] for s in fresh]
    assert all(a > b for a, b in zip(after, before))  # both servers served


def test_dead_and_failing_servers_are_taken_out_of_rotation(fresh):
    dead_url = f"http://127.0.0.1:{free_port()}"
    stub, stub_url = _stub("500")
    hang, hang_url = _stub("hang")
    try:
        with SGLangEngine([fresh[0].url, stub_url, dead_url], backoff_s=0.01, max_retries=4) as eng:
            states = {s.url: s for s in eng.servers}
            assert not states[dead_url].alive  # refused at connect
            res = eng.generate(PROMPTS * 2, GREEDY)
            assert all(len(c.output_ids) == 8 for (c,) in res)
            assert not states[stub_url].alive and states[fresh[0].url].alive  # 5xx twice -> out
        # per-request timeout: the first pick (round robin starts at the first URL) hangs
        one = SamplingParams(temperature=0.0, max_new_tokens=1)
        with SGLangEngine([hang_url, fresh[0].url], request_timeout=2.5, backoff_s=0.01) as eng:
            (c,), = eng.generate([[5, 6]], one)
            assert len(c.output_ids) == 1
            states = {s.url: s for s in eng.servers}
            assert not states[hang_url].alive and "timed out" in states[hang_url].last_error
        with SGLangEngine([stub_url], backoff_s=0.01, max_retries=2) as eng:
            with pytest.raises(EngineError, match="no SGLang server could serve.*HTTP 500: boom"):
                eng.generate([[1, 2]], GREEDY)
        with pytest.raises(EngineError, match="no SGLang server answers"):
            SGLangEngine([dead_url])
    finally:
        stub.shutdown()
        hang.shutdown()


def test_client_errors_are_not_retried(fresh):
    with SGLangEngine([s.url for s in fresh]) as eng:
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            eng.generate([[1, 4000]], GREEDY)
        with pytest.raises(InvalidRequestError, match="context length"):
            eng.generate([[1] * 60000], GREEDY)


def test_stale_server_is_detected_and_bypassed(fresh):
    with SGLangEngine([s.url for s in fresh]) as eng:
        fresh[1].engine.set_weight_version(9)  # behind the client's back: results would be stale
        res = eng.generate(PROMPTS * 2, GREEDY)
        assert all(c.weight_version == 0 for (c,) in res)
        assert {s.url: s for s in eng.servers}[fresh[1].url].stale
        fresh[0].engine.set_weight_version(9)
        with pytest.raises(EngineError, match="weight_version 9, expected 0"):
            eng.generate([[5, 6]], GREEDY)


@pytest.mark.parametrize("method", ["disk", "tensor"])
def test_weight_push_through_client(fresh, other, llama, method):
    target = _hf(other)
    sd = target.state_dict()
    # small buckets: several shards / several tensor calls
    with SGLangEngine([s.url for s in fresh], weight_sync=method, bucket_bytes=64 << 10) as eng:
        before = [c.output_ids for (c,) in eng.generate(PROMPTS, GREEDY)]
        bad = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(2, 2))]
        with pytest.raises(EngineError, match="failed on every server"):
            push_weights(eng, iter(bad), 3)
        assert eng.weight_version == 0 and [s.engine.weight_version for s in fresh] == [0, 0]
        assert [c.output_ids for (c,) in eng.generate(PROMPTS, GREEDY)] == before
        assert len(list(iter_buckets(sd.items(), 64 << 10))) > 2
        push_weights(eng, iter(sd.items()), 3)
        assert eng.weight_version == 3 and [s.engine.weight_version for s in fresh] == [3, 3]
        res = eng.generate(PROMPTS, GREEDY)
    for p, (c,) in zip(PROMPTS, res):
        assert c.weight_version == 3 and c.output_ids == _greedy(target, p)


def test_update_during_generation_resends_aborted_requests(fresh, other, llama):
    models = {0: _hf(llama), 4: _hf(other)}
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    expected = {v: [_greedy(m, p, 40) for p in PROMPTS] for v, m in models.items()}
    with SGLangEngine([s.url for s in fresh]) as eng:
        out = {}
        t = threading.Thread(target=lambda: out.update(res=eng.generate(PROMPTS * 4, sp)))
        t.start()
        deadline = time.time() + 60
        while not any(s.engine.stats()["running"] for s in fresh) and time.time() < deadline:
            time.sleep(0.002)
        eng.update_weights(models[4].state_dict().items(), 4)  # pause(abort) hits running requests
        t.join(120)
    assert any(c.weight_version == 4 for (c,) in out["res"])
    for i, (c,) in enumerate(out["res"]):
        assert c.finish_reason == "length"  # aborted ones were re-sent
        assert c.output_ids == expected[c.weight_version][i % len(PROMPTS)]


def test_launcher_runs_embedded_server_subprocess(llama):
    with SGLangEngine.launch(str(llama), backend="embedded", startup_timeout=180) as eng:
        proc = eng._launcher.procs[0][1]
        (c,), = eng.generate([[5, 6, 7]], GREEDY)
        assert c.output_ids == _greedy(_hf(llama), [5, 6, 7])
    assert proc.poll() is not None  # stopped with the engine
    bad = ServerLauncher("/nonexistent", backend="embedded", startup_timeout=120)
    with pytest.raises(EngineError, match="(?s)exited with code 2.*not found"):
        bad.start()


def test_sglang_absent_gives_clear_message(monkeypatch):
    import importlib.util

    import ophsd.rollout.launcher as mod

    monkeypatch.setattr(mod, "sglang_available", lambda: False)
    with pytest.raises(EngineError, match="not installed.*--rollout-engine embedded"):
        ServerLauncher("/some/model", backend="sglang")
    from ophsd.rollout.weight_sync import serialize_for_sglang

    if not importlib.util.find_spec("sglang"):
        with pytest.raises(ImportError, match="needs sglang"):
            serialize_for_sglang([("w", torch.zeros(1))])


# --------------------------------------------------------------------------- contract tests
# Field sets copied from SGLang's source (see ophsd/rollout/protocol.py for the files):
# python/sglang/srt/sampling/sampling_params.py  SamplingParams.__init__ / struct fields
SGLANG_SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}
# python/sglang/srt/managers/io_struct.py
SGLANG_GENERATE_REQ = {"rid", "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                       "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "stream"}
SGLANG_UPDATE_FROM_DISK = {"model_path", "load_format", "abort_all_requests", "weight_version", "is_async",
                           "torch_empty_cache", "keep_pause", "recapture_cuda_graph", "token_step", "flush_cache"}
SGLANG_UPDATE_FROM_TENSOR = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
                             "weight_version"}
SGLANG_INIT_GROUP = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
SGLANG_UPDATE_DISTRIBUTED = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
                             "weight_version"}
# python/sglang/srt/managers/tokenizer_manager.py: a non-streaming /generate answer
SGLANG_GENERATE_OUTPUT = {
    "text": " the answer", "output_ids": [279, 4226, 2],
    "meta_info": {"id": "9f2c", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 7,
                  "weight_version": "12", "completion_tokens": 3, "cached_tokens": 0, "e2e_latency": 0.04,
                  "output_token_logprobs": [[-0.5, 279, None], [-1.25, 4226, None], [-0.01, 2, None]]},
}


def test_contract_request_shapes():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop=("\n",),
                        stop_token_ids=(2,), seed=1, n=2, return_logprob=True, ignore_eos=True)
    body = P.generate_request([1, 2, 3], sp, rid="r")
    assert set(body) <= SGLANG_GENERATE_REQ and body["return_logprob"] is True
    assert set(body["sampling_params"]) <= SGLANG_SAMPLING_KEYS
    assert P.sampling_from_sglang(body["sampling_params"], True) == sp  # round trip
    assert P.sampling_from_sglang({"top_k": P.TOP_K_ALL}).top_k == -1
    assert set(P.update_weights_from_disk_request("/w", 3)) <= SGLANG_UPDATE_FROM_DISK
    assert P.update_weights_from_disk_request("/w", 3)["weight_version"] == "3"
    assert set(P.update_weights_from_tensor_request(["x"], 3)) <= SGLANG_UPDATE_FROM_TENSOR
    assert set(P.init_weights_update_group_request("h", 1, 1, 2)) == SGLANG_INIT_GROUP
    dist = P.update_weights_from_distributed_request(["a"], ["bfloat16"], [[2, 3]], 4)
    assert set(dist) == SGLANG_UPDATE_DISTRIBUTED and dist["weight_version"] == "4"
    with pytest.raises(ValueError):
        P.update_weights_from_distributed_request(["a"], [], [[1]], 1)


def test_contract_response_parsing():
    c = P.completion_from_sglang(SGLANG_GENERATE_OUTPUT, [1, 2])
    assert c.output_ids == [279, 4226, 2] and c.finish_reason == "stop" and c.weight_version == 12
    assert c.logprobs == [-0.5, -1.25, -0.01] and c.text == " the answer" and c.meta["rid"] == "9f2c"
    length = json.loads(json.dumps(SGLANG_GENERATE_OUTPUT))
    length["meta_info"].update(finish_reason={"type": "length", "length": 3}, weight_version="default")
    del length["meta_info"]["output_token_logprobs"]
    c = P.completion_from_sglang(length, [1])
    assert c.finish_reason == "length" and c.weight_version == 0 and c.logprobs is None
    # our server's answer has exactly SGLang's keys
    ours = P.completion_to_sglang(c, return_logprob=False)
    assert set(ours) == set(SGLANG_GENERATE_OUTPUT)
    assert set(ours["meta_info"]) == set(SGLANG_GENERATE_OUTPUT["meta_info"]) - {"output_token_logprobs"}
    with pytest.raises(ValueError):
        P.completion_from_sglang({"text": "x"}, [1])


def test_generate_many_sends_each_prompt_its_own_seed(fresh, llama):
    """Per-prompt sampling params (the trainer's rollout seeds) reach the servers as each request's
    sampling_seed, and give the in-process engine's samples for the same requests; one prompt
    sampled under two seeds differs, under the same seed repeats."""
    seen = []
    for s in fresh:
        def record(requests, rids=None, real=s.engine.submit_many):
            seen.extend(sp.seed for _, sp in requests)
            return real(requests, rids)

        s.engine.submit_many = record
    hot = dict(temperature=1.0, max_new_tokens=8, ignore_eos=True, n=2)
    reqs = [(p, SamplingParams(**hot, seed=1000 + 17 * i)) for i, p in enumerate(PROMPTS)]
    same = [(PROMPTS[1], SamplingParams(**hot, seed=s)) for s in (5, 6, 5)]
    try:
        with SGLangEngine([s.url for s in fresh]) as eng:
            got = eng.generate_many(reqs)
            twice = eng.generate_many(same)
    finally:
        for s in fresh:
            del s.engine.submit_many
    assert sorted(seen) == [5, 5, 6] + [1000 + 17 * i for i in range(4)]
    with EmbeddedEngine(str(llama), seed=0) as ref:
        want = ref.generate_many(reqs)
    assert [[c.output_ids for c in g] for g in got] == [[c.output_ids for c in g] for g in want]
    ids = [[c.output_ids for c in g] for g in twice]
    assert ids[0] == ids[2] and ids[0] != ids[1] and ids[0][0] != ids[0][1]  # sample j draws with seed + j
