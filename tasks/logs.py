"""Structured logs: every line about a request carries its request id, correlation id, lane and instance.

The ids live in context variables set by the worker pipeline; ``RequestContextFilter`` copies them onto every
log record (``-`` outside a request). ``VLLM_FLEET_LOG_FORMAT=json`` switches the worker's handlers to one
JSON object per line. Payload text is never logged unless ``VLLM_FLEET_LOG_PAYLOADS=true`` (a debug aid).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["JsonFormatter", "RequestContextFilter", "install", "request_context"]

REQUEST_FIELDS = ("request_id", "correlation_id", "lane", "instance")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("fleet_request", default=None)


def _current() -> dict[str, str]:
    return _context.get() or {}


@contextmanager
def request_context(**fields: str | None) -> Iterator[None]:
    """Attach request fields to every log line written inside the block (per thread/context)."""
    token = _context.set({**_current(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: str | None) -> None:
    """Add fields to the current request context (e.g. the instance once it is chosen)."""
    _context.set({**_current(), **{k: v for k, v in fields.items() if v}})


class RequestContextFilter(logging.Filter):
    """Copies the current request's ids onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; only adds attributes."""
        current = _current()
        for name in REQUEST_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, current.get(name, "-"))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        body: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            body[name] = getattr(record, name, "-")
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


TEXT_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s %(message)s "
    "[request_id=%(request_id)s correlation_id=%(correlation_id)s lane=%(lane)s instance=%(instance)s]"
)


def install(logger: logging.Logger, *, json_lines: bool) -> None:
    """Add the request filter and the chosen format to every handler of ``logger``."""
    formatter: logging.Formatter = JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)
    for handler in logger.handlers:
        handler.addFilter(RequestContextFilter())
        handler.setFormatter(formatter)
