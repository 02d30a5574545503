"""The README's streaming snippet, run as written against a live fleet, with vLLM dropping the stream mid-way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tasks.conftest import Fleet

README = Path(__file__).resolve().parents[2] / "README.md"
DROP_AFTER_CHUNKS = 2


def _streaming_snippet() -> str:
    """The README's Python block that reads a stream with ``open_stream``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    matching = [block for block in blocks if "for chunk in open_stream(result)" in block]
    assert len(matching) == 1, "the README shows one streaming loop"
    return matching[0]


def test_readme_streaming_loop_survives_a_stream_reset(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: the loop as written prints content and ends normally when the worker restarts generation."""
    from tasks import StreamReset, open_stream, stream_chat

    fleet.simulator.configure(
        failures=[{"route": "chat", "mode": "drop", "after_chunks": DROP_AFTER_CHUNKS, "count": 1}]
    )
    namespace: dict[str, object] = {"stream_chat": stream_chat, "open_stream": open_stream}
    exec(_streaming_snippet(), namespace)  # noqa: S102 - the README's own code, run as a user would
    final = namespace["final"]
    assert isinstance(final, dict)
    assert final["content"] == "Tell me a story"
    printed = capsys.readouterr().out
    assert printed.endswith("Tell me a story"), printed
    result = namespace["result"]
    items = list(open_stream(result))  # type: ignore[arg-type]
    assert any(isinstance(item, StreamReset) for item in items), "no reset was injected: the test proves nothing"
