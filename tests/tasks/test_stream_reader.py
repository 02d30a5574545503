"""One deadline rule for the sync (``open_stream``) and async (``astream``) stream readers."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import pytest

from provider.protocol import FleetError
from tasks.stream_reader import stream_deadline
from tests.tasks.conftest import Fleet


@dataclass
class _Submitted:
    """What a reader reads from a submitted request: its id and its deadline."""

    id: str
    deadline: float


def test_an_explicit_timeout_wins_over_the_requests_deadline() -> None:
    before = time.time()
    deadline = stream_deadline(before + 3600.0, 5.0, 60.0)
    assert before + 5.0 <= deadline < before + 3600.0


def test_the_requests_deadline_wins_over_the_default() -> None:
    assert stream_deadline(1234.5, None, 60.0) == 1234.5


def test_with_neither_the_default_from_now_applies() -> None:
    before = time.time()
    assert before + 60.0 <= stream_deadline(None, None, 60.0) <= time.time() + 60.0


def test_both_readers_stop_at_the_callers_timeout_not_the_requests_later_deadline(fleet: Fleet) -> None:
    from tasks import open_stream
    from tasks.aio import astream

    submitted = _Submitted(id=uuid.uuid4().hex, deadline=time.time() + 3600.0)  # nothing ever writes this stream

    with pytest.raises(FleetError) as sync_info:
        open_stream(submitted, timeout_s=0.3).text()  # type: ignore[arg-type]
    assert sync_info.value.code == "fleet_timeout"

    async def read_async() -> None:
        async for _ in astream(submitted, timeout_s=0.3):  # type: ignore[arg-type]
            pass

    with pytest.raises(FleetError) as async_info:
        asyncio.run(read_async())
    assert async_info.value.code == "fleet_timeout"


def test_both_readers_stop_at_the_requests_deadline_without_a_timeout(fleet: Fleet) -> None:
    from tasks import open_stream
    from tasks.aio import astream

    submitted = _Submitted(id=uuid.uuid4().hex, deadline=time.time() + 0.3)

    with pytest.raises(FleetError) as sync_info:
        open_stream(submitted).text()  # type: ignore[arg-type]
    assert sync_info.value.code == "fleet_timeout"

    async def read_async() -> None:
        async for _ in astream(submitted):  # type: ignore[arg-type]
            pass

    with pytest.raises(FleetError) as async_info:
        asyncio.run(read_async())
    assert async_info.value.code == "fleet_timeout"
