"""The fleet's Celery app: ``create_app(settings)`` builds one, fully configured (``celeryconfig.build_config``,
the control queue's declaration, the fleet's tasks, the worker's bootstep by name); ``configure(settings)`` makes a
new runtime and app current and closes the old app.

``app`` and the producer API's tasks (``fleet_task``, ``from tasks import chat``) always resolve to the current
app, so ``chat.delay()`` after ``configure`` publishes on the new broker; ``celery -A tasks.app`` finds ``app``.
Never imports worker code (the bootstep is loaded by name when a worker starts).
"""

from __future__ import annotations

import threading
from functools import partial
from typing import cast

from celery import Celery
from celery.local import Proxy
from kombu import Connection, pools
from kombu.utils.collections import eqhash

from celeryconfig import build_config
from provider.settings import Settings
from tasks import redaction, result_backend, strict_json
from tasks.brokers import broker_for
from tasks.fleet import register_fleet_tasks, task_name
from tasks.producer import FleetTask
from tasks.runtime import FleetRuntime, replace_runtime, runtime

__all__ = ["WORKER_BOOTSTEP", "app", "close_app", "configure", "create_app", "fleet_app", "fleet_task"]

# The worker's consumer bootstep, by name: Celery loads it when a worker starts, so producers never import it.
WORKER_BOOTSTEP = "tasks.worker:FleetConsumerStep"

redaction.install()  # Celery's success log line and task events show an envelope's ids, never its content
strict_json.install()  # a message body with a duplicate key never decodes (kombu would keep the last one)


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``: every setting from ``build_config``, the control queue declared the way lanes
    are (``LaneBroker.control_queues``), one result round trip per stored result (``tasks.result_backend``), every
    fleet task registered, and the worker's bootstep. Not made current: ``configure`` does that."""
    config = {**build_config(settings), "task_queues": broker_for(settings).control_queues()}
    built = Celery("vllm_fleet", config_source=config, set_as_current=False)
    result_backend.install(built.loader)
    built.steps["consumer"].add(WORKER_BOOTSTEP)
    register_fleet_tasks(built)
    return built


def close_app(old: Celery, *, successor: Celery | None = None) -> None:
    """Release what ``old`` holds, then ``old.close()``: its result consumer (the pub/sub connection results arrive
    on), and, when ``successor`` publishes elsewhere, the broker's connection and producer pools (kombu keeps one
    per broker for the process: taken out of its registry and closed, so nothing reuses them). ``old`` publishes
    no more."""
    consumer = getattr(old.backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
    broker = old.connection_for_write()
    if successor is None or not _same_broker(broker, successor):
        for group in (pools.producers, pools.connections):  # producers first: their pool takes a connection pool
            pool = group[broker]
            del group[broker]
            pool.force_close_all()
    broker.release()
    old.close()


def _same_broker(broker: Connection, other: Celery) -> bool:
    """Whether ``other`` publishes on ``broker`` as kombu pools it (same transport, host, user, vhost, options)."""
    with other.connection_for_write() as theirs:
        return bool(eqhash(broker) == eqhash(theirs))


_lock = threading.Lock()
_current: Celery | None = None


def _make_current(chosen: Celery) -> None:
    chosen.set_current()  # this thread
    chosen.set_default()  # and every other thread that has not chosen one


def fleet_app() -> Celery:
    """The current fleet app, built from the runtime's settings on first use."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                built = create_app(runtime().settings)
                _make_current(built)
                _current = built
    return _current


def configure(settings: Settings) -> FleetRuntime:
    """Switch this process to ``settings``: a new runtime and a new app become current, the old app is closed
    (``close_app``) and the old runtime's Redis connections released. Tests, benchmarks and the CLI switch settings
    this way; not meant for use while other threads publish."""
    global _current
    fresh_runtime = FleetRuntime(settings)
    fresh_app = create_app(settings)
    with _lock:
        old_app, _current = _current, fresh_app
        old_runtime = replace_runtime(fresh_runtime)
        _make_current(fresh_app)
    if old_app is not None:
        close_app(old_app, successor=fresh_app)
    if old_runtime is not None:
        old_runtime.close()
    return fresh_runtime


def _current_task(name: str) -> FleetTask:
    return cast(FleetTask, fleet_app().tasks[name])


def fleet_task(operation: str) -> FleetTask:
    """The task of ``operation`` on whichever app is current when it is used (``chat.delay`` after ``configure``
    publishes with the new app)."""
    return cast(FleetTask, Proxy(partial(_current_task, task_name(operation)), name=task_name(operation)))


# ``celery -A tasks.app`` and ``from tasks import app``: the current app.
app = cast(Celery, Proxy(fleet_app))
