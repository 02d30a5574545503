"""How many tokens of context a request needs, estimated without a tokenizer (generously: an overestimate only
picks a larger lane, an underestimate gets a 400 from vLLM)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from provider.fleet.lanes import LaneError

__all__ = [
    "BYTES_PER_TOKEN_ESTIMATE",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "estimate_tokens",
    "needed_context",
]

# Token estimate: byte-level BPE vocabularies average about four bytes a token on English prose, fewer on
# code, digits and non-Latin scripts (a CJK character is three UTF-8 bytes and about one token). Three bytes
# a token overestimates nearly everything; an overestimate only picks a larger lane, an underestimate gets
# a 400 from vLLM.
BYTES_PER_TOKEN_ESTIMATE: Final = 3
MESSAGE_OVERHEAD_TOKENS: Final = 8  # role markers and separators a chat template wraps around each message
REPLY_PRIMING_TOKENS: Final = 8  # the assistant header the template opens for the reply
MIN_REPLY_TOKENS: Final = 1  # a request without max_tokens still needs room for one token


def needed_context(prompt_tokens: int, max_tokens: int | None = None) -> int:
    """Tokens a request needs in the window: the prompt plus the reply (at least one token when unbounded)."""
    for name, value in (("prompt_tokens", prompt_tokens), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise LaneError(f"{name} must be a non-negative integer")
    return prompt_tokens + (max_tokens if max_tokens is not None else MIN_REPLY_TOKENS)


def _text_tokens(text: str) -> int:
    """A generous token count for a text: its UTF-8 bytes over three, rounded up."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)


def _content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(
            str(part.get("text") or "") if isinstance(part, Mapping) else str(part)
            for part in content
            if not isinstance(part, Mapping) or part.get("type", "text") == "text"
        )
    return ""


def _compact_json(value: Any) -> str:
    """Compact JSON for counting, tolerant of values JSON cannot carry."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def estimate_tokens(
    messages: str | Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> int:
    """A conservative prompt size when no tokenizer is at hand (see :data:`BYTES_PER_TOKEN_ESTIMATE`).

    Each message counts its text, name and tool calls, plus :data:`MESSAGE_OVERHEAD_TOKENS`; the reply
    header and any tool schemas are added. Image and audio parts are not counted: count those with the
    server's /tokenize.
    """
    if isinstance(messages, str):
        return _text_tokens(messages) + REPLY_PRIMING_TOKENS
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + _text_tokens(_content_text(message.get("content")))
        for extra in ("name", "tool_call_id"):
            if isinstance(message.get(extra), str):
                total += _text_tokens(message[extra])
        if message.get("tool_calls"):
            total += _text_tokens(_compact_json(message["tool_calls"]))
    if tools:
        total += _text_tokens(_compact_json(list(tools)))
    return total
