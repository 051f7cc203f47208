"""Request bodies of the embedded server as pydantic models, named and shaped like SGLang's.

SGLang declares its request dataclasses in ``python/sglang/srt/managers/io_struct.py`` and answers
errors with ``ErrorResponse`` (``entrypoints/http_server.py``). These models list the fields the
embedded server accepts; those it uses as data are strictly typed (JSON has no implicit casts:
``"3"`` is not an int, ``1.0`` is not a token id). :func:`validate` turns a body into a model or an
:class:`~ophsd.rollout.base.InvalidRequestError` whose message names the route and the field: the
server's 400, never FastAPI's 422. Semantic checks (limits, exclusive fields, what the embedded
engine does not implement) stay in :mod:`ophsd.rollout.serve`.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ophsd.rollout.base import InvalidRequestError

NonEmpty = Field(min_length=1)


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    route: ClassVar[str]
    # SGLang fields the embedded server knows but does not implement: their own 400.
    unsupported: ClassVar[frozenset[str]] = frozenset()
    # field -> the 400's message when its value has the wrong type: a template (``{route}``,
    # ``{got}``: the JSON type received) or a function of the value.
    messages: ClassVar[dict[str, Any]] = {}


def _got(v) -> str:
    return type(v).__name__


def validate(model: type[_Req], body: Any, route: str | None = None) -> _Req:
    """``body`` (parsed JSON) -> ``model``, or the 400 the server answers: unknown fields first
    (like SGLang's dataclass constructor), then the first wrongly typed field."""
    route = route or model.route
    if not isinstance(body, dict):
        raise InvalidRequestError(f"{route}: the JSON body must be an object, got {_got(body)}")
    known = model.model_fields
    for k in body:
        if k in model.unsupported:
            raise InvalidRequestError(f"{route}: field {k!r} is an SGLang option the embedded server does not "
                                      "implement")
        if k not in known:
            raise InvalidRequestError(f"{route}: unknown field {k!r}; known fields: {', '.join(sorted(known))}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        field = str(e.errors(include_url=False)[0]["loc"][0])
        value = body.get(field)
        msg = model.messages.get(field, "{route}: field {field!r} has the wrong type ({got}): {detail}")
        msg = msg(value) if callable(msg) else msg
        raise InvalidRequestError(msg.format(route=route, got=_got(value), field=field,
                                             detail=e.errors(include_url=False)[0]["msg"])) from None


# A field whose value the server reads by truthiness or compares itself (flags such as ``stream``,
# values it accepts only in their default), or ignores: any JSON value passes validation, as it
# does in SGLang's unvalidated dataclasses, and the route decides.
Unchecked = Any


class GenerateReqInput(_Req):
    """SGLang's ``GenerateReqInput``: one prompt or a batch (``text`` or ``input_ids``)."""

    route = "/generate"
    unsupported = frozenset({
        "input_embeds", "image_data", "video_data", "audio_data", "return_hidden_states",
        "modalities", "session_params", "session_id", "lora_id", "return_routed_experts",
        "background", "require_reasoning", "extra_key", "custom_labels", "return_bytes",
        "return_entropy", "return_prompt_token_ids", "external_trace_header", "conversation_id",
        "cache_salt", "no_logs", "max_thinking_tokens",
    })
    messages = {
        "text": "{route}: 'text' must be a string or a non-empty list of strings",
        "input_ids": lambda v: ("{route}: 'input_ids' must hold integers only" if isinstance(v, list) and v else
                                "{route}: 'input_ids' must be a non-empty list of ints or of lists of ints"),
        "sampling_params": lambda v: "sampling_params must be an object, got " + _got(
            next((x for x in v if not isinstance(x, dict)), v) if isinstance(v, list) else v),
        "rid": lambda v: ("{route}: for a batch, 'rid' must be a list of strings, one per prompt"
                          if isinstance(v, list) else "{route}: 'rid' must be a string"),
    }

    text: str | Annotated[list[str], NonEmpty] | None = None
    input_ids: Annotated[list[int], NonEmpty] | Annotated[list[list[int]], NonEmpty] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: Unchecked = None  # a flag, or a list of flags (one per prompt)
    stream: Unchecked = None
    logprob_start_len: Unchecked = None  # only -1
    top_logprobs_num: Unchecked = None  # only 0
    return_text_in_logprobs: Unchecked = None
    log_metrics: Unchecked = None
    token_ids_logprob: Unchecked = None  # SGLang options not implemented: only null
    lora_path: Unchecked = None
    custom_logit_processor: Unchecked = None
    bootstrap_host: Unchecked = None
    priority: Unchecked = None
    routed_dp_rank: Unchecked = None
    data_parallel_rank: Unchecked = None
    bootstrap_port: Unchecked = None
    bootstrap_room: Unchecked = None


class UpdateWeightFromDiskReqInput(_Req):
    route = "/update_weights_from_disk"
    messages = {"model_path": "{route}: 'model_path' (a directory of .safetensors) is required"}

    model_path: str
    load_format: Unchecked = None  # auto or safetensors
    abort_all_requests: Unchecked = False
    weight_version: Unchecked = None  # SGLang: a string; the embedded server wants an integer in it
    is_async: Unchecked = None
    torch_empty_cache: Unchecked = None
    keep_pause: Unchecked = None
    recapture_cuda_graph: Unchecked = None
    token_step: Unchecked = None
    flush_cache: Unchecked = None
    rid: Unchecked = None
    manifest: Unchecked = None


class UpdateWeightsFromTensorReqInput(_Req):
    route = "/update_weights_from_tensor"
    messages = {"serialized_named_tensors": "{route}: serialized_named_tensors must be a list of one string (the "
                                            "embedded server has one TP rank)"}

    serialized_named_tensors: list[str] | None = None
    load_format: Unchecked = None
    flush_cache: Unchecked = None
    abort_all_requests: Unchecked = False
    weight_version: Unchecked = None
    rid: Unchecked = None


class AbortReq(_Req):
    route = "/abort_request"
    messages = {"rid": "{route}: 'rid' must be a string (a request id or its prefix), got {got}",
                "abort_message": "{route}: 'abort_message' must be a string"}

    rid: str | None = None
    abort_all: Unchecked = False
    finished_reason: Unchecked = None
    abort_message: str | None = None


class UpdateWeightVersionReqInput(_Req):
    route = "/update_weight_version"
    messages = {"new_version": "{route}: new_version must be an integer string"}

    new_version: str | int
    abort_all_requests: Unchecked = True
    rid: Unchecked = None


class PauseGenerationReqInput(_Req):
    route = "/pause_generation"

    mode: Unchecked = "abort"  # abort, retract or in_place
    rid: Unchecked = None


class MemoryOccupationReqInput(_Req):
    """SGLang's ``ReleaseMemoryOccupationReqInput`` / ``ResumeMemoryOccupationReqInput`` (same fields)."""

    route = "/release_memory_occupation"
    tags: Unchecked = None
    rid: Unchecked = None


class ErrorResponse(BaseModel):
    """SGLang's error answer (``object`` is always ``"error"``)."""

    object: str = "error"
    message: str
    type: str
    param: str | None = None
    code: int
