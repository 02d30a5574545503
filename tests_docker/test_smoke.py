"""pytest-celery's Docker-based smoke tests: run only where a Docker engine exists (``make test-docker``).

pytest-celery 1.x starts its worker, broker and backend as containers; the plugin is disabled in the main
suite (``-p no:celery``), so these run in their own session with it enabled.
"""

from __future__ import annotations

from pytest_celery import RESULT_TIMEOUT, CeleryTestSetup, ping


def test_setup_is_ready(celery_setup: CeleryTestSetup) -> None:
    assert celery_setup.ready()


def test_worker_answers_a_ping(celery_setup: CeleryTestSetup) -> None:
    worker_queue = celery_setup.worker.worker_queue
    assert ping.s().apply_async(queue=worker_queue).get(timeout=RESULT_TIMEOUT) == "pong"
