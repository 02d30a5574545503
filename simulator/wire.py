"""vLLM's wire format: compact JSON bodies, error shapes and the SSE chunks of chat and text completions.

Every key order and null field here follows the answers of a real vLLM 0.32 server
(``tests/data/vllm/``). Stream chunks are assembled from precomputed string prefixes so that a token
costs one ``json.dumps`` of its text.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.responses import Response

from simulator.config import ReasoningField
from simulator.generation import CONTENT, REASONING, TOOL_ARGS, TOOL_NAME, ToolCall

__all__ = [
    "BUSY_MESSAGE",
    "DONE_FRAME",
    "JSON_MEDIA_TYPE",
    "KEEPALIVE_FRAME",
    "SSE_MEDIA_TYPE",
    "ChatChunkWriter",
    "CompletionChunkWriter",
    "detail_response",
    "dumps",
    "error_body",
    "error_frame",
    "error_response",
    "error_type_for",
    "json_response",
    "logprob_entry",
    "reasoning_keys",
]

JSON_MEDIA_TYPE = "application/json"
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
DONE_FRAME = "data: [DONE]\n\n"
KEEPALIVE_FRAME = ": keep-alive\n\n"
BUSY_MESSAGE = "The engine is currently busy. Please try again later."

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def dumps(value: Any) -> str:
    """Compact JSON as vLLM writes it (no spaces, UTF-8 kept)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_response(value: Any, status_code: int = 200) -> Response:
    """A JSON answer with vLLM's content type."""
    return Response(dumps(value), status_code=status_code, media_type=JSON_MEDIA_TYPE)


def detail_response(status_code: int) -> Response:
    """FastAPI's own error answer (``{"detail": "Not Found"}``), used for routes a server does not have."""
    return json_response({"detail": HTTPStatus(status_code).phrase}, status_code)


def error_type_for(status_code: int) -> str:
    """vLLM's error ``type`` for an HTTP status ("NotFoundError", "ServiceUnavailableError", ...)."""
    known = _ERROR_TYPES.get(status_code)
    if known is not None:
        return known
    name = HTTPStatus(status_code).phrase.replace(" ", "").replace("-", "")
    return name if name.endswith("Error") else name + "Error"


def error_body(
    message: str, status_code: int, error_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """vLLM's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": error_type or error_type_for(status_code),
            "param": param,
            "code": status_code,
        }
    }


def error_response(message: str, status_code: int, error_type: str | None = None, param: str | None = None) -> Response:
    """An error answer in vLLM's shape."""
    return json_response(error_body(message, status_code, error_type, param), status_code)


def error_frame(message: str, status_code: int, error_type: str | None = None, param: str | None = None) -> str:
    """The SSE frame of an error inside a 200 stream (vLLM writes it with ``json.dumps`` defaults)."""
    return f"data: {json.dumps(error_body(message, status_code, error_type, param))}\n\n"


def logprob_entry(text: str, top_logprobs: int) -> dict[str, Any]:
    """vLLM's logprobs of one generated token: the token, a made-up logprob, its bytes and ``top_logprobs``
    alternatives (the token itself first)."""
    alternatives = [text, *(f"{text}~{rank}" for rank in range(1, top_logprobs))][:top_logprobs]
    return {
        "token": text,
        "logprob": -0.25,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": token, "logprob": -0.25 * (rank + 1), "bytes": list(token.encode())}
            for rank, token in enumerate(alternatives)
        ],
    }


def reasoning_keys(field: ReasoningField) -> tuple[str, ...]:
    """The message keys that carry reasoning for a server of this generation."""
    if field == "both":
        return ("reasoning_content", "reasoning")
    return (field,)


def _usage(prompt_tokens: int, completion_tokens: int) -> str:
    """The opening of a usage object (its three counts), left open for more keys."""
    return (
        f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens + completion_tokens},'
        f'"completion_tokens":{completion_tokens}'
    )


class ChatChunkWriter:
    """Formats the SSE frames of one streamed chat completion."""

    def __init__(
        self,
        *,
        request_id: str,
        created: int,
        model: str,
        fingerprint: str,
        prompt_tokens: int,
        reasoning_field: ReasoningField,
        reasoning_details: bool,
        continuous_usage: bool,
        tool_call: ToolCall | None,
    ) -> None:
        self._head = (
            f'data: {{"id":{dumps(request_id)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{dumps(model)},"choices":'
        )
        self._fingerprint = dumps(fingerprint)
        self._prompt_tokens = prompt_tokens
        self._reasoning_keys = reasoning_keys(reasoning_field)
        self._reasoning_details = reasoning_details
        self._continuous = continuous_usage
        self._tool_head = ""
        if tool_call is not None:
            self._tool_head = (
                f'{{"content":null,"tool_calls":[{{"id":{dumps(tool_call.id)},"type":"function",'
                f'"index":0,"function":{{"name":'
            )

    def _details(self, reasoning_tokens: int) -> str:
        """The ``completion_tokens_details`` value: reasoning counts on a server with a reasoning parser."""
        return f'{{"reasoning_tokens":{reasoning_tokens}}}' if self._reasoning_details else "null"

    def _running_usage(self, completion_tokens: int, reasoning_tokens: int) -> str:
        """The ``usage`` member of a chunk under ``continuous_usage_stats`` ('' otherwise)."""
        if not self._continuous:
            return ""
        usage = _usage(self._prompt_tokens, completion_tokens)
        return f',"usage":{usage},"completion_tokens_details":{self._details(reasoning_tokens)}}}'

    def delta(self, channel: int, text: str) -> str:
        """The JSON of one token's delta."""
        if channel == CONTENT:
            return f'{{"content":{dumps(text)}}}'
        if channel == REASONING:
            value = dumps(text)
            return "{" + ",".join(f'"{key}":{value}' for key in self._reasoning_keys) + "}"
        if channel == TOOL_NAME:
            return f"{self._tool_head}{dumps(text)}}}}}]}}"
        if channel == TOOL_ARGS:
            return f'{{"content":null,"tool_calls":[{{"index":0,"function":{{"arguments":{dumps(text)}}}}}]}}'
        raise ValueError(f"unknown channel {channel}")

    def opening(self) -> str:
        """The first chunk: the assistant role with empty content."""
        return (
            f'{self._head}[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
            f'"finish_reason":null}}]{self._running_usage(0, 0)},'
            '"prompt_token_ids":null,"prompt_text":null}\n\n'
        )

    def token(self, delta: str, completion_tokens: int, reasoning_tokens: int, logprobs: str = "null") -> str:
        """A chunk carrying one token's delta (and its ``logprobs`` JSON when they were asked for)."""
        return (
            f'{self._head}[{{"index":0,"delta":{delta},"logprobs":{logprobs},"finish_reason":null,"token_ids":null}}]'
            f"{self._running_usage(completion_tokens, reasoning_tokens)}}}\n\n"
        )

    def finish(
        self, delta: str, finish_reason: str, completion_tokens: int, reasoning_tokens: int, logprobs: str = "null"
    ) -> str:
        """The last choice chunk: its delta (``{}`` at a natural end), finish reason and stop reason."""
        return (
            f'{self._head}[{{"index":0,"delta":{delta},"logprobs":{logprobs},"finish_reason":{dumps(finish_reason)},'
            f'"stop_reason":null,"token_ids":null}}]'
            f"{self._running_usage(completion_tokens, reasoning_tokens)}}}\n\n"
        )

    def usage(self, completion_tokens: int, reasoning_tokens: int) -> str:
        """The chunk after the last choice chunk: no choices, the final usage and the fingerprint."""
        usage = _usage(self._prompt_tokens, completion_tokens)
        if self._reasoning_details:
            usage += f',"completion_tokens_details":{self._details(reasoning_tokens)}'
        return f'{self._head}[],"usage":{usage}}},"system_fingerprint":{self._fingerprint}}}\n\n'


class CompletionChunkWriter:
    """Formats the SSE frames of one streamed text completion."""

    def __init__(
        self,
        *,
        request_id: str,
        created: int,
        model: str,
        fingerprint: str,
        prompt_tokens: int,
        continuous_usage: bool,
    ) -> None:
        self._head = (
            f'data: {{"id":{dumps(request_id)},"object":"text_completion","created":{created},'
            f'"model":{dumps(model)},"choices":'
        )
        self._fingerprint = dumps(fingerprint)
        self._prompt_tokens = prompt_tokens
        self._continuous = continuous_usage

    def _running_usage(self, completion_tokens: int) -> str:
        """The ``usage`` member of a chunk under ``continuous_usage_stats`` ('' otherwise)."""
        if not self._continuous:
            return ""
        return f',"usage":{_usage(self._prompt_tokens, completion_tokens)}}}'

    def token(self, index: int, text: str, completion_tokens: int) -> str:
        """A chunk carrying one token of choice ``index``."""
        return (
            f'{self._head}[{{"index":{index},"text":{dumps(text)},"logprobs":null,"finish_reason":null,'
            f'"stop_reason":null,"prompt_token_ids":null,"token_ids":null}}]'
            f"{self._running_usage(completion_tokens)}}}\n\n"
        )

    def finish(self, index: int, text: str, finish_reason: str, completion_tokens: int) -> str:
        """The last chunk of choice ``index``: its last text, ``finish_reason`` and the fingerprint."""
        return (
            f'{self._head}[{{"index":{index},"text":{dumps(text)},"logprobs":null,'
            f'"finish_reason":{dumps(finish_reason)},"stop_reason":null,"prompt_token_ids":null,"token_ids":null}}]'
            f'{self._running_usage(completion_tokens)},"system_fingerprint":{self._fingerprint}}}\n\n'
        )

    def usage(self, completion_tokens: int) -> str:
        """The chunk after the last choice chunk: no choices and the final usage."""
        return f'{self._head}[],"usage":{_usage(self._prompt_tokens, completion_tokens)}}}}}\n\n'
