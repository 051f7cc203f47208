"""The embedded server over real HTTP on localhost: SGLang's JSON shapes, 4xx handling, updates."""
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from ophsd.rollout import SamplingParams
from ophsd.rollout.embedded import EmbeddedEngine
from ophsd.rollout.serve import EmbeddedServer


def call(url, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"))
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        payload, status = e.read(), e.code
    try:
        return status, json.loads(payload) if payload else None
    except json.JSONDecodeError:
        return status, payload.decode()


@pytest.fixture(scope="module")
def served(llama):
    eng = EmbeddedEngine(str(llama), seed=0)
    srv = EmbeddedServer(eng).start()
    yield srv
    srv.shutdown(close_engine=True)


GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_generate_shapes_match_sglang_and_engine(served):
    eng, url = served.engine, served.url
    prompt = [5, 17, 33, 2, 90]
    status, out = call(url, "/generate", {"input_ids": prompt, "sampling_params": GREEDY, "return_logprob": True,
                                          "rid": "req-1"})
    assert status == 200
    (ref,), = eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True,
                                                    return_logprob=True))
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert out["output_ids"] == ref.output_ids and out["text"] == ref.text
    assert meta["id"] == "req-1" and meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["weight_version"] == "0" and meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 8
    lps = meta["output_token_logprobs"]
    assert [x[1] for x in lps] == ref.output_ids and all(x[2] is None for x in lps)
    assert torch.allclose(torch.tensor([x[0] for x in lps]), torch.tensor(ref.logprobs), atol=1e-5)
    # batch of prompts with n=2: prompt-major, sample-minor list (SGLang's parallel sampling order)
    sp = {"temperature": 1.0, "max_new_tokens": 4, "n": 2, "sampling_seed": 3, "ignore_eos": True}
    status, outs = call(url, "/generate", {"input_ids": [prompt, prompt[:2]], "sampling_params": sp})
    assert status == 200 and isinstance(outs, list) and len(outs) == 4
    direct = eng.generate([prompt, prompt[:2]], SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=3,
                                                                ignore_eos=True))
    assert [o["output_ids"] for o in outs] == [c.output_ids for g in direct for c in g]
    # text input is tokenized like the engine does; text-in-logprobs
    status, out = call(url, "/generate", {"text": "what is 3 plus 4?", "sampling_params": GREEDY,
                                          "return_logprob": True, "return_text_in_logprobs": True})
    assert status == 200 and out["meta_info"]["prompt_tokens"] == len(eng.tokenize("what is 3 plus 4?"))
    assert all(isinstance(x[2], str) for x in out["meta_info"]["output_token_logprobs"])


def test_info_health_and_misc_endpoints(served):
    url = served.url
    assert call(url, "/health_generate")[0] == 200 and call(url, "/health")[0] == 200
    for path in ("/get_model_info", "/model_info"):
        status, info = call(url, path)
        assert status == 200 and info["is_generation"] is True and info["weight_version"] == "0"
        assert info["vocab_size"] == 400 and info["model_path"] == served.engine.model_path
    assert call(url, "/get_weight_version") == (200, {"weight_version": "0"})
    assert call(url, "/flush_cache", {})[0] == 200
    assert call(url, "/pause_generation", {"mode": "in_place"})[1]["status"] == "ok"
    assert served.engine.is_paused
    assert call(url, "/continue_generation", {})[1]["status"] == "ok"
    assert not served.engine.is_paused


@pytest.mark.parametrize("body,raw,code,needle", [
    (None, b"{not json", 400, "malformed JSON"),
    ({"input_ids": [1, 2], "bogus": 1}, None, 400, "unknown field 'bogus'"),
    ({"input_ids": [1, 2], "image_data": "x.png"}, None, 400, "does not implement"),
    ({"input_ids": [1, 999]}, None, 400, "outside the vocabulary"),
    ({"input_ids": [5] * 60000, "sampling_params": {"max_new_tokens": 4}}, None, 400, "context length"),
    ({"input_ids": [1, 2], "sampling_params": {"temprature": 0.5}}, None, 400, "unknown sampling_params key"),
    ({"input_ids": [1, 2], "sampling_params": {"repetition_penalty": 1.3}}, None, 400, "not implemented"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, None, 400, "top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "ten"}}, None, 400, "integer"),
    ({"text": "a", "input_ids": [1]}, None, 400, "exactly one"),
    ({"input_ids": [1, 2], "stream": True}, None, 400, "stream"),
    ([1, 2], None, 400, "must be an object"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(served, body, raw, code, needle):
    status, out = call(served.url, "/generate", body=body, raw=raw)
    assert status == code and needle in out["message"] and out["object"] == "error"
    status, out = call(served.url, "/generate", {"input_ids": [3, 4], "sampling_params": GREEDY})
    assert status == 200 and len(out["output_ids"]) == 8


def test_routes_and_methods(served):
    assert call(served.url, "/nope", {})[0] == 404
    assert call(served.url, "/generate")[0] == 405
    status, out = call(served.url, "/update_weights_from_distributed", {"names": []})
    assert status == 400 and "NCCL" in out["message"]


def test_abort_request_over_http(served):
    eng = served.engine
    eng.pause_generation()
    result = {}
    t = threading.Thread(target=lambda: result.update(out=call(served.url, "/generate", {
        "input_ids": [7, 8, 9], "sampling_params": GREEDY, "rid": "to-abort"})))
    t.start()
    try:
        for _ in range(500):
            if eng.stats()["waiting"]:
                break
            threading.Event().wait(0.01)
        assert call(served.url, "/abort_request", {"rid": "to-abort"})[0] == 200
    finally:
        eng.continue_generation()
    t.join(30)
    status, out = result["out"]
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort" and out["output_ids"] == []


def test_update_weights_from_disk_and_tensor(served, llama, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ophsd.rollout.weight_sync import EMBEDDED_TENSOR_FORMAT, serialize_for_embedded
    from tests.tiny_models import write_tiny_model

    other_dir = write_tiny_model(tmp_path / "other", "llama", seed=3, tokenizer_dir=llama)
    other = AutoModelForCausalLM.from_pretrained(str(other_dir), dtype=torch.float32).eval()
    prompt = [11, 12, 13]
    expected = other.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 3:].tolist()
    before = call(served.url, "/generate", {"input_ids": prompt, "sampling_params": GREEDY})[1]["output_ids"]
    # a failing update: wrong shape -> 400, success false, old weights and version stay
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"model.norm.weight": torch.ones(3)}, str(bad / "model.safetensors"))
    status, out = call(served.url, "/update_weights_from_disk", {"model_path": str(bad), "weight_version": "4"})
    assert status == 400 and out["success"] is False and "shape" in out["message"]
    status, out = call(served.url, "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
    assert status == 400 and out["success"] is False
    assert call(served.url, "/get_weight_version")[1] == {"weight_version": "0"}
    assert call(served.url, "/generate", {"input_ids": prompt, "sampling_params": GREEDY})[1]["output_ids"] == before
    try:
        status, out = call(served.url, "/update_weights_from_disk", {"model_path": str(other_dir), "weight_version": "4"})
        assert status == 200 and out["success"] is True and out["num_paused_requests"] == 0
        out = call(served.url, "/generate", {"input_ids": prompt, "sampling_params": GREEDY})[1]
        assert out["output_ids"] == expected and out["meta_info"]["weight_version"] == "4"
        # tensor path, back to the original weights
        base = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
        payload = serialize_for_embedded(list(base.state_dict().items()))
        status, out = call(served.url, "/update_weights_from_tensor", {
            "serialized_named_tensors": [payload], "load_format": EMBEDDED_TENSOR_FORMAT, "weight_version": "5"})
        assert status == 200 and out["success"] is True
        out = call(served.url, "/generate", {"input_ids": prompt, "sampling_params": GREEDY})[1]
        assert out["output_ids"] == before and out["meta_info"]["weight_version"] == "5"
        status, out = call(served.url, "/update_weights_from_tensor", {"serialized_named_tensors": ["x"]})
        assert status == 400 and "load_format" in out["message"]
    finally:
        served.engine.update_weights(AutoModelForCausalLM.from_pretrained(str(llama)).state_dict().items(), 0)


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "ophsd.rollout.serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "/generate" in r.stdout and "--model" in r.stdout and "--port" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ophsd.rollout.serve", "--model", "/nonexistent/dir", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
