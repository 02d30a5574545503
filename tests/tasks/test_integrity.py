"""End-to-end integrity against a live worker, on both brokers: a caller only ever reads what a fleet worker
wrote for its request, and a worker runs nothing but fleet tasks (issue 10's attacks, one test each)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from provider.protocol import FleetError
from tests.tasks.conftest import CHAT_MODEL, Fleet
from tests.tasks.test_bad_input import (  # noqa: F401 (dead_letters is a fixture)
    RESULT_TIMEOUT_S,
    TIMEOUT_S,
    assert_dead_lettered,
    dead_letters,
    lane_of,
    stored_meta,
)

CELERY_BUILT_INS = (
    "celery.accumulate",
    "celery.chord_unlock",
    "celery.backend_cleanup",
    "celery.group",
    "celery.chain",
    "celery.chord",
    "celery.map",
    "celery.starmap",
    "celery.chunks",
)


def forged_response(request_id: str, content: str) -> dict[str, Any]:
    """A response envelope no worker wrote: the ids right, the content the forger's."""
    return {
        "message_type": "llm.fleet.response",
        "protocol_version": 2,
        "request_id": request_id,
        "correlation_id": request_id,
        "reply_to": f"celery:{request_id}",
        "content": content,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "finish_reason": "stop",
    }


def management_queue() -> str:
    """The in-process worker's management queue."""
    from tasks.routing import pick_management_queue

    return pick_management_queue("sim-a")


# ------------------------------------------------------------------------------------ fleet tasks only


@pytest.mark.parametrize("name", CELERY_BUILT_INS)
@pytest.mark.parametrize("where", ["lane", "management"])
def test_celery_built_in_tasks_are_refused_on_fleet_queues(
    fleet: Fleet,
    dead_letters: Any,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
    name: str,
    where: str,
) -> None:
    """``send_task("celery.accumulate", args=[<forged response>], task_id=<request id>)`` never runs: it is
    dead-lettered and counted, and the caller reading that id gets a typed error, never the forged SUCCESS."""
    from tasks import app, chat
    from tasks.routing import queue_for

    request_id = uuid.uuid4().hex
    queue = queue_for(lane_of(CHAT_MODEL)) if where == "lane" else queue_for(management_queue())

    def send(marker: bytes) -> None:
        app.send_task(
            name,
            args=[forged_response(request_id, marker.decode())],
            task_id=request_id,
            queue=queue,
            expires=TIMEOUT_S,
        )

    dead = assert_dead_lettered(
        fleet, dead_letters, caplog, "unknown_task", send, source=None if where == "lane" else management_queue()
    )
    assert dead.headers["task"] == name
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(request_id).get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "operation_not_allowed"
    stored = stored_meta(request_id)
    assert stored is not None
    assert b'"SUCCESS"' not in stored
