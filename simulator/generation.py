"""What the simulated model answers: a plan of output tokens, each on one channel, and how the answer ends.

A plan's steps are the tokens the engine produces in order. A natural end adds one more step, the
end-of-sequence token, which shows as an empty delta; an answer cut by ``max_tokens`` ends on its last
token with ``finish_reason`` "length". Either way ``completion_tokens`` equals the number of steps run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulator.config import ReasoningStyle, SimulatorConfig
from simulator.tokenizer import cycle_pieces, lorem_pieces, split_pieces

__all__ = [
    "CONTENT",
    "REASONING",
    "TOOL_ARGS",
    "TOOL_NAME",
    "Plan",
    "ToolCall",
    "ToolChoice",
    "example_arguments",
    "plan_chat",
    "plan_completion",
]

CONTENT = 0
REASONING = 1
TOOL_NAME = 2
TOOL_ARGS = 3

THINK_OPEN = ("<think>", "\n")
THINK_CLOSE = ("\n", "</think>", "\n\n")
REASONING_SEED_PREFIX = "reasoning:"
TOOL_CALL_ID_PREFIX = "chatcmpl-tool-"
REQUEST_ID_HEX_CHARS = 16
PLACEHOLDER_STRING = "example"

Step = tuple[int, str]


@dataclass(slots=True)
class ToolCall:
    """The one tool call an answer makes."""

    id: str
    name: str


@dataclass(slots=True)
class ToolChoice:
    """The tool the model will call and whether the request named it (``tool_choice`` as an object)."""

    name: str
    parameters: Mapping[str, Any]
    named: bool


@dataclass(slots=True)
class Plan:
    """The tokens of one answer and how it ends."""

    steps: list[Step]
    eos: bool
    finish_reason: str
    tool_call: ToolCall | None = None

    @property
    def total(self) -> int:
        """How many tokens the engine produces for this answer (the end-of-sequence token included)."""
        return len(self.steps) + 1 if self.eos else len(self.steps)


def new_hex_id() -> str:
    """A random id in vLLM's style (16 hex digits)."""
    return uuid.uuid4().hex[:REQUEST_ID_HEX_CHARS]


def _cut(steps: list[Step], natural_finish: str, budget: int) -> Plan:
    """The plan of ``steps`` ended naturally, or cut to ``budget`` tokens when the end does not fit."""
    if len(steps) < budget:
        return Plan(steps, eos=True, finish_reason=natural_finish)
    return Plan(steps[:budget], eos=False, finish_reason="length")


def _answer_pieces(config: SimulatorConfig, source_text: str, floor: int) -> list[str]:
    """The answer text's pieces for ``config.text_mode``, continued to at least ``floor`` pieces.

    A lorem answer has ``output_tokens - 1`` words, so that with its end-of-sequence token it is
    ``output_tokens`` long.
    """
    if config.text_mode == "echo" and (echoed := split_pieces(source_text)):
        return echoed if floor <= len(echoed) else cycle_pieces(echoed, floor)
    return lorem_pieces(source_text, max(config.output_tokens - 1, floor))


def example_value(schema: Mapping[str, Any]) -> Any:
    """A simple value that fits the JSON schema ``schema``."""
    if "default" in schema:
        return schema["default"]
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            return example_value(options[0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((item for item in kind if item != "null"), "null")
    if kind == "object":
        return _example_object(schema)
    return {
        "integer": 1,
        "number": 1.0,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(str(kind), PLACEHOLDER_STRING)


def _example_object(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An object holding a simple value for each required property of ``schema``."""
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    names = [name for name in required if isinstance(name, str)] if isinstance(required, list) else []
    return {name: example_value(properties.get(name) or {}) for name in names}


def example_arguments(parameters: Mapping[str, Any]) -> str:
    """The JSON arguments of a call to a tool whose parameters schema is ``parameters``."""
    return json.dumps(_example_object(parameters))


def plan_chat(
    config: SimulatorConfig,
    *,
    reasoning: ReasoningStyle,
    thinking: bool,
    tool: ToolChoice | None,
    source_text: str,
    budget: int,
    ignore_eos: bool,
    min_tokens: int,
) -> Plan:
    """The plan of a chat answer: thinking first (when on), then a tool call or the text."""
    steps: list[Step] = []
    if thinking and reasoning != "none" and not (tool is not None and tool.named):
        thought = lorem_pieces(REASONING_SEED_PREFIX + source_text, config.reasoning_tokens)
        if reasoning == "server":
            steps.extend((REASONING, piece) for piece in thought)
        else:
            steps.extend((CONTENT, piece) for piece in (*THINK_OPEN, *thought, *THINK_CLOSE))
    if tool is not None:
        call = ToolCall(id=TOOL_CALL_ID_PREFIX + new_hex_id(), name=tool.name)
        steps.append((TOOL_NAME, tool.name))
        steps.extend((TOOL_ARGS, piece) for piece in split_pieces(example_arguments(tool.parameters)))
        plan = _cut(steps, "stop" if tool.named else "tool_calls", budget)
        plan.tool_call = call
        return plan
    floor = budget if ignore_eos else min_tokens - len(steps)
    steps.extend((CONTENT, piece) for piece in _answer_pieces(config, source_text, floor))
    return _cut(steps, "stop", budget)


def plan_completion(
    config: SimulatorConfig, *, prompt_text: str, budget: int, ignore_eos: bool, min_tokens: int
) -> Plan:
    """The plan of a text completion of ``prompt_text``."""
    floor = budget if ignore_eos else min_tokens
    steps = [(CONTENT, piece) for piece in _answer_pieces(config, prompt_text, floor)]
    return _cut(steps, "stop", budget)
