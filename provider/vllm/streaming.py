"""Reading vLLM's chat stream: SSE event data to ``StreamChunk``, and chunks back into one ``ChatResponse``.

``StreamDecoder`` takes the ``data`` of each server-sent event (httpx-sse has already dropped comment and
keep-alive lines): ``[DONE]`` ends the stream, ``{"error": {...}}`` inside the 200 stream raises
``StreamErrorFrame``, a chunk with ``finish_reason: "abort"`` raises ``GenerationAbortedError``, and
``finish()`` raises ``StreamInterruptedError`` when the stream stopped before ``[DONE]``. It does no I/O;
``provider.vllm.client.ChatStream`` feeds it. Per-chunk work is a ``json.loads`` and a few dict lookups: the fleet
relays more than 10,000 chunks a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from provider.vllm.errors import GenerationAbortedError, InvalidResponseError, StreamErrorFrame, StreamInterruptedError
from provider.vllm.models import (
    ChatResponse,
    FunctionCall,
    StreamChunk,
    ToolCall,
    ToolCallDelta,
    Usage,
    parse_usage,
)
from provider.vllm.thinking import ReasoningSplitter

__all__ = ["ABORT_FINISH_REASON", "DONE_MARKER", "StreamAccumulator", "StreamDecoder", "aborted", "error_frame"]

DONE_MARKER = "[DONE]"
ABORT_FINISH_REASON = "abort"


def aborted(progress: str, *, instance: str | None = None) -> GenerationAbortedError:
    """The error for a generation vLLM ended with ``finish_reason: "abort"`` after ``progress`` ("12 chunks")."""
    return GenerationAbortedError(
        f"vLLM aborted the generation after {progress} (finish_reason abort: the server was put to "
        "sleep, reset or stopped)",
        instance=instance,
    )


def error_frame(data: dict[str, Any], *, instance: str | None = None) -> StreamErrorFrame:
    """The typed error for ``{"error": {...}}`` (or the older flat ``{"object": "error", ...}``)."""
    error = data.get("error", data)
    error_type = param = None
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "error in stream")
        code = error.get("code")
        error_type = error.get("type") if isinstance(error.get("type"), str) else None
        param = error.get("param") if isinstance(error.get("param"), str) else None
    else:
        message, code = str(error), None
    status_code = code if isinstance(code, int) and not isinstance(code, bool) else None
    return StreamErrorFrame(message, status_code=status_code, error_type=error_type, param=param, instance=instance)


def _join(first: str | None, second: str) -> str | None:
    """Two optional text pieces as one, ``None`` when both are empty."""
    return ((first or "") + second) or None


class StreamDecoder:
    """Turns the data of each SSE event into a ``StreamChunk``, applying an optional reasoning splitter."""

    def __init__(self, *, splitter: ReasoningSplitter | None = None, instance: str | None = None) -> None:
        self._splitter = splitter
        self._instance = instance
        self.done = False
        self.chunks = 0

    def feed(self, data: str) -> StreamChunk | None:
        """One event's data; ``None`` for ``[DONE]`` (then ``done`` is true) unless held text remains."""
        if data == DONE_MARKER:
            self.done = True
            return self._flushed_chunk()
        try:
            frame = json.loads(data)
            if "error" in frame or frame.get("object") == "error":
                raise error_frame(frame, instance=self._instance)
            chunk = self._chunk(frame)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, ValidationError) as exc:
            raise InvalidResponseError(
                f"unexpected stream chunk from vLLM: {type(exc).__name__}: {exc}", instance=self._instance
            ) from exc
        if chunk.finish_reason == ABORT_FINISH_REASON:  # a close by our own caller never reads this chunk
            raise aborted(f"{self.chunks} chunks", instance=self._instance)
        self.chunks += 1
        return chunk

    def finish(self) -> None:
        """The event stream ended; without ``[DONE]`` the answer is incomplete."""
        if not self.done:
            raise StreamInterruptedError(
                f"stream ended after {self.chunks} chunks without [DONE]", instance=self._instance
            )

    def _chunk(self, frame: dict[str, Any]) -> StreamChunk:
        usage_data = frame.get("usage")
        usage = parse_usage(usage_data) if usage_data else None
        choices = frame.get("choices")
        if not choices:
            return StreamChunk(id=frame.get("id"), model=frame.get("model"), usage=usage)
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning")
        if reasoning is None:
            reasoning = delta.get("reasoning_content")
        finish_reason = choice.get("finish_reason")
        if self._splitter is not None:
            content, reasoning = _split(self._splitter, content, reasoning, finished=finish_reason is not None)
        raw_tool_calls = delta.get("tool_calls")
        tool_calls = [_tool_call_delta(call) for call in raw_tool_calls] if raw_tool_calls else []
        return StreamChunk(
            id=frame.get("id"),
            model=frame.get("model"),
            content=content,
            reasoning=reasoning,
            tool_calls=tool_calls,
            finish_reason=finish_reason,
            stop_reason=choice.get("stop_reason"),
            usage=usage,
            logprobs=choice.get("logprobs") or None,
        )

    def _flushed_chunk(self) -> StreamChunk | None:
        """Text a splitter still held when ``[DONE]`` came without a finish chunk."""
        if self._splitter is None:
            return None
        content, reasoning = self._splitter.flush()
        if not content and not reasoning:
            return None
        return StreamChunk(content=content or None, reasoning=reasoning or None)


def _split(
    splitter: ReasoningSplitter, content: str | None, reasoning: str | None, *, finished: bool
) -> tuple[str | None, str | None]:
    """One delta's content through the splitter (flushed on the finish chunk), server reasoning first."""
    split_content, split_reasoning = splitter.feed(content) if content else ("", "")
    if finished:
        rest_content, rest_reasoning = splitter.flush()
        split_content += rest_content
        split_reasoning += rest_reasoning
    return split_content or None, _join(reasoning, split_reasoning)


def _tool_call_delta(call: dict[str, Any]) -> ToolCallDelta:
    function = call.get("function") or {}
    return ToolCallDelta(
        index=call.get("index", 0),
        id=call.get("id"),
        type=call.get("type"),
        name=function.get("name"),
        arguments=function.get("arguments"),
    )


@dataclass
class _ToolCallParts:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class StreamAccumulator:
    """Joins streamed chunks into the ``ChatResponse`` a non-streamed request would have returned."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: dict[int, _ToolCallParts] = {}
        self._id: str | None = None
        self._model: str | None = None
        self._finish_reason: str | None = None
        self._stop_reason: str | int | None = None
        self._usage: Usage | None = None
        self._logprobs: list[Any] = []

    def add(self, chunk: StreamChunk) -> None:
        """Take one chunk."""
        if chunk.logprobs:
            self._logprobs.extend(chunk.logprobs.get("content") or ())
        if chunk.content:
            self._content.append(chunk.content)
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
        for delta in chunk.tool_calls:
            parts = self._tool_calls.get(delta.index)
            if parts is None:
                parts = self._tool_calls[delta.index] = _ToolCallParts()
            if parts.id is None and delta.id:
                parts.id = delta.id
            if parts.name is None and delta.name:
                parts.name = delta.name
            if delta.arguments:
                parts.arguments.append(delta.arguments)
        if self._id is None and chunk.id:
            self._id = chunk.id
        if self._model is None and chunk.model:
            self._model = chunk.model
        if chunk.finish_reason is not None:
            self._finish_reason = chunk.finish_reason
            self._stop_reason = chunk.stop_reason
        if chunk.usage is not None:
            self._usage = chunk.usage

    def result(self) -> ChatResponse:
        """The answer so far: content and reasoning apart, tool calls in index order, the last usage seen."""
        tool_calls = [
            ToolCall(
                id=parts.id or "",
                function=FunctionCall(name=parts.name or "", arguments="".join(parts.arguments)),
            )
            for _, parts in sorted(self._tool_calls.items())
        ]
        return ChatResponse(
            id=self._id or "",
            model=self._model or "",
            content="".join(self._content) or None,
            reasoning="".join(self._reasoning) or None,
            tool_calls=tool_calls,
            finish_reason=self._finish_reason,
            stop_reason=self._stop_reason,
            usage=self._usage,
            logprobs={"content": self._logprobs} if self._logprobs else None,
        )
