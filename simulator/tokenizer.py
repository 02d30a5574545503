"""A deterministic stand-in tokenizer, a ChatML-like chat template, and the texts the simulator answers with.

Tokens are regex pieces (a word with its leading whitespace, one punctuation mark, a ``<|...|>`` marker),
so joining a text's pieces gives the text back. Token ids are a stable hash of the piece; ``Tokenizer``
remembers the pieces it has encoded so that ``/detokenize`` can map ids back.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from math import gcd
from typing import Any

__all__ = [
    "LOREM_WORDS",
    "VOCAB_SIZE",
    "Tokenizer",
    "count_tokens",
    "cycle_pieces",
    "last_user_text",
    "lorem_pieces",
    "message_text",
    "render_chat",
    "split_pieces",
]

VOCAB_SIZE = 32000
MAX_REMEMBERED_PIECES = 1 << 20
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_MARKER = "<|image_pad|>"

_PIECE_RE = re.compile(r"<\|[a-z_]+\|>|\s*\w+|\s*[^\w\s]|\s+")

LOREM_WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
    "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "enim", "ad", "minim",
    "veniam", "quis", "nostrud", "exercitation", "ullamco", "laboris", "nisi", "aliquip", "ex", "ea",
    "commodo", "consequat", "duis", "aute", "irure", "in", "reprehenderit", "voluptate", "velit", "esse",
    "cillum", "fugiat", "nulla", "pariatur", "excepteur", "sint", "occaecat", "cupidatat", "non",
    "proident", "sunt", "culpa", "qui", "officia", "deserunt", "mollit", "anim", "id", "est", "laborum",
)  # fmt: skip


def split_pieces(text: str) -> list[str]:
    """The token pieces of ``text``; ``"".join`` of them is ``text``."""
    return _PIECE_RE.findall(text)


def count_tokens(text: str) -> int:
    """How many tokens ``text`` has."""
    return len(_PIECE_RE.findall(text))


def _piece_id(piece: str) -> int:
    """The stable token id of one piece."""
    return zlib.crc32(piece.encode("utf-8")) % VOCAB_SIZE


class Tokenizer:
    """Encodes text to stable ids and decodes the ids it has seen (others decode to a lorem word)."""

    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        self._remember(LOREM_WORDS)
        self._remember(" " + word for word in LOREM_WORDS)

    def _remember(self, pieces: Iterable[str]) -> list[int]:
        """Ids of ``pieces``, noting each so that ``decode`` can return it."""
        ids = []
        for piece in pieces:
            token_id = _piece_id(piece)
            if len(self._pieces) < MAX_REMEMBERED_PIECES:
                self._pieces.setdefault(token_id, piece)
            ids.append(token_id)
        return ids

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids and pieces of ``text``."""
        pieces = split_pieces(text)
        return self._remember(pieces), pieces

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        words = []
        for token_id in ids:
            piece = self._pieces.get(token_id)
            words.append(piece if piece is not None else " " + LOREM_WORDS[token_id % len(LOREM_WORDS)])
        return "".join(words)


def message_text(message: Mapping[str, Any]) -> str:
    """The text a chat message contributes to the prompt (text parts, image markers, tool calls)."""
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif part.get("type") in ("image_url", "input_image", "image"):
                    parts.append(IMAGE_MARKER)
            elif isinstance(part, str):
                parts.append(part)
        text = "".join(parts)
    else:
        text = ""
    tool_calls = message.get("tool_calls")
    if tool_calls:
        text += json.dumps(tool_calls)
    return text


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text a ChatML-style template makes of ``messages`` (and ``tools``)."""
    parts = []
    if tools:
        parts.append(f"{IM_START}system\n# Tools\n{json.dumps(list(tools))}{IM_END}\n")
    for message in messages:
        role = message.get("role", "user")
        parts.append(f"{IM_START}{role}\n{message_text(message)}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def lorem_pieces(seed_text: str, count: int) -> list[str]:
    """``count`` lorem-ipsum word pieces, in an order fixed by ``seed_text``."""
    size = len(LOREM_WORDS)
    seed = zlib.crc32(seed_text.encode("utf-8"))
    start = seed % size
    stride = 1 + (seed >> 8) % (size - 1)
    while gcd(stride, size) != 1:
        stride += 1
    pieces = []
    for index in range(count):
        word = LOREM_WORDS[(start + index * stride) % size]
        pieces.append(word if index == 0 else " " + word)
    return pieces


def cycle_pieces(pieces: Sequence[str], count: int) -> list[str]:
    """``count`` pieces taken from ``pieces`` in a cycle (``pieces`` must not be empty)."""
    size = len(pieces)
    if count <= size:
        return list(pieces[:count])
    return [pieces[index % size] for index in range(count)]
