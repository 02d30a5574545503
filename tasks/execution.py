"""The operations a worker runs: plain functions of the request context (``tasks.pipeline``).

``run_chat``, ``run_embed`` and ``run_stream`` call the picked instance through ``call_instance`` (circuit
breaker and retries); ``execute`` (re-exported) runs one message through the pipeline's steps.
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker import state as worker_state

from provider.protocol import EnvelopeError
from provider.protocol.errors import Cancelled
from provider.vllm.errors import ProviderError
from provider.vllm.models import ChatRequest, ChatResponse, EmbedRequest
from provider.vllm.streaming import StreamAccumulator
from tasks.metrics import TIME_TO_FIRST_TOKEN
from tasks.pipeline import RequestContext, Runner, call_instance, execute, stream_writer
from tasks.worker import HandBack, ServedInstance

__all__ = ["Runner", "chat_body", "execute", "run_chat", "run_embed", "run_stream"]


class _Cancelled(Exception):
    """The producer cancelled, or the task was revoked, while streaming."""


def run_chat(ctx: RequestContext) -> dict[str, Any]:
    """One chat completion."""
    request = ChatRequest.model_validate(ctx.verified.params)
    client = ctx.served.client
    response = call_instance(ctx, lambda left: client.chat(request, timeout_s=left))
    return chat_body(response, ctx.served, request)


def run_embed(ctx: RequestContext) -> dict[str, Any]:
    """One embedding batch."""
    request = EmbedRequest.model_validate(ctx.verified.params)
    client = ctx.served.client
    response = call_instance(ctx, lambda left: client.embed(request, timeout_s=left))
    data = response.model_dump(mode="json")
    return {"result": data, "usage": data.get("usage"), "metadata": {"instance": ctx.served.name}}


def run_stream(ctx: RequestContext) -> dict[str, Any]:
    """A chat relayed chunk by chunk into the request's Redis Stream; returns the assembled message."""
    rt, verified, served = ctx.rt, ctx.verified, ctx.served
    request = ChatRequest.model_validate(verified.params)
    writer = stream_writer(rt, verified)
    task_id = ctx.task.request.id
    attempts = 0
    # A redelivered request (its worker died mid-stream) finds that worker's chunks: mark them superseded, and
    # number the new entries after them.
    resumed = writer.resume()

    def one_attempt(time_left_s: float) -> dict[str, Any]:
        nonlocal attempts
        attempts += 1
        if attempts > 1 or resumed:
            writer.reset(attempts)
        accumulator = StreamAccumulator()
        first = True
        with served.client.stream_chat(request, timeout_s=time_left_s) as stream:
            for chunk in stream:
                if first:
                    TIME_TO_FIRST_TOKEN.labels(lane=verified.lane).observe(time.time() - verified.issued_at_epoch)
                    first = False
                accumulator.add(chunk)
                cancelled = writer.chunk(chunk)
                if cancelled or task_id in worker_state.revoked:
                    stream.close()
                    raise _Cancelled()
        return chat_body(accumulator.result(), served, request)

    try:
        body: dict[str, Any] = call_instance(ctx, one_attempt)
    except HandBack:
        writer.reset(attempts + 1)  # another worker restarts the stream: readers discard what they have
        raise
    except _Cancelled:
        writer.cancelled("cancelled by the producer")
        raise Cancelled("the stream was cancelled by its producer") from None
    except (ProviderError, EnvelopeError) as exc:
        writer.error(rt.codec.error(verified, exc))
        raise
    writer.done({"finish_reason": body.get("finish_reason")})
    return body


def shortened_max_tokens(served: ServedInstance, request: ChatRequest, response: ChatResponse) -> int | None:
    """The max_tokens vLLM really allowed when prompt + max_tokens overflowed the window (it shortens, as 0.32
    does, rather than refuse); None when the request's max_tokens stood."""
    if request.max_tokens is None or response.usage is None:
        return None
    window = served.context_window(request.model)
    if window is None:
        return None
    room = window - response.usage.prompt_tokens
    return room if room < request.max_tokens else None


def chat_body(response: ChatResponse, served: ServedInstance, request: ChatRequest | None = None) -> dict[str, Any]:
    """The response envelope body of a chat: message fields, usage, where it ran, and whether vLLM shortened
    max_tokens (``metadata.max_tokens_shortened_to``)."""
    data = response.model_dump(mode="json")
    shortened = None if request is None else shortened_max_tokens(served, request, response)
    body: dict[str, Any] = {
        "content": data.get("content"),
        "reasoning": data.get("reasoning"),
        "tool_calls": data.get("tool_calls") or None,
        "finish_reason": data.get("finish_reason"),
        "usage": data.get("usage"),
        "metadata": {
            "instance": served.name,
            "model": data.get("model"),
            "vllm_id": data.get("id"),
            "stop_reason": data.get("stop_reason"),
        },
    }
    if shortened is not None:
        body["metadata"]["max_tokens_shortened_to"] = shortened
    if data.get("logprobs"):  # asked for through extra_body: vLLM's logprobs, as it sent them
        body["result"] = {"logprobs": data["logprobs"]}
    return body
