"""The worker's message consumer: a message no task can be made of goes to the dead-letter queue, never to the logs.

Celery's consumer logs the body of a message it cannot decode (``on_decode_error``), that names no task
(``on_unknown_message``), an unknown task (``on_unknown_task``) or is not a valid task message
(``on_invalid_task``), then acks or rejects it: on Redis it is gone. ``FleetConsumer`` (the ``worker_consumer``
setting) instead copies the raw body and headers to the dead-letter queue (``tasks.queues.dead_letter_queue``),
counts it (``vllm_fleet_undecodable_messages_total`` by reason), logs sizes and well-formed ids only, answers
the caller with a typed error when the message names a request id that has no record yet, and acks it. Whatever
a message holds, handling it never raises into the event loop (broker connection errors aside): the lane flows on.

On Redis anyone with broker access can push an item that is not a kombu message at all onto a lane list; kombu
then raises in its reader and the worker stops. ``guard_redis_transport`` makes kombu hand such an item over as
a message of its own content type (``UNDECODABLE_CONTENT_TYPE``), which the consumer dead-letters like the rest.
It also sets a message's delivery lane to the list kombu actually popped it from: a frame LPUSHed onto one
lane's list claiming another lane in its own ``delivery_info`` is checked against the lane it really came from.

It also keeps a broker drop from stopping the worker: when the Redis broker goes away, Celery closes the
connection (kombu detaches its transport) and reconnects, while tasks started before the drop still run on
their threads. When one finishes, it acks its message on the old channel, which then builds a connection pool
from the detached transport and raised ``AttributeError`` (not a connection error), which Celery treats as
unrecoverable: the worker exited. Guarded, that ack fails as a broker connection error, which Celery logs; the
message stays unacked on the broker and comes back after the visibility timeout, where the jti ledger answers
it with the stored result (it never runs twice).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from celery import signals
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from vine import promise

from provider.fleet.names import DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER
from provider.protocol import EnvelopeError, MalformedError, OperationNotAllowedError
from provider.protocol.envelope import REQUEST_ID_PATTERN
from tasks.errors import FleetTaskError
from tasks.metrics import UNDECODABLE_MESSAGES
from tasks.runtime import runtime

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "UNDECODABLE_CONTENT_TYPE",
    "FleetConsumer",
    "UndecodableReason",
    "fleet_task_names",
    "guard_redis_transport",
    "redact_reprs",
]

log = logging.getLogger("tasks.consumer")

UNDECODABLE_CONTENT_TYPE = "application/x-fleet-undecodable"
DEAD_LETTER_PUBLISH_TIMEOUT_S = 5.0
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
_PERSISTENT = 2
_PLAIN_CONTENT_TYPE = "application/octet-stream"
_BINARY_ENCODING = "binary"


class UndecodableReason:
    """Label values of ``vllm_fleet_undecodable_messages_total`` (and of the dead-letter reason header)."""

    DECODE_ERROR = "decode_error"
    UNKNOWN_MESSAGE = "unknown_message"
    UNKNOWN_TASK = "unknown_task"
    INVALID_TASK = "invalid_task"
    HANDLER_ERROR = "handler_error"
    TRANSPORT_FRAME = "transport_frame"


def _well_formed(value: object) -> str | None:
    """A caller-given id or name as it may be logged or answered: our id syntax, or nothing."""
    return value if isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value) else None


def _headers(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return dict(headers) if isinstance(headers, Mapping) else {}


def _body(message: Any) -> bytes:
    body = getattr(message, "body", None)
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return b""


def _text_property(message: Any, name: str, default: str) -> str:
    value = getattr(message, name, None)
    return value if isinstance(value, str) and value else default


def _handed_to_pool(message: Any) -> bool:
    """Whether a request made of this message is already scheduled, reserved or running (it settles itself)."""
    scheduled = getattr(worker_state, "scheduled_requests", ())  # not in the stubs
    pending = (*scheduled, *worker_state.reserved_requests, *worker_state.active_requests)
    return any(getattr(request, "message", None) is message for request in pending)


class FleetConsumer(Consumer):
    """Celery's consumer, but undecodable messages are dead-lettered, counted, answered when possible, never logged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        guard_redis_transport()

    def update_strategies(self) -> None:
        """Celery's strategies for the fleet's own tasks only: any other name (Celery's built-ins such as
        ``celery.accumulate`` or ``celery.chord_unlock`` included) is an unknown task here, dead-lettered and
        answered with a typed error before anything runs, on every queue this worker consumes."""
        super().update_strategies()
        allowed = fleet_task_names(self.app)
        strategies: dict[str, Any] = getattr(self, "strategies")  # noqa: B009 (not in the stubs)
        for name in [name for name in strategies if name not in allowed]:
            del strategies[name]  # the handler keeps this very dict: refuse in place

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """The body cannot be decoded (not JSON, a content type we do not accept, not a broker message at all)."""
        raw_item = _text_property(message, "content_type", "") == UNDECODABLE_CONTENT_TYPE
        reason = UndecodableReason.TRANSPORT_FRAME if raw_item else UndecodableReason.DECODE_ERROR
        self._dead_letter(message, reason, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Decoded, but not a task message (no task name)."""
        self._dead_letter(message, UndecodableReason.UNKNOWN_MESSAGE, None)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task name no worker here registers."""
        self._dead_letter(message, UndecodableReason.UNKNOWN_TASK, exc)
        headers = _headers(message)
        signals.task_unknown.send(
            sender=self, message=message, exc=exc, name=_well_formed(headers.get("task")), id=headers.get("id")
        )

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message Celery refuses (bad args, ETA, expires, content type)."""
        self._dead_letter(message, UndecodableReason.INVALID_TASK, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def create_task_handler(self, promise: type[promise] = promise) -> Callable[..., Any]:
        """Celery's handler, guarded: a message that makes it raise is dead-lettered instead of stopping the loop."""
        handle = super().create_task_handler(promise)
        connection_errors = self._connection_errors()

        def on_task_received(message: Any) -> None:
            try:
                redact_reprs(message)
                handle(message)
            except Exception as exc:  # any message whatever: never crash the consumer
                # kombu's Redis transport counts KeyError as a connection error; from a handler it is the message's
                if isinstance(exc, connection_errors) and not isinstance(exc, LookupError):
                    raise
                if getattr(message, "acknowledged", False) or _handed_to_pool(message):
                    log.error("task message handler failed after handing the message on: %s", type(exc).__name__)
                    return
                self._dead_letter(message, UndecodableReason.HANDLER_ERROR, exc)

        return on_task_received

    # ----------------------------------------------------------------------------------------------- internals

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        return tuple(getattr(self, "connection_errors", None) or ())

    def _dead_letter(self, message: Any, reason: str, exc: BaseException | None) -> None:
        """Copy to the dead-letter queue, count, log ids only, answer the caller if it named a request, ack."""
        errors = self._connection_errors()
        headers = _headers(message)
        delivery = getattr(message, "delivery_info", None) or {}
        source = _well_formed(delivery.get("routing_key")) or ""
        task_id = _well_formed(headers.get("id"))
        UNDECODABLE_MESSAGES.labels(reason=reason).inc()
        log.error(
            "dead-lettering a message no task can be made of: reason=%s error=%s lane=%s task=%s id=%s bytes=%d",
            reason,
            type(exc).__name__ if exc is not None else "-",
            source or "-",
            _well_formed(headers.get("task")) or "-",
            task_id or "-",
            len(_body(message)),
            extra={"reason": reason, "lane": source, "task_id": task_id},
        )
        if getattr(message, "acknowledged", False):
            return
        kept = self._publish_dead_letter(message, headers, reason, source)
        if task_id is not None and reason != UndecodableReason.UNKNOWN_MESSAGE:
            self._answer(task_id, reason)
        if kept:
            message.ack_log_error(log, errors)
        else:  # on RabbitMQ the lane's own dead-letter exchange keeps it; on Redis this drops it
            message.reject_log_error(log, errors, requeue=False)

    def _publish_dead_letter(self, message: Any, headers: dict[str, Any], reason: str, source: str) -> bool:
        """Publish the raw body and headers to the dead-letter queue; False when the broker would not take it."""
        rt = runtime()
        queue = rt.broker.dead_letter_queue()
        body = _body(message)
        content_type = _text_property(message, "content_type", _PLAIN_CONTENT_TYPE)
        content_encoding = _text_property(message, "content_encoding", _BINARY_ENCODING)
        marks = {DEAD_LETTER_REASON_HEADER: reason, DEAD_LETTER_SOURCE_HEADER: source}
        for attempt_headers in ({**headers, **marks}, marks):  # headers the broker cannot carry: ours alone
            try:
                with self.app.producer_or_acquire() as producer:
                    producer.publish(
                        body,
                        exchange="",
                        routing_key=queue.name,
                        declare=[queue],
                        content_type=content_type,
                        content_encoding=content_encoding,
                        headers=attempt_headers,
                        delivery_mode=_PERSISTENT,
                        retry=True,
                        retry_policy=_PUBLISH_RETRY,
                        timeout=DEAD_LETTER_PUBLISH_TIMEOUT_S,
                    )
            except Exception as exc:  # the copy failed: try plainer headers, then fall back to reject
                log.error("could not dead-letter a message (%s): %s", reason, type(exc).__name__)
                continue
            return True
        return False

    def _answer(self, task_id: str, reason: str) -> None:
        """Record a typed error for the request the message named, unless it already has a record or result."""
        try:
            rt = runtime()
            if rt.ledger.peek(task_id) is not None:
                return
            backend = self.app.backend
            meta = backend.get_task_meta(task_id, cache=False)
            if meta and meta.get("status") not in (None, "PENDING"):
                return
            error: EnvelopeError
            if reason == UndecodableReason.UNKNOWN_TASK:
                error = OperationNotAllowedError("no task of that name runs on this fleet", field="task")
            else:
                error = MalformedError("the message could not be read as a fleet task")
            envelope = rt.codec.error({"request_id": task_id}, error)
            backend.mark_as_failure(task_id, FleetTaskError(envelope), call_errbacks=False)
        except Exception as exc:  # the answer is a courtesy; the dead-lettered copy is what counts
            log.error("could not record the refusal of %s: %s", task_id, type(exc).__name__)


# What the fleet's own producers put in ``argsrepr`` (``tasks.producer.envelope_summary``): ids only.
_SUMMARY = re.compile(r"\(<envelope op=[a-z_]+ request_id=[A-Za-z0-9._:-]+ lane=[A-Za-z0-9._:-]+ model=[^\s<>]*>,\)")


def redact_reprs(message: Any) -> None:
    """Keep the sender's ``argsrepr``/``kwargsrepr`` headers only when they are the fleet's id-only summary.

    Celery shows them in the ``task-received`` event (and Flower), and a Celery client other than the fleet's
    producer fills them with the arguments themselves: the envelope, contexts in clear."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or ("argsrepr" not in headers and "kwargsrepr" not in headers):
        return
    argsrepr = headers.get("argsrepr")
    if not (isinstance(argsrepr, str) and _SUMMARY.fullmatch(argsrepr)):
        headers["argsrepr"] = f"(<envelope request_id={_well_formed(headers.get('id')) or '-'}>,)"
    headers["kwargsrepr"] = "{}"


def fleet_task_names(app: Any) -> frozenset[str]:
    """The names of the fleet's own tasks (``FleetTask`` subclasses) registered on ``app``: all a worker runs."""
    from tasks.producer import FleetTask

    return frozenset(name for name, task in app.tasks.items() if isinstance(task, FleetTask))


# --------------------------------------------------------------------------------------------- Redis transport


_popped = threading.local()  # the Redis list kombu is delivering an item from, while it builds the message


class _RawItem:
    """What the guarded ``loads`` returns for text that is not JSON: the text, kept for the dead-letter copy."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _undecodable_payload(payload: object) -> dict[str, Any]:
    """A kombu message (as the Redis transport stores one) whose body is the item that was not one."""
    if isinstance(payload, _RawItem):
        raw = payload.text.encode("utf-8", "surrogatepass")
    else:
        raw = json.dumps(payload, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
    return {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-type": UNDECODABLE_CONTENT_TYPE,
        "content-encoding": _BINARY_ENCODING,
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": uuid.uuid4().hex,
            "delivery_info": {"exchange": "", "routing_key": ""},
            "delivery_mode": _PERSISTENT,
            "priority": 0,
        },
    }


def guard_redis_transport() -> bool:
    """Make kombu's Redis transport deliver a list item that is not a kombu message instead of raising; idempotent.

    Its reader decodes each popped item with ``loads`` and builds ``Channel.Message`` from it: text that is not
    JSON raises there, outside any handler, and stops the worker. Guarded, such an item (already popped, so never
    seen again) becomes a message of ``UNDECODABLE_CONTENT_TYPE`` that the consumer dead-letters and acks.
    """
    try:
        from kombu.transport import redis as imported
    except ImportError:  # no Redis client installed: nothing to guard
        return False
    redis_transport: Any = imported  # module internals the stubs do not declare
    if getattr(redis_transport, "_fleet_guarded", False):
        return True
    original_loads = redis_transport.loads
    base_message: Any = redis_transport.Channel.Message

    def loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_loads(text, *args, **kwargs)
        except ValueError:
            return _RawItem(text if isinstance(text, str) else bytes(text).decode("utf-8", "replace"))

    class GuardedMessage(base_message):  # type: ignore[misc]
        """A Redis message; an item that is not one is delivered as an undecodable message instead of raising."""

        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            try:
                super().__init__(payload, channel=channel, **kwargs)
            except Exception:  # not a kombu message dict: wrap what was there
                super().__init__(_undecodable_payload(payload), channel=channel, **kwargs)
                return
            lane = getattr(_popped, "queue", None)
            if lane:  # the lane is the list this came from, whatever the frame's own delivery_info claims
                info: Any = getattr(self, "delivery_info", None)
                self.delivery_info = {**(info or {}), "routing_key": lane}

    original_deliver = redis_transport.Transport._deliver
    original_fanout = redis_transport.Channel._deliver_fanout_message

    def _deliver(self: Any, message: Any, queue: Any) -> Any:
        """Note the list BRPOP popped this item from (broadcasts, which come by pub/sub, keep their own)."""
        _popped.queue = None if getattr(_popped, "fanout", False) else queue
        try:
            return original_deliver(self, message, queue)
        finally:
            _popped.queue = None

    def _deliver_fanout_message(self: Any, message: Any, exchange: Any) -> Any:
        _popped.fanout = True
        try:
            return original_fanout(self, message, exchange)
        finally:
            _popped.fanout = False

    original_connparams = redis_transport.Channel._connparams
    connection_error = redis_transport.get_redis_ConnectionError()

    def connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.connection, "client", None) is None:  # the connection was closed: a late ack or reject
            raise connection_error("the broker connection of this channel was closed")
        return original_connparams(self, *args, **kwargs)

    original_restore_once = redis_transport.QoS.restore_unacked_once

    def restore_unacked_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        """At exit, a channel whose connection was closed restores nothing: its unacked messages stay in Redis's
        unacked set, and the visibility timeout hands them to a live worker."""
        if getattr(self.channel.connection, "client", None) is None:
            return None
        return original_restore_once(self, *args, **kwargs)

    redis_transport.loads = loads
    redis_transport.QoS.restore_unacked_once = restore_unacked_once
    redis_transport.Channel.Message = GuardedMessage
    redis_transport.Transport._deliver = _deliver
    redis_transport.Channel._deliver_fanout_message = _deliver_fanout_message
    redis_transport.Channel._connparams = connparams
    redis_transport._fleet_guarded = True
    return True
