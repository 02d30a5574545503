"""The app factory: ``create_app(settings)`` builds a configured Celery app; ``configure(settings)`` makes a new
one current, the producer API follows it onto the new broker, and the old app is closed (its broker connections
released, it publishes no more). Switching runs in a child process: it closes the app a session's in-process
worker may be running on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from provider.protocol import generated_security
from provider.settings import Settings
from tests.conftest import BACKEND_DB, BROKER_DB, RABBIT_HOST, RABBIT_PORT, STATE_DB, _rabbitmqctl, require_server

ROOT = Path(__file__).resolve().parents[2]
_CONNECTIONS_POLL_S = 0.2


def _settings(broker_url: str, redis_base: str, prefix: str) -> Settings:
    return Settings(
        broker_url=broker_url,
        result_backend=f"{redis_base}/{BACKEND_DB}",
        redis_url=f"{redis_base}/{STATE_DB}",
        key_prefix=prefix,
        security=generated_security(kid="factory-k1", encryption_kid="factory-e1"),
    )


def test_create_app_builds_a_configured_app_and_leaves_the_current_one_alone(redis_url: str) -> None:
    from provider.protocol import OPERATIONS
    from tasks.app import WORKER_BOOTSTEP, create_app, fleet_app
    from tasks.producer import FleetTask

    settings = _settings(f"{redis_url}/{BROKER_DB}", redis_url, "vft-factory")
    current = fleet_app()
    built = create_app(settings)
    try:
        assert built is not current
        assert fleet_app() is current
        assert built.conf.broker_url == settings.broker_url
        assert built.conf.result_backend == settings.result_backend
        assert [queue.name for queue in built.conf.task_queues] == ["llm.fleet.control"]
        assert WORKER_BOOTSTEP in built.steps["consumer"]
        for operation in OPERATIONS:
            task = built.tasks[f"vllm.{operation}"]
            assert isinstance(task, FleetTask)
            assert (task.operation, task.app) == (operation, built)
    finally:
        built.close()


def test_runtime_and_app_modules_touch_no_private_celery_attribute() -> None:
    """The old ``_forget_connections`` reset seven private attributes; the factory needs none."""
    for module in ("tasks/runtime.py", "tasks/app.py"):
        source = (ROOT / module).read_text()
        for private in ("._pool", "_producer_pool", "_backend_cache", "._local", "amqp.__dict__"):
            assert private not in source, f"{module} uses {private}"


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own: its connections are only the child's."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = f"vllm-fleet-factory-{os.getpid()}"
    _rabbitmqctl("delete_vhost", vhost, check=False)
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    _rabbitmqctl("delete_vhost", vhost, check=False)


def _vhost_connections(vhost: str) -> int:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "vhost"], capture_output=True, text=True, timeout=60, check=True
    )
    return sum(1 for line in listed.stdout.splitlines() if line.strip() == vhost)


def child_switches(vhost: str, redis_base: str, queue: str, timeout_s: float) -> dict[str, Any]:
    """In the child: configure RabbitMQ, publish, configure Redis, publish; what each broker and app showed."""
    from tasks import app, configure, health

    def publish(rt: Any) -> None:
        envelope = rt.codec.build_request(
            operation="health",
            task_name="vllm.health",
            lane=queue,
            params={},
            timeout_s=60.0,
            model=None,
            provider_instance="factory",
        )
        health.apply_async(args=[envelope])

    seen: dict[str, Any] = {}
    rabbit_url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    rabbit_rt = configure(_settings(rabbit_url, redis_base, f"vft-factory-{uuid.uuid4().hex[:6]}"))
    first = app._get_current_object()  # type: ignore[attr-defined]
    publish(rabbit_rt)
    with app.connection_for_write() as connection:
        seen["rabbit_depth"] = rabbit_rt.lane_depth(queue, connection)
    seen["rabbit_connections_while_current"] = _vhost_connections(vhost)

    redis_rt = configure(_settings(f"{redis_base}/{BROKER_DB}", redis_base, f"vft-factory-{uuid.uuid4().hex[:6]}"))
    second = app._get_current_object()  # type: ignore[attr-defined]
    publish(redis_rt)
    seen["redis_depth"] = redis_rt.lane_depth(queue)
    seen["task_app_is_new"] = health.app is second and second is not first
    deadline = time.monotonic() + timeout_s
    while (left := _vhost_connections(vhost)) and time.monotonic() < deadline:
        time.sleep(_CONNECTIONS_POLL_S)
    seen["rabbit_connections_after_switch"] = left
    try:
        with first.producer_or_acquire():
            seen["old_app_publishes"] = True
    except RuntimeError:  # kombu: "Acquire on closed pool"
        seen["old_app_publishes"] = False
    return seen


@pytest.mark.integration
def test_configure_switches_brokers_and_closes_the_old_app(redis_url: str, own_vhost: str) -> None:
    queue = f"llm.fleet.mgmt.factory-{uuid.uuid4().hex[:8]}"
    code = (
        "import json, sys; from tests.tasks.test_app_factory import child_switches; "
        "print(json.dumps(child_switches(*sys.argv[1:4], float(sys.argv[4]))))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, own_vhost, redis_url, queue, "20"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    redis.Redis.from_url(f"{redis_url}/{BROKER_DB}").delete(queue)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["rabbit_depth"] == 1  # published on RabbitMQ while it was configured
    assert seen["redis_depth"] == 1  # and on Redis after configure() switched back
    assert seen["task_app_is_new"] is True
    assert seen["rabbit_connections_while_current"] >= 1
    assert seen["rabbit_connections_after_switch"] == 0  # the old app's broker connections are released
    assert seen["old_app_publishes"] is False
