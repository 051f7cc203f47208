"""Serve an :class:`~ophsd.rollout.embedded.EmbeddedEngine` over HTTP with SGLang's native API.

    python -m ophsd.rollout.serve --model smollm2-135m --port 30000 [--host 127.0.0.1]

Endpoints and JSON field names are SGLang's (see :mod:`ophsd.rollout.protocol` for the version and
source files), served on SGLang's own stack (FastAPI on uvicorn, request bodies as the pydantic
models of :mod:`ophsd.rollout.io_struct`): the SGLang client
(:class:`ophsd.rollout.sglang.SGLangEngine`) and SGLang's own tools talk to it unchanged. The event
loop waits on the engine's futures, and the engine batches the requests of all connections
together. Bad requests get a 4xx JSON error (SGLang's ``ErrorResponse``) and the server keeps
serving. One request cannot take the server down: :class:`ServerLimits` bounds body size, JSON
nesting, the time a body may take to arrive, ``n``, sequences per request, ``max_new_tokens`` and
prompt length (each a flag, each named in its 4xx), all checked before anything is tokenized or
queued; a request whose client has disconnected is aborted between decode steps.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus

import h11
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from ophsd.rollout import io_struct as io
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
    # Seconds a connection may stall while the server reads a request body: a client that
    # announces more bytes than it sends must not hold its connection forever.
    read_timeout_s: int = 60

    def __post_init__(self):
        for k, v in vars(self).items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 1, got {v!r}")


class _HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _ClientGone(Exception):
    """The client closed its connection: its work was aborted and nobody reads an answer."""


class _JSON(JSONResponse):
    """``json.dumps`` defaults, as SGLang's clients expect: ASCII escapes (a lone surrogate echoed
    in an error message stays encodable) and NaN/Infinity allowed (a ``-inf`` logprob is data)."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode()


def error_response(code: int, message: str, close: bool = False) -> _JSON:
    """SGLang's ``ErrorResponse``; ``close``: the connection ends after it (unread or unparsable bytes)."""
    body = io.ErrorResponse(message=message, type=HTTPStatus(code).phrase, code=code).model_dump()
    return _JSON(body, status_code=code, headers={"Connection": "close"} if close else None)


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


def parse_json(raw: bytes | bytearray, max_depth: int, required: bool = True):
    """A request body -> JSON, with the server's 400s: empty, malformed, nested too deep."""
    if not raw or raw.isspace():
        if required:
            raise _HTTPError(400, "this endpoint needs a JSON body")
        return {}
    depth_error = f"JSON body nested deeper than the server's limit of {max_depth} levels (--max-json-depth)"
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _HTTPError(400, depth_error) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise _HTTPError(400, f"malformed JSON body: {e}") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth and _json_depth_exceeds(body, max_depth):
        raise _HTTPError(400, depth_error)
    return body


class _RequestGuard:
    """ASGI middleware: what is decided before any route or parser sees a request. Methods other
    than GET/POST/PUT (405), chunked bodies (411), a Content-Length over the limit (413, nothing
    read) and a body that stalls for ``--read-timeout`` (408) end the connection; the body, read
    whole, waits in ``request.state.body`` (the routes' JSON dependency parses it). Paths lose a
    trailing slash."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["path"] = scope["path"].rstrip("/") or "/"
        try:
            scope.setdefault("state", {})["body"] = await self._read(scope, receive)
        except _HTTPError as e:
            return await error_response(e.code, str(e), close=True)(scope, receive, send)
        except _ClientGone:
            return None
        await self.app(scope, receive, send)  # receive now only tells when the client disconnects

    async def _read(self, scope, receive) -> bytearray:
        lim, method = self.limits, scope["method"]
        if method not in ("GET", "POST", "PUT"):
            raise _HTTPError(405, f"method {method} is not supported: use GET or POST")
        headers = dict(scope["headers"])
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            raise _HTTPError(411, "chunked request bodies are not supported: send Content-Length")
        n = int(headers.get(b"content-length", 0))  # h11 has already answered a malformed one (_H11)
        limit, flag = ((lim.max_weight_update_bytes, "--max-weight-update-bytes")
                       if scope["path"] == "/update_weights_from_tensor" else (lim.max_body_bytes, "--max-body-bytes"))
        if n > limit:
            raise _HTTPError(413, f"request body of {n} bytes is larger than the server's limit of {limit} "
                                  f"bytes ({flag})")
        body, got, more = bytearray(n), 0, n > 0  # one buffer: a 2 GiB weight update is not copied
        while more:
            try:
                msg = await asyncio.wait_for(receive(), lim.read_timeout_s)
            except TimeoutError:
                raise _HTTPError(408, f"request body of {n} bytes not received within {lim.read_timeout_s} s "
                                      "(--read-timeout)") from None
            if msg["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = msg.get("body", b"")
            body[got:got + len(chunk)] = chunk
            got += len(chunk)
            more = msg.get("more_body", False)
        return body


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two of the server's rules: what h11 rejects before the app
    runs (a Content-Length that is not a byte count, malformed headers) gets the server's JSON 4xx,
    and a connection whose request head does not arrive within ``read_timeout_s`` is closed."""

    read_timeout_s: int = ServerLimits.read_timeout_s  # per server: a subclass sets its --read-timeout

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_head()

    def _expect_head(self) -> None:
        cycle = self.cycle

        def expire():  # no new request since: the client stalls in its headers (or is idle)
            if self.cycle is cycle and (cycle is None or cycle.response_complete):
                self.transport.close()

        self.loop.call_later(self.read_timeout_s, expire)

    def send_400_response(self, msg: str) -> None:
        exc = sys.exc_info()[1]  # called while uvicorn handles h11's RemoteProtocolError
        code = getattr(exc, "error_status_hint", 400)
        code = code if 400 <= code < 500 else 400
        data = json.dumps(io.ErrorResponse(message=f"malformed HTTP request: {exc or msg}",
                                           type=HTTPStatus(code).phrase, code=code).model_dump()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=code, headers=headers), h11.Data(data=data), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _wait_for_engine(eng: EmbeddedEngine, futs, receive) -> None:
    """Wait until every future is done or one failed; a client that hangs up meanwhile (or a server
    that shuts down) has its sequences aborted."""
    waiting = {asyncio.wrap_future(f) for f in futs}
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        while waiting:
            done, waiting = await asyncio.wait(waiting | {gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                raise _ClientGone()
            waiting.discard(gone)
            if any(f.cancelled() or f.exception() is not None for f in done):
                return
    except (_ClientGone, asyncio.CancelledError):
        eng.cancel(futs, "aborted: the client disconnected")
        raise
    finally:
        gone.cancel()


class EmbeddedServer:
    """The HTTP front of one engine. ``start()`` serves in a background thread (tests, trainer);
    ``serve_forever()`` blocks (the CLI). The port is bound at construction (``port=0``: a free one)."""

    def __init__(self, engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                 limits: ServerLimits | None = None):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        # An idle keep-alive connection is closed after --read-timeout, like a stalled one; the
        # client's pool (httpx: 5 s) lets its idle connections go before that.
        timeout = self.limits.read_timeout_s
        protocol = type("_H11", (_H11,), {"read_timeout_s": timeout})
        config = uvicorn.Config(create_app(self), http=protocol, lifespan="off", log_config=None,
                                access_log=log.isEnabledFor(logging.DEBUG), timeout_keep_alive=timeout,
                                timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._update_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "EmbeddedServer":
        self._thread = threading.Thread(target=self.serve_forever, name="ophsd-serve", daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            time.sleep(0.005)
        return self

    def serve_forever(self):
        self._uvicorn.run(sockets=[self._sock])

    def shutdown(self, close_engine: bool = False):
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self._sock.close()
        if close_engine:
            self.engine.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ---------------------------------------------------------------- endpoint logic
    async def generate(self, body, receive):
        """``/generate``: checked, tokenized and queued in a worker thread (the event loop stays
        free), then awaited; a client that disconnects while it waits has its sequences aborted."""
        single, with_text, groups, samplings = await run_in_threadpool(self._submit, body)
        eng = self.engine
        await _wait_for_engine(eng, [f for g in groups for f in g], receive)
        outs = []
        for futs, sp in zip(groups, samplings):
            for f in futs:
                c = f.result()
                texts = ([eng.tokenizer.decode([t]) for t in c.output_ids]
                         if (with_text and sp.return_logprob) else None)
                outs.append(P.completion_to_sglang(c, sp.return_logprob, texts))
        return outs[0] if single and len(outs) == 1 else outs

    def _submit(self, body):
        """Every check (fields, types, limits) before anything is tokenized or queued; then queue."""
        req = io.validate(io.GenerateReqInput, body)
        eng = self.engine
        if req.stream:
            raise InvalidRequestError("/generate: stream=true is not supported by the embedded server")
        for k in ("lora_path", "custom_logit_processor", "token_ids_logprob", "bootstrap_host"):
            if getattr(req, k) is not None:
                raise InvalidRequestError(f"/generate: field {k!r} is an SGLang option the embedded server does not implement")
        if req.top_logprobs_num not in (None, 0):
            raise InvalidRequestError("/generate: top_logprobs_num > 0 is not supported (only sampled-token logprobs)")
        if req.logprob_start_len not in (None, -1):
            raise InvalidRequestError("/generate: logprob_start_len >= 0 (prompt logprobs) is not supported")
        text, ids = req.text, req.input_ids
        if (text is None) == (ids is None):
            raise InvalidRequestError("/generate: give exactly one of 'text' or 'input_ids'")
        if text is not None:
            single = isinstance(text, str)
            prompts = [text] if single else text
            for t in prompts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InvalidRequestError(f"/generate: 'text' is not valid Unicode ({e.reason} at "
                                              f"character {e.start})") from None
        else:
            single = not isinstance(ids[0], list)
            prompts = [ids] if single else ids
        n = len(prompts)
        sps = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params] * n
        rls = req.return_logprob if isinstance(req.return_logprob, list) else [bool(req.return_logprob)] * n
        if len(sps) != n or len(rls) != n:
            raise InvalidRequestError(f"/generate: {n} prompts but {len(sps)} sampling_params / {len(rls)} return_logprob")
        samplings = [P.sampling_from_sglang(s, r) for s, r in zip(sps, rls)]
        self._check_limits(samplings)
        rid = req.rid
        if single and not isinstance(rid, list):
            rids = [rid]
        elif not single and rid is None:
            rids = [None] * n
        elif not single and isinstance(rid, list) and len(rid) == n:
            rids = rid
        elif single:
            raise InvalidRequestError("/generate: 'rid' must be a string")
        else:
            raise InvalidRequestError("/generate: for a batch, 'rid' must be a list of strings, one per prompt")
        if text is not None:
            prompts = [eng.tokenize(t) for t in prompts]
        max_prompt = self.limits.max_prompt_tokens or eng.max_context
        for p in prompts:
            if len(p) > max_prompt:
                raise InvalidRequestError(
                    f"/generate: a prompt of {len(p)} tokens is longer than the server's limit of {max_prompt} "
                    f"(--max-prompt-tokens; the model's context length is {eng.max_context})")
        groups = eng.submit_many(list(zip(prompts, samplings)), rids)
        return single, bool(req.return_text_in_logprobs), groups, samplings

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

    def _apply_update(self, req, staged_fn, what):
        eng = self.engine
        version = req.weight_version
        try:
            staged = staged_fn()
            with self._update_lock:
                if req.abort_all_requests:
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

        req = io.validate(io.UpdateWeightFromDiskReqInput, body)
        if not req.model_path:
            raise InvalidRequestError("/update_weights_from_disk: 'model_path' (a directory of .safetensors) is required")
        if req.load_format not in (None, "auto", "safetensors"):
            raise InvalidRequestError("/update_weights_from_disk: load_format must be auto or safetensors")
        return self._apply_update(req, lambda: self.engine.stage_weights(load_safetensors_dir(req.model_path)),
                                  "update_weights_from_disk")

    def update_from_tensor(self, body):
        from ophsd.rollout.weight_sync import EMBEDDED_TENSOR_FORMAT, deserialize_for_embedded

        req = io.validate(io.UpdateWeightsFromTensorReqInput, body)
        if req.load_format != EMBEDDED_TENSOR_FORMAT:
            raise InvalidRequestError(
                f"/update_weights_from_tensor: the embedded server takes load_format={EMBEDDED_TENSOR_FORMAT!r} "
                "(base64 safetensors, see ophsd.rollout.weight_sync.serialize_for_embedded); SGLang's default "
                "payload carries CUDA IPC handles that only a colocated SGLang server can open"
            )
        if req.serialized_named_tensors is None or len(req.serialized_named_tensors) != 1:
            raise InvalidRequestError("/update_weights_from_tensor: serialized_named_tensors must be a list of one "
                                      "string (the embedded server has one TP rank)")

        def staged():
            try:
                tensors = deserialize_for_embedded(req.serialized_named_tensors[0])
            except Exception as e:  # noqa: BLE001 - bad base64 / safetensors bytes
                raise InvalidRequestError(f"cannot decode serialized_named_tensors: {e}") from e
            return self.engine.stage_weights(tensors)

        return self._apply_update(req, staged, "update_weights_from_tensor")


GET_ROUTES = {"/health", "/health_generate", "/get_model_info", "/model_info", "/get_weight_version",
              "/get_server_info", "/flush_cache"}
POST_ROUTES = {"/generate", "/abort_request", "/update_weights_from_disk", "/update_weights_from_tensor",
               "/update_weight_version", "/pause_generation", "/continue_generation",
               "/release_memory_occupation", "/resume_memory_occupation", "/init_weights_update_group",
               "/update_weights_from_distributed", "/destroy_weights_update_group", "/flush_cache"}
# Like the server it replaces, an info route answers whatever its method (of the three allowed).
ANY = ["GET", "POST", "PUT"]
POST = ["POST", "PUT"]  # SGLang's /generate takes PUT too


def create_app(srv: EmbeddedServer) -> FastAPI:
    """The routes of :class:`EmbeddedServer`; blocking engine calls are plain ``def`` (FastAPI runs
    them in its thread pool), ``/generate`` waits on the engine's futures in the event loop."""
    eng, depth = srv.engine, srv.limits.max_json_depth
    app = FastAPI(title="ophsd embedded server", openapi_url=None, docs_url=None, redoc_url=None,
                  redirect_slashes=False, default_response_class=_JSON)
    app.add_middleware(_RequestGuard, limits=srv.limits)

    async def body(request: Request):
        return await run_in_threadpool(parse_json, request.state.body, depth)

    async def optional_body(request: Request):
        return await run_in_threadpool(parse_json, request.state.body, depth, False)

    @app.exception_handler(_HTTPError)
    async def _http_error(_, e: _HTTPError):
        return error_response(e.code, str(e))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_, e):
        return error_response(400, str(e))

    @app.exception_handler(EngineError)
    async def _engine_error(_, e):
        return error_response(503, str(e))

    @app.exception_handler(_ClientGone)
    async def _gone(_, e):
        return error_response(400, "the client disconnected")  # nobody reads it

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # a bug must not kill the server
        log.error("internal error on %s", request.scope["path"], exc_info=e)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    ok = PlainTextResponse  # SGLang's bare 200 for health and control calls

    @app.api_route("/health", methods=ANY)
    @app.api_route("/ping", methods=ANY)
    def health():
        return ok("")

    @app.api_route("/health_generate", methods=ANY)
    def health_generate():
        return ok("", status_code=200 if eng.health() else 503)

    @app.api_route("/get_model_info", methods=ANY)
    @app.api_route("/model_info", methods=ANY)
    def get_model_info():
        return srv.model_info()

    @app.api_route("/get_weight_version", methods=ANY)
    def get_weight_version():
        return {"weight_version": str(eng.weight_version)}

    @app.api_route("/get_server_info", methods=ANY)
    def get_server_info():
        return {**srv.model_info(), **eng.stats(), "version": P.SGLANG_TARGET_VERSION}

    @app.api_route("/flush_cache", methods=ANY)
    def flush_cache():
        return ok(f"Cache flushed.\n(prefix cache: {eng.flush_cache()} tokens dropped)\n")

    @app.api_route("/generate", methods=POST)
    async def generate(request: Request, b=Depends(body)):
        return _JSON(await srv.generate(b, request.receive))

    @app.api_route("/abort_request", methods=POST)
    def abort_request(b=Depends(body)):
        req = io.validate(io.AbortReq, b)
        eng.abort(rid=req.rid or None, abort_all=bool(req.abort_all),
                  message=req.abort_message or "aborted by /abort_request")
        return ok("")

    @app.api_route("/update_weights_from_disk", methods=POST)
    def update_weights_from_disk(b=Depends(body)):
        code, payload = srv.update_from_disk(b)
        return _JSON(payload, status_code=code)

    @app.api_route("/update_weights_from_tensor", methods=POST)
    def update_weights_from_tensor(b=Depends(body)):
        code, payload = srv.update_from_tensor(b)
        return _JSON(payload, status_code=code)

    @app.api_route("/update_weight_version", methods=POST)
    def update_weight_version(b=Depends(body)):
        req = io.validate(io.UpdateWeightVersionReqInput, b)
        v = P.parse_weight_version(req.new_version)
        if v is None:
            raise InvalidRequestError("/update_weight_version: new_version must be an integer string")
        if req.abort_all_requests:
            eng.abort(abort_all=True, message="aborted for a weight version update")
        eng.set_weight_version(v)
        return {"success": True, "message": f"Weight version updated to {v}", "new_version": str(v)}

    @app.api_route("/pause_generation", methods=POST)
    def pause_generation(b=Depends(optional_body)):
        mode = io.validate(io.PauseGenerationReqInput, b).mode
        if mode not in ("abort", "retract", "in_place"):
            raise InvalidRequestError(f"/pause_generation: mode must be abort, retract or in_place, got {mode!r}")
        # abort: running requests end now with finish_reason abort. retract/in_place: the
        # embedded engine lets them finish on the current weights (never mixed versions).
        eng.pause_generation(abort=(mode == "abort"))
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.api_route("/continue_generation", methods=POST)
    def continue_generation(_=Depends(optional_body)):
        eng.continue_generation()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/release_memory_occupation", methods=POST)
    def release_memory_occupation(b=Depends(optional_body)):
        io.validate(io.MemoryOccupationReqInput, b, "/release_memory_occupation")
        eng.release_memory()
        return ok("")

    @app.api_route("/resume_memory_occupation", methods=POST)
    def resume_memory_occupation(b=Depends(optional_body)):
        io.validate(io.MemoryOccupationReqInput, b, "/resume_memory_occupation")
        eng.resume_memory()
        return ok("")

    @app.api_route("/init_weights_update_group", methods=POST)
    @app.api_route("/update_weights_from_distributed", methods=POST)
    @app.api_route("/destroy_weights_update_group", methods=POST)
    def nccl_routes(request: Request):
        raise _HTTPError(400, f"{request.scope['path']} needs NCCL and a real SGLang server; the embedded server takes "
                              "/update_weights_from_disk and /update_weights_from_tensor")

    @app.api_route("/{path:path}", methods=ANY, include_in_schema=False)
    def not_found(request: Request):
        path, method = request.scope["path"], request.method
        if method == "GET":
            raise _HTTPError(405 if path in POST_ROUTES else 404,
                             f"no GET route {path}" + (" (use POST)" if path in POST_ROUTES else ""))
        raise _HTTPError(404, f"unknown endpoint {path}; the embedded server implements: "
                         + ", ".join(sorted(POST_ROUTES | GET_ROUTES)))

    return app


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
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
    finally:
        server.shutdown(close_engine=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
