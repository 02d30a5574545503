"""The producer API: ``chat.delay(model=..., messages=...)`` builds, routes, signs and publishes one envelope.

Every fleet task's ``apply_async`` takes the request's own keyword arguments (``provider.vllm.models.ChatRequest``
fields for chat and stream_chat, ``EmbedRequest`` fields for embed, the call's arguments plus ``instance`` for
management) and these fleet options, all optional:

| option | meaning |
|---|---|
| ``timeout_s`` | the one deadline, from now; default per operation from settings |
| ``idempotency_key`` | a resubmission with the same key returns the stored result (scoped to caller and operation) |
| ``correlation_id`` | groups requests of one conversation or job |
| ``caller``, ``message_context``, ``trace_context`` | JSON objects carried (hashed in the token) for the caller's use |
| ``fleet_priority`` | ``critical``, ``high``, ``normal`` (default) or ``low`` |

A pre-built envelope (``apply_async(args=[envelope])``, or ``send_task`` from another language) is published
to its own lane unchanged. The returned ``FleetResult.get()`` opens the response envelope and raises
``FleetError`` for an error envelope, and never waits past the request's deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, ClassVar, cast

from amqp.exceptions import MessageNacked
from celery import Task
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from provider.fleet.lanes import LaneError
from provider.protocol import MANAGEMENT_OPERATIONS, FleetError
from provider.protocol.errors import (
    Backpressure,
    EnvelopeError,
    FleetTimeout,
    InvalidRequest,
    NoFleetQueue,
    PublishFailed,
    ResponseForged,
    ResultUnavailable,
    as_fleet_error,
)
from provider.vllm.models import ChatRequest, EmbedRequest
from tasks.errors import FleetTaskError, error_as_dict
from tasks.routing import live_instances, pick_lane, pick_management_queue, queue_for
from tasks.runtime import FleetRuntime, runtime

__all__ = [
    "FLEET_OPTIONS",
    "PRIORITIES",
    "FleetGroupResult",
    "FleetResult",
    "FleetTask",
    "ManagementParams",
]

log = logging.getLogger("tasks.producer")

PRIORITIES = {"critical": 9, "high": 7, "normal": 5, "low": 2}
FLEET_OPTIONS = (
    "timeout_s",
    "idempotency_key",
    "correlation_id",
    "caller",
    "message_context",
    "trace_context",
    "fleet_priority",
)
_RESULT_GRACE_S = 2.0
_AUTHENTIC_POLL_S = 0.05
_MANAGEMENT = MANAGEMENT_OPERATIONS


class ManagementParams(BaseModel):
    """Arguments of the management operations (each uses the ones it needs)."""

    model_config = {"extra": "forbid"}

    level: int | None = None
    mode: str | None = None
    tags: list[str] | None = None
    reset_running_requests: bool | None = None
    reset_external: bool | None = None
    live: bool | None = None


def is_envelope(value: Any) -> bool:
    """Whether a task argument is already a fleet envelope."""
    return isinstance(value, dict) and "signed_token" in value and "routing_key" in value


def _timeout_for(rt: FleetRuntime, operation: str) -> float:
    timeouts = rt.settings.timeouts
    if operation == "embed":
        return timeouts.embed_s
    if operation == "stream_chat":
        return timeouts.stream_s
    if operation == "chat":
        return timeouts.chat_s
    return timeouts.management_s


def _validated_params(operation: str, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Validate a request's own arguments at submit (clear errors before anything is published)."""
    model_cls: type[BaseModel]
    if operation in ("chat", "stream_chat"):
        model_cls = ChatRequest
    elif operation == "embed":
        model_cls = EmbedRequest
    else:
        model_cls = ManagementParams
    try:
        parsed = model_cls.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise InvalidRequest(
            f"invalid {operation} request: {problems}",
            metadata={"field": ".".join(str(p) for p in exc.errors()[0]["loc"])},
        ) from None
    model = getattr(parsed, "model", None)
    return model, parsed.model_dump(mode="json", exclude_none=True)


_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "above")}


def _problem(error: Any) -> str:
    """One validation error as a user can act on it: the field, what is wrong, never the text it was given."""
    field = ".".join(str(part) for part in error["loc"]) or "request"
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if field == "messages" and kind == "too_short":
        return 'messages is empty: give at least one message, e.g. [{"role": "user", "content": "Hi"}]'
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        shown = f" (got {given})" if isinstance(given, int | float) and not isinstance(given, bool) else ""
        return f"{field} must be {words} {ctx.get(name)}{shown}"
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"{field} is not a field of this request"
    return f"{field}: {error['msg']}"


class FleetResult(AsyncResult):  # type: ignore[type-arg]
    """An ``AsyncResult`` that opens response envelopes and raises typed ``FleetError``s.

    Only what a fleet worker signed for this request is returned. A stored value that is not (a forgery, or an
    early write by someone with Redis access) never hides the worker's answer: the result waits, up to the
    deadline, for an authentic one in the result backend or the worker's ledger, and otherwise raises
    ``ResponseForged`` (``response_forged``).
    """

    deadline: float | None = None
    lane: str | None = None
    operation: str | None = None

    def __del__(self) -> None:
        """Celery unsubscribes from the result here; with the result store down that fails: nothing to do then."""
        with contextlib.suppress(Exception):  # garbage collection must never raise
            super().__del__()

    def get(self, timeout: float | None = None, propagate: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        """The opened response; waits at most until the request's deadline (plus a short grace).

        A result made from an id alone (``chat.AsyncResult(id)``, not from ``delay`` here) does not know its
        deadline: it waits at most the longest deadline of any operation (``timeouts.longest_s``), never for ever.
        While the result store is unreachable it raises ``ResultUnavailable`` (retryable); with no answer by the
        deadline (no worker took the request, or it ran too long) ``FleetTimeout`` (retryable).
        """
        if timeout is None:
            if self.deadline is not None:
                timeout = max(0.0, self.deadline - time.time()) + _RESULT_GRACE_S
            else:
                timeout = runtime().settings.timeouts.longest_s + _RESULT_GRACE_S
        until = time.monotonic() + timeout
        candidate: Any = None
        try:
            candidate = super().get(timeout=timeout, propagate=True, **kwargs)
        except (RedisError, OperationalError) as exc:
            raise _result_unavailable(exc) from None
        except RuntimeError as exc:  # Celery's result consumer after its connection broke
            if isinstance(exc.__cause__ or exc.__context__, RedisError) or "restarted" in str(exc):
                raise _result_unavailable(exc) from None
            # anything else: no answer a worker signed yet; look for one below
        except CeleryTimeoutError:
            raise FleetTimeout("no result before the request's deadline") from None
        except FleetTaskError as exc:
            candidate = exc.envelope
        except TaskRevokedError:  # expired in its lane before a worker took it
            raise FleetTimeout("the request expired before a worker took it") from None
        except Exception:  # a failure no fleet worker signed: look for an authentic answer below
            candidate = None
        try:
            return self._open(candidate)
        except ResponseForged as exc:
            forged = exc
        return self._authentic_answer(forged, until)

    def _open(self, candidate: Any) -> Any:
        """The response a worker signed for this request; its typed error; or ``response_forged``."""
        return runtime().codec.open_response(candidate, request_id=self.id, lane=self.lane, operation=self.operation)

    def _authentic_answer(self, forged: ResponseForged, until: float) -> Any:
        """Wait for an answer a worker signed (result backend, then the worker's ledger) until ``until``."""
        rt = runtime()
        log.warning("ignoring an unauthenticated result for %s", self.id)
        while True:
            for candidate in self._candidates(rt):
                with contextlib.suppress(ResponseForged):
                    return self._open(candidate)
            if time.monotonic() >= until:
                raise forged
            time.sleep(_AUTHENTIC_POLL_S)

    def _candidates(self, rt: FleetRuntime) -> list[Any]:
        """What might be the worker's answer: the stored result as it is now, and the ledger's record."""
        found: list[Any] = []
        try:
            meta = self.backend.get_task_meta(self.id, cache=False)
        except Exception:
            meta = {}
        result = meta.get("result")
        found.append(result.envelope if isinstance(result, FleetTaskError) else result)
        try:
            outcome = rt.ledger.lookup(self.id)
        except ValueError:  # a record that is not JSON: not the worker's
            outcome = None
        except RedisError as exc:
            raise _result_unavailable(exc) from None
        if outcome is not None and outcome.result is not None:
            found.append(outcome.result)
        return found


def _publish_failed(exc: BaseException) -> PublishFailed:
    return PublishFailed(f"could not publish: Redis unreachable ({type(exc).__name__})")


def _result_unavailable(exc: BaseException) -> ResultUnavailable:
    return ResultUnavailable(f"the result store is unreachable ({type(exc).__name__}); try get() again")


class FleetGroupResult:
    """Results of a fan-out to every instance: ``get()`` maps instance name to its answer or error."""

    def __init__(self, results: dict[str, FleetResult]) -> None:
        self.results = results

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """Each instance's answer, or ``{"error": {...}}`` for one that failed: who answered what."""
        answers: dict[str, Any] = {}
        for instance, result in self.results.items():
            try:
                answers[instance] = {"ok": True, "result": result.get(timeout=timeout)}
            except FleetError as exc:
                answers[instance] = {"ok": False, "error": error_as_dict(exc)}
        return answers


class FleetTask(Task):  # type: ignore[type-arg]
    """Base of every fleet task: the producer side builds the envelope; the worker side executes it."""

    abstract = True
    operation: ClassVar[str] = ""
    acks_late = True
    reject_on_worker_lost = True
    throws = (FleetTaskError,)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> FleetResult:
        """Results of fleet tasks open envelopes (answers for this task's operation only)."""
        result = FleetResult(task_id, backend=self.backend, task_name=self.name, app=self.app, **kwargs)
        result.operation = self.operation or None
        return result

    def apply_async(  # type: ignore[override]
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> FleetResult | FleetGroupResult:
        """Publish one signed envelope (or one per instance for a management call to ``all``).

        Every refusal is a ``FleetError`` with a code (a protocol refusal keeps its own, e.g. ``token_lifetime``;
        Redis unreachable is ``fleet_publish_failed``).
        """
        try:
            if args and len(args) == 1 and is_envelope(args[0]) and not kwargs:
                return self._publish(args[0], producer=producer, options=options)
            if args:
                raise InvalidRequest(f"{self.name} takes keyword arguments or one envelope")
            return self.submit(producer=producer, options=options, **(kwargs or {}))
        except FleetError:
            raise
        except EnvelopeError as exc:
            raise as_fleet_error(exc) from None
        except LaneError as exc:  # no lane key can be made for it (the registry's values, not the caller's)
            raise NoFleetQueue(f"no lane can serve this request: {exc}") from None
        except RedisError as exc:
            raise _publish_failed(exc) from None

    def submit(
        self, *, producer: Any = None, options: dict[str, Any] | None = None, **kwargs: Any
    ) -> FleetResult | FleetGroupResult:
        """Build, route, sign and publish; the producer API behind ``delay``.

        With Redis (registry or broker) unreachable it raises ``PublishFailed`` at once.
        """
        try:
            return self._submit(producer=producer, options=options, **kwargs)
        except RedisError as exc:
            raise _publish_failed(exc) from None

    def _submit(
        self, *, producer: Any = None, options: dict[str, Any] | None = None, **kwargs: Any
    ) -> FleetResult | FleetGroupResult:
        rt = runtime()
        fleet = {k: kwargs.pop(k) for k in FLEET_OPTIONS if k in kwargs}
        operation = self.operation
        instance = str(kwargs.pop("instance", "any")) if operation in _MANAGEMENT else "any"
        model, params = _validated_params(operation, kwargs)
        timeout_s = float(fleet.get("timeout_s") or _timeout_for(rt, operation))
        priority = PRIORITIES.get(str(fleet.get("fleet_priority", "normal")))
        if priority is None:
            raise InvalidRequest("fleet_priority must be critical, high, normal or low")

        def build(lane: str, provider_instance: str) -> dict[str, Any]:
            return rt.codec.build_request(
                operation=operation,
                task_name=self.name,
                lane=lane,
                params=params,
                timeout_s=timeout_s,
                model=model,
                provider_instance=provider_instance,
                correlation_id=fleet.get("correlation_id"),
                idempotency_key=fleet.get("idempotency_key"),
                caller=fleet.get("caller"),
                message_context=fleet.get("message_context"),
                trace_context=fleet.get("trace_context"),
            )

        publish_options = {**(options or {}), "priority": priority}
        if operation in _MANAGEMENT:
            if instance == "all":
                results: dict[str, FleetResult] = {}
                for name in live_instances(rt):
                    lane = pick_management_queue(name, rt)
                    envelope = build(lane, name)
                    published = self._publish(envelope, producer=producer, options=dict(publish_options))
                    assert isinstance(published, FleetResult)
                    results[name] = published
                return FleetGroupResult(results)
            lane = pick_management_queue(instance, rt)
            envelope = build(lane, instance)
            return self._publish(envelope, producer=producer, options=publish_options)
        if model is None:
            raise InvalidRequest(f"{operation} needs a model")
        choice = pick_lane(operation, model, params, rt)
        if choice["model"] != model:  # an alias: the request names the offering's exact served id
            model = choice["model"]
            params = {**params, "model": model}
        envelope = build(choice["lane"], choice["instance"])
        return self._publish(envelope, producer=producer, options=publish_options)

    def _publish(self, envelope: dict[str, Any], *, producer: Any, options: dict[str, Any]) -> FleetResult:
        rt = runtime()
        lane = envelope["routing_key"]
        _check_lane_room(rt, lane)
        timeout_s = float(envelope.get("timeout_seconds") or 0) or None
        options.setdefault("queue", queue_for(lane, rt))
        # Flower and task events show these instead of the arguments: ids only, never payload or token.
        options["argsrepr"] = envelope_summary(envelope)
        options["kwargsrepr"] = "{}"
        rt.broker.publish_options(options, timeout_s)
        if timeout_s:
            options.setdefault("expires", timeout_s)
        task_id = envelope["request_id"]

        def send(chosen: Any) -> Any:
            return super(FleetTask, self).apply_async((envelope,), {}, task_id=task_id, producer=chosen, **options)

        try:
            with self.app.producer_or_acquire(producer) as chosen:
                result = rt.broker.publish(chosen, options["queue"], task_id, send)
        except Exception as exc:
            if _was_nacked(exc):
                raise Backpressure(f"lane {lane} is full; try later") from None
            if isinstance(exc, OperationalError):
                raise PublishFailed(f"could not publish to {lane}: broker unreachable") from exc
            raise
        fleet_result = cast(FleetResult, result)
        fleet_result.lane = lane
        fleet_result.operation = envelope.get("operation")
        if timeout_s:
            fleet_result.deadline = time.time() + timeout_s
        return fleet_result


def _was_nacked(exc: BaseException) -> bool:
    """Whether RabbitMQ refused the message (a full lane with reject-publish), however kombu wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MessageNacked):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def envelope_summary(envelope: dict[str, Any]) -> str:
    """What monitoring may show of an envelope: operation, ids, lane, model; never params or token."""
    return (
        f"(<envelope op={envelope.get('operation')} request_id={envelope.get('request_id')} "
        f"lane={envelope.get('routing_key')} model={envelope.get('model')}>,)"
    )


_room_lock = threading.Lock()
_lane_room: dict[str, tuple[float, int]] = {}
_ROOM_RECHECK_S = 0.1


def _check_lane_room(rt: FleetRuntime, lane: str) -> None:
    """On Redis, refuse to publish into a lane already holding ``max_length`` messages (RabbitMQ does it itself).

    A lane whose depth, as last read plus what this process has published to it since, is under half the limit
    is not asked again for ``_ROOM_RECHECK_S``: one producer never overshoots the bound, and the depth query (a
    round trip) leaves the hot path. Concurrent producers may still overshoot it by a few (the bound is soft).
    """
    if rt.broker.bounds_lanes:
        return
    limit = rt.settings.lanes.max_length
    now = time.monotonic()
    with _room_lock:
        seen = _lane_room.get(lane)
        if seen is not None and now - seen[0] < _ROOM_RECHECK_S and seen[1] + 1 < limit // 2:
            _lane_room[lane] = (seen[0], seen[1] + 1)  # count this publish against the estimate
            return
    depth = rt.lane_depth(lane)
    with _room_lock:
        _lane_room[lane] = (now, depth + 1)
    if depth >= rt.settings.lanes.max_length:
        raise Backpressure(
            f"lane {lane} holds {depth} waiting requests (limit {rt.settings.lanes.max_length}); try later"
        )
