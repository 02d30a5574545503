"""The simulator's settings: served models, latency, capacity, auth, dev routes and failure injection.

One pydantic object, ``SimulatorConfig``, drives a running simulator; ``POST /_sim/config`` merges a JSON
patch into it while it runs, so every field is read live by the request handlers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "DEFAULT_EMBED_MAX_MODEL_LEN",
    "DEFAULT_EMBED_MODEL",
    "DEFAULT_GENERATE_MAX_MODEL_LEN",
    "DEFAULT_GENERATE_MODEL",
    "DEFAULT_HANG_S",
    "DEFAULT_KV_CACHE_TOKENS",
    "DEFAULT_MAX_LOGPROBS",
    "DEFAULT_MAX_RUNNING",
    "DEFAULT_OUTPUT_TOKENS",
    "DEFAULT_REASONING_TOKENS",
    "DEFAULT_VLLM_VERSION",
    "FailureMode",
    "FailureRoute",
    "FailureRule",
    "ModelKind",
    "ReasoningField",
    "ReasoningStyle",
    "ServedModel",
    "SimulatorConfig",
    "TextMode",
]

DEFAULT_GENERATE_MODEL = "qwen3-6-27b"
DEFAULT_GENERATE_MAX_MODEL_LEN = 32768
DEFAULT_EMBED_MODEL = "minilm"
DEFAULT_EMBED_MAX_MODEL_LEN = 256
DEFAULT_EMBEDDING_DIM = 384
DEFAULT_OUTPUT_TOKENS = 16
DEFAULT_REASONING_TOKENS = 8
DEFAULT_MAX_RUNNING = 256
DEFAULT_KV_CACHE_TOKENS = 16 * DEFAULT_GENERATE_MAX_MODEL_LEN
DEFAULT_HANG_S = 3600.0
DEFAULT_VLLM_VERSION = "0.32.0"
DEFAULT_MAX_LOGPROBS = 20

ModelKind = Literal["generate", "embed"]
ReasoningStyle = Literal["none", "server", "tags"]
ReasoningField = Literal["reasoning", "reasoning_content", "both"]
TextMode = Literal["echo", "lorem"]
FailureRoute = Literal["chat", "completions", "embeddings", "models", "*"]
FailureMode = Literal["status", "error_frame", "drop", "hang"]


class ServedModel(BaseModel):
    """One served name: a base model (generate or embed) or a LoRA adapter on one (``parent`` set)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    max_model_len: int = Field(default=DEFAULT_GENERATE_MAX_MODEL_LEN, ge=1)
    kind: ModelKind = "generate"
    parent: str | None = None
    embedding_dim: int = Field(default=DEFAULT_EMBEDDING_DIM, ge=1)
    matryoshka: bool = False
    reasoning: ReasoningStyle = "none"


class FailureRule(BaseModel):
    """One failure to inject: which requests it hits, what happens, and how many more times (-1 = forever)."""

    model_config = ConfigDict(extra="forbid")

    route: FailureRoute = "*"
    model: str | None = None
    mode: FailureMode = "status"
    status: int = Field(default=503, ge=400, le=599)
    message: str | None = None
    error_type: str | None = None
    after_chunks: int = Field(default=0, ge=0)
    hang_s: float = Field(default=DEFAULT_HANG_S, ge=0)
    count: int = Field(default=1, ge=-1)

    def matches(self, route: str, model: str | None) -> bool:
        """Whether this rule still has uses left and applies to a request on ``route`` for ``model``."""
        if self.count == 0:
            return False
        if self.route not in ("*", route):
            return False
        return self.model is None or self.model == model


def _default_models() -> list[ServedModel]:
    """The served models when none are given: one chat model and one embedding model."""
    return [
        ServedModel(name=DEFAULT_GENERATE_MODEL, max_model_len=DEFAULT_GENERATE_MAX_MODEL_LEN),
        ServedModel(name=DEFAULT_EMBED_MODEL, max_model_len=DEFAULT_EMBED_MAX_MODEL_LEN, kind="embed"),
    ]


class SimulatorConfig(BaseModel):
    """Everything a simulated vLLM server does; read live, so a patch takes effect on the next request.

    ``text_mode`` "echo" answers with the last user message (or the completion prompt), "lorem" with words
    of a fixed cycle seeded by the prompt, ``output_tokens`` tokens long with the end-of-sequence token;
    both are cut at ``max_tokens`` (``finish_reason`` "length").
    ``reasoning_tokens`` is the length of the thinking part when thinking is on.
    ``tool_parser`` False is a server started without ``--enable-auto-tool-choice --tool-call-parser``:
    tools with an ``auto`` tool choice get vLLM's 400 (a named tool choice still works).
    ``max_logprobs`` is vLLM's ``--max-logprobs`` (20 by default; -1 = the vocabulary).
    """

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(default_factory=_default_models, min_length=1)
    reasoning_field: ReasoningField = "reasoning"
    reasoning_tokens: int = Field(default=DEFAULT_REASONING_TOKENS, ge=0)
    ttft_s: float = Field(default=0.0, ge=0)
    itl_s: float = Field(default=0.0, ge=0)
    output_tokens: int = Field(default=DEFAULT_OUTPUT_TOKENS, ge=0)
    max_running: int = Field(default=DEFAULT_MAX_RUNNING, ge=1)
    max_queued: int = Field(default=0, ge=0)
    kv_cache_tokens: int = Field(default=DEFAULT_KV_CACHE_TOKENS, ge=1)
    api_key: str | None = None
    dev_mode: bool = True
    legacy_dev_routes: bool = False
    text_mode: TextMode = "echo"
    keepalive_s: float | None = Field(default=None, gt=0)
    dead: bool = False
    failures: list[FailureRule] = Field(default_factory=list)
    version: str = DEFAULT_VLLM_VERSION
    tool_parser: bool = True
    max_logprobs: int = Field(default=DEFAULT_MAX_LOGPROBS, ge=-1)

    @model_validator(mode="after")
    def _check_models(self) -> SimulatorConfig:
        """Served names are unique and every LoRA adapter sits on a base model that is served."""
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must be unique: {names}")
        bases = {model.name for model in self.models if model.parent is None}
        for model in self.models:
            if model.parent is not None and model.parent not in bases:
                raise ValueError(f"LoRA adapter {model.name!r} names an unknown base model {model.parent!r}")
        return self

    def find_model(self, name: str) -> ServedModel | None:
        """The served model called ``name``, or None."""
        for model in self.models:
            if model.name == name:
                return model
        return None

    def base_of(self, model: ServedModel) -> ServedModel:
        """The base model that serves ``model`` (itself unless it is a LoRA adapter)."""
        if model.parent is None:
            return model
        base = self.find_model(model.parent)
        return base if base is not None else model

    def default_model(self, kind: ModelKind) -> ServedModel | None:
        """The model a request without ``model`` goes to: the first served one of that kind."""
        for model in self.models:
            if self.base_of(model).kind == kind:
                return model
        return None
