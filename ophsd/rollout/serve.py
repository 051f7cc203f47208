"""Serve an :class:`~ophsd.rollout.embedded.EmbeddedEngine` over HTTP with SGLang's native API.

    python -m ophsd.rollout.serve --model smollm2-135m --port 30000 [--host 127.0.0.1]

Endpoints and JSON field names are SGLang's (see :mod:`ophsd.rollout.protocol` for the
version and source files): the SGLang client (:class:`ophsd.rollout.sglang.SGLangEngine`)
and SGLang's own tools talk to it unchanged. Standard library only (``ThreadingHTTPServer``):
each connection gets a thread, and the engine batches the requests of all threads together.
Bad requests get a 4xx JSON error (SGLang's ``ErrorResponse``) and the server keeps serving.
One request cannot take the server down: :class:`ServerLimits` bounds body size, JSON nesting,
``n``, sequences per request, ``max_new_tokens`` and prompt length (each a flag, each named in
its 400), and a request whose client has disconnected is aborted between decode steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import select
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from ophsd.rollout import protocol as P
from ophsd.rollout.base import EngineError, InvalidRequestError
from ophsd.rollout.embedded import EmbeddedEngine

log = logging.getLogger("ophsd.rollout.serve")



@dataclass
class ServerLimits:
    """What one request may ask for; each field is a ``--max-*`` flag of the CLI, named in the 400.

    ``None`` for ``max_new_tokens`` / ``max_prompt_tokens`` means the model's context length.
    Weight updates over ``/update_weights_from_tensor`` carry whole buckets (512 MiB of tensors,
    base64) and get their own, larger body limit.
    """

    max_n: int = 64
    max_sequences: int = 4096
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 8 << 20
    max_weight_update_bytes: int = 2 << 30
    max_json_depth: int = 32
    # Seconds a connection may stall while the server reads a request (headers, body): a client that
    # announces more bytes than it sends must not hold a thread forever.
    read_timeout_s: int = 60

    def __post_init__(self):
        for k, v in vars(self).items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 1, got {v!r}")


# How often a request thread checks that its client is still connected while it waits.
CLIENT_POLL_S = 0.2


class _HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _ClientGone(Exception):
    """The client closed its connection: its work was aborted and nobody reads an answer."""


def _json_depth_exceeds(obj, limit: int) -> bool:
    """True when containers nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)] if isinstance(obj, (list, dict)) else []
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        items = o.values() if isinstance(o, dict) else o
        stack.extend((c, d + 1) for c in items if isinstance(c, (list, dict)))
    return False


class EmbeddedServer:
    """The HTTP front of one engine. ``start()`` serves in a background thread (tests, trainer);
    ``serve_forever()`` blocks (the CLI)."""

    def __init__(self, engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits | None = None):
        self.engine = engine
        self.limits = limits or ServerLimits()
        handler = type("Handler", (_Handler,), {"server_ref": self, "timeout": self.limits.read_timeout_s})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None
        self._update_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "EmbeddedServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ophsd-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self.httpd.serve_forever()

    def shutdown(self, close_engine: bool = False):
        self.httpd.shutdown()
        self.httpd.server_close()
        if close_engine:
            self.engine.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ---------------------------------------------------------------- endpoint logic
    def generate(self, body, client_gone=lambda: False):
        """``/generate``: every check (fields, types, limits) runs before anything is queued or
        tokenized; ``client_gone`` is polled while waiting, and a gone client's sequences are aborted."""
        body = P.check_fields(body, P.GENERATE_FIELDS, "/generate", P.GENERATE_FIELDS_UNSUPPORTED)
        eng, lim = self.engine, self.limits
        if body.get("stream"):
            raise InvalidRequestError("/generate: stream=true is not supported by the embedded server")
        for k in ("lora_path", "custom_logit_processor", "token_ids_logprob", "bootstrap_host"):
            if body.get(k) is not None:
                raise InvalidRequestError(f"/generate: field {k!r} is an SGLang option the embedded server does not implement")
        if body.get("top_logprobs_num") not in (None, 0):
            raise InvalidRequestError("/generate: top_logprobs_num > 0 is not supported (only sampled-token logprobs)")
        if body.get("logprob_start_len") not in (None, -1):
            raise InvalidRequestError("/generate: logprob_start_len >= 0 (prompt logprobs) is not supported")
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise InvalidRequestError("/generate: give exactly one of 'text' or 'input_ids'")
        if text is not None:
            single = isinstance(text, str)
            texts = [text] if single else text
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise InvalidRequestError("/generate: 'text' must be a string or a non-empty list of strings")
            for t in texts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InvalidRequestError(f"/generate: 'text' is not valid Unicode ({e.reason} at "
                                              f"character {e.start})") from None
            prompts = texts
        else:
            if not isinstance(ids, list) or not ids:
                raise InvalidRequestError("/generate: 'input_ids' must be a non-empty list of ints or of lists of ints")
            single = not isinstance(ids[0], list)
            prompts = [ids] if single else ids
            for p in prompts:
                if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    raise InvalidRequestError("/generate: 'input_ids' must hold integers only")
        n = len(prompts)
        sps = body.get("sampling_params")
        rl = body.get("return_logprob") or False
        sps = sps if isinstance(sps, list) else [sps] * n
        rls = rl if isinstance(rl, list) else [rl] * n
        if len(sps) != n or len(rls) != n:
            raise InvalidRequestError(f"/generate: {n} prompts but {len(sps)} sampling_params / {len(rls)} return_logprob")
        samplings = [P.sampling_from_sglang(s, bool(r)) for s, r in zip(sps, rls)]
        self._check_limits(samplings)
        rid = body.get("rid")
        if single:
            rids = [rid]
        elif rid is None:
            rids = [None] * n
        elif isinstance(rid, list) and len(rid) == n and all(isinstance(r, str) for r in rid):
            rids = rid
        else:
            raise InvalidRequestError("/generate: for a batch, 'rid' must be a list of strings, one per prompt")
        if any(r is not None and not isinstance(r, str) for r in rids):
            raise InvalidRequestError("/generate: 'rid' must be a string")
        if text is not None:
            prompts = [eng.tokenize(t) for t in texts]
        max_prompt = lim.max_prompt_tokens or eng.max_context
        for p in prompts:
            if len(p) > max_prompt:
                raise InvalidRequestError(
                    f"/generate: a prompt of {len(p)} tokens is longer than the server's limit of {max_prompt} "
                    f"(--max-prompt-tokens; the model's context length is {eng.max_context})")
        groups = eng.submit_many(list(zip(prompts, samplings)), rids)
        futs = [f for g in groups for f in g]
        while True:
            done, pending = wait(futs, timeout=CLIENT_POLL_S, return_when=FIRST_EXCEPTION)
            if not pending or any(f.exception() is not None for f in done):
                break
            if client_gone():
                eng.cancel(futs, "aborted: the client disconnected")
                raise _ClientGone()
        with_text = bool(body.get("return_text_in_logprobs"))
        outs = []
        for futs, sp in zip(groups, samplings):
            for f in futs:
                c = f.result()
                texts = [eng.tokenizer.decode([t]) for t in c.output_ids] if (with_text and sp.return_logprob) else None
                outs.append(P.completion_to_sglang(c, sp.return_logprob, texts))
        return outs[0] if single and len(outs) == 1 else outs

    def _check_limits(self, samplings) -> None:
        """The per-request limits that bound the work queued: ``n``, sequences, ``max_new_tokens``."""
        lim, eng = self.limits, self.engine
        max_new = lim.max_new_tokens or eng.max_context
        total = 0
        for sp in samplings:
            if sp.n > lim.max_n:
                raise InvalidRequestError(f"/generate: sampling_params.n={sp.n} is above the server's limit of "
                                          f"{lim.max_n} samples per prompt (--max-n)")
            if sp.max_new_tokens > max_new:
                raise InvalidRequestError(
                    f"/generate: sampling_params.max_new_tokens={sp.max_new_tokens} is above the server's limit "
                    f"of {max_new} (--max-new-tokens; the model's context length is {eng.max_context})")
            total += sp.n
        if total > lim.max_sequences:
            raise InvalidRequestError(f"/generate: {total} sequences (prompts x n) in one request is above the "
                                      f"server's limit of {lim.max_sequences} (--max-sequences)")

    def model_info(self):
        eng = self.engine
        return {
            "model_path": eng.model_path, "tokenizer_path": eng.model_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": str(eng.weight_version),
            # ophsd extras (SGLang keeps these in /get_server_info)
            "vocab_size": eng.vocab_size, "max_context_length": eng.max_context,
            "engine": "ophsd-embedded", "sglang_api_version": P.SGLANG_TARGET_VERSION,
        }

    def _apply_update(self, body, staged_fn, what):
        eng = self.engine
        version = body.get("weight_version")
        try:
            staged = staged_fn()
            with self._update_lock:
                if body.get("abort_all_requests"):
                    eng.abort(abort_all=True, message="aborted for a weight update")
                new_version = P.parse_weight_version(version) if version is not None else eng.weight_version
                if version is not None and new_version is None:
                    raise InvalidRequestError(f"weight_version must be an integer string for the embedded server, got {version!r}")
                eng.apply_staged(staged, new_version)
        except (EngineError, FileNotFoundError, OSError, ValueError) as e:
            return 400, {"success": False, "message": f"{what} failed: {e}", "num_paused_requests": 0}
        msg = f"Succeeded to update model weights ({len(staged)} tensors)."
        if version is not None:
            msg += f" Weight version updated to {version}."
        return 200, {"success": True, "message": msg, "num_paused_requests": 0}

    def update_from_disk(self, body):
        from ophsd.rollout.weight_sync import load_safetensors_dir

        body = P.check_fields(body, P.UPDATE_FROM_DISK_FIELDS, "/update_weights_from_disk")
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("/update_weights_from_disk: 'model_path' (a directory of .safetensors) is required")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise InvalidRequestError("/update_weights_from_disk: load_format must be auto or safetensors")
        return self._apply_update(body, lambda: self.engine.stage_weights(load_safetensors_dir(path)), "update_weights_from_disk")

    def update_from_tensor(self, body):
        from ophsd.rollout.weight_sync import EMBEDDED_TENSOR_FORMAT, deserialize_for_embedded

        body = P.check_fields(body, P.UPDATE_FROM_TENSOR_FIELDS, "/update_weights_from_tensor")
        if body.get("load_format") != EMBEDDED_TENSOR_FORMAT:
            raise InvalidRequestError(
                f"/update_weights_from_tensor: the embedded server takes load_format={EMBEDDED_TENSOR_FORMAT!r} "
                "(base64 safetensors, see ophsd.rollout.weight_sync.serialize_for_embedded); SGLang's default "
                "payload carries CUDA IPC handles that only a colocated SGLang server can open"
            )
        payload = body.get("serialized_named_tensors")
        if not isinstance(payload, list) or len(payload) != 1 or not isinstance(payload[0], str):
            raise InvalidRequestError("/update_weights_from_tensor: serialized_named_tensors must be a list of one "
                                      "string (the embedded server has one TP rank)")

        def staged():
            try:
                tensors = deserialize_for_embedded(payload[0])
            except Exception as e:  # noqa: BLE001 - bad base64 / safetensors bytes
                raise InvalidRequestError(f"cannot decode serialized_named_tensors: {e}") from e
            return self.engine.stage_weights(tensors)

        return self._apply_update(body, staged, "update_weights_from_tensor")


class _Handler(BaseHTTPRequestHandler):
    server_ref: EmbeddedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs to logging (quiet by default)
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _send(self, code: int, payload=None, text: str | None = None):
        if text is not None:
            data, ctype = text.encode(), "text/plain; charset=utf-8"
        elif payload is None:
            data, ctype = b"", "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self, required: bool = True, weight_update: bool = False):
        lim = self.server_ref.limits
        limit, flag = ((lim.max_weight_update_bytes, "--max-weight-update-bytes") if weight_update
                       else (lim.max_body_bytes, "--max-body-bytes"))
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise _HTTPError(411, "chunked request bodies are not supported: send Content-Length")
            raw = b""
        else:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                self.close_connection = True  # where this body ends is unknown
                raise _HTTPError(400, f"bad Content-Length header {length[:40]!r}: expected a byte count >= 0")
            if n > limit:
                self.close_connection = True  # the body is not read
                raise _HTTPError(413, f"request body of {n} bytes is larger than the server's limit of {limit} "
                                      f"bytes ({flag})")
            try:
                raw = self.rfile.read(n)
            except TimeoutError:
                self.close_connection = True
                raise _HTTPError(408, f"request body of {n} bytes not received within {lim.read_timeout_s} s "
                                      "(--read-timeout)") from None
            if len(raw) < n:
                self.close_connection = True
                raise _HTTPError(400, f"request body ended after {len(raw)} of the {n} bytes of its Content-Length")
        self._consumed = True
        if not raw.strip():
            if required:
                raise _HTTPError(400, "this endpoint needs a JSON body")
            return {}
        depth = lim.max_json_depth
        try:
            body = json.loads(raw)
        except RecursionError:
            raise _HTTPError(400, f"JSON body nested deeper than the server's limit of {depth} levels "
                                  "(--max-json-depth)") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
            raise _HTTPError(400, f"malformed JSON body: {e}") from None
        if raw.count(b"[") + raw.count(b"{") > depth and _json_depth_exceeds(body, depth):
            raise _HTTPError(400, f"JSON body nested deeper than the server's limit of {depth} levels "
                                  "(--max-json-depth)")
        return body

    def _client_gone(self) -> bool:
        """True when the peer has closed (or reset) its side of the connection: EOF is readable."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _no_such_method(self):
        self.close_connection = True
        self._send(405, P.error_body(f"method {self.command} is not supported: use GET or POST", 405))

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _no_such_method

    def _dispatch(self, method: str):
        path = urlparse(self.path).path.rstrip("/") or "/"
        srv = self.server_ref
        eng = srv.engine
        self._consumed = self.headers.get("Content-Length") in (None, "0")
        try:
            if path in ("/health", "/ping"):
                return self._send(200)
            if path == "/health_generate":
                return self._send(200 if eng.health() else 503)
            if path in ("/get_model_info", "/model_info"):
                return self._send(200, srv.model_info())
            if path == "/get_weight_version":
                return self._send(200, {"weight_version": str(eng.weight_version)})
            if path == "/get_server_info":
                return self._send(200, {**srv.model_info(), **eng.stats(), "version": P.SGLANG_TARGET_VERSION})
            if path == "/flush_cache":
                n = eng.flush_cache()
                return self._send(200, text=f"Cache flushed.\n(prefix cache: {n} tokens dropped)\n")
            if method == "GET":
                raise _HTTPError(404 if path not in _POST_ROUTES else 405,
                                 f"no GET route {path}" + (" (use POST)" if path in _POST_ROUTES else ""))
            if path not in _POST_ROUTES:
                raise _HTTPError(404, f"unknown endpoint {path}; the embedded server implements: "
                                 + ", ".join(sorted(_POST_ROUTES | _GET_ROUTES)))
            if path == "/generate":
                return self._send(200, srv.generate(self._body(), client_gone=self._client_gone))
            if path == "/abort_request":
                body = P.check_fields(self._body(), P.ABORT_FIELDS, "/abort_request")
                rid, msg = body.get("rid"), body.get("abort_message")
                if rid is not None and not isinstance(rid, str):
                    raise InvalidRequestError(f"/abort_request: 'rid' must be a string (a request id or its "
                                              f"prefix), got {type(rid).__name__}")
                if msg is not None and not isinstance(msg, str):
                    raise InvalidRequestError("/abort_request: 'abort_message' must be a string")
                eng.abort(rid=rid or None, abort_all=bool(body.get("abort_all")),
                          message=msg or "aborted by /abort_request")
                return self._send(200)
            if path == "/update_weights_from_disk":
                return self._send(*srv.update_from_disk(self._body()))
            if path == "/update_weights_from_tensor":
                return self._send(*srv.update_from_tensor(self._body(weight_update=True)))
            if path == "/update_weight_version":
                body = P.check_fields(self._body(), P.UPDATE_VERSION_FIELDS, "/update_weight_version")
                v = P.parse_weight_version(body.get("new_version"))
                if v is None:
                    raise InvalidRequestError("/update_weight_version: new_version must be an integer string")
                if body.get("abort_all_requests", True):
                    eng.abort(abort_all=True, message="aborted for a weight version update")
                eng.set_weight_version(v)
                return self._send(200, {"success": True, "message": f"Weight version updated to {v}",
                                        "new_version": str(v)})
            if path == "/pause_generation":
                body = P.check_fields(self._body(required=False), P.PAUSE_FIELDS, "/pause_generation")
                mode = body.get("mode", "abort")
                if mode not in ("abort", "retract", "in_place"):
                    raise InvalidRequestError(f"/pause_generation: mode must be abort, retract or in_place, got {mode!r}")
                # abort: running requests end now with finish_reason abort. retract/in_place: the
                # embedded engine lets them finish on the current weights (never mixed versions).
                eng.pause_generation(abort=(mode == "abort"))
                return self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
            if path == "/continue_generation":
                self._body(required=False)
                eng.continue_generation()
                return self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
            if path == "/release_memory_occupation":
                P.check_fields(self._body(required=False), P.MEMORY_FIELDS, path)
                eng.release_memory()
                return self._send(200)
            if path == "/resume_memory_occupation":
                P.check_fields(self._body(required=False), P.MEMORY_FIELDS, path)
                eng.resume_memory()
                return self._send(200)
            if path in ("/init_weights_update_group", "/update_weights_from_distributed",
                        "/destroy_weights_update_group"):
                raise _HTTPError(400, f"{path} needs NCCL and a real SGLang server; the embedded server takes "
                                 "/update_weights_from_disk and /update_weights_from_tensor")
        except _HTTPError as e:
            self.close_connection |= not self._consumed  # unread body bytes would be taken for the next request
            return self._send(e.code, P.error_body(str(e), e.code))
        except InvalidRequestError as e:
            return self._send(400, P.error_body(str(e), 400))
        except EngineError as e:
            return self._send(503, P.error_body(str(e), 503))
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return None
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            log.exception("internal error on %s", path)
            return self._send(500, P.error_body(f"internal error: {type(e).__name__}: {e}", 500))


_GET_ROUTES = {"/health", "/health_generate", "/get_model_info", "/model_info", "/get_weight_version",
               "/get_server_info", "/flush_cache"}
_POST_ROUTES = {"/generate", "/abort_request", "/update_weights_from_disk", "/update_weights_from_tensor",
                "/update_weight_version", "/pause_generation", "/continue_generation",
                "/release_memory_occupation", "/resume_memory_occupation", "/init_weights_update_group",
                "/update_weights_from_distributed", "/destroy_weights_update_group", "/flush_cache"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ophsd.rollout.serve",
        description="Serve the embedded ophsd generation engine (transformers + KV cache, continuous batching) "
        f"over HTTP with SGLang's native API (SGLang {P.SGLANG_TARGET_VERSION} field names): POST /generate, "
        "GET /health_generate, GET /get_model_info (alias /model_info), GET /get_weight_version, "
        "POST /update_weights_from_disk, POST /update_weights_from_tensor, POST /flush_cache, "
        "POST /abort_request, POST /pause_generation, POST /continue_generation. "
        "Point SGLangEngine (or any SGLang client) at the printed URL.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m), HF model directory or .gguf file (default: %(default)s)")
    p.add_argument("--port", type=int, default=30000, help="TCP port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s; the API has no auth)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: %(default)s)")
    p.add_argument("--max-running", type=int, default=64, help="most sequences decoded together (default: %(default)s)")
    p.add_argument("--prefix-cache-tokens", type=int, default=32768,
                   help="prompt tokens whose KV the radix prefix cache keeps, LRU-evicted beyond; 0 turns it off "
                   "(default: %(default)s)")
    p.add_argument("--logprob-mode", choices=["temperature", "original"], default="temperature",
                   help="temperature: log_softmax(logits/T) like SGLang; original: like SGLANG_RETURN_ORIGINAL_LOGPROB=1")
    p.add_argument("--weight-version", type=int, default=0, help="initial weight version (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for requests without sampling_seed")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG logs every HTTP request)")
    d = ServerLimits()
    g = p.add_argument_group("per-request limits (a request beyond one gets a 4xx naming the flag)")
    g.add_argument("--max-n", type=int, default=d.max_n, help="most samples per prompt (default: %(default)s)")
    g.add_argument("--max-sequences", type=int, default=d.max_sequences,
                   help="most sequences (prompts x n) in one /generate (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="largest sampling_params.max_new_tokens (default: the model's context length)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context length)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body (default: %(default)s = 8 MiB)")
    g.add_argument("--max-weight-update-bytes", type=int, default=d.max_weight_update_bytes,
                   help="largest /update_weights_from_tensor body (default: %(default)s = 2 GiB)")
    g.add_argument("--max-json-depth", type=int, default=d.max_json_depth,
                   help="deepest nesting of JSON arrays/objects in a body (default: %(default)s)")
    g.add_argument("--read-timeout", type=int, default=d.read_timeout_s,
                   help="seconds a connection may stall while its request is read; then it is closed "
                        "(default: %(default)s)")
    return p


def limits_from_args(args) -> ServerLimits:
    return ServerLimits(max_n=args.max_n, max_sequences=args.max_sequences, max_new_tokens=args.max_new_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                        max_weight_update_bytes=args.max_weight_update_bytes, max_json_depth=args.max_json_depth,
                        read_timeout_s=args.read_timeout)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        limits = limits_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ophsd.models.hub import ModelNotFoundError

    t0 = time.time()
    try:
        engine = EmbeddedEngine(args.model, dtype=args.dtype, device=args.device, max_running=args.max_running,
                                logprob_mode=args.logprob_mode, seed=args.seed,
                                prefix_cache_tokens=args.prefix_cache_tokens)
    except (ModelNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.set_weight_version(args.weight_version)
    try:
        server = EmbeddedServer(engine, args.host, args.port, limits)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        engine.close()
        return 2
    print(f"ophsd embedded server ready on {server.url} (model {args.model}, loaded in {time.time() - t0:.1f}s)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
