"""The dead-letter queue: what could not be delivered or served, kept for an operator to inspect,
requeue to its lane, or drop.

RabbitMQ dead-letters lanes itself (expired, over the delivery limit); workers copy what they dead-letter on a
Redis broker, and undecodable bytes, into the same queue. Listing never consumes: messages are read and put back.

Requeueing runs the work again: the answer stored for a dead-lettered request (``fleet_dead_lettered``) and its
hand-back count are forgotten first, so the worker does not answer the copy with them. A request still inside
its deadline goes back as it is (a caller still waiting gets the answer); one past its deadline is re-signed as
a new request with the same parameters and a fresh deadline (``requeued_as``: its id), which needs the signing
key (and the sealing key for sealed parameters) where the command runs.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from typing import Any

from provider.fleet.names import DEAD_LETTER_REASON_HEADER, DEATH_HEADER, FIRST_DEATH_REASON_HEADER
from provider.protocol import EnvelopeError
from provider.protocol.codes import FLEET_DEAD_LETTERED
from tasks.app import app
from tasks.producer import is_envelope
from tasks.runtime import FleetRuntime, runtime

__all__ = ["DeadLetter", "drop_dead_letters", "list_dead_letters", "requeue_dead_letters"]

_READ_LIMIT = 10_000
_DEAD_LETTERED = FLEET_DEAD_LETTERED
_MIN_TIME_LEFT_S = 5.0


@dataclass(frozen=True)
class DeadLetter:
    """What an operator sees of one dead-lettered message (ids and routing only, never params)."""

    task_id: str
    task: str
    lane: str
    operation: str
    reason: str
    requeued_as: str = ""

    def as_row(self) -> list[str]:
        """Table cells."""
        return [self.task_id, self.task, self.lane, self.operation, self.reason, self.requeued_as]


def _envelope_of(message: Any) -> dict[str, Any] | None:
    payload = message.payload
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(base64.b64decode(payload) if isinstance(payload, bytes) else payload)
        except ValueError:
            return None
    args = payload[0] if isinstance(payload, list) and payload else None
    if isinstance(args, list) and args and is_envelope(args[0]):
        envelope: dict[str, Any] = args[0]
        return envelope
    return None


def _describe(message: Any) -> DeadLetter:
    headers = message.headers or {}
    envelope = _envelope_of(message) or {}
    deaths = headers.get(DEATH_HEADER) or []
    if deaths and isinstance(deaths[0], dict):  # RabbitMQ's own dead-lettering: rejected, expired, delivery_limit
        reason = str(deaths[0].get("reason", ""))
    else:  # what a worker copied here: our header
        reason = str(headers.get(DEAD_LETTER_REASON_HEADER) or headers.get(FIRST_DEATH_REASON_HEADER) or "")
    return DeadLetter(
        task_id=str(headers.get("id") or envelope.get("request_id") or "?"),
        task=str(headers.get("task") or "?"),
        lane=str(envelope.get("routing_key") or "?"),
        operation=str(envelope.get("operation") or "?"),
        reason=str(reason or "dead-lettered"),
    )


def _each(rt: FleetRuntime, decide: Any) -> list[DeadLetter]:
    """Read every dead letter once; ``decide(message)`` returns "keep", "requeue" or "drop"."""
    seen: list[DeadLetter] = []
    with app.connection_for_write() as conn:
        declaration: Any = rt.broker.dead_letter_queue()
        queue = conn.SimpleQueue(declaration)
        kept: list[Any] = []
        try:
            for _ in range(_READ_LIMIT):
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                letter = _describe(message)
                action = decide(message)
                if action == "keep":
                    kept.append(message)
                else:
                    if action == "requeue":
                        letter = replace(letter, requeued_as=_republish(rt, message))
                    message.ack()
                seen.append(letter)
        finally:
            for message in kept:
                message.requeue()
            queue.close()
    return seen


def _republish(rt: FleetRuntime, message: Any) -> str:
    """Publish a dead letter's request to run again; returns its request id (a new one when re-signed)."""
    envelope = _envelope_of(message)
    name = str((message.headers or {}).get("task") or "")
    if envelope is None or name not in app.tasks:
        raise ValueError("this dead letter holds no fleet envelope; drop it instead")
    request_id = str(envelope.get("request_id") or "")
    lane = str(envelope.get("routing_key") or "")
    verified = rt.codec.verify_request(envelope, lane=lane, task_name=name, now=_issued_at(envelope))
    if rt.ledger.forget_error(request_id, _DEAD_LETTERED):  # its stored answer would be given to the copy
        rt.redis.delete(rt.keys.hand_backs(request_id))
        app.backend.forget(request_id)
    if verified.time_left_s() >= _MIN_TIME_LEFT_S:
        app.tasks[name].apply_async(args=(envelope,))
        return request_id
    fresh = rt.codec.build_request(
        operation=verified.operation,
        task_name=name,
        lane=lane,
        params=verified.params,
        timeout_s=verified.timeout_seconds,
        model=verified.model,
        provider_instance=verified.provider_instance,
        correlation_id=verified.correlation_id,
        caller=verified.caller,
        message_context=verified.message_context,
        trace_context=verified.trace_context,
    )
    app.tasks[name].apply_async(args=(fresh,))
    return str(fresh["request_id"])


def _issued_at(envelope: dict[str, Any]) -> float:
    """When the token was issued (read unverified, only to verify everything else as of that time)."""
    try:
        payload = str(envelope["signed_token"]).split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["iat"]) + 1.0
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise EnvelopeError("the dead letter's token cannot be read") from exc


def list_dead_letters(rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Every dead letter, left in place."""
    return _each(rt or runtime(), lambda _: "keep")


def _act_on(action: str, task_id: str | None, rt: FleetRuntime | None) -> list[DeadLetter]:
    """Apply ``action`` to every dead letter (or the one of ``task_id``), keep the rest; returns those acted on."""
    chosen: list[bool] = []

    def decide(message: Any) -> str:
        picked = task_id is None or _describe(message).task_id == task_id
        chosen.append(picked)
        return action if picked else "keep"

    seen = _each(rt or runtime(), decide)
    return [letter for letter, picked in zip(seen, chosen, strict=True) if picked]


def requeue_dead_letters(task_id: str | None = None, rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Publish dead letters (all, or one by task id) back to their lanes; returns what was requeued."""
    return _act_on("requeue", task_id, rt)


def drop_dead_letters(task_id: str | None = None, rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Delete dead letters (all, or one by task id); returns what was dropped."""
    return _act_on("drop", task_id, rt)
