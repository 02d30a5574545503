"""Fixtures for the provider tests: recorded vLLM answers behind ``httpx.MockTransport``, and the simulator.

``fake_vllm`` answers each route with a transcript recorded from a real vLLM 0.32 (``tests/data/vllm``), or
with a handler a test installs, and keeps every request it saw. ``simulator`` starts one HTTP vLLM simulator
for the session; ``sim`` hands it to a test with its configuration and counters reset before and after.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provider.settings import InstanceSettings
from provider.vllm import VllmClient

TRANSCRIPTS_DIR = Path(__file__).resolve().parent.parent / "data" / "vllm"
API_KEY = "test-key-not-secret"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

Handler = Callable[[httpx.Request], httpx.Response]


class PiecewiseStream(httpx.SyncByteStream):
    """A response body delivered a few bytes at a time, optionally breaking before its end."""

    def __init__(self, body: bytes, piece_size: int, *, break_after: int | None = None) -> None:
        self._body = body
        self._piece_size = piece_size
        self._break_after = break_after

    def __iter__(self) -> Iterator[bytes]:
        end = len(self._body) if self._break_after is None else self._break_after
        for start in range(0, end, self._piece_size):
            yield self._body[start : min(start + self._piece_size, end)]
        if self._break_after is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def transcript_body(name: str) -> bytes:
    """The exact body vLLM sent."""
    return (TRANSCRIPTS_DIR / f"{name}.body").read_bytes()


def transcript_response(name: str, *, piece_size: int | None = None, break_after: int | None = None) -> httpx.Response:
    """The recorded answer as an httpx response, without framing headers (MockTransport does no framing)."""
    status_line, *header_lines = (TRANSCRIPTS_DIR / f"{name}.headers").read_text().splitlines()
    headers = [tuple(line.split(": ", 1)) for line in header_lines if line.strip()]
    kept = [(key, value) for key, value in headers if key.lower() not in ("content-length", "transfer-encoding")]
    body = transcript_body(name)
    status = int(status_line.split()[1])
    if piece_size is None and break_after is None:
        return httpx.Response(status, headers=kept, content=body)
    stream = PiecewiseStream(body, piece_size or len(body), break_after=break_after)
    return httpx.Response(status, headers=kept, stream=stream)


class FakeVllm:
    """Routes ``"METHOD /path"`` to transcripts or handlers, recording every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[httpx.Request] = []

    def answer(self, route: str, answer: str | Handler, **options: Any) -> None:
        """Answer ``route`` with a handler or the named transcript (``piece_size``, ``break_after``)."""
        if isinstance(answer, str):
            name = answer
            self.routes[route] = lambda request: transcript_response(name, **options)
        else:
            self.routes[route] = answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.routes.get(f"{request.method} {request.url.path}")
        if handler is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        return handler(request)

    def client(self, **instance: Any) -> VllmClient:
        """A client for a fake instance ``gpu1``; keyword arguments go to its settings."""
        settings = InstanceSettings(**{"name": "gpu1", "base_url": "http://gpu1.test:8000", **instance})
        return VllmClient(settings, http=httpx.Client(transport=httpx.MockTransport(self.handle)))

    def last_json(self) -> Any:
        """The JSON body of the last request."""
        return json.loads(self.requests[-1].content)


@pytest.fixture
def fake_vllm() -> FakeVllm:
    """A fresh fake server for one test."""
    return FakeVllm()


@pytest.fixture(scope="session")
def simulator() -> Iterator[Any]:
    """One HTTP vLLM simulator for the session; a missing package skips locally and fails in CI."""
    try:
        from simulator.config import SimulatorConfig
        from simulator.testing import SimulatorServer
    except ImportError as exc:
        message = f"the vLLM simulator cannot be imported: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with SimulatorServer(SimulatorConfig()) as server:
        yield server


@pytest.fixture
def sim(simulator: Any) -> Iterator[Any]:
    """The session simulator with its configuration and counters reset before and after the test."""
    simulator.reset()
    yield simulator
    simulator.reset()
