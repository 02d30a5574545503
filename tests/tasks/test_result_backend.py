"""The fleet's Redis result backend on real Redis: one script checks, stores and publishes each state."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task, states

from provider.protocol.codec import WORKER_SIGNATURE_FIELD
from provider.protocol.ledger import JtiLedger
from tasks.app import app as fleet_app
from tasks.result_backend import FleetRedisBackend, complete_and_store, install
from tests.conftest import BACKEND_DB, STATE_DB

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
def answered(backend: FleetRedisBackend) -> Iterator[Task[Any, Any]]:
    """A task of the backend's app, running (its request pushed) under a fresh id, as a worker runs it."""

    @backend.app.task(name="result-backend-test.answer", shared=False)
    def answer() -> None:
        """Never called: the test plays the worker."""

    answer.push_request(id=str(uuid.uuid4()), is_eager=False)
    yield answer
    answer.pop_request()


def signed(content: str, sig: str) -> dict[str, Any]:
    """A response shaped like a worker's signed answer (the backend looks only for the signature)."""
    return {"content": content, WORKER_SIGNATURE_FIELD: {"sig": sig}}


def ledger_on(redis_url: str, db: int, holder: str, jti: str) -> JtiLedger:
    """A ledger on database ``db`` whose ``holder`` holds ``jti``."""
    ledger = JtiLedger(redis.Redis.from_url(f"{redis_url}/{db}"), f"rb-{uuid.uuid4().hex[:6]}")
    assert ledger.claim(jti, "digest", holder).status.value == "TAKEN"
    return ledger


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


def _published(pubsub: Any, seconds: float = 1.0) -> list[Any]:
    """The messages published to the subscribed channel within ``seconds`` (polled)."""
    messages = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            messages.append(json.loads(message["data"]))
    return messages


@pytest.mark.parametrize("ledger_db", [STATE_DB, BACKEND_DB], ids=["another-database", "same-database"])
def test_the_ledger_and_the_result_are_written_together(
    backend: FleetRedisBackend, answered: Task[Any, Any], raw: redis.Redis, redis_url: str, ledger_db: int
) -> None:
    task_id = str(answered.request.id)
    ledger = ledger_on(redis_url, ledger_db, "worker-1", task_id)
    assert backend.combined_with(ledger.client) is not None  # one server: one script
    pubsub = raw.pubsub()
    pubsub.subscribe(backend.get_key_for_task(task_id))
    response = signed("the answer", "sig-1")
    complete_and_store(answered, ledger, "worker-1", response, ttl_s=60)
    record = ledger.peek(task_id)
    assert record is not None
    assert (record["state"], json.loads(record["result"])) == ("done", response)
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, response)
    assert 0 < raw.ttl(backend.get_key_for_task(task_id)) <= 120
    # Celery's own store when the task returns is skipped: even another signed answer does not replace it.
    backend.mark_as_done(task_id, signed("another answer", "sig-2"), request=answered.request)
    assert backend.get_task_meta(task_id, cache=False)["result"] == response
    published = _published(pubsub)
    pubsub.close()
    assert [message["result"] for message in published] == [response]


def test_a_lost_lease_still_stores_the_result_but_not_the_record(
    backend: FleetRedisBackend, answered: Task[Any, Any], redis_url: str
) -> None:
    task_id = str(answered.request.id)
    ledger = ledger_on(redis_url, STATE_DB, "worker-1", task_id)
    complete_and_store(answered, ledger, "worker-2", signed("late", "sig-3"), ttl_s=60)
    record = ledger.peek(task_id)
    assert record is not None
    assert (record["state"], record["holder"]) == ("held", "worker-1")  # only the holder completes
    assert backend.get_task_meta(task_id)["result"] == signed("late", "sig-3")  # as Celery's store did before


def test_a_ledger_on_another_server_or_user_is_written_apart(
    backend: FleetRedisBackend, answered: Task[Any, Any], redis_url: str
) -> None:
    host_url = redis_url.removeprefix("redis://")
    elsewhere = redis.Redis.from_url(f"redis://127.0.0.1:1/{BACKEND_DB}")  # never connected
    other_user = redis.Redis.from_url(f"redis://someone:secret@{host_url}/{BACKEND_DB}")
    assert backend.combined_with(elsewhere) is None
    assert backend.combined_with(other_user) is None
    # Apart: the ledger's record now, the task's result only when Celery stores what the task returned.
    task_id = str(answered.request.id)
    ledger = ledger_on(redis_url, STATE_DB, "worker-1", task_id)
    answered.ignore_result = True  # a result Celery does not store is not stored with the ledger either
    complete_and_store(answered, ledger, "worker-1", signed("kept", "sig-4"), ttl_s=60)
    assert ledger.peek(task_id) is not None
    assert backend.get_task_meta(task_id, cache=False)["status"] == states.PENDING


def test_an_answer_too_large_for_the_result_backend_still_completes_the_ledger(
    backend: FleetRedisBackend, answered: Task[Any, Any], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import BackendStoreError

    task_id = str(answered.request.id)
    ledger = ledger_on(redis_url, STATE_DB, "worker-1", task_id)
    monkeypatch.setattr(backend, "_MAX_STR_VALUE_SIZE", 64)
    response = signed("x" * 100, "sig-5")
    complete_and_store(answered, ledger, "worker-1", response, ttl_s=60)
    record = ledger.peek(task_id)
    assert record is not None
    assert (record["state"], json.loads(record["result"])) == ("done", response)
    with pytest.raises(BackendStoreError, match="too large"):  # Celery's store refuses it, as before
        backend.mark_as_done(task_id, response, request=answered.request)
