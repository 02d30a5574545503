"""The peer: the plain Celery task a user would write in front of vLLM instead of the fleet.

    @app.task
    def chat(body):
        return vllm.post("/v1/chat/completions", json=body).json()

Stock Celery: JSON serializer, the stock Redis result backend, early acknowledgement, the default queue; no
envelopes, no signatures, no ledger, no registry. Its streaming twin is what a user would add for tokens as they
come: the task reads vLLM's server-sent events and appends each ``data:`` line to a Redis stream (``XADD``, one
per chunk) that the caller reads with ``XREAD BLOCK`` until ``[DONE]``.

The worker (``celery -A bench.peer worker -P threads -c N``) builds ``app`` from ``VFT_PEER_*`` variables
(``peer_worker_env``); callers build their own app for a broker with ``build_app``. The one concession to
fairness: a shared ``httpx.Client`` with a connection per slot, not ``httpx.post`` per call (a new TLS-capable
client and TCP connection each time would make the peer slower than a careful user's task).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import redis
from celery import Celery

__all__ = [
    "CHAT_TASK",
    "STREAM_TASK",
    "app",
    "build_app",
    "new_stream_key",
    "peer_worker_env",
    "read_stream",
    "reply_fields",
]

CHAT_TASK = "peer.chat"
STREAM_TASK = "peer.stream_chat"
STREAM_TTL_S = 300
READ_BLOCK_MS = 30_000


def build_app(
    broker_url: str, result_backend: str, vllm_url: str = "", streams_url: str = "", slots: int = 8
) -> Celery:
    """A stock Celery app with the two peer tasks (the vLLM client and stream store are opened on first use)."""
    peer = Celery("peer", broker=broker_url, backend=result_backend, set_as_current=False)
    clients: dict[str, Any] = {}

    def vllm() -> httpx.Client:
        if "vllm" not in clients:
            limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
            clients["vllm"] = httpx.Client(base_url=vllm_url, timeout=60.0, limits=limits)
        client: httpx.Client = clients["vllm"]
        return client

    def store() -> redis.Redis:
        if "redis" not in clients:
            clients["redis"] = redis.Redis.from_url(streams_url, max_connections=slots + 2)
        client: redis.Redis = clients["redis"]
        return client

    @peer.task(name=CHAT_TASK, shared=False)
    def chat(body: dict[str, Any]) -> Any:
        response = vllm().post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()

    @peer.task(name=STREAM_TASK, shared=False)
    def stream_chat(body: dict[str, Any], stream_key: str) -> None:
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with vllm().stream("POST", "/v1/chat/completions", json=payload) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    store().xadd(stream_key, {"d": line[6:]})
        store().expire(stream_key, STREAM_TTL_S)

    return peer


def peer_worker_env(
    broker_url: str, result_backend: str, vllm_url: str, streams_url: str, slots: int
) -> dict[str, str]:
    """The environment a peer worker process reads (``bench.peer.app``)."""
    return {
        "VFT_PEER_BROKER_URL": broker_url,
        "VFT_PEER_RESULT_BACKEND": result_backend,
        "VFT_PEER_VLLM_URL": vllm_url,
        "VFT_PEER_STREAMS_URL": streams_url,
        "VFT_PEER_SLOTS": str(slots),
    }


def reply_fields(reply: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Content, completion tokens and finish reason of a vLLM chat completion as JSON."""
    choice = (reply.get("choices") or [{}])[0]
    return (
        (choice.get("message") or {}).get("content"),
        (reply.get("usage") or {}).get("completion_tokens"),
        choice.get("finish_reason"),
    )


def new_stream_key() -> str:
    """A fresh Redis stream key for one peer stream."""
    return f"peer-stream:{uuid.uuid4().hex}"


def read_stream(store: redis.Redis, stream_key: str) -> Iterator[dict[str, Any]]:
    """Each chunk the peer task appended to ``stream_key``, as parsed JSON, until ``[DONE]``."""
    last: Any = "0-0"
    while True:
        answer: Any = store.xread({stream_key: last}, block=READ_BLOCK_MS)
        if not answer:
            raise TimeoutError(f"no chunk on {stream_key} for {READ_BLOCK_MS} ms")
        # RESP2 answers [[key, entries]]; RESP3 {key: [entries]}
        entries = answer[0][1] if isinstance(answer, list) else next(iter(answer.values()))[0]
        for entry_id, fields in entries:
            last = entry_id
            data = fields[b"d"]
            if data == b"[DONE]":
                return
            yield json.loads(data)


def _from_env() -> Celery:
    env = os.environ
    return build_app(
        env.get("VFT_PEER_BROKER_URL", "redis://127.0.0.1:6379/13"),
        env.get("VFT_PEER_RESULT_BACKEND", "redis://127.0.0.1:6379/14"),
        env.get("VFT_PEER_VLLM_URL", "http://127.0.0.1:8000"),
        env.get("VFT_PEER_STREAMS_URL", "redis://127.0.0.1:6379/15"),
        int(env.get("VFT_PEER_SLOTS", "8")),
    )


app = _from_env()
