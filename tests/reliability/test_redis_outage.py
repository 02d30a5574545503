"""Defect 7 of issue 15: during a Redis outage the producer API raises typed errors, fast, never raw redis
errors, and ``.get()`` never hangs or raises Celery's internals. Issue 14: a result made from an id alone has a
deadline too."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from provider.protocol import FleetError
from provider.settings import SecuritySettings, Timeouts
from tests.reliability.conftest import use
from tests.reliability.harness import CHAT_MODEL, PrivateRedis, fault_settings

LANE = f"llm.fleet.inference.{CHAT_MODEL}.ctx32768"


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(aof=False)
    server.start()
    try:
        yield server
    finally:
        server.close()


def _envelope(timeout_s: float = 5.0) -> dict[str, object]:
    from tasks.runtime import runtime

    return runtime().codec.build_request(
        operation="chat",
        task_name="vllm.chat",
        lane=LANE,
        params={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout_s=timeout_s,
        model=CHAT_MODEL,
    )


# Celery's result consumer thread reports the broken connection after the test: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_publish_and_get_during_a_redis_outage_raise_typed_errors(
    private_redis: PrivateRedis, fault_security: SecuritySettings
) -> None:
    from tasks import chat

    url = private_redis.url
    use(
        fault_settings(
            broker_url=f"{url}/0",
            backend_url=f"{url}/1",
            state_url=f"{url}/2",
            prefix=f"rel-outage-{uuid.uuid4().hex[:6]}",
            security=fault_security,
            instances={},
        )
    )
    waiting = chat.apply_async(args=[_envelope()])  # published; no worker: it waits in its lane
    private_redis.kill()

    started = time.monotonic()
    with pytest.raises(FleetError) as published:
        chat.apply_async(args=[_envelope()])
    assert published.value.code == "fleet_publish_failed"
    with pytest.raises(FleetError) as routed:
        chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert routed.value.code == "fleet_publish_failed"
    with pytest.raises(FleetError) as got:
        waiting.get()
    assert got.value.code in ("fleet_result_unavailable", "fleet_timeout")
    print(f"three calls during the outage answered in {time.monotonic() - started:.2f} s")


def test_a_result_from_an_id_alone_stops_waiting(private_redis: PrivateRedis, fault_security: SecuritySettings) -> None:
    from tasks import chat

    url = private_redis.url
    use(
        fault_settings(
            broker_url=f"{url}/0",
            backend_url=f"{url}/1",
            state_url=f"{url}/2",
            prefix=f"rel-id-{uuid.uuid4().hex[:6]}",
            security=fault_security,
            instances={},
            timeouts=Timeouts(chat_s=1, stream_s=1, embed_s=1, management_s=1),
        )
    )
    with pytest.raises(FleetError) as waited:
        chat.AsyncResult(uuid.uuid4().hex).get()  # nobody will ever answer it
    assert waited.value.code == "fleet_timeout"
