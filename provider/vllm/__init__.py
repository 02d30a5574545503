"""The vLLM provider: a typed HTTP client for one vLLM server, its request and response models, streaming,
reasoning split, errors and discovery. Imports httpx; never celery, kombu or ``provider.protocol``.

Names are loaded on first use, so importing a model (``provider.vllm.models``) does not load httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provider.vllm.client import (
        ENDPOINTS,
        ChatStream,
        VllmClient,
        probe,
    )
    from provider.vllm.errors import (
        AuthenticationError,
        BadRequestError,
        GenerationAbortedError,
        InvalidResponseError,
        NotFoundError,
        ProviderConfigurationError,
        ProviderConnectionError,
        ProviderError,
        ProviderStatusError,
        ProviderTimeoutError,
        ServerBusyError,
        ServerError,
        StreamErrorFrame,
        StreamInterruptedError,
        UnsupportedCapabilityError,
        error_for_status,
        is_retryable,
    )
    from provider.vllm.metrics import (
        parse_metrics,
    )
    from provider.vllm.models import (
        ChatRequest,
        ChatResponse,
        CompletionResponse,
        EmbeddingResponse,
        EmbedRequest,
        FunctionCall,
        HealthCheck,
        MetricsSnapshot,
        ModelInfo,
        ModelMetrics,
        Readiness,
        StreamChunk,
        ThinkingOption,
        TokenizeResult,
        ToolCall,
        ToolCallDelta,
        Usage,
    )
    from provider.vllm.streaming import (
        StreamAccumulator,
        StreamDecoder,
    )
    from provider.vllm.thinking import (
        PreambleSplitter,
        ReasoningSplitter,
        TagSplitter,
        build_chat_payload,
        make_splitter,
        split_reasoning,
    )

_HOMES: dict[str, str] = {
    "AuthenticationError": "provider.vllm.errors",
    "BadRequestError": "provider.vllm.errors",
    "ChatRequest": "provider.vllm.models",
    "ChatResponse": "provider.vllm.models",
    "ChatStream": "provider.vllm.client",
    "CompletionResponse": "provider.vllm.models",
    "ENDPOINTS": "provider.vllm.client",
    "EmbedRequest": "provider.vllm.models",
    "EmbeddingResponse": "provider.vllm.models",
    "FunctionCall": "provider.vllm.models",
    "GenerationAbortedError": "provider.vllm.errors",
    "HealthCheck": "provider.vllm.models",
    "InvalidResponseError": "provider.vllm.errors",
    "MetricsSnapshot": "provider.vllm.models",
    "ModelInfo": "provider.vllm.models",
    "ModelMetrics": "provider.vllm.models",
    "NotFoundError": "provider.vllm.errors",
    "PreambleSplitter": "provider.vllm.thinking",
    "ProviderConfigurationError": "provider.vllm.errors",
    "ProviderConnectionError": "provider.vllm.errors",
    "ProviderError": "provider.vllm.errors",
    "ProviderStatusError": "provider.vllm.errors",
    "ProviderTimeoutError": "provider.vllm.errors",
    "Readiness": "provider.vllm.models",
    "ReasoningSplitter": "provider.vllm.thinking",
    "ServerBusyError": "provider.vllm.errors",
    "ServerError": "provider.vllm.errors",
    "StreamAccumulator": "provider.vllm.streaming",
    "StreamChunk": "provider.vllm.models",
    "StreamDecoder": "provider.vllm.streaming",
    "StreamErrorFrame": "provider.vllm.errors",
    "StreamInterruptedError": "provider.vllm.errors",
    "TagSplitter": "provider.vllm.thinking",
    "ThinkingOption": "provider.vllm.models",
    "TokenizeResult": "provider.vllm.models",
    "ToolCall": "provider.vllm.models",
    "ToolCallDelta": "provider.vllm.models",
    "UnsupportedCapabilityError": "provider.vllm.errors",
    "Usage": "provider.vllm.models",
    "VllmClient": "provider.vllm.client",
    "build_chat_payload": "provider.vllm.thinking",
    "error_for_status": "provider.vllm.errors",
    "is_retryable": "provider.vllm.errors",
    "make_splitter": "provider.vllm.thinking",
    "parse_metrics": "provider.vllm.metrics",
    "probe": "provider.vllm.client",
    "split_reasoning": "provider.vllm.thinking",
}

__all__ = [
    "ENDPOINTS",
    "AuthenticationError",
    "BadRequestError",
    "ChatRequest",
    "ChatResponse",
    "ChatStream",
    "CompletionResponse",
    "EmbedRequest",
    "EmbeddingResponse",
    "FunctionCall",
    "GenerationAbortedError",
    "HealthCheck",
    "InvalidResponseError",
    "MetricsSnapshot",
    "ModelInfo",
    "ModelMetrics",
    "NotFoundError",
    "PreambleSplitter",
    "ProviderConfigurationError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderStatusError",
    "ProviderTimeoutError",
    "Readiness",
    "ReasoningSplitter",
    "ServerBusyError",
    "ServerError",
    "StreamAccumulator",
    "StreamChunk",
    "StreamDecoder",
    "StreamErrorFrame",
    "StreamInterruptedError",
    "TagSplitter",
    "ThinkingOption",
    "TokenizeResult",
    "ToolCall",
    "ToolCallDelta",
    "UnsupportedCapabilityError",
    "Usage",
    "VllmClient",
    "build_chat_payload",
    "error_for_status",
    "is_retryable",
    "make_splitter",
    "parse_metrics",
    "probe",
    "split_reasoning",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
