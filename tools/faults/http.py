"""HTTP fuzz: hostile /generate, /abort_request bodies and headers against the embedded server on 127.0.0.1.

Starts an :class:`~ophsd.rollout.serve.EmbeddedServer` in this process (a tiny random model unless
``--model``), sends the fixed set of issue 14 (each must get its 4xx naming the limit or field),
then ``--random`` mutated bodies (each must get a 2xx or a 4xx, never a 5xx or no answer), checks
that a client that hangs up has its work aborted, and that the server still serves a normal
request at the end. ``tests/test_faults_http.py`` runs the same cases under pytest.
"""
from __future__ import annotations

import json
import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
TIMEOUT_S = 60.0


@dataclass
class Case:
    """One request: ``body`` (JSON-encoded) or ``raw`` bytes, sent with ``headers``; the answer must
    have status ``code`` and ``needle`` in its message."""

    name: str
    path: str = "/generate"
    body: object = None
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)
    method: str = "POST"
    code: int = 400
    needle: str = ""
    during_run: bool = False  # sent while a long request is running (abort cases)

    def payload(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()


def _gen(sp: dict, **extra) -> dict:
    return {"input_ids": [5, 6, 7], "sampling_params": {**GREEDY, **sp}, **extra}


def _raw_gen(sp_json: str) -> bytes:
    return ('{"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 4, '
            + sp_json + "}}").encode()


def fixed_cases(max_context: int = 2048) -> list[Case]:
    """Issue 14's item 7 and the limits of item 3, each with the status and the text it must get."""
    deep = b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        Case("n=1e400", raw=_raw_gen('"n": 1e400'), needle="sampling_params.n must be an integer"),
        Case("max_new_tokens=1e400", raw=_raw_gen('"max_new_tokens": 1e400'),
             needle="sampling_params.max_new_tokens must be an integer"),
        Case("top_k=1e400", raw=_raw_gen('"top_k": 1e400'), needle="sampling_params.top_k must be an integer"),
        Case("n=NaN", raw=_raw_gen('"n": NaN'), needle="sampling_params.n must be an integer"),
        Case("temperature=-Infinity", raw=_raw_gen('"temperature": -Infinity'), needle="finite"),
        Case("sampling_seed=1e23", raw=_raw_gen('"sampling_seed": 1e23'), needle="sampling_seed must be an integer"),
        Case("sampling_seed=10**23", raw=_raw_gen('"sampling_seed": 100000000000000000000000'),
             needle="sampling_seed must be an integer in [0, 2**63)"),
        Case("sampling_seed=-1", body=_gen({"sampling_seed": -1}), needle="sampling_seed"),
        Case("text lone surrogate", raw=b'{"text": "a\\ud800b", "sampling_params": {"max_new_tokens": 2}}',
             needle="'text' is not valid Unicode"),
        Case("JSON nested 100k deep", raw=deep, needle="--max-json-depth"),
        Case("JSON nested 40 deep", raw=b'{"input_ids": ' + b"[" * 40 + b"]" * 40 + b"}", needle="--max-json-depth"),
        Case("integer of 5000 digits", raw=_raw_gen('"n": ' + "9" * 5000), needle="malformed JSON"),
        Case("invalid UTF-8 body", raw=b'{"text": "\xff\xfe"}', needle="malformed JSON"),
        Case("Content-Length: -5", raw=b"{}", headers={"Content-Length": "-5"}, needle="Content-Length"),
        Case("Content-Length: abc", raw=b"{}", headers={"Content-Length": "abc"}, needle="Content-Length"),
        Case("body over --max-body-bytes", raw=b"", headers={"Content-Length": str(64 << 20)}, code=413,
             needle="--max-body-bytes"),
        Case("chunked body", raw=b"", headers={"Transfer-Encoding": "chunked", "Content-Length": None}, code=411,
             needle="chunked"),
        Case("n=1000000", body=_gen({"n": 1_000_000, "max_new_tokens": 1}), needle="--max-n"),
        Case("max_new_tokens=10**9", body=_gen({"max_new_tokens": 10 ** 9}), needle="--max-new-tokens"),
        Case("prompt longer than the context", body={"input_ids": [5] * (max_context + 1),
                                                     "sampling_params": {"max_new_tokens": 1}},
             needle="--max-prompt-tokens"),
        Case("100 prompts x n=64", body={"input_ids": [[5, 6]] * 100, "sampling_params": {**GREEDY, "n": 64}},
             needle="--max-sequences"),
        Case("rid is a dict", body=_gen({}, rid={"a": 1}), needle="'rid' must be a string"),
        Case("stop is a list of ints", body=_gen({"stop": [1, 2]}), needle="stop must be"),
        Case("DELETE /generate", method="DELETE", raw=b"", code=405, needle="method DELETE"),
        Case("update_weight_version 1e400", path="/update_weight_version", raw=b'{"new_version": 1e400}',
             needle="new_version must be an integer string"),
        Case("/abort_request rid=5", path="/abort_request", body={"rid": 5}, needle="'rid' must be a string",
             during_run=True),
        Case("/abort_request rid=list", path="/abort_request", body={"rid": ["fuzz-long"]},
             needle="'rid' must be a string", during_run=True),
        Case("/abort_request abort_message=7", path="/abort_request", body={"abort_all": True, "abort_message": 7},
             needle="'abort_message' must be a string", during_run=True),
    ]


# ------------------------------------------------------------------------------------ transport

def send(port: int, case: Case, host: str = "127.0.0.1", timeout: float = TIMEOUT_S):
    """Send ``case`` over a fresh socket; returns ``(status, parsed JSON or text)``, status ``None``
    when the server gave no HTTP answer (reset, timeout)."""
    data = case.payload()
    headers = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(data)),
               "Connection": "close", **case.headers}
    head = f"{case.method} {case.path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items() if v is not None) + "\r\n"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(head.encode() + data)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    resp = b"".join(chunks)
    head, _, body = resp.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, resp[:200].decode(errors="replace")
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")


def message(out) -> str:
    return out.get("message", "") if isinstance(out, dict) else str(out)


def generate_ok(port: int) -> bool:
    status, out = send(port, Case("normal", body=_gen({})))
    return status == 200 and isinstance(out, dict) and len(out.get("output_ids", [])) == 4


class LongRequest:
    """A /generate that runs until aborted (``rid`` ``fuzz-long``), in a thread."""

    def __init__(self, port: int, engine, max_new_tokens: int):
        self.result = None
        body = _gen({"max_new_tokens": max_new_tokens}, rid="fuzz-long")
        self.thread = threading.Thread(target=lambda: setattr(self, "result", send(port, Case("long", body=body))),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)

    def abort(self, port: int):
        send(port, Case("abort", path="/abort_request", body={"rid": "fuzz-long"}))
        self.thread.join(TIMEOUT_S)
        return self.result


# ------------------------------------------------------------------------------------ random bodies

_HOSTILE = [None, True, -1, 0, 2, 1 << 31, 1 << 63, 10 ** 30, -(10 ** 30), 0.5, -0.0, 1e308, "x", "", "a\ud800b",
            "\x00" * 3, [], [1], [[]], [[1, 2]], {}, {"a": None}, [None] * 5, "ø" * 50]
_RAW_NUMS = ["1e400", "-1e400", "NaN", "Infinity", "1e23", "9" * 40]


def random_bodies(rng: random.Random, k: int):
    """``k`` mutations of a valid /generate body: a field or sampling key set to a hostile value."""
    from ophsd.rollout import protocol as P
    from ophsd.rollout.io_struct import GenerateReqInput

    fields = sorted(set(GenerateReqInput.model_fields) | {"input_embeds", "zzz"})
    keys = sorted(P.SAMPLING_SUPPORTED | set(P.SAMPLING_DEFAULT_ONLY) | {"zzz"})
    for i in range(k):
        body = _gen({})
        where = rng.random()
        if where < 0.6:
            key = rng.choice(keys)
            if rng.random() < 0.3:  # a number json.dumps cannot write: splice it in raw
                raw = json.dumps(body).replace('"temperature": 0', f'"{key}": {rng.choice(_RAW_NUMS)}, "temperature": 0')
                yield Case(f"random {i}: sampling_params.{key} raw", raw=raw.encode(), code=0)
                continue
            value = body["sampling_params"][key] = rng.choice(_HOSTILE)
        else:
            key = rng.choice(fields)
            value = body[key] = rng.choice(_HOSTILE)
        yield Case(f"random {i}: {key}={str(value)[:30]!r}", raw=json.dumps(body).encode(), code=0)


# ------------------------------------------------------------------------------------ suite

def add_args(p):
    p.add_argument("--model", help="HF model directory to serve (default: a tiny random llama written to a temp dir)")
    p.add_argument("--random", type=int, default=300, help="randomly mutated /generate bodies after the fixed set")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mutations")


def check(port: int, case: Case, tally: dict | None = None) -> str | None:
    """Send one case; returns a failure line, or None when it was answered as it must be: its
    ``code`` with its ``needle``, or (``code`` 0, random bodies) any 2xx/4xx."""
    status, out = send(port, case)
    if tally is not None:
        kind = "none" if status is None else f"{status // 100}xx"
        tally[kind] = tally.get(kind, 0) + 1
    if status is None:
        return f"{case.name}: no HTTP answer ({out})"
    if status >= 500:
        return f"{case.name}: {status} {message(out)[:200]}"
    if case.code and (status != case.code or case.needle not in message(out)):
        return f"{case.name}: expected {case.code} with {case.needle!r}, got {status} {message(out)[:200]!r}"
    return None


def client_gone_is_aborted(port: int, engine, max_new_tokens: int = 1500) -> str | None:
    """A client that hangs up mid-generation: its sequence must stop long before max_new_tokens."""
    before = engine.stats()["tokens"]
    body = json.dumps(_gen({"max_new_tokens": max_new_tokens}, rid="fuzz-gone")).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while engine.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    made = engine.stats()["tokens"] - before
    if engine.stats()["running"] or made >= max_new_tokens:
        return f"client gone: its request went on ({made} tokens of {max_new_tokens})"
    return None


def serve_tiny(tmp: str, model: str | None = None):
    """An embedded server on 127.0.0.1 (started) and its engine."""
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.rollout.serve import EmbeddedServer

    if model is None:
        from tests.tiny_models import write_tiny_model, write_tiny_tokenizer

        tok = write_tiny_tokenizer(Path(tmp) / "tok")
        model = str(write_tiny_model(Path(tmp) / "model", "llama", tokenizer_dir=tok))
    engine = EmbeddedEngine(model, seed=0)
    return EmbeddedServer(engine).start(), engine


def run(args) -> dict:
    failures: list[str] = []
    tally = {"2xx": 0, "4xx": 0, "5xx": 0, "none": 0}
    gone, alive = "not run", False
    with tempfile.TemporaryDirectory(prefix="ophsd-fuzz-") as tmp:
        srv, engine = serve_tiny(tmp, args.model)
        port = srv.port
        try:
            cases = fixed_cases(engine.max_context)
            long = LongRequest(port, engine, max_new_tokens=min(1500, engine.max_context - 8))
            failures += [f for c in cases if c.during_run for f in [check(port, c, tally)] if f]
            res = long.abort(port)  # the bad aborts left it running; a good one ends it
            if not (res and res[0] == 200 and res[1]["meta_info"]["finish_reason"]["type"] == "abort"):
                failures.append(f"abort by rid after the bad aborts: {res}")
            failures += [f for c in cases if not c.during_run for f in [check(port, c, tally)] if f]
            for c in random_bodies(random.Random(args.seed), args.random):
                f = check(port, c, tally)
                if f:
                    failures.append(f)
            gone = client_gone_is_aborted(port, engine)
            if gone:
                failures.append(gone)
            alive = generate_ok(port) and send(port, Case("health", path="/health_generate", method="GET",
                                                          raw=b""))[0] == 200
            if not alive:
                failures.append("the server does not serve a normal request after the fuzz set")
        finally:
            srv.shutdown(close_engine=True)
    return {"bodies": sum(tally.values()), "answered_4xx": tally["4xx"], "answered_2xx": tally["2xx"],
            "server_errors_5xx": tally["5xx"], "no_answer": tally["none"], "client_gone_aborted": gone is None,
            "server_alive": alive, "failures": failures}
