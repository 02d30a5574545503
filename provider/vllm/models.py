"""The shapes the client takes and returns, and how vLLM's JSON answers become them.

Requests refuse unknown fields; answers keep only what callers use. Every model is JSON-serializable with
``model_dump(mode="json")``. The ``parse_*`` functions raise ``InvalidResponseError`` for a body that is not
vLLM's wire format.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from provider.vllm.errors import InvalidResponseError

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "CompletionResponse",
    "EmbedRequest",
    "EmbeddingResponse",
    "FunctionCall",
    "HealthCheck",
    "MetricsSnapshot",
    "ModelInfo",
    "ModelMetrics",
    "Readiness",
    "StreamChunk",
    "ThinkingOption",
    "TokenizeResult",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "parse_chat_response",
    "parse_completion_response",
    "parse_embedding_response",
    "parse_model_list",
    "parse_tokenize_result",
    "parse_usage",
]

_Parsed = TypeVar("_Parsed")

# Keys of ``extra_body`` that would break how the client reads the answer.
_EXTRA_BODY_FORBIDDEN = ("n", "stream")


class ThinkingOption(BaseModel):
    """A request's own thinking switch: ``{"enabled": bool}``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool


class ChatRequest(BaseModel):
    """One chat completion request in the fleet's vocabulary (``build_chat_payload`` makes vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int | None = None
    request_id: str | None = None
    thinking: ThinkingOption | None = None
    include_reasoning: bool = False
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    reasoning_effort: str | None = None
    max_thinking_tokens: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra_body")
    @classmethod
    def _refuse_shape_changing_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """``n`` and ``stream`` change the answer's shape, so they cannot ride in ``extra_body``."""
        refused = [key for key in _EXTRA_BODY_FORBIDDEN if key in value]
        if refused:
            raise ValueError(f"extra_body may not set {', '.join(refused)}")
        return value


class FunctionCall(BaseModel):
    """The function a tool call names, with its arguments as the model wrote them (a JSON string)."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One complete tool call."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int | None = None


class ChatResponse(BaseModel):
    """A finished chat completion: the answer, the reasoning apart from it, and any tool calls."""

    id: str
    model: str
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    logprobs: dict[str, Any] | None = None  # vLLM's ``choices[0].logprobs`` when asked (extra_body logprobs)


class CompletionResponse(BaseModel):
    """A finished plain completion (``/v1/completions``)."""

    id: str
    model: str
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


class ToolCallDelta(BaseModel):
    """One fragment of a streamed tool call; ``id``, ``type`` and ``name`` come with the first one."""

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str | None = None


class StreamChunk(BaseModel):
    """One streamed piece of a chat completion."""

    id: str | None = None
    model: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    logprobs: dict[str, Any] | None = None  # this chunk's ``logprobs`` (``{"content": [...]}``) when asked


class EmbedRequest(BaseModel):
    """Embed one text or a batch."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"


class EmbeddingResponse(BaseModel):
    """One vector per input, in input order."""

    model: str
    vectors: list[list[float]]
    usage: Usage | None = None


class ModelInfo(BaseModel):
    """One served model name; a LoRA adapter (with a ``parent``) inherits its parent's context window."""

    model_config = ConfigDict(frozen=True)

    id: str
    root: str | None = None
    parent: str | None = None
    owned_by: str | None = None
    max_model_len: int | None = None
    context_window: int | None = None


class TokenizeResult(BaseModel):
    """Token ids of a prompt or chat, and the model's context length."""

    count: int
    max_model_len: int | None = None
    tokens: list[int] = Field(default_factory=list)
    token_strs: list[str] | None = None


class ModelMetrics(BaseModel):
    """Load gauges and token counters of one served model."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class MetricsSnapshot(ModelMetrics):
    """The server's load summed over its models and engines (KV-cache usage: the fullest engine, 0..1)."""

    models: dict[str, ModelMetrics] = Field(default_factory=dict)


class HealthCheck(BaseModel):
    """Whether the model list was checked (only on a live server), whether it passed, and why not."""

    checked: bool = False
    ok: bool = False
    error: str | None = None


class Readiness(BaseModel):
    """Liveness (``/health``) and readiness (``/v1/models`` lists models) of one instance."""

    provider: Literal["vllm"] = "vllm"
    instance: str
    configured: bool
    ready: bool
    local: bool
    base_url: str
    live: bool
    endpoints: dict[str, str] = Field(default_factory=dict)
    health: HealthCheck = Field(default_factory=HealthCheck)
    models: list[str] = Field(default_factory=list)


def _parsed(what: str, parse: Callable[[], _Parsed]) -> _Parsed:
    """Run a parser, turning any shape mismatch into ``InvalidResponseError``."""
    try:
        return parse()
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, ValidationError) as exc:
        raise InvalidResponseError(f"unexpected {what} body from vLLM: {type(exc).__name__}: {exc}") from exc


def parse_usage(data: dict[str, Any]) -> Usage:
    """vLLM's usage object, with ``completion_tokens_details.reasoning_tokens`` lifted up."""
    details = data.get("completion_tokens_details")
    return Usage(
        prompt_tokens=data.get("prompt_tokens") or 0,
        completion_tokens=data.get("completion_tokens") or 0,
        total_tokens=data.get("total_tokens") or 0,
        reasoning_tokens=details.get("reasoning_tokens") if details else None,
    )


def _optional_usage(body: dict[str, Any]) -> Usage | None:
    data = body.get("usage")
    return parse_usage(data) if data else None


def parse_chat_response(body: Any) -> ChatResponse:
    """A non-streamed ``chat.completion``; reasoning from ``reasoning`` or the older ``reasoning_content``."""

    def parse() -> ChatResponse:
        choice = body["choices"][0]
        message = choice["message"]
        reasoning = message.get("reasoning")
        if reasoning is None:
            reasoning = message.get("reasoning_content")
        tool_calls = [
            ToolCall(
                id=call.get("id") or "",
                function=FunctionCall(name=call["function"]["name"], arguments=call["function"].get("arguments") or ""),
            )
            for call in message.get("tool_calls") or ()
        ]
        return ChatResponse(
            id=body["id"],
            model=body["model"],
            content=message.get("content") or None,
            reasoning=reasoning or None,
            tool_calls=tool_calls,
            finish_reason=choice.get("finish_reason"),
            stop_reason=choice.get("stop_reason"),
            usage=_optional_usage(body),
            logprobs=choice.get("logprobs") or None,
        )

    return _parsed("chat completion", parse)


def parse_completion_response(body: Any) -> CompletionResponse:
    """A non-streamed ``text_completion``."""

    def parse() -> CompletionResponse:
        choice = body["choices"][0]
        return CompletionResponse(
            id=body["id"],
            model=body["model"],
            text=choice["text"],
            finish_reason=choice.get("finish_reason"),
            stop_reason=choice.get("stop_reason"),
            usage=_optional_usage(body),
        )

    return _parsed("completion", parse)


def _decode_base64_vector(encoded: str) -> list[float]:
    """vLLM's base64 embedding: little-endian float32 values."""
    values = array.array("f", base64.b64decode(encoded, validate=True))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def parse_embedding_response(body: Any) -> EmbeddingResponse:
    """An embeddings list, float or base64, ordered by ``index``."""

    def parse() -> EmbeddingResponse:
        items = sorted(body["data"], key=lambda item: item["index"])
        vectors = [
            _decode_base64_vector(item["embedding"]) if isinstance(item["embedding"], str) else item["embedding"]
            for item in items
        ]
        return EmbeddingResponse(model=body["model"], vectors=vectors, usage=_optional_usage(body))

    return _parsed("embeddings", parse)


def parse_model_list(body: Any) -> list[ModelInfo]:
    """``/v1/models``; an adapter listed without ``max_model_len`` takes its parent's."""

    def parse() -> list[ModelInfo]:
        entries = body["data"]
        lengths = {entry["id"]: entry.get("max_model_len") for entry in entries}
        models = []
        for entry in entries:
            max_model_len = entry.get("max_model_len")
            parent = entry.get("parent")
            context_window = max_model_len
            if context_window is None and parent is not None:
                context_window = lengths.get(parent)
            models.append(
                ModelInfo(
                    id=entry["id"],
                    root=entry.get("root"),
                    parent=parent,
                    owned_by=entry.get("owned_by"),
                    max_model_len=max_model_len,
                    context_window=context_window,
                )
            )
        return models

    return _parsed("model list", parse)


def parse_tokenize_result(body: Any) -> TokenizeResult:
    """``/tokenize``."""
    return _parsed("tokenize", lambda: TokenizeResult.model_validate(body))
