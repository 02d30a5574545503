"""Every Celery setting of the fleet, derived from the typed settings (``provider.settings``).

``tasks.app.create_app(settings)`` configures each app from ``build_config(settings)``. Nothing here is set by hand:
change the environment (``VLLM_FLEET_*``) or the config file instead.
"""

from __future__ import annotations

from typing import Any

from beat_schedule import build_beat_schedule
from provider.fleet.names import CONTROL_QUEUE, broker_is_amqp
from provider.settings import Settings
from provider.sizing import redis_pool_size, worker_threads

_BROKER_MARGIN_S = 60.0
DEFAULT_REDIS_VISIBILITY_TIMEOUT_S = 5.0
_CONNECT_TIMEOUT_S = 2.0
_RESTORE_LOCK_S = 3


def build_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for one settings object."""
    longest_s = settings.timeouts.longest_s
    slots = [instance.concurrency for instance in settings.usable_instances()]
    transport_options: dict[str, Any] = {}
    if broker_is_amqp(settings.broker_url):
        transport_options["confirm_publish"] = True
    else:
        # Unacked messages come back after this long. Workers touch the messages they hold (reserved or running)
        # every third of it (``tasks.worker.VisibilityKeeper``), so only a dead worker's messages come back, within
        # the deadlines; a copy of a message still running meets its live lease and never runs twice.
        visibility_s = settings.redis_visibility_timeout_s or DEFAULT_REDIS_VISIBILITY_TIMEOUT_S
        transport_options["visibility_timeout"] = max(1, int(visibility_s))
        transport_options["unacked_restore_interval"] = max(1, min(10, int(visibility_s / 4)))
        transport_options["unacked_restore_throttle"] = 1
        transport_options["socket_connect_timeout"] = _CONNECT_TIMEOUT_S  # a broker outage fails publishes fast
        # kombu's restore scan holds a lock (default 300 s): a worker SIGKILLed while holding it stopped every
        # restore for five minutes. Concurrent scans are safe (each restore is a WATCHed transaction).
        transport_options["unacked_mutex_expire"] = _RESTORE_LOCK_S
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # vLLM batches continuously: a worker keeps as many requests in flight as its instances accept.
        "worker_pool": "threads",
        "worker_concurrency": worker_threads(slots),
        # Flower shows tasks, states and runtimes from task events. They cost a publish per state change (about
        # a fifth of a worker's CPU per request, measured), so they are off unless asked for: Flower switches them
        # on in running workers itself (its enable_events timer, every 5 s), and sees every task from then on.
        "worker_send_task_events": settings.send_task_events,
        # A "task-sent" event per request from producers costs one more publish on the hot path: opt in.
        "task_send_sent_event": settings.send_sent_events,
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": ("tasks.routing.route_task",),
        "result_expires": int(settings.result_expires_s),
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        # a broker outage: publishing gives up after about a second (FleetError fleet_publish_failed)
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "redis_max_connections": redis_pool_size(slots),  # a connection per worker thread at once
        "task_time_limit": int(longest_s + _BROKER_MARGIN_S),
        "worker_hijack_root_logger": False,
        "worker_consumer": "tasks.consumer:FleetConsumer",
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "beat_schedule": build_beat_schedule(settings),
        "timezone": "UTC",
        "enable_utc": True,
    }
