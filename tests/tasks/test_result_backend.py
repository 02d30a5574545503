"""The fleet's Redis result backend on real Redis: one script checks, stores and publishes each state."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery, states

from tasks.app import app as fleet_app
from tasks.result_backend import FleetRedisBackend, install
from tests.conftest import BACKEND_DB

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(redis_url: str) -> Iterator[FleetRedisBackend]:
    """A FleetRedisBackend on the test backend database, built the way the fleet app builds it."""
    app = Celery("result-backend-test", set_as_current=False)
    app.conf.update(
        result_backend=f"{redis_url}/{BACKEND_DB}",
        result_serializer="json",
        result_expires=120,
        result_extended=False,
    )
    install(app.loader)
    built = app.backend
    assert isinstance(built, FleetRedisBackend)
    yield built
    app.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{redis_url}/{BACKEND_DB}")
    yield client
    client.close()


def test_the_fleet_app_uses_it_for_redis_urls() -> None:
    assert isinstance(fleet_app.backend, FleetRedisBackend)
    assert fleet_app.conf.result_backend.startswith("redis://")  # the setting is the user's URL, unchanged


def test_a_stored_result_is_read_back_and_published(backend: FleetRedisBackend, raw: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = raw.pubsub()
    pubsub.subscribe(key)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    backend.store_result(task_id, {"content": "hi"}, states.SUCCESS)
    message = None
    deadline = time.monotonic() + 2
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None
    assert json.loads(message["data"])["result"] == {"content": "hi"}
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"content": "hi"})
    assert 0 < raw.ttl(key) <= 120


def test_a_success_is_never_overwritten_by_a_later_state(backend: FleetRedisBackend, raw: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"content": "first"}, states.SUCCESS)
    backend.store_result(task_id, None, states.STARTED)
    backend.store_result(task_id, ValueError("late duplicate"), states.FAILURE)
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"content": "first"})


def test_earlier_states_are_replaced(backend: FleetRedisBackend) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    backend.store_result(task_id, ValueError("boom"), states.FAILURE)
    assert backend.get_task_meta(task_id)["status"] == states.FAILURE
    backend.store_result(task_id, {"content": "retried"}, states.SUCCESS)
    assert backend.get_task_meta(task_id)["result"] == {"content": "retried"}


def test_a_value_redis_cannot_hold_is_refused_with_a_typed_error(
    backend: FleetRedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import BackendStoreError

    monkeypatch.setattr(backend, "_MAX_STR_VALUE_SIZE", 64)
    with pytest.raises(BackendStoreError, match="too large"):
        backend.store_result(str(uuid.uuid4()), {"content": "x" * 100}, states.SUCCESS)
