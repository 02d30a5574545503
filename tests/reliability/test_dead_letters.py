"""Defect 5 of issue 15 and issue 14's dead-letter bugs: a request that keeps failing is dead-lettered with its
reason shown, its caller gets ``fleet_dead_lettered``, and ``vllm-fleet dlq requeue`` really runs it again."""

from __future__ import annotations

import uuid

import pytest

from provider.fleet.health import HealthTracker
from provider.protocol import FleetError
from tasks.runtime import runtime
from tests.reliability.conftest import LiveFleet
from tests.reliability.harness import CHAT_MODEL, wait_until


@pytest.mark.parametrize("fleet_fixture", ["live_fleet", "rabbit_fleet"])
def test_poison_is_dead_lettered_listed_with_its_reason_and_requeue_runs_it(
    fleet_fixture: str, request: pytest.FixtureRequest
) -> None:
    """On RabbitMQ the queue's own delivery limit must not dead-letter before the worker's (defect 6)."""
    from tasks import chat
    from tasks.dead_letters import drop_dead_letters, list_dead_letters, requeue_dead_letters

    live_fleet: LiveFleet = request.getfixturevalue(fleet_fixture)
    drop_dead_letters()
    health = HealthTracker.from_settings(live_fleet.state, live_fleet.settings)
    prompts = [f"poison-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    # The instance fails every chat: its circuit opens, and the requests' hand-backs reach the lane's limit.
    live_fleet.sim.configure(failures=[{"route": "chat", "mode": "status", "status": 500, "count": -1}])
    try:
        results = [
            chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": prompt}], timeout_s=45)
            for prompt in prompts
        ]
        codes = []
        for result in results:
            with pytest.raises(FleetError) as failed:
                result.get()
            codes.append(failed.value.code)
        assert codes == ["fleet_dead_lettered"] * len(prompts)
    finally:
        live_fleet.sim.configure(failures=[])
        health.reset("sim-a")

    ids = {result.id for result in results}
    wait_until(  # RabbitMQ dead-letters at least once, asynchronously
        lambda: len([letter for letter in list_dead_letters() if letter.task_id in ids]) == len(ids),
        15,
        "every dead letter listed",
    )
    letters = [letter for letter in list_dead_letters() if letter.task_id in ids]
    # a worker's copy on Redis says why; on RabbitMQ the broker dead-letters the worker's reject itself
    assert {letter.reason for letter in letters} == (
        {"rejected"} if "amqp" in live_fleet.settings.broker_url else {"delivery_limit"}
    )
    assert all(letter.lane.startswith("llm.fleet.inference.") for letter in letters)
    requeued = [letter for result in results for letter in requeue_dead_letters(result.id)]
    assert {letter.requeued_as for letter in requeued} == ids, "inside their deadline: the same requests"
    for prompt, result in zip(prompts, results, strict=True):
        # Read the stored answer itself: this process's result consumer may still hold a buffered copy of the
        # dead-letter failure (published twice on RabbitMQ), which an AsyncResult of the same id resolves from.
        wait_until(
            lambda r=result: chat.backend.get_task_meta(r.id, cache=False).get("status") == "SUCCESS",
            30,
            "the requeued request answered",
        )
        stored = chat.backend.get_task_meta(result.id, cache=False)["result"]
        reply = runtime().codec.open_response(stored, request_id=result.id)
        assert prompt.startswith(reply["content"].strip())
        wait_until(lambda p=prompt: live_fleet.sim.completed_for(p) >= 1, 5, "the simulator answering the rerun")
    assert not [letter for letter in list_dead_letters() if letter.task_id in ids]
