"""Two instances serving one lane: when one fails, its circuit opens, its work is handed back to the lane and
served by the other, discovery marks its offerings unavailable, and registry events say so without secrets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from provider.fleet.health import HealthTracker
from provider.protocol import FleetError
from provider.settings import InstanceSettings, Settings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tasks.event_bus import AmqpEventReader, ReceivedEvent, read_events
from tests.tasks.conftest import CHAT_MODEL, Fleet, WorkerProcess, wait_for

PLANTED_KEY = "sk-planted-secret-4242"
HELLO = [{"role": "user", "content": "fail over please"}]


@pytest.fixture
def second_instance(fleet: Fleet) -> Iterator[tuple[SimulatorServer, WorkerProcess, Settings]]:
    """sim-b: another vLLM serving the same chat model, behind an api key, with its own worker process."""
    config = SimulatorConfig(models=[ServedModel(name=CHAT_MODEL, max_model_len=32768)], api_key=PLANTED_KEY)
    with SimulatorServer(config) as sim:
        settings = fleet.settings.model_copy(
            update={
                "instances": {
                    "sim-b": InstanceSettings(name="sim-b", base_url=sim.url, concurrency=4, api_key=PLANTED_KEY)
                },
                "capacity_check_interval_s": 0.2,
            }
        )
        worker = WorkerProcess(settings, "sim-b")
        try:
            wait_for(lambda: _registered_by(worker, "sim-b"), what="sim-b's worker registering")
            yield sim, worker, settings
        finally:
            worker.stop()
            HealthTracker.from_settings(fleet.state, fleet.settings).reset("sim-b")


def _registered_by(worker: WorkerProcess, name: str) -> bool:
    """Whether this very worker process (not an earlier one) has registered the instance."""
    from tasks.runtime import runtime

    record = runtime().registry.instance(name)
    return record is not None and str(record.get("holder", "")).endswith(f":{worker.process.pid}")


def _collect(reader: AmqpEventReader, seconds: float) -> list[ReceivedEvent]:
    """Events arriving within ``seconds`` (heartbeats keep coming, so never wait for silence)."""
    deadline = time.monotonic() + seconds
    events: list[ReceivedEvent] = []
    while (left := deadline - time.monotonic()) > 0:
        received = reader.get(timeout_s=min(0.2, left))
        if received is not None:
            events.append(received)
    return events


def _chat(_: int) -> dict[str, object]:
    from tasks import chat

    return dict(chat.delay(model=CHAT_MODEL, messages=HELLO, max_tokens=8, timeout_s=20).get())


def test_failing_instance_hands_work_back_and_the_other_serves_it(
    fleet: Fleet, second_instance: tuple[SimulatorServer, WorkerProcess, Settings]
) -> None:
    sim_b, _, _ = second_instance
    sim_b.configure(failures=[{"route": "chat", "mode": "status", "status": 500, "count": -1}])
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(_chat, range(12)))
    assert all(reply["content"] == "fail over please" for reply in replies)
    assert {reply["metadata"]["instance"] for reply in replies} == {"sim-a"}  # type: ignore[index]
    assert sim_b.stats()["requests"].get("chat", 0) >= 3, "sim-b must have been tried and failed"
    health = HealthTracker.from_settings(fleet.state, fleet.settings).state("sim-b")
    assert health.circuit == "open"


def test_instance_down_marks_its_offerings_unavailable_and_events_carry_no_secrets(
    fleet: Fleet, second_instance: tuple[SimulatorServer, WorkerProcess, Settings]
) -> None:
    from tasks import chat, discover
    from tasks.routing import invalidate_route_cache
    from tasks.runtime import runtime

    sim_b, _, _ = second_instance
    reader = AmqpEventReader(fleet.settings.broker_url) if fleet.broker == "rabbitmq" else None
    if reader is not None:
        reader.open()
    stream_start = "0-0"
    try:
        sim_b.stop()  # connection refused from now on
        discover.delay(instance="sim-b").get()
        invalidate_route_cache()
        offerings = [o for o in runtime().registry.all() if o.instance_id == "sim-b"]
        assert offerings, "a down instance keeps its offerings, marked unavailable"
        assert {o.status for o in offerings} == {"unavailable"}
        reply = chat.delay(model=CHAT_MODEL, messages=HELLO, max_tokens=8).get()
        assert reply["metadata"]["instance"] == "sim-a"
        if reader is not None:
            received = _collect(reader, seconds=2.0)
        else:
            received = read_events(fleet.state, runtime().keys.events, after=stream_start, count=10_000)
    finally:
        if reader is not None:
            reader.close()
    unavailable = [
        r.event
        for r in received
        if r.event.event_type == "offering_unavailable" and "sim-b" in json.dumps(r.event.offering)
    ]
    assert unavailable, "an offering_unavailable event for sim-b"
    for item in received:
        text = item.event.to_json()
        assert PLANTED_KEY not in text
        assert "http://" not in text
        assert HELLO[0]["content"] not in text


@pytest.mark.only_broker("redis")  # RabbitMQ refuses a second declaration of a lane with another limit (406)
def test_past_the_delivery_limit_the_request_is_dead_lettered_and_the_caller_told(fleet: Fleet) -> None:
    """Hand-backs are counted per request on both brokers; one past the lane's limit dead-letters it.

    Run with a worker whose lanes allow no hand-back at all (delivery_limit 0). On RabbitMQ a lane must be
    declared identically by producer and worker, so this runs on the Redis broker; the count is the same code.
    """
    from tasks import chat
    from tasks.runtime import runtime

    model = "lonely-model"
    config = SimulatorConfig(models=[ServedModel(name=model, max_model_len=2048)])
    config.failures = []
    with SimulatorServer(config) as sim:
        sim.configure(failures=[{"route": "chat", "mode": "status", "status": 500, "count": -1}])
        lanes = fleet.settings.lanes.model_copy(update={"delivery_limit": 0})
        settings = fleet.settings.model_copy(
            update={"instances": {"sim-lonely": InstanceSettings(name="sim-lonely", base_url=sim.url)}, "lanes": lanes}
        )
        worker = WorkerProcess(settings, "sim-lonely")
        try:
            wait_for(lambda: _registered_by(worker, "sim-lonely"), what="the lonely worker registering")
            from tasks.routing import invalidate_route_cache

            invalidate_route_cache()
            with pytest.raises(FleetError) as info:
                chat.delay(model=model, messages=HELLO, max_tokens=8, timeout_s=15).get()
            assert info.value.code == "fleet_dead_lettered"
            dead = runtime().broker.client.llen(fleet.settings.lanes.dead_letter_queue)
            assert dead >= 1
        finally:
            worker.stop()
            HealthTracker.from_settings(fleet.state, fleet.settings).reset("sim-lonely")
            runtime().broker.client.delete(fleet.settings.lanes.dead_letter_queue)
