"""The fleet's JSON content type, decoded strictly: a message body with a duplicate key is refused.

Parsers disagree on which of two equal keys wins, so an envelope with one could mean one thing to a check and
another to the code that uses it. The codec refuses duplicates in envelopes that arrive as text; kombu decodes a
broker message's body itself (last key wins) before the codec sees it. ``install`` registers the same strict
rule for ``application/json`` with kombu (keeping kombu's own typed-value hook), so broker-decoded messages get
the same check: such a message fails to decode, and the consumer dead-letters it and answers ``malformed``.
"""

from __future__ import annotations

import json
from typing import Any

from kombu import serialization
from kombu.utils import json as kombu_json

__all__ = ["install", "strict_loads"]

CONTENT_TYPE = "application/json"


class DuplicateKeyError(ValueError):
    """A JSON object has the same key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> Any:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DuplicateKeyError("a JSON object has a duplicate key")
    return kombu_json.object_hook(result)


def strict_loads(data: Any) -> Any:
    """kombu's JSON ``loads``, refusing duplicate keys."""
    return kombu_json.loads(data, object_hook=None, _loads=_strict)


def _strict(text: str, object_hook: Any = None) -> Any:
    return json.loads(text, object_pairs_hook=_unique_pairs)


def install() -> None:
    """Decode ``application/json`` message bodies strictly in this process (producers and workers); idempotent."""
    serialization.register("json", kombu_json.dumps, strict_loads, content_type=CONTENT_TYPE, content_encoding="utf-8")
