"""A publisher process for the backlog run: ``count`` chats published to their lane with no worker consuming.

Reads one JSON line (``{"count": N, "threads": T, "model": ..., "context": CTX}``) and its settings from the
``VLLM_FLEET_*`` environment. With no live worker the producer API would refuse to route, so this builds each
signed envelope for the model's ``ctx<CTX>`` lane itself and publishes it with ``chat.apply_async(args=[envelope])``
(the documented path for pre-built envelopes). Prints one JSON line: the task ids in prompt order, the publish
rate and any errors. Its result subscriptions end with the process, so nothing piles up in a subscriber's buffer.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

__all__ = ["main"]

PROMPTS = 8


def main() -> None:
    """Publish, then report."""
    from bench.fleet import MAX_TOKENS, chat_messages
    from provider.fleet.lanes import shared_lane_key
    from provider.settings import Settings
    from provider.vllm.models import ChatRequest
    from tasks import chat, configure

    config: dict[str, Any] = json.loads(sys.stdin.readline())
    count, threads, model = int(config["count"]), int(config["threads"]), str(config["model"])
    runtime = configure(Settings())
    lane = shared_lane_key(model, "inference", context_window=int(config["context"]))
    timeout_s = runtime.settings.timeouts.chat_s
    ids: list[str] = [""] * count
    errors: list[str] = []

    def publish(start: int) -> None:
        for i in range(start, count, threads):
            params = ChatRequest(model=model, messages=chat_messages(i % PROMPTS), max_tokens=MAX_TOKENS)
            try:
                envelope = runtime.codec.build_request(
                    operation="chat",
                    task_name=chat.name,
                    lane=lane,
                    params=params.model_dump(mode="json", exclude_none=True),
                    timeout_s=timeout_s,
                    model=model,
                )
                ids[i] = chat.apply_async(args=[envelope]).id
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    report = {"task_ids": ids, "per_s": count / seconds, "threads": threads, "lane": lane, "errors": errors[:5]}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
