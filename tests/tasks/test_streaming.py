"""Streaming through the queue: live, late, resumed, cancelled, retried, and failed streams."""

from __future__ import annotations

import time

import pytest

from provider.protocol import FleetError
from tests.conftest import wait_until
from tests.tasks.conftest import CHAT_MODEL, Fleet

PROMPT = [{"role": "user", "content": "one two three four five six seven eight"}]


def _submit(**kwargs: object):  # type: ignore[no-untyped-def]
    from tasks import stream_chat

    options = {"max_tokens": 64, **kwargs}
    return stream_chat.delay(model=CHAT_MODEL, messages=PROMPT, **options)


def test_stream_is_read_live_while_the_task_runs(fleet: Fleet) -> None:
    from tasks import StreamChunk, open_stream

    fleet.simulator.configure(itl_s=0.05)
    result = _submit()
    stream = open_stream(result)
    first_chunk_at = None
    pieces = []
    for item in stream:
        assert isinstance(item, StreamChunk)
        if item.content:
            first_chunk_at = first_chunk_at or time.monotonic()
            pieces.append(item.content)
            if len(pieces) == 1:
                assert not result.ready(), "the first chunk must arrive before the task finishes"
    assert "".join(pieces) == "one two three four five six seven eight"
    final = result.get()
    assert final["content"] == "".join(pieces)
    assert final["finish_reason"] == "stop"


def test_stream_read_late_misses_nothing(fleet: Fleet) -> None:
    from tasks import open_stream

    result = _submit()
    final = result.get()
    assert open_stream(result).text() == final["content"]


def test_stream_resumes_from_an_entry_id(fleet: Fleet) -> None:
    from tasks import open_stream

    result = _submit()
    result.get()
    first = open_stream(result)
    items = iter(first)
    head = [next(items) for _ in range(3)]
    resumed = open_stream(result, start_id=first.last_id).text()
    head_text = "".join(getattr(chunk, "content", None) or "" for chunk in head)
    assert head_text + resumed == open_stream(result).text()


def test_cancel_stops_generation_within_a_chunk(fleet: Fleet) -> None:
    from tasks import cancel, open_stream

    fleet.simulator.configure(itl_s=0.05, text_mode="lorem", output_tokens=400)
    result = _submit(max_tokens=400)
    stream = open_stream(result)
    seen = 0
    with pytest.raises(FleetError) as info:
        for item in stream:
            if getattr(item, "content", None):
                seen += 1
                if seen == 3:
                    cancel(result)
    assert info.value.code == "cancelled"
    assert seen <= 5
    with pytest.raises(FleetError) as outcome:
        result.get()
    assert outcome.value.code == "cancelled"
    wait_until(lambda: fleet.simulator.stats()["aborted"] >= 1, 5.0, "the simulator counting the abort")
    assert fleet.simulator.stats()["in_flight"] == 0


def test_dropped_stream_restarts_with_a_visible_reset(fleet: Fleet) -> None:
    from tasks import StreamReset, open_stream

    fleet.simulator.configure(failures=[{"route": "chat", "mode": "drop", "after_chunks": 3, "count": 1}])
    result = _submit()
    items = list(open_stream(result))
    resets = [i for i, item in enumerate(items) if isinstance(item, StreamReset)]
    assert len(resets) == 1
    after = "".join(getattr(item, "content", None) or "" for item in items[resets[0] + 1 :])
    assert after == result.get()["content"] == "one two three four five six seven eight"
    assert open_stream(result).text() == after


def test_error_frame_ends_the_stream_with_a_typed_error(fleet: Fleet) -> None:
    from tasks import open_stream

    fleet.simulator.configure(
        failures=[{"route": "chat", "mode": "error_frame", "status": 400, "after_chunks": 2, "count": 1}]
    )
    result = _submit()
    with pytest.raises(FleetError) as info:
        open_stream(result).text()
    assert info.value.code == "bad_request", "a 400 error frame reads as a 400 answer would"
    with pytest.raises(FleetError):
        result.get()
