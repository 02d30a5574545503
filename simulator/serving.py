"""Running one generation request: wait for a slot, pace the tokens, then stream them or answer at once.

A ``Job`` knows how to format its answer (chat or text completion); ``stream_events`` and ``answer`` run it
against the engine. A stream's ticket is released by ``GenerationStream`` whatever ends it, and a client
that goes away mid-answer stops the work at its next await and is counted as aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine
from http import HTTPStatus
from typing import Any, TypeVar

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from simulator.config import FailureRule, ReasoningField, ReasoningStyle
from simulator.engine import Engine, Outcome, Ticket
from simulator.generation import CONTENT, REASONING, TOOL_ARGS, TOOL_NAME, Plan
from simulator.wire import (
    BUSY_MESSAGE,
    DONE_FRAME,
    KEEPALIVE_FRAME,
    SSE_MEDIA_TYPE,
    ChatChunkWriter,
    CompletionChunkWriter,
    dumps,
    error_frame,
    json_response,
    logprob_entry,
    reasoning_keys,
)

__all__ = [
    "TRANSPORT_SCOPE_KEY",
    "ChatJob",
    "CompletionJob",
    "ConnectionDroppedError",
    "GenerationStream",
    "Job",
    "answer",
    "drop_connection",
    "failure_message",
    "race_disconnect",
]

TRANSPORT_SCOPE_KEY = "simulator.transport"
DROP_SETTLE_S = 1.0

T = TypeVar("T")


class ConnectionDroppedError(Exception):
    """A ``drop`` failure on a server that does not expose its transport: ending the app closes the link."""


def failure_message(rule: FailureRule) -> str:
    """The error message an injected failure answers with."""
    if rule.message is not None:
        return rule.message
    if rule.status == HTTPStatus.SERVICE_UNAVAILABLE:
        return BUSY_MESSAGE
    return f"{HTTPStatus(rule.status).phrase} (injected by the simulator)"


class Job:
    """One accepted generation request: its ticket, its plans, and how its output is formatted."""

    def __init__(
        self,
        engine: Engine,
        ticket: Ticket,
        plans: list[Plan],
        *,
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        rule: FailureRule | None,
        scope: Scope,
    ) -> None:
        self.engine = engine
        self.ticket = ticket
        self.plans = plans
        self.request_id = request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.rule = rule
        self.scope = scope
        self.outcome: Outcome = "aborted"
        self.finish_reason: str | None = "abort"

    def opening(self) -> str | None:
        """The frame sent before the first token, if the format has one."""
        return None

    def frame(self, choice: int, index: int, finish_reason: str | None) -> str:
        """The frame of token ``index`` of ``choice`` (an end-of-sequence token past the plan's steps)."""
        raise NotImplementedError

    def usage_frame(self) -> str:
        """The usage chunk sent after the last choice chunk."""
        raise NotImplementedError

    def body(self, executed: list[int], finish_reasons: list[str]) -> dict[str, Any]:
        """The non-streamed answer after ``executed[i]`` tokens of each choice."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the ticket, counting how the request ended."""
        self.engine.finish(self.ticket, self.outcome, self.finish_reason)


class ChatJob(Job):
    """A chat completion."""

    def __init__(
        self,
        engine: Engine,
        ticket: Ticket,
        plan: Plan,
        *,
        reasoning: ReasoningStyle,
        reasoning_field: ReasoningField,
        thinking: bool,
        named_tool: bool,
        continuous_usage: bool,
        top_logprobs: int | None = None,
        **common: Any,
    ) -> None:
        super().__init__(engine, ticket, [plan], **common)
        self.plan = plan
        self.top_logprobs = top_logprobs
        self.server_reasoning = reasoning == "server"
        self.server_thinking = thinking and self.server_reasoning
        self.reasoning_field = reasoning_field
        self.named_tool = named_tool
        self.reasoning_tokens = 0
        self.writer = ChatChunkWriter(
            request_id=self.request_id,
            created=self.created,
            model=self.model,
            fingerprint=engine.fingerprint,
            prompt_tokens=ticket.prompt_tokens,
            reasoning_field=reasoning_field,
            reasoning_details=self.server_reasoning,
            continuous_usage=continuous_usage,
            tool_call=plan.tool_call,
        )

    def opening(self) -> str:
        """The role chunk."""
        return self.writer.opening()

    def frame(self, choice: int, index: int, finish_reason: str | None) -> str:
        """One token's chunk, or the last choice chunk when ``finish_reason`` is given."""
        steps = self.plan.steps
        logprobs = "null"
        if index < len(steps):
            channel, text = steps[index]
            if channel == REASONING:
                self.reasoning_tokens += 1
            delta = self.writer.delta(channel, text)
            if self.top_logprobs is not None:
                logprobs = dumps({"content": [logprob_entry(text, self.top_logprobs)]})
        else:
            delta = "{}"
        generated = self.ticket.generated
        if finish_reason is None:
            return self.writer.token(delta, generated, self.reasoning_tokens, logprobs)
        return self.writer.finish(delta, finish_reason, generated, self.reasoning_tokens, logprobs)

    def usage_frame(self) -> str:
        """The final usage chunk."""
        return self.writer.usage(self.ticket.generated, self.reasoning_tokens)

    def body(self, executed: list[int], finish_reasons: list[str]) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        steps = self.plan.steps[: executed[0]]
        content = "".join(text for channel, text in steps if channel == CONTENT)
        thought = [text for channel, text in steps if channel == REASONING]
        called = any(channel == TOOL_NAME for channel, _ in steps)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if self.named_tool or not (called or self.server_thinking) else content or None,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        call = self.plan.tool_call
        if called and call is not None:
            arguments = "".join(text for channel, text in steps if channel == TOOL_ARGS)
            function = {"name": call.name, "arguments": arguments}
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": function}]
        reasoning = "".join(thought) if self.server_thinking else None
        for key in reasoning_keys(self.reasoning_field):
            message[key] = reasoning
        prompt_tokens = self.ticket.prompt_tokens
        details = {"reasoning_tokens": len(thought)} if self.server_reasoning else None
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = {"content": [logprob_entry(text, self.top_logprobs) for _, text in steps]}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reasons[0],
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
        return {
            "id": self.request_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": self.engine.fingerprint,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + executed[0],
                "completion_tokens": executed[0],
                "prompt_tokens_details": None,
                "completion_tokens_details": details,
            },
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }


class CompletionJob(Job):
    """A text completion (one choice per prompt)."""

    def __init__(self, engine: Engine, ticket: Ticket, plans: list[Plan], *, continuous_usage: bool, **common: Any):
        super().__init__(engine, ticket, plans, **common)
        self.writer = CompletionChunkWriter(
            request_id=self.request_id,
            created=self.created,
            model=self.model,
            fingerprint=engine.fingerprint,
            prompt_tokens=ticket.prompt_tokens,
            continuous_usage=continuous_usage,
        )

    def frame(self, choice: int, index: int, finish_reason: str | None) -> str:
        """One token's chunk, or the choice's last chunk when ``finish_reason`` is given."""
        steps = self.plans[choice].steps
        text = steps[index][1] if index < len(steps) else ""
        if finish_reason is None:
            return self.writer.token(choice, text, self.ticket.generated)
        return self.writer.finish(choice, text, finish_reason, self.ticket.generated)

    def usage_frame(self) -> str:
        """The final usage chunk."""
        return self.writer.usage(self.ticket.generated)

    def body(self, executed: list[int], finish_reasons: list[str]) -> dict[str, Any]:
        """The ``text_completion`` object."""
        choices = []
        for index, (plan, count) in enumerate(zip(self.plans, executed, strict=True)):
            choices.append(
                {
                    "index": index,
                    "text": "".join(text for _, text in plan.steps[:count]),
                    "logprobs": None,
                    "finish_reason": finish_reasons[index],
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            )
        prompt_tokens = self.ticket.prompt_tokens
        completion_tokens = sum(executed)
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.engine.fingerprint,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }


async def _keepalive_frames(awaitable: Awaitable[Any], interval_s: float) -> AsyncIterator[str]:
    """Await ``awaitable``, yielding a keep-alive comment every ``interval_s`` it stays pending."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=interval_s)
            if done:
                task.result()
                return
            yield KEEPALIVE_FRAME
    finally:
        task.cancel()


async def _paced_frames(job: Job) -> AsyncGenerator[str, None]:
    """The frames of a streamed answer at the configured pace, ending with ``[DONE]``."""
    engine, ticket, config = job.engine, job.ticket, job.engine.config
    keepalive = config.keepalive_s
    granted = True
    if ticket.future is not None:
        if keepalive is not None:
            async for frame in _keepalive_frames(asyncio.shield(ticket.future), keepalive):
                yield frame
        granted = await ticket.future
    if granted:
        if config.ttft_s and keepalive is not None:
            async for frame in _keepalive_frames(asyncio.sleep(config.ttft_s), keepalive):
                yield frame
        elif config.ttft_s:
            await asyncio.sleep(config.ttft_s)
        engine.first_token(ticket)
    opening = job.opening()
    if opening is not None:
        yield opening
    itl = config.itl_s
    aborted = not granted
    for choice, plan in enumerate(job.plans):
        if aborted:
            yield job.frame(choice, len(plan.steps), "abort")
            continue
        total = plan.total
        for index in range(total):
            if itl and ticket.generated:
                if keepalive is not None and itl >= keepalive:
                    async for frame in _keepalive_frames(asyncio.sleep(itl), keepalive):
                        yield frame
                else:
                    await asyncio.sleep(itl)
            if ticket.epoch != engine.epoch or engine.paused:
                if engine.paused and ticket.epoch == engine.epoch:
                    if keepalive is not None:
                        async for frame in _keepalive_frames(engine.resumed.wait(), keepalive):
                            yield frame
                    else:
                        await engine.resumed.wait()
                aborted = ticket.epoch != engine.epoch
            ticket.generated += 1
            if aborted:
                yield job.frame(choice, index, "abort")
                break
            yield job.frame(choice, index, plan.finish_reason if index == total - 1 else None)
    if job.include_usage:
        yield job.usage_frame()
    yield DONE_FRAME
    job.outcome = "aborted" if aborted else "completed"
    job.finish_reason = "abort" if aborted else job.plans[0].finish_reason


async def _failing_frames(job: Job, rule: FailureRule) -> AsyncGenerator[str, None]:
    """The first ``rule.after_chunks`` data frames of the answer, then an error frame or a dropped link."""
    frames = _paced_frames(job)
    sent = 0
    try:
        async for frame in frames:
            if frame is not KEEPALIVE_FRAME:
                if sent == rule.after_chunks:
                    break
                sent += 1
            yield frame
        else:
            return
    finally:
        await frames.aclose()
    job.outcome = "failed"
    job.finish_reason = None
    if rule.mode == "error_frame":
        yield error_frame(failure_message(rule), rule.status, rule.error_type)
        yield DONE_FRAME
        return
    await drop_connection(job.scope, None)


class GenerationStream(StreamingResponse):
    """The SSE answer of a job; whatever ends it (done, client gone, failure), the ticket is released."""

    def __init__(self, job: Job) -> None:
        rule = job.rule
        self._frames = _paced_frames(job) if rule is None else _failing_frames(job, rule)
        self._job = job
        super().__init__(self._frames, media_type=SSE_MEDIA_TYPE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the frames, then close the generator and the job."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._frames.aclose()
            self._job.close()


async def answer(job: Job) -> Response:
    """Run a non-streamed job to its end and return its JSON answer."""
    engine, ticket, config = job.engine, job.ticket, job.engine.config
    try:
        granted = True if ticket.future is None else await ticket.future
        if granted:
            if config.ttft_s:
                await asyncio.sleep(config.ttft_s)
            engine.first_token(ticket)
        itl = config.itl_s
        aborted = not granted
        executed: list[int] = []
        reasons: list[str] = []
        for plan in job.plans:
            count, reason = 0, "abort"
            if not aborted:
                reason = plan.finish_reason
                for _ in range(plan.total):
                    if itl and ticket.generated:
                        await asyncio.sleep(itl)
                    if ticket.epoch != engine.epoch or engine.paused:
                        if engine.paused and ticket.epoch == engine.epoch:
                            await engine.resumed.wait()
                        aborted = ticket.epoch != engine.epoch
                    ticket.generated += 1
                    count += 1
                    if aborted:
                        reason = "abort"
                        break
            executed.append(count)
            reasons.append(reason)
        job.outcome = "aborted" if aborted else "completed"
        job.finish_reason = "abort" if aborted else reasons[0]
        return json_response(job.body(executed, reasons))
    finally:
        job.close()


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
    """Run ``work`` unless the client leaves first: ``(True, result)``, or ``(False, None)`` when it left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


async def drop_connection(scope: Scope, receive: Receive | None) -> None:
    """Close the client's connection abruptly, without finishing the answer."""
    transport = scope.get(TRANSPORT_SCOPE_KEY)
    if transport is None:
        raise ConnectionDroppedError("the server does not expose its transport; ending the request instead")
    transport.close()
    if receive is None:
        await asyncio.sleep(DROP_SETTLE_S)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_until_disconnect(receive), DROP_SETTLE_S)
