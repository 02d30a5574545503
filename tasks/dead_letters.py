"""The dead-letter queue: what could not be delivered or served, kept for an operator to inspect,
requeue to its lane, or drop.

RabbitMQ dead-letters lanes itself (expired, over the delivery limit); workers copy what they dead-letter on a
Redis broker, and undecodable bytes, into the same queue. Listing never consumes: messages are read and put back.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from tasks.app import app
from tasks.producer import is_envelope
from tasks.queues import dead_letter_queue
from tasks.runtime import FleetRuntime, runtime

__all__ = ["DeadLetter", "drop_dead_letters", "list_dead_letters", "requeue_dead_letters"]

_READ_LIMIT = 10_000


@dataclass(frozen=True)
class DeadLetter:
    """What an operator sees of one dead-lettered message (ids and routing only, never params)."""

    task_id: str
    task: str
    lane: str
    operation: str
    reason: str

    def as_row(self) -> list[str]:
        """Table cells."""
        return [self.task_id, self.task, self.lane, self.operation, self.reason]


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
    deaths = headers.get("x-death") or []
    reason = str(deaths[0].get("reason", "")) if deaths and isinstance(deaths[0], dict) else headers.get("x-reason", "")
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
        declaration: Any = dead_letter_queue(rt.settings.lanes, rt.amqp)
        queue = conn.SimpleQueue(declaration)
        kept: list[Any] = []
        try:
            for _ in range(_READ_LIMIT):
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                seen.append(_describe(message))
                action = decide(message)
                if action == "keep":
                    kept.append(message)
                else:
                    if action == "requeue":
                        _republish(message)
                    message.ack()
        finally:
            for message in kept:
                message.requeue()
            queue.close()
    return seen


def _republish(message: Any) -> None:
    envelope = _envelope_of(message)
    name = str((message.headers or {}).get("task") or "")
    if envelope is None or name not in app.tasks:
        raise ValueError("this dead letter holds no fleet envelope; drop it instead")
    app.tasks[name].apply_async(args=(envelope,))


def list_dead_letters(rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Every dead letter, left in place."""
    return _each(rt or runtime(), lambda _: "keep")


def _act_on(action: str, task_id: str | None, rt: FleetRuntime | None) -> list[DeadLetter]:
    """Apply ``action`` to every dead letter (or the one of ``task_id``), keep the rest; returns those acted on."""
    chosen: list[DeadLetter] = []

    def decide(message: Any) -> str:
        letter = _describe(message)
        if task_id is None or letter.task_id == task_id:
            chosen.append(letter)
            return action
        return "keep"

    _each(rt or runtime(), decide)
    return chosen


def requeue_dead_letters(task_id: str | None = None, rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Publish dead letters (all, or one by task id) back to their lanes; returns what was requeued."""
    return _act_on("requeue", task_id, rt)


def drop_dead_letters(task_id: str | None = None, rt: FleetRuntime | None = None) -> list[DeadLetter]:
    """Delete dead letters (all, or one by task id); returns what was dropped."""
    return _act_on("drop", task_id, rt)
