"""The asyncio producer API against the live fleet."""

from __future__ import annotations

import asyncio

import pytest

from provider.protocol import FleetError
from tests.tasks.conftest import CHAT_MODEL, Fleet

PROMPT = [{"role": "user", "content": "async fleets stream too"}]


def test_await_a_chat_result(fleet: Fleet) -> None:
    from tasks import chat
    from tasks.aio import gather_result, submit

    async def main() -> dict[str, object]:
        result = await submit(chat, model=CHAT_MODEL, messages=PROMPT, max_tokens=16)
        return dict(await gather_result(result))

    assert asyncio.run(main())["content"] == "async fleets stream too"


def test_async_for_over_a_stream(fleet: Fleet) -> None:
    from tasks import stream_chat
    from tasks.aio import astream, gather_result, submit

    async def main() -> tuple[str, str]:
        result = await submit(stream_chat, model=CHAT_MODEL, messages=PROMPT, max_tokens=16)
        pieces = [chunk.content async for chunk in astream(result) if getattr(chunk, "content", None)]
        final = await gather_result(result)
        return "".join(p or "" for p in pieces), final["content"]

    streamed, final = asyncio.run(main())
    assert streamed == final == "async fleets stream too"


def test_async_stream_raises_the_typed_error(fleet: Fleet) -> None:
    from tasks import stream_chat
    from tasks.aio import astream, submit

    fleet.simulator.configure(failures=[{"route": "chat", "mode": "error_frame", "status": 400, "count": 1}])

    async def main() -> None:
        result = await submit(stream_chat, model=CHAT_MODEL, messages=PROMPT, max_tokens=16)
        async for _ in astream(result):
            pass

    with pytest.raises(FleetError) as info:
        asyncio.run(main())
    assert info.value.code == "bad_request"
