"""Hostile HTTP input against the embedded server on 127.0.0.1 (issue 14, items 3 and 7): every
body of the fuzz set gets its 4xx naming the limit or field, never a 5xx, and the server keeps
serving. The cases live in ``tools/faults/http.py`` (also run by ``tools/fault_inject.py http``)."""
import random
import sys
import time
from pathlib import Path

import pytest

from ophsd.rollout.embedded import EmbeddedEngine
from ophsd.rollout.serve import EmbeddedServer, ServerLimits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from faults import http as fz  # noqa: E402

FIXED = fz.fixed_cases(max_context=2048)  # the tiny llama's context


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    eng = EmbeddedEngine(str(tiny_model_dir("llama")), seed=0)
    assert eng.max_context == 2048
    srv = EmbeddedServer(eng).start()
    yield srv
    srv.shutdown(close_engine=True)


@pytest.mark.parametrize("case", [c for c in FIXED if not c.during_run], ids=lambda c: c.name)
def test_fixed_fuzz_set_gets_its_4xx(served, case):
    status, out = fz.send(served.port, case)
    assert status == case.code, (status, out)
    assert case.needle in out["message"] and out["object"] == "error" and out["code"] == case.code
    assert served.engine.stats()["waiting"] == 0  # nothing was queued
    assert fz.generate_ok(served.port)


def test_bad_aborts_while_a_request_runs(served):
    eng = served.engine
    long = fz.LongRequest(served.port, eng, max_new_tokens=1500)
    assert eng.stats()["running"] == 1
    for case in [c for c in FIXED if c.during_run]:
        status, out = fz.send(served.port, case)
        assert status == 400 and case.needle in out["message"], (case.name, status, out)
    assert eng.stats()["running"] == 1  # the bad aborts did not touch it
    status, out = long.abort(served.port)
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 1500


def test_n_of_a_million_is_rejected_before_any_work(served):
    eng = served.engine
    before = eng.stats()
    t0 = time.monotonic()
    status, out = fz.send(served.port, fz.Case("n", body={"input_ids": [5, 6], "sampling_params": {
        "n": 1_000_000, "max_new_tokens": 1}}))
    assert status == 400 and "n=1000000" in out["message"] and "--max-n" in out["message"]
    assert time.monotonic() - t0 < 5
    after = eng.stats()
    assert after["waiting"] == 0 and after["prompt_tokens"] == before["prompt_tokens"]


def test_random_bodies_never_get_a_5xx(served):
    tally = {}
    failures = [f for c in fz.random_bodies(random.Random(1), 60) for f in [fz.check(served.port, c, tally)] if f]
    assert failures == []
    assert tally.get("5xx", 0) == 0 and tally.get("none", 0) == 0 and tally["4xx"] > 30
    assert fz.generate_ok(served.port)


def test_client_that_hangs_up_has_its_work_aborted(served):
    eng = served.engine
    # queued: the engine is paused, the client leaves, the sequence leaves the queue unrun
    eng.pause_generation()
    try:
        import socket

        s = socket.create_connection(("127.0.0.1", served.port))
        body = b'{"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4}}'
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while eng.stats()["waiting"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats()["waiting"] == 1
        s.close()
        while eng.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.stats()["waiting"] == 0
    finally:
        eng.continue_generation()
    # running: decoding stops long before max_new_tokens
    assert fz.client_gone_is_aborted(served.port, eng, max_new_tokens=1500) is None
    assert fz.generate_ok(served.port)


def test_limits_are_flags(served, tiny_model_dir):
    from ophsd.rollout.serve import build_parser, limits_from_args

    args = build_parser().parse_args(["--max-n", "2", "--max-new-tokens", "5", "--max-prompt-tokens", "3",
                                      "--max-body-bytes", "200", "--max-json-depth", "3", "--max-sequences", "3"])
    lim = limits_from_args(args)
    assert (lim.max_n, lim.max_new_tokens, lim.max_prompt_tokens, lim.max_body_bytes, lim.max_json_depth,
            lim.max_sequences) == (2, 5, 3, 200, 3, 3)
    with pytest.raises(ValueError, match="--max-n must be an integer >= 1"):
        ServerLimits(max_n=0)
    srv = EmbeddedServer(served.engine, limits=lim).start()
    try:
        def msg(body, raw=None):
            status, out = fz.send(srv.port, fz.Case("x", body=body, raw=raw))
            return status, out["message"] if status != 200 else out

        ok = {"max_new_tokens": 5, "n": 2, "temperature": 0}
        assert msg({"input_ids": [1, 2, 3], "sampling_params": ok})[0] == 200
        status, m = msg({"input_ids": [1, 2], "sampling_params": {**ok, "n": 3}})
        assert status == 400 and "limit of 2 samples per prompt (--max-n)" in m
        status, m = msg({"input_ids": [1, 2], "sampling_params": {**ok, "max_new_tokens": 6}})
        assert status == 400 and "max_new_tokens=6 is above the server's limit of 5 (--max-new-tokens" in m
        status, m = msg({"input_ids": [1, 2, 3, 4], "sampling_params": ok})
        assert status == 400 and "prompt of 4 tokens is longer than the server's limit of 3 (--max-prompt-tokens" in m
        status, m = msg({"input_ids": [[1], [2]], "sampling_params": ok})
        assert status == 400 and "4 sequences" in m and "(--max-sequences)" in m
        status, m = msg({"input_ids": [[[1]]]})
        assert status == 400 and "limit of 3 levels (--max-json-depth)" in m
        status, m = msg(None, raw=b'{"text": "' + b"x" * 300 + b'"}')
        assert status == 413 and "limit of 200 bytes (--max-body-bytes)" in m
    finally:
        srv.shutdown()


def test_a_stalled_body_is_cut_off_after_the_read_timeout(served):
    """A client that announces 100 body bytes and sends 10 gets a 408 naming --read-timeout after
    the timeout, its connection is closed, and the server still serves."""
    import json
    import socket

    srv = EmbeddedServer(served.engine, limits=ServerLimits(read_timeout_s=1)).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n" + b'{"text": "a')
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            waited = time.monotonic() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") or head.startswith(b"HTTP/1.0 408"), head
        assert "not received within 1 s (--read-timeout)" in json.loads(body)["message"]
        assert 0.5 < waited < 8
        status, out = fz.send(srv.port, fz.Case("ok", body={"input_ids": [1, 2, 3],
                                                            "sampling_params": {"max_new_tokens": 2, "temperature": 0}}))
        assert status == 200 and len(out["output_ids"]) == 2
    finally:
        srv.shutdown()
