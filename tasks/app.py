"""The one Celery app of the fleet, configured from ``celeryconfig`` (which reads the typed settings)."""

from __future__ import annotations

from celery import Celery

import celeryconfig
from provider.settings import Settings, get_settings
from tasks import redaction, result_backend, strict_json
from tasks.brokers import broker_for

__all__ = ["app"]

app = Celery("vllm_fleet")
app.config_from_object(celeryconfig)
app.conf.include = ["tasks.fleet"]
result_backend.install(app.loader)  # one round trip per stored result (see tasks.result_backend)
redaction.install()  # Celery's success log line and task events show an envelope's ids, never its content
strict_json.install()  # a message body with a duplicate key never decodes (kombu would keep the last one)


def apply_queue_declarations(settings: Settings) -> None:
    """Declare the control queue the way lanes are declared (see ``LaneBroker.control_queues``)."""
    app.conf.task_queues = broker_for(settings).control_queues()


apply_queue_declarations(get_settings())
# The worker's bootstep, by name: Celery loads it when a worker starts, so producers never import worker code.
app.steps["consumer"].add("tasks.worker:FleetConsumerStep")
