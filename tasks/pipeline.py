"""The worker pipeline: one ``RequestContext`` passed through named steps, in design.md's order.

``execute`` is the whole path of one message, read top to bottom:

1. ``verify``: size, schema, version, legacy fields, signature, claims, sealed params, payload hash. A refusal is
   recorded as a typed error (never executed, never retried, never requeued), unless the task id already has a
   record: a refusal never overwrites a stored result.
2. ``claim``: the jti lease. Completed → the stored result; held by a live holder → nothing; seen with a
   different token → refused as a replay; free or abandoned → ours (``lease``: renewed while it runs).
3. ``check_deadline``, then ``idempotent`` (same key and payload → the first request's result; other payload →
   conflict).
4. ``pick_instance`` (the instance serving the lane), a concurrency slot, then the operation's runner, whose
   calls go through ``call_instance`` (circuit breaker, retries of transient failures within the deadline).
5. ``complete`` (store and count the answer) or ``fail`` (an error envelope the caller can read) or
   ``hand_back`` (to the lane for another worker, or dead-lettered past the delivery limit); ``observe``
   counts every answer.

Every step is a plain function of the context, testable with a real Redis and no broker. The context looks up
the runtime and the worker fleet once per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from celery import Task
from celery.exceptions import Ignore, Reject
from pydantic import ValidationError

from provider.fleet.names import DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER, DELIVERY_COUNT_HEADER
from provider.protocol import (
    ERROR_MESSAGE_TYPE,
    INFERENCE_OPERATIONS,
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
from provider.protocol.errors import DeadLettered, ExpiredError, FleetTimeout, InvalidRequest
from provider.vllm.errors import ProviderError
from provider.vllm.retry import call_with_retries
from tasks.errors import FleetTaskError, count_rejection
from tasks.logs import bind, request_context
from tasks.metrics import HAND_BACKS, REQUEST_SECONDS, REQUESTS, RETRIES, TOKENS
from tasks.queues import QUEUE_DELIVERY_LIMIT_MARGIN as QUEUE_MARGIN
from tasks.redaction import describe_exception
from tasks.result_backend import complete_and_store
from tasks.runtime import FleetRuntime, runtime
from tasks.stream_writer import StreamWriter
from tasks.worker import HandBack, ServedInstance, WorkerFleet, worker_fleet

__all__ = [
    "DELIVERY_LIMIT_REASON",
    "RequestContext",
    "Runner",
    "call_instance",
    "check_deadline",
    "claim",
    "complete",
    "execute",
    "fail",
    "hand_back",
    "idempotent",
    "observe",
    "pick_instance",
    "run_in_slot",
    "stream_writer",
    "verify",
]

log = logging.getLogger("tasks.execution")  # the name operators filter on: kept from before the pipeline

_T = TypeVar("_T")
_HELD_POLL_S = 0.1
DELIVERY_LIMIT_REASON = "delivery_limit"
_HAND_BACK_PAUSE_S = 0.5
RESPONSE_BODY_FIELDS = (*SEALED_RESPONSE_FIELDS, *PLAIN_RESPONSE_FIELDS)


@dataclass(slots=True)
class RequestContext:
    """One message on its way through the pipeline: what each step reads and what it adds.

    ``verified`` is set by ``verify``, ``served`` by ``pick_instance``; ``failed_attempts`` counts the
    retryable failures of this request's calls (the circuit rule of ``call_instance``).
    """

    task: Task[Any, Any]
    raw: Any
    rt: FleetRuntime
    fleet: WorkerFleet
    lane: str | None
    started: float
    verified: VerifiedRequest = field(init=False, repr=False)
    served: ServedInstance = field(init=False, repr=False)
    failed_attempts: int = 0

    @classmethod
    def of(cls, task: Task[Any, Any], raw: Any) -> RequestContext:
        """The context of the message ``task`` is running, with this process's runtime and worker fleet."""
        info = task.request.delivery_info or {}
        lane = info.get("routing_key")
        return cls(task, raw, runtime(), worker_fleet(), str(lane) if lane else None, time.monotonic())

    @property
    def request_id(self) -> str:
        """The task id: the id the caller reads its answer under."""
        return str(self.task.request.id)


Runner = Callable[[RequestContext], dict[str, Any]]


def execute(task: Task[Any, Any], raw: Any, run: Runner) -> dict[str, Any]:
    """Validate ``raw``, then run ``run`` once under the jti lease; returns the response envelope."""
    ctx = RequestContext.of(task, raw)
    with request_context(request_id=ctx.request_id, lane=ctx.lane):
        verify(ctx)
        stored = claim(ctx)
        if stored is not None:
            return stored
        verified = ctx.verified
        bind(correlation_id=verified.correlation_id)
        if ctx.rt.settings.log_payloads:
            log.debug("request params: %s", verified.params)
        leases = ctx.fleet.leases
        leases.hold(verified.request_id)
        try:
            check_deadline(ctx)
            body = idempotent(ctx, run)
            response = ctx.rt.codec.response(verified, body)
        except HandBack as exc:
            hand_back(ctx, exc)
        except Exception as caught:  # every failure becomes a typed error envelope; nothing crashes the worker
            fail(ctx, caught)
        finally:
            leases.drop(verified.request_id)
        complete(ctx, response, body.get("usage"))
        return response


# 1. verify


def verify(ctx: RequestContext) -> None:
    """Verify the envelope against the task it arrived as; sets ``ctx.verified`` or refuses the message."""
    try:
        verified = ctx.rt.codec.verify_request(ctx.raw, lane=ctx.lane, task_name=ctx.task.name)
        if verified.request_id != ctx.task.request.id:
            raise ClaimMismatchError("the task id is not the envelope's request id", field="request_id")
    except EnvelopeError as exc:
        refuse(ctx, exc)
    ctx.verified = verified


def refuse(ctx: RequestContext, exc: EnvelopeError) -> NoReturn:
    """Record a refused message as a typed error, without ever overwriting a stored result."""
    task, rt = ctx.task, ctx.rt
    task_id = ctx.request_id
    log.warning(
        "envelope refused: %s",
        exc.code,
        extra={"task_id": task_id, "code": exc.code, "lane": ctx.lane, "task": task.name},
    )
    count_rejection(exc.code)
    if rt.ledger.peek(task_id) is not None or _has_stored_result(task):
        raise Ignore()
    # The error answers the id the caller reads (the task id), whatever the refused envelope claims.
    source = {**(ctx.raw if isinstance(ctx.raw, dict) else {}), "request_id": task_id}
    raise FleetTaskError(rt.codec.error(source, exc))


def _has_stored_result(task: Task[Any, Any]) -> bool:
    meta = task.backend.get_task_meta(str(task.request.id))
    return bool(meta) and meta.get("status") not in (None, "PENDING")


# 2. claim and lease


def claim(ctx: RequestContext) -> dict[str, Any] | None:
    """Claim the request's jti: None when it is ours to run, the stored answer when it already completed.

    Raises ``Ignore`` while a live holder still runs it at the deadline, and refuses a replay (same id,
    another token).
    """
    outcome = _claim_lease(ctx.rt, ctx.verified)
    if outcome.status is ClaimStatus.COMPLETED:
        return _replay_stored(ctx.rt, outcome.result)
    if outcome.status is ClaimStatus.HELD:  # still held at the deadline: its live holder answers
        raise Ignore()
    if outcome.status is ClaimStatus.MISMATCH:
        refuse(ctx, ReplayedError("this request id was already used", field="jti"))
    return None


def _claim_lease(rt: FleetRuntime, verified: VerifiedRequest) -> ClaimOutcome:
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


def _replay_stored(rt: FleetRuntime, stored: Any) -> dict[str, Any]:
    """Answer a completed request again with its stored answer, if a worker signed it (someone with Redis access
    could have replaced the ledger's copy: that is never stored over the genuine result)."""
    if not isinstance(stored, dict) or not rt.codec.answer_is_authentic(stored):
        log.warning("the stored answer is not a worker's: not replaying it")
        raise Ignore()
    if stored.get("message_type") == ERROR_MESSAGE_TYPE:
        raise FleetTaskError(stored)
    return stored


# 3. deadline and idempotency


def check_deadline(ctx: RequestContext) -> None:
    """Refuse a request whose deadline has passed (``ExpiredError``): the codec allows its clock-skew leeway,
    but no work starts past the deadline on this worker's clock (its caller has stopped waiting)."""
    ctx.rt.codec.check_deadline(ctx.verified)
    if ctx.verified.time_left_s() <= 0:
        raise ExpiredError("the request's deadline passed before a worker could start it", field="expires_at")


def idempotent(ctx: RequestContext, run: Runner) -> dict[str, Any]:
    """The request's response body: from ``run_in_slot(ctx, run)``, unless an earlier request with the same
    idempotency key (and payload) has, or will have, the answer."""
    rt, verified = ctx.rt, ctx.verified
    if verified.idempotency_key == verified.request_id:  # no key of the caller's: nothing to look up
        return run_in_slot(ctx, run)
    outcome = rt.idempotency.reserve(
        verified.idempotency_scope,
        verified.idempotency_key,
        verified.params_hash,
        verified.request_id,
        rt.settings.result_expires_s,
    )
    outcome.raise_for_conflict()
    if outcome.status is not IdemStatus.DUPLICATE:
        return run_in_slot(ctx, run)
    first = rt.ledger.wait_for_result(outcome.request_id, timeout_s=max(0.0, verified.time_left_s()))
    if first is None:
        raise FleetTimeout("the first request with this idempotency key did not finish in time")
    opened = rt.codec.open_response(first.result, request_id=outcome.request_id)
    return {name: opened[name] for name in RESPONSE_BODY_FIELDS if name in opened}


# 4. instance, slot, circuit and retries


def pick_instance(ctx: RequestContext) -> ServedInstance:
    """The instance serving the request's lane (``HandBack`` when this worker no longer serves it)."""
    verified = ctx.verified
    served = ctx.fleet.instance_for(verified.lane, verified.provider_instance, verified.model, verified.operation)
    ctx.served = served
    bind(instance=served.name)
    return served


def run_in_slot(ctx: RequestContext, run: Runner) -> dict[str, Any]:
    """Pick the instance, then run the operation, holding one of its concurrency slots for generation."""
    served = pick_instance(ctx)
    if ctx.verified.operation in INFERENCE_OPERATIONS:
        with served.slot():
            return run(ctx)
    return run(ctx)


def call_instance(ctx: RequestContext, call: Callable[[float], _T]) -> _T:
    """Run ``call(time_left_s)`` on the picked instance through its circuit breaker, retrying transient failures
    within the deadline (``provider.vllm.retry``, never ``self.retry()``)."""
    settings = ctx.rt.settings
    return call_with_retries(
        lambda time_left_s: _guarded_attempt(ctx, call, time_left_s),
        deadline=ctx.verified.expires_at_epoch,
        base_delay_s=settings.retry_base_delay_s,
        max_delay_s=settings.retry_max_delay_s,
        on_retry=lambda attempt, exc: _on_retry(ctx, attempt, exc),
    )


def _guarded_attempt(ctx: RequestContext, call: Callable[[float], _T], time_left_s: float) -> _T:
    # A blip seen by one request's retries must not open the circuit: its first failure counts, its next ones
    # only once it alone has failed ``circuit_failure_threshold`` times (the instance keeps failing).
    failed = ctx.failed_attempts
    counts = failed == 0 or failed >= ctx.rt.settings.circuit_failure_threshold - 1
    try:
        return ctx.served.guarded(call, time_left_s, count_failure=counts)
    except ProviderError as exc:
        ctx.failed_attempts = failed + int(exc.retryable)
        raise


def _on_retry(ctx: RequestContext, attempt: int, exc: ProviderError) -> None:
    RETRIES.labels(operation=ctx.verified.operation).inc()
    log.info("retrying after %s (attempt %d)", exc.code, attempt)


# 5. complete, fail, hand back, observe


def complete(ctx: RequestContext, response: dict[str, Any], usage: Any) -> None:
    """Store the signed answer in the ledger (and as the task's result, in the same round trip when one Redis
    server holds both) and count it."""
    rt = ctx.rt
    complete_and_store(ctx.task, rt.ledger, rt.holder, response, ttl_s=rt.settings.result_expires_s)
    observe(ctx, "ok", usage)


def fail(ctx: RequestContext, caught: Exception) -> NoReturn:
    """Answer a failure with a typed error envelope (stored, counted, raised as ``FleetTaskError``)."""
    rt, verified = ctx.rt, ctx.verified
    failure: Exception = caught
    if isinstance(caught, ValidationError):  # the params do not make a valid request: say which fields
        failure = InvalidRequest(f"invalid request: {describe_exception(caught)}")
    elif not isinstance(caught, (EnvelopeError, ProviderError, FleetError)):
        # by type and field names only: an exception's text or traceback may quote the prompt
        log.error("unexpected failure serving %s: %s", verified.request_id, describe_exception(caught))
    elif isinstance(caught, EnvelopeError):
        count_rejection(caught.code)  # refused after the claim (the deadline), counted like the others
    envelope = rt.codec.error(verified, failure)
    rt.ledger.complete(verified.request_id, rt.holder, envelope, ttl_s=rt.settings.result_expires_s)
    observe(ctx, str(envelope.get("code", "error")), None)
    raise FleetTaskError(envelope) from None


def observe(ctx: RequestContext, outcome: str, usage: Any) -> None:
    """Count one answered request (outcome ``ok`` or its error code), its duration and its tokens."""
    verified = ctx.verified
    REQUESTS.labels(lane=verified.lane, operation=verified.operation, outcome=outcome).inc()
    REQUEST_SECONDS.labels(operation=verified.operation).observe(time.monotonic() - ctx.started)
    if isinstance(usage, dict):
        TOKENS.labels(direction="in").inc(int(usage.get("prompt_tokens") or 0))
        TOKENS.labels(direction="out").inc(int(usage.get("completion_tokens") or 0))
    log.info("%s %s", verified.operation, outcome)


def hand_back(ctx: RequestContext, why: HandBack) -> NoReturn:
    """Return the message to its lane for another worker, or dead-letter it past the delivery limit.

    Hand-backs are counted per request in Redis (``<prefix>:handbacks:<jti>``) on both brokers. Past the
    lane's delivery limit the caller is told (``fleet_dead_lettered``) and the message is kept in the
    dead-letter queue; nothing loops forever.
    """
    task, rt, verified = ctx.task, ctx.rt, ctx.verified
    key = rt.keys.hand_backs(verified.request_id)
    if why.tried:
        count = rt.count_hand_back(verified.request_id, ttl_s=verified.time_left_s() + rt.settings.security.leeway_s)
    else:  # handed back untried: not the request's fault, not counted (its deadline bounds it)
        count = int(rt.redis.get(key) or 0)
    # RabbitMQ counts every return of the message (x-delivery-count), hand-back or not: the worker dead-letters
    # (and tells the caller) before the queue's own limit would dead-letter it silently.
    deliveries = delivery_count(task)
    if count > rt.settings.lanes.delivery_limit or deliveries + 1 >= rt.settings.lanes.delivery_limit + QUEUE_MARGIN:
        envelope = rt.codec.error(
            verified,
            DeadLettered(f"no worker could serve the request after {count - 1} hand-backs; it was dead-lettered"),
        )
        log.warning("dead-lettering %s after %d hand-backs", verified.request_id, count - 1)
        if not rt.broker.dead_letters_rejected:  # RabbitMQ dead-letters a rejected message; Redis needs a copy
            task.app.send_task(
                task.name,
                args=[ctx.raw],
                task_id=verified.request_id,
                queue=rt.broker.dead_letter_queue().name,
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
    ctx.fleet.reconcile()
    time.sleep(min(_HAND_BACK_PAUSE_S, max(0.0, verified.time_left_s()) / 10))
    raise Reject(str(why), requeue=True)


def delivery_count(task: Task[Any, Any]) -> int:
    """How many times RabbitMQ returned this message to its lane before (its ``x-delivery-count`` header)."""
    value = task.request.get(DELIVERY_COUNT_HEADER)
    if value is None:
        value = (getattr(task.request, "headers", None) or {}).get(DELIVERY_COUNT_HEADER)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


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
