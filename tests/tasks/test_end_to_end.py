"""Each task end to end through ``.delay().get()`` on a live worker, over Redis and RabbitMQ brokers."""

from __future__ import annotations

import pytest

from provider.protocol import FleetError
from tests.tasks.conftest import CHAT_MODEL, EMBED_MODEL, SMALL_MODEL, Fleet

HELLO = [{"role": "user", "content": "hello fleet"}]


def test_chat_round_trip(fleet: Fleet) -> None:
    reply = chat_reply(fleet, CHAT_MODEL)
    assert reply["content"] == "hello fleet"
    assert reply["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] > 0
    assert reply["request_id"]


def chat_reply(fleet: Fleet, model: str, **kwargs: object) -> dict[str, object]:
    from tasks import chat

    return dict(chat.delay(model=model, messages=HELLO, max_tokens=32, **kwargs).get())


def test_embed_round_trip(fleet: Fleet) -> None:
    from tasks import embed

    result = embed.delay(model=EMBED_MODEL, input=["one", "two"]).get()
    vectors = result["result"]["vectors"]
    assert len(vectors) == 2
    assert len(vectors[0]) == 384
    assert vectors[0] != vectors[1]


def test_chat_goes_to_its_models_smallest_fitting_lane(fleet: Fleet) -> None:
    from tasks.routing import pick_lane

    small = pick_lane("chat", SMALL_MODEL, {"messages": HELLO, "max_tokens": 100})
    big = pick_lane("chat", CHAT_MODEL, {"messages": HELLO, "max_tokens": 100})
    assert small["lane"] == "llm.fleet.inference.small-chat.ctx4096"
    assert big["lane"] == "llm.fleet.inference.qwen3-6-27b.ctx32768"
    embed_lane = pick_lane("embed", EMBED_MODEL, {"input": "x"})
    assert embed_lane["lane"] == "llm.fleet.embed.minilm"


def test_unknown_model_is_refused_at_submit(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model="no-such-model", messages=HELLO)
    assert info.value.code == "no_fleet_queue"
    assert "no-such-model" in info.value.message


def test_context_too_large_for_every_lane_is_refused_at_submit(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=SMALL_MODEL, messages=HELLO, max_tokens=10_000)
    assert info.value.code == "no_fleet_queue"


def test_invalid_request_is_refused_at_submit(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages="not a list")
    assert info.value.code == "invalid_request"


def test_management_reaches_one_instance(fleet: Fleet) -> None:
    from tasks import version

    answer = version.delay(instance="sim-a").get()
    assert answer["metadata"]["instance"] == "sim-a"
    assert answer["result"]["version"]


def test_management_fans_out_to_every_instance(fleet: Fleet) -> None:
    from tasks import health

    answers = health.delay(instance="all").get()
    assert set(answers) == {"sim-a"}
    assert answers["sim-a"]["ok"] is True
    assert answers["sim-a"]["result"]["result"]["live"] is True


def test_vllm_error_is_not_retried_and_keeps_the_message(fleet: Fleet) -> None:
    fleet.simulator.configure(failures=[{"route": "chat", "mode": "status", "status": 400, "count": 1}])
    with pytest.raises(FleetError) as info:
        chat_reply(fleet, CHAT_MODEL)
    assert info.value.code == "bad_request"
    assert fleet.simulator.stats()["requests"].get("chat", 0) == 1


def test_busy_server_is_retried_within_the_deadline(fleet: Fleet) -> None:
    fleet.simulator.configure(failures=[{"route": "chat", "mode": "status", "status": 503, "count": 2}])
    reply = chat_reply(fleet, CHAT_MODEL)
    assert reply["content"] == "hello fleet"
    assert fleet.simulator.stats()["requests"].get("chat", 0) == 3


def test_dropped_connection_is_retried(fleet: Fleet) -> None:
    fleet.simulator.configure(failures=[{"route": "chat", "mode": "drop", "count": 1}])
    reply = chat_reply(fleet, CHAT_MODEL)
    assert reply["content"] == "hello fleet"


def test_idempotency_key_returns_the_stored_result(fleet: Fleet) -> None:
    first = chat_reply(fleet, CHAT_MODEL, idempotency_key="order-42")
    calls = fleet.simulator.stats()["requests"].get("chat", 0)
    second = chat_reply(fleet, CHAT_MODEL, idempotency_key="order-42")
    assert second["content"] == first["content"]
    assert fleet.simulator.stats()["requests"].get("chat", 0) == calls


def test_idempotency_key_with_another_payload_conflicts(fleet: Fleet) -> None:
    from tasks import chat

    chat_reply(fleet, CHAT_MODEL, idempotency_key="order-43")
    other = [{"role": "user", "content": "something else"}]
    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages=other, idempotency_key="order-43").get()
    assert info.value.code == "idempotency_conflict"
