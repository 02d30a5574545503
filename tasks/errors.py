"""Errors of the Celery layer; what callers catch is ``provider.protocol.FleetError`` (its tree and codes are in
``provider.protocol.errors``).

``FleetTaskError`` is internal: it only carries an error envelope from a worker to the result backend (Celery
stores it as the task's failure, so Flower shows FAILURE with the code, never payload text), and the producer
API turns it back into the ``FleetError`` subclass of its code (``fleet_error_from_envelope``).
"""

from __future__ import annotations

from typing import Any

from provider.protocol import FleetError
from provider.protocol.codes import PROVIDER_ERROR
from tasks.metrics import ENVELOPE_REJECTIONS

__all__ = ["FleetTaskError", "count_rejection", "error_as_dict", "fleet_error_from_envelope"]


class FleetTaskError(Exception):
    """A task's typed failure; its only argument is the error envelope (no payload text, no secrets)."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        super().__init__(envelope)
        self.envelope = envelope

    def __str__(self) -> str:
        envelope = self.envelope if isinstance(self.envelope, dict) else {}
        return f"{envelope.get('code', 'error')}: {envelope.get('message', '')}"


def fleet_error_from_envelope(envelope: dict[str, Any]) -> FleetError:
    """The ``FleetError`` (the subclass of its code) an error envelope describes."""
    return FleetError(
        str(envelope.get("message", "the fleet reported an error")),
        code=str(envelope.get("code", PROVIDER_ERROR)),
        retryable=bool(envelope.get("retryable", False)),
        error_class=envelope.get("error_class"),
        request_id=envelope.get("request_id"),
        metadata=envelope.get("metadata") or None,
    )


def error_as_dict(exc: FleetError) -> dict[str, Any]:
    """A caller-facing summary of a ``FleetError``."""
    return {"code": exc.code, "message": exc.message, "retryable": exc.retryable}


def count_rejection(code: str) -> None:
    """Count one refused envelope by its code."""
    ENVELOPE_REJECTIONS.labels(code=code).inc()
