"""Request bodies as vLLM validates them, and its 400 answer for a body that does not validate.

Only the fields the simulator acts on are declared; any other field is accepted and ignored, as vLLM does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import Response

from simulator.wire import error_response

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "ResponseFormat",
    "StreamOptions",
    "TokenizeRequest",
    "parse_body",
    "validation_error",
]

VALIDATION_ERROR_TYPE = "Bad Request"
UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"
DEFAULT_COMPLETION_MAX_TOKENS = 16

_BRACKETED_RE = re.compile(r"[\[\]{}()]")
_INTERNAL_LOC_PARTS = frozenset(
    {
        "function-wrap",
        "function-after",
        "function-before",
        "function-plain",
        "json-or-python",
        "lax-or-strict",
    }
    | {"chain", "default", "nullable", "tagged-union", "union", "str", "int", "float", "bool", "list", "dict"}
)


class _Body(BaseModel):
    """A request body: unknown fields accepted."""

    model_config = ConfigDict(extra="allow")


BodyT = TypeVar("BodyT", bound=_Body)


class StreamOptions(_Body):
    """``stream_options``: usage after the last chunk, or on every chunk."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Generation(_Body):
    """A generation request: ``stream_options`` only with ``stream``, as vLLM insists."""

    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Generation:
        """Reject ``stream_options`` on a request that does not stream."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return self


class ResponseFormat(_Body):
    """``response_format``: its ``type`` must be one vLLM knows; ``json_schema`` needs its schema."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        """Reject ``json_schema`` without the schema object."""
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema must be provided when response_format type is 'json_schema'")
        return self


class _Sampling(_Generation):
    """Sampling fields vLLM checks after validation (``SamplingParams``) or in the engine (logprobs)."""

    temperature: float | None = None
    stop: str | list[str] | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    model: str | None = None
    messages: list[dict[str, Any]]
    response_format: ResponseFormat | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: int = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    ignore_eos: bool = False
    request_id: str | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    model: str | None = None
    logprobs: int | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS
    min_tokens: int = 0
    ignore_eos: bool = False
    request_id: str | None = None


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    request_id: str | None = None


class TokenizeRequest(_Body):
    """``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


def _clean_loc(loc: Sequence[Any]) -> str:
    """A pydantic error location as vLLM prints it: dotted, without pydantic's internal schema markers."""
    parts = [str(part) for part in loc]
    kept = [part for part in parts if not _BRACKETED_RE.search(part) and part.lower() not in _INTERNAL_LOC_PARTS]
    return ".".join(kept or parts)


def validation_error(errors: Sequence[Any]) -> Response:
    """vLLM's 400 for a body that fails validation; ``errors`` are pydantic error dicts or plain strings."""
    items: list[Any] = []
    for error in errors:
        if isinstance(error, dict):
            item = {
                "type": error["type"],
                "loc": _clean_loc(("body", *error["loc"])),
                "msg": error["msg"],
                "input": error.get("input"),
            }
            if "ctx" in error:
                item["ctx"] = error["ctx"]
            items.append(item)
        else:
            items.append(error)
    label = "error" if len(items) == 1 else "errors"
    message = f"{len(items)} validation {label}:\n" + "".join(f"  {item}\n" for item in items)
    first = items[0] if items else None
    param = first["loc"] if isinstance(first, dict) else None
    return error_response(message.rstrip(), 400, VALIDATION_ERROR_TYPE, param)


async def parse_body(request: Request, schema: type[BodyT]) -> BodyT | Response:
    """The validated JSON body of ``request``, or vLLM's 400 answer explaining why there is none."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return validation_error([UNSUPPORTED_MEDIA_TYPE])
    raw = await request.body()
    if not raw.strip():
        return validation_error([{"type": "missing", "loc": (), "msg": "Field required", "input": None}])
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        position = exc.pos if isinstance(exc, json.JSONDecodeError) else exc.start
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
        error = {"type": "json_invalid", "loc": (position,), "msg": "JSON decode error", "input": {}}
        return validation_error([{**error, "ctx": {"error": reason}}])
    request.state.body = data
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        return validation_error(exc.errors(include_url=False))
