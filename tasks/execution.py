"""What a worker does with one envelope, in design.md's order.

1. Verify the envelope (size, schema, version, legacy fields, signature, claims, sealed params, payload hash).
   A refusal is recorded as a typed error (never executed, never retried, never requeued), unless the task id
   already has a record: a refusal never overwrites a stored result.
2. Claim the jti lease: completed → answer with the stored result; held by a live holder → do nothing;
   seen with a different token → refused as a replay; free or abandoned → ours.
3. Deadline, then idempotency (same key and payload → the first request's result; other payload → conflict).
4. Call vLLM, retrying transient failures within the deadline (``provider.vllm.retry``), never with ``self.retry()``.
5. Store and return the response envelope; any failure becomes an error envelope the caller can read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject
from celery.worker import state as worker_state
from kombu import Queue
from pydantic import ValidationError

from provider.protocol import (
    ERROR_MESSAGE_TYPE,
    PLAIN_RESPONSE_FIELDS,
    SEALED_RESPONSE_FIELDS,
    ClaimMismatchError,
    ClaimOutcome,
    ClaimStatus,
    EnvelopeError,
    FleetError,
    IdemStatus,
    ReplayedError,
    VerifiedRequest,
)
from provider.protocol.errors import Cancelled, DeadLettered, FleetTimeout, InvalidRequest
from provider.vllm.errors import ProviderError
from provider.vllm.models import ChatRequest, ChatResponse, EmbedRequest
from provider.vllm.retry import call_with_retries
from provider.vllm.streaming import StreamAccumulator
from tasks.consumer import DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER
from tasks.errors import FleetTaskError, count_rejection
from tasks.logs import bind, request_context
from tasks.metrics import HAND_BACKS, REQUEST_SECONDS, REQUESTS, RETRIES, TIME_TO_FIRST_TOKEN, TOKENS
from tasks.queues import QUEUE_DELIVERY_LIMIT_MARGIN as QUEUE_MARGIN
from tasks.queues import dead_letter_queue
from tasks.redaction import describe_exception
from tasks.runtime import FleetRuntime, runtime
from tasks.streams import StreamWriter
from tasks.worker import HandBack, ServedInstance, worker_fleet

__all__ = ["execute", "run_chat", "run_embed", "stream_chat_runner"]

log = logging.getLogger("tasks.execution")

_HELD_POLL_S = 0.1
DELIVERY_LIMIT_REASON = "delivery_limit"
_HAND_BACK_PAUSE_S = 0.5
RESPONSE_BODY_FIELDS = (*SEALED_RESPONSE_FIELDS, *PLAIN_RESPONSE_FIELDS)
_GENERATION = {"chat", "stream_chat", "embed", "count_tokens"}
Runner = Callable[[VerifiedRequest, ServedInstance], dict[str, Any]]


class _Cancelled(Exception):
    """The producer cancelled, or the task was revoked, while streaming."""


def _delivery_lane(task: Task[Any, Any]) -> str | None:
    info = task.request.delivery_info or {}
    lane = info.get("routing_key")
    return str(lane) if lane else None


def _refuse(task: Task[Any, Any], rt: FleetRuntime, raw: Any, exc: EnvelopeError) -> dict[str, Any]:
    """Record a refused message as a typed error, without ever overwriting a stored result."""
    task_id = str(task.request.id)
    log.warning(
        "envelope refused: %s",
        exc.code,
        extra={"task_id": task_id, "code": exc.code, "lane": _delivery_lane(task), "task": task.name},
    )
    count_rejection(exc.code)
    if rt.ledger.peek(task_id) is not None or _has_stored_result(task):
        raise Ignore()
    # The error answers the id the caller reads (the task id), whatever the refused envelope claims.
    source = {**(raw if isinstance(raw, dict) else {}), "request_id": task_id}
    raise FleetTaskError(rt.codec.error(source, exc))


def _has_stored_result(task: Task[Any, Any]) -> bool:
    meta = task.backend.get_task_meta(str(task.request.id))
    return bool(meta) and meta.get("status") not in (None, "PENDING")


def execute(task: Task[Any, Any], raw: Any, run: Runner) -> dict[str, Any]:
    """Validate ``raw``, then run ``run`` once under the jti lease; returns the response envelope."""
    with request_context(request_id=str(task.request.id), lane=_delivery_lane(task)):
        return _execute(task, raw, run)


def _execute(task: Task[Any, Any], raw: Any, run: Runner) -> dict[str, Any]:
    rt = runtime()
    started = time.monotonic()
    try:
        verified = rt.codec.verify_request(raw, lane=_delivery_lane(task), task_name=task.name)
        if verified.request_id != task.request.id:
            raise ClaimMismatchError("the task id is not the envelope's request id", field="request_id")
    except EnvelopeError as exc:
        return _refuse(task, rt, raw, exc)

    outcome = _claim(rt, verified)
    if outcome.status is ClaimStatus.COMPLETED:
        return _replay_stored(rt, outcome.result)
    if outcome.status is ClaimStatus.HELD:  # still held at the deadline: its live holder answers
        raise Ignore()
    if outcome.status is ClaimStatus.MISMATCH:
        return _refuse(task, rt, raw, ReplayedError("this request id was already used", field="jti"))

    bind(correlation_id=verified.correlation_id)
    if rt.settings.log_payloads:
        log.debug("request params: %s", verified.params)
    leases = worker_fleet().leases
    leases.hold(verified.request_id)
    try:
        rt.codec.check_deadline(verified)
        body = _idempotent(rt, verified, lambda: _run_on_instance(verified, run))
        response = rt.codec.response(verified, body)
    except HandBack as exc:
        _hand_back(task, rt, verified, raw, exc)
    except Exception as caught:  # every failure becomes a typed error envelope; nothing crashes the worker
        failure: Exception = caught
        if isinstance(caught, ValidationError):  # the params do not make a valid request: say which fields
            failure = InvalidRequest(f"invalid request: {describe_exception(caught)}")
        elif not isinstance(caught, (EnvelopeError, FleetError, ProviderError)):
            # by type and field names only: an exception's text or traceback may quote the prompt
            log.error("unexpected failure serving %s: %s", verified.request_id, describe_exception(caught))
        elif isinstance(caught, EnvelopeError):
            count_rejection(caught.code)  # refused after the claim (the deadline), counted like the others
        envelope = rt.codec.error(verified, failure)
        rt.ledger.complete(verified.request_id, rt.holder, envelope, ttl_s=rt.settings.result_expires_s)
        _observe(verified, started, str(envelope.get("code", "error")), None)
        raise FleetTaskError(envelope) from None
    finally:
        leases.drop(verified.request_id)
    rt.ledger.complete(verified.request_id, rt.holder, response, ttl_s=rt.settings.result_expires_s)
    _observe(verified, started, "ok", body.get("usage"))
    return response


def _observe(verified: VerifiedRequest, started: float, outcome: str, usage: Any) -> None:
    """Count one answered request (outcome ``ok`` or its error code), its duration and its tokens."""
    REQUESTS.labels(lane=verified.lane, operation=verified.operation, outcome=outcome).inc()
    REQUEST_SECONDS.labels(operation=verified.operation).observe(time.monotonic() - started)
    if isinstance(usage, dict):
        TOKENS.labels(direction="in").inc(int(usage.get("prompt_tokens") or 0))
        TOKENS.labels(direction="out").inc(int(usage.get("completion_tokens") or 0))
    log.info("%s %s", verified.operation, outcome)


def _claim(rt: FleetRuntime, verified: VerifiedRequest) -> ClaimOutcome:
    """Claim the jti; while another holder's lease is live, wait for its result or for the lease to lapse.

    A copy delivered while the first is still running (or right after its worker died) must neither run the
    work twice nor be dropped: it answers with the first one's result, or takes over an abandoned lease.
    A holder without a heartbeat is dead: its lease is taken over at once, so recovery never waits out a lease
    longer than the request's deadline.
    """
    security = rt.settings.security
    memory_s = max(security.replay_memory_s, verified.time_left_s() + security.leeway_s)
    while True:
        outcome = rt.ledger.claim(verified.request_id, verified.token_digest, rt.holder, memory_s=memory_s)
        if outcome.status is not ClaimStatus.HELD or verified.time_left_s() <= 0:
            return outcome
        held_by = outcome.holder or ""
        if held_by != rt.holder and rt.ledger.take_over_if_dead(verified.request_id, held_by, rt.holder):
            log.warning("took over the lease of %s from a dead worker", verified.request_id)
            return ClaimOutcome(ClaimStatus.TAKEN, holder=rt.holder, lease_left_s=rt.settings.lease_s)
        time.sleep(min(_HELD_POLL_S, max(0.01, outcome.lease_left_s or _HELD_POLL_S)))


def dead_letter_queue_for(rt: FleetRuntime) -> Queue:
    """The dead-letter queue's declaration for the broker in use."""
    return dead_letter_queue(rt.settings.lanes, rt.amqp)


def _hand_back(task: Task[Any, Any], rt: FleetRuntime, verified: VerifiedRequest, raw: Any, why: HandBack) -> None:
    """Return the message to its lane for another worker, or dead-letter it past the delivery limit.

    Hand-backs are counted per request in Redis (``<prefix>:handbacks:<jti>``) on both brokers. Past the
    lane's delivery limit the caller is told (``fleet_dead_lettered``) and the message is kept in the
    dead-letter queue; nothing loops forever.
    """
    key = rt.keys.hand_backs(verified.request_id)
    if why.tried:
        count = rt.count_hand_back(verified.request_id, ttl_s=verified.time_left_s() + rt.settings.security.leeway_s)
    else:  # handed back untried: not the request's fault, not counted (its deadline bounds it)
        count = int(rt.redis.get(key) or 0)
    # RabbitMQ counts every return of the message (x-delivery-count), hand-back or not: the worker dead-letters
    # (and tells the caller) before the queue's own limit would dead-letter it silently.
    deliveries = _delivery_count(task)
    if count > rt.settings.lanes.delivery_limit or deliveries + 1 >= rt.settings.lanes.delivery_limit + QUEUE_MARGIN:
        envelope = rt.codec.error(
            verified,
            DeadLettered(f"no worker could serve the request after {count - 1} hand-backs; it was dead-lettered"),
        )
        log.warning("dead-lettering %s after %d hand-backs", verified.request_id, count - 1)
        if not rt.amqp:  # RabbitMQ dead-letters a rejected message itself; a Redis lane needs it copied
            task.app.send_task(
                task.name,
                args=[raw],
                task_id=verified.request_id,
                queue=dead_letter_queue_for(rt).name,
                headers={DEAD_LETTER_REASON_HEADER: DELIVERY_LIMIT_REASON, DEAD_LETTER_SOURCE_HEADER: verified.lane},
            )
        rt.ledger.complete(verified.request_id, rt.holder, envelope, ttl_s=rt.settings.result_expires_s)
        task.backend.mark_as_failure(verified.request_id, FleetTaskError(envelope), request=task.request)
        if verified.operation == "stream_chat":  # its reader stops at this error instead of its deadline
            stream_writer(rt, verified).error(envelope)
        raise Reject(str(why), requeue=False)
    rt.ledger.release(verified.request_id, rt.holder)
    HAND_BACKS.labels(instance=str(getattr(why, "instance", "-"))).inc()
    log.warning("handing %s back to its lane: %s", verified.request_id, why)
    # Stop consuming the failing instance's lanes first, so the lane redelivers to a worker with room
    # rather than back to this one (every redelivery counts against the lane's delivery limit).
    worker_fleet().reconcile()
    time.sleep(min(_HAND_BACK_PAUSE_S, max(0.0, verified.time_left_s()) / 10))
    raise Reject(str(why), requeue=True)


def _delivery_count(task: Task[Any, Any]) -> int:
    """How many times RabbitMQ returned this message to its lane before (its ``x-delivery-count`` header)."""
    value = task.request.get("x-delivery-count")
    if value is None:
        value = (getattr(task.request, "headers", None) or {}).get("x-delivery-count")
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _replay_stored(rt: FleetRuntime, stored: Any) -> dict[str, Any]:
    """Answer a completed request again with its stored answer, if a worker signed it (someone with Redis access
    could have replaced the ledger's copy: that is never stored over the genuine result)."""
    if not isinstance(stored, dict) or not rt.codec.answer_is_authentic(stored):
        log.warning("the stored answer is not a worker's: not replaying it")
        raise Ignore()
    if stored.get("message_type") == ERROR_MESSAGE_TYPE:
        raise FleetTaskError(stored)
    return stored


def _idempotent(rt: FleetRuntime, verified: VerifiedRequest, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` unless an earlier request with the same key (and payload) has, or will have, the answer."""
    if verified.idempotency_key == verified.request_id:  # no key of the caller's: nothing to look up
        return work()
    outcome = rt.idempotency.reserve(
        verified.idempotency_scope,
        verified.idempotency_key,
        verified.params_hash,
        verified.request_id,
        rt.settings.result_expires_s,
    )
    outcome.raise_for_conflict()
    if outcome.status is not IdemStatus.DUPLICATE:
        return work()
    first = rt.ledger.wait_for_result(outcome.request_id, timeout_s=max(0.0, verified.time_left_s()))
    if first is None:
        raise FleetTimeout("the first request with this idempotency key did not finish in time")
    opened = rt.codec.open_response(first.result, request_id=outcome.request_id)
    return {name: opened[name] for name in RESPONSE_BODY_FIELDS if name in opened}


def _run_on_instance(verified: VerifiedRequest, run: Runner) -> dict[str, Any]:
    served = worker_fleet().instance_for(verified.lane, verified.provider_instance, verified.model, verified.operation)
    bind(instance=served.name)
    if verified.operation in _GENERATION:
        with served.slot():
            return run(verified, served)
    return run(verified, served)


def _retrying(rt: FleetRuntime, verified: VerifiedRequest, served: ServedInstance, call: Callable[[float], Any]) -> Any:
    settings = rt.settings
    failed_attempts = 0

    def attempt(time_left_s: float) -> Any:
        # A blip seen by one request's retries must not open the circuit: its first failure counts, its next
        # ones only once it alone has failed ``circuit_failure_threshold`` times (the instance keeps failing).
        nonlocal failed_attempts
        counts = failed_attempts == 0 or failed_attempts >= settings.circuit_failure_threshold - 1
        try:
            return served.guarded(call, time_left_s, count_failure=counts)
        except ProviderError as exc:
            failed_attempts += int(exc.retryable)
            raise

    return call_with_retries(
        attempt,
        deadline=verified.expires_at_epoch,
        base_delay_s=settings.retry_base_delay_s,
        max_delay_s=settings.retry_max_delay_s,
        on_retry=lambda attempt, exc: _on_retry(verified, attempt, exc),
    )


def _on_retry(verified: VerifiedRequest, attempt: int, exc: ProviderError) -> None:
    RETRIES.labels(operation=verified.operation).inc()
    log.info("retrying after %s (attempt %d)", exc.code, attempt)


def run_chat(verified: VerifiedRequest, served: ServedInstance) -> dict[str, Any]:
    """One chat completion."""
    request = ChatRequest.model_validate(verified.params)
    response = _retrying(runtime(), verified, served, lambda left: served.client.chat(request, timeout_s=left))
    return chat_body(response, served, request)


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


def run_embed(verified: VerifiedRequest, served: ServedInstance) -> dict[str, Any]:
    """One embedding batch."""
    request = EmbedRequest.model_validate(verified.params)
    response = _retrying(runtime(), verified, served, lambda left: served.client.embed(request, timeout_s=left))
    data = response.model_dump(mode="json")
    return {"result": data, "usage": data.get("usage"), "metadata": {"instance": served.name}}


def stream_writer(rt: FleetRuntime, verified: VerifiedRequest) -> StreamWriter:
    """The writer of a request's Redis Stream."""
    return StreamWriter(
        rt.redis,
        rt.keys.stream(verified.request_id),
        max_len=rt.settings.stream_max_len,
        retention_s=rt.settings.stream_retention_s,
        cancel_key=rt.keys.cancel(verified.request_id),
        sealer=rt.stream_sealer(verified.request_id),
    )


def stream_chat_runner(task: Task[Any, Any]) -> Runner:
    """A runner that relays chunks into the task's Redis Stream and returns the assembled message."""

    def run(verified: VerifiedRequest, served: ServedInstance) -> dict[str, Any]:
        rt = runtime()
        request = ChatRequest.model_validate(verified.params)
        writer = stream_writer(rt, verified)
        attempts = 0
        # A redelivered request (its worker died mid-stream) finds that worker's chunks: mark them superseded.
        resumed = bool(rt.redis.exists(rt.keys.stream(verified.request_id)))

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
                    if cancelled or task.request.id in worker_state.revoked:
                        stream.close()
                        raise _Cancelled()
            return chat_body(accumulator.result(), served, request)

        try:
            body: dict[str, Any] = _retrying(rt, verified, served, one_attempt)
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

    return run
