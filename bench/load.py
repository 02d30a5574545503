"""A load-generator process: ``callers`` closed-loop threads sending chats, direct or through the fleet.

The parent starts several of these (``python -m bench.load``) so no single interpreter's GIL limits the load,
and talks to each over its standard streams:

1. parent → child, one JSON line: ``{"mode": "direct"|"fleet"|"peer", "callers": K, "sim_url": ..., "model": ...,
   "expected": {"<prompt index>": "<answer>"}, "completion_tokens": 16, "max_tokens": 64}``
   (fleet mode reads its settings from the ``VLLM_FLEET_*`` environment; peer mode, the plain Celery task of
   ``bench.peer``, also takes ``"broker_url"`` and ``"result_backend"``);
2. child → parent ``READY`` once every caller has made one warm-up request;
3. parent → child ``GO <start epoch> <end epoch>``;
4. child → parent one JSON line: requests completed inside the window, latencies of requests that started
   and ended inside it, failures, wrong answers, and the child's own CPU seconds over the window.

Every answer is checked (content against the prompt's known answer, completion tokens, finish reason).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.fleet import chat_messages

__all__ = ["CallFailed", "CallerLog", "check_answer", "main"]

MAX_ERRORS_KEPT = 5
WARM_UP_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 60.0


class CallFailed(Exception):
    """A fleet call failed; the message names the task."""


@dataclass
class CallerLog:
    """What one caller thread saw."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    wrong_count: int = 0


def check_answer(content: Any, completion_tokens: Any, finish_reason: Any, expected: str, tokens: int) -> str | None:
    """Why an answer is wrong, or ``None`` when it is the prompt's known answer."""
    if content != expected:
        return f"content {str(content)[:60]!r} is not the expected {expected[:60]!r}"
    if completion_tokens != tokens:
        return f"completion_tokens {completion_tokens} (expected {tokens})"
    if finish_reason != "stop":
        return f"finish_reason {finish_reason!r}"
    return None


def _direct_call(config: dict[str, Any]) -> Callable[[int], tuple[Any, Any, Any]]:
    from provider.settings import InstanceSettings
    from provider.vllm.client import VllmClient
    from provider.vllm.models import ChatRequest

    client = VllmClient(
        InstanceSettings(name="bench-direct", base_url=config["sim_url"], concurrency=config["callers"])
    )
    model, max_tokens = config["model"], config["max_tokens"]

    def call(index: int) -> tuple[Any, Any, Any]:
        messages = chat_messages(index)
        reply = client.chat(ChatRequest(model=model, messages=messages, max_tokens=max_tokens))
        usage = reply.usage.completion_tokens if reply.usage else None
        return reply.content, usage, reply.finish_reason

    return call


def _fleet_call(config: dict[str, Any]) -> Callable[[int], tuple[Any, Any, Any]]:
    from provider.settings import Settings
    from tasks import chat, configure

    configure(Settings())
    model, max_tokens = config["model"], config["max_tokens"]

    def call(index: int) -> tuple[Any, Any, Any]:
        messages = chat_messages(index)
        result = chat.delay(model=model, messages=messages, max_tokens=max_tokens)
        try:
            reply = result.get()
        except Exception as exc:
            raise CallFailed(f"{type(exc).__name__}: {exc} [task {result.id}]") from exc
        return reply.get("content"), (reply.get("usage") or {}).get("completion_tokens"), reply.get("finish_reason")

    return call


def _peer_call(config: dict[str, Any]) -> Callable[[int], tuple[Any, Any, Any]]:
    from bench.peer import CHAT_TASK, build_app, reply_fields

    chat = build_app(config["broker_url"], config["result_backend"]).tasks[CHAT_TASK]
    model, max_tokens = config["model"], config["max_tokens"]

    def call(index: int) -> tuple[Any, Any, Any]:
        result = chat.delay({"model": model, "messages": chat_messages(index), "max_tokens": max_tokens})
        try:
            reply = result.get(timeout=RESULT_TIMEOUT_S)
        except Exception as exc:
            raise CallFailed(f"{type(exc).__name__}: {exc} [peer task {result.id}]") from exc
        return reply_fields(reply)

    return call


CALLS = {"direct": _direct_call, "fleet": _fleet_call, "peer": _peer_call}


def _caller(
    number: int,
    call: Callable[[int], tuple[Any, Any, Any]],
    config: dict[str, Any],
    log: CallerLog,
    ready: threading.Barrier,
    window: dict[str, float],
    go: threading.Event,
) -> None:
    expected: dict[str, str] = config["expected"]
    prompts = len(expected)
    tokens = int(config["completion_tokens"])
    sequence = number

    def one() -> tuple[float, float]:
        nonlocal sequence
        index = sequence % prompts
        sequence += 1
        started = time.time()
        try:
            content, usage, finish = call(index)
        except Exception as exc:
            log.error_count += 1
            if len(log.errors) < MAX_ERRORS_KEPT:
                log.errors.append(f"{type(exc).__name__}: {exc}")
            return started, -1.0
        ended = time.time()
        problem = check_answer(content, usage, finish, expected[str(index)], tokens)
        if problem is not None:
            log.wrong_count += 1
            if len(log.errors) < MAX_ERRORS_KEPT:
                log.errors.append(problem)
            return started, -1.0
        return started, ended

    one()  # warm-up: connections open, routes cached; not counted
    ready.wait(WARM_UP_TIMEOUT_S)
    go.wait()
    start_at, end_at = window["start"], window["end"]
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < end_at:
        log.spans.append(one())


def main() -> None:
    """Run one load-generator process (see the module docstring for the protocol)."""
    config: dict[str, Any] = json.loads(sys.stdin.readline())
    callers = int(config["callers"])
    call = CALLS[config["mode"]](config)
    logs = [CallerLog() for _ in range(callers)]
    ready = threading.Barrier(callers + 1)
    go = threading.Event()
    window: dict[str, float] = {}
    threads = [
        threading.Thread(
            target=_caller, args=(i, call, config, logs[i], ready, window, go), name=f"caller-{i}", daemon=True
        )
        for i in range(callers)
    ]
    for thread in threads:
        thread.start()
    ready.wait(WARM_UP_TIMEOUT_S)
    print("READY", flush=True)
    _, start_text, end_text = sys.stdin.readline().split()
    window["start"], window["end"] = float(start_text), float(end_text)
    go.set()
    time.sleep(max(0.0, window["start"] - time.time()))
    cpu_start = time.process_time()
    time.sleep(max(0.0, window["end"] - time.time()))
    cpu_s = time.process_time() - cpu_start
    for thread in threads:
        thread.join()
    completed = 0
    latencies: list[float] = []
    for log in logs:
        for started, ended in log.spans:
            if ended < 0:
                continue
            if window["start"] <= ended <= window["end"]:
                completed += 1
                if started >= window["start"]:
                    latencies.append((ended - started) * 1000.0)
    report = {
        "completed": completed,
        "total": sum(len(log.spans) for log in logs),
        "latencies_ms": latencies,
        "error_count": sum(log.error_count for log in logs),
        "wrong_count": sum(log.wrong_count for log in logs),
        "errors": [error for log in logs for error in log.errors][:MAX_ERRORS_KEPT],
        "cpu_s": cpu_s,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
