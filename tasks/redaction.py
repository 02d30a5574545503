"""What Celery itself may write about a fleet task's result: a summary of ids, never the envelope.

Celery renders a task's return value with ``celery.app.trace.saferepr`` for its ``Task …succeeded in …: <value>``
log line (INFO) and the ``task-succeeded`` event Flower shows. ``install`` makes that rendering print
``<response op=… request_id=… lane=…>`` for a fleet envelope (the same for an error envelope), so neither the
sealed payload nor anything the caller put in its contexts reaches a log, an event or Flower.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

__all__ = ["describe_exception", "install", "result_summary"]


def result_summary(value: Any) -> str | None:
    """The summary of a fleet envelope, or None for anything else."""
    if not isinstance(value, dict):
        return None
    message_type = value.get("message_type")
    if not isinstance(message_type, str) or not message_type.startswith("llm.fleet."):
        return None
    kind = message_type.rsplit(".", 1)[-1]
    code = f" code={value.get('code')}" if kind == "error" else ""
    return (
        f"<{kind} op={value.get('operation')} request_id={value.get('request_id')} "
        f"lane={value.get('routing_key')}{code}>"
    )


def describe_exception(exc: BaseException) -> str:
    """An exception for a log line: its type and the fields it names, never the values it quotes."""
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(str(part) for part in error["loc"]) or "(root)" for error in exc.errors()})
        return f"{type(exc).__name__} in {', '.join(fields[:8])}"
    return type(exc).__name__


def install() -> None:
    """Wrap ``celery.app.trace.saferepr`` so fleet envelopes render as their summary; idempotent."""
    from celery.app import trace

    module: Any = trace
    if getattr(module, "_fleet_redacted", False):
        return
    original = module.saferepr

    def saferepr(value: Any, *args: Any, **kwargs: Any) -> str:
        summary = result_summary(value)
        return summary if summary is not None else str(original(value, *args, **kwargs))

    module.saferepr = saferepr
    module._fleet_redacted = True
