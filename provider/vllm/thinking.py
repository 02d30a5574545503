"""Thinking mode: the chat payload vLLM receives, and where the model's reasoning comes back.

Payload rules (the seeds', plus an explicit ``False``): ``reasoning_effort`` and ``max_thinking_tokens`` are
never sent; ``stop_sequences`` joins ``stop``; ``chat_template_kwargs.enable_thinking`` is ``True`` when the
request enables thinking, or says nothing and the instance default enables it, and ``False`` when the request
turns it off. Other ``chat_template_kwargs`` (from ``extra_body``) are kept.

Reasoning extraction follows the instance's ``reasoning_source``: ``server`` trusts vLLM's ``reasoning``
fields and leaves content alone; ``tags`` moves ``<think>…</think>`` spans out of the content; ``preamble``
(templates that open ``<think>`` in the prompt) takes the content before the first ``</think>`` as
reasoning; the blank lines a template leaves after ``</think>`` are dropped. Splitters work on streamed
deltas, so a tag cut across two deltas is still found.
"""

from __future__ import annotations

from typing import Any, Protocol

from provider.settings import ReasoningSource
from provider.vllm.models import ChatRequest

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "PreambleSplitter",
    "ReasoningSplitter",
    "TagSplitter",
    "build_chat_payload",
    "make_splitter",
    "sent_thinking",
    "split_reasoning",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Request fields sent to vLLM under their own name when set.
_PASSTHROUGH_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "structured_outputs",
    "priority",
    "request_id",
    "ignore_eos",
    "min_tokens",
)
# Accepted from callers for compatibility with the seeds, never sent.
_NEVER_SENT = ("reasoning_effort", "max_thinking_tokens")


def _merged_stop(stop: str | list[str] | None, stop_sequences: list[str] | None) -> list[str]:
    """``stop`` and ``stop_sequences`` as one list, first occurrence kept."""
    merged: list[str] = []
    for value in ([stop] if isinstance(stop, str) else stop or []) + (stop_sequences or []):
        if value not in merged:
            merged.append(value)
    return merged


def build_chat_payload(request: ChatRequest, *, enable_thinking_default: bool, stream: bool = False) -> dict[str, Any]:
    """The JSON body for ``/v1/chat/completions``; streams always ask for the usage chunk."""
    payload: dict[str, Any] = {"model": request.model, "messages": request.messages}
    for name in _PASSTHROUGH_FIELDS:
        value = getattr(request, name)
        if value is not None:
            payload[name] = value
    stop = _merged_stop(request.stop, request.stop_sequences)
    if stop:
        payload["stop"] = stop
    payload.update(request.extra_body)
    for name in _NEVER_SENT:
        payload.pop(name, None)

    template_kwargs = dict(payload.get("chat_template_kwargs") or {})
    if request.thinking is not None:
        template_kwargs["enable_thinking"] = request.thinking.enabled
    elif enable_thinking_default and "enable_thinking" not in template_kwargs:
        template_kwargs["enable_thinking"] = True
    if template_kwargs:
        payload["chat_template_kwargs"] = template_kwargs

    if stream:
        payload["stream"] = True
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    return payload


def sent_thinking(payload: dict[str, Any]) -> bool | None:
    """The ``enable_thinking`` a payload carries, ``None`` when the chat template decides."""
    value = (payload.get("chat_template_kwargs") or {}).get("enable_thinking")
    return value if isinstance(value, bool) else None


class ReasoningSplitter(Protocol):
    """Separates reasoning from streamed content text."""

    def feed(self, text: str) -> tuple[str, str]:
        """Take the next content delta; return the ``(content, reasoning)`` that is certain so far."""
        ...

    def flush(self) -> tuple[str, str]:
        """The stream ended: return whatever was held back."""
        ...


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``tag``."""
    start = text.rfind("<", max(0, len(text) - len(tag) + 1))
    if start >= 0 and tag.startswith(text[start:]):
        return len(text) - start
    return 0


class _AnswerTrimmer:
    """Drops the blank lines templates put between ``</think>`` and the answer."""

    def __init__(self) -> None:
        self._trim = False

    def _answer(self, text: str) -> str:
        """Answer text, without leading whitespace while a closing tag was the last thing seen."""
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        return text


class TagSplitter(_AnswerTrimmer):
    """Moves every ``<think>…</think>`` span from content to reasoning."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = False
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Split one delta; a possible tag at its end waits for the next delta."""
        if not self._pending and "<" not in text:
            return ("", text) if self._inside else (self._answer(text), "")
        text = self._pending + text
        self._pending = ""
        content: list[str] = []
        reasoning: list[str] = []
        while text:
            tag = THINK_CLOSE if self._inside else THINK_OPEN
            position = text.find(tag)
            end = position if position >= 0 else len(text) - _partial_tag_length(text, tag)
            if self._inside:
                reasoning.append(text[:end])
            else:
                content.append(self._answer(text[:end]))
            if position < 0:
                self._pending = text[end:]
                break
            text = text[position + len(tag) :]
            self._trim = self._inside
            self._inside = not self._inside
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        """A held partial tag was text after all."""
        pending, self._pending = self._pending, ""
        return ("", pending) if self._inside else (self._answer(pending), "")


class PreambleSplitter(_AnswerTrimmer):
    """Everything before the first ``</think>`` is reasoning; with no ``</think>`` at all, it is all content.

    Text is held until ``</think>`` arrives, so a model that never thinks keeps its whole answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held: list[str] = []
        self._tail = ""
        self._closed = False

    def feed(self, text: str) -> tuple[str, str]:
        """Hold text until the closing tag, then release reasoning and content; after it, pass through."""
        if self._closed:
            return self._answer(text), ""
        window = self._tail + text
        self._held.append(text)
        if THINK_CLOSE not in window:
            self._tail = window[-(len(THINK_CLOSE) - 1) :]
            return "", ""
        reasoning, _, content = "".join(self._held).partition(THINK_CLOSE)
        self._held = []
        self._closed = self._trim = True
        return self._answer(content), reasoning.removeprefix(THINK_OPEN)

    def flush(self) -> tuple[str, str]:
        """No ``</think>`` came: the held text is the answer."""
        held = "".join(self._held)
        self._held = []
        return held, ""


def make_splitter(source: ReasoningSource, thinking: bool | None) -> ReasoningSplitter | None:
    """The splitter for a reasoning source; none for ``server``, nor for ``preamble`` with thinking off."""
    if source == "tags":
        return TagSplitter()
    if source == "preamble" and thinking is not False:
        return PreambleSplitter()
    return None


def split_reasoning(
    content: str | None, reasoning: str | None, source: ReasoningSource, thinking: bool | None
) -> tuple[str | None, str | None]:
    """A whole answer's ``(content, reasoning)`` once the instance's reasoning source is applied."""
    splitter = make_splitter(source, thinking)
    if splitter is None or not content:
        return content, reasoning
    fed_content, fed_reasoning = splitter.feed(content)
    rest_content, rest_reasoning = splitter.flush()
    extracted = fed_reasoning + rest_reasoning
    joined_reasoning = (reasoning or "") + extracted
    return (fed_content + rest_content) or None, joined_reasoning or None
