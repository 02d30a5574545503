"""What a real vLLM 0.32 server showed the fleet got wrong (issue 11), end to end on both brokers.

Simulators over HTTP behave as the real server did (tests/simulator/test_conformance.py checks that); workers
are the session's in-process worker or real worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from provider.protocol import FleetError
from provider.settings import InstanceSettings, Settings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.tasks.conftest import SMALL_MODEL, Fleet, WorkerProcess, wait_for

TOOL_MODEL = "tool-chat"
TOOL_WINDOW = 8192
TOOL_REQUESTS = 50
BATCH = 10
SMALL_WINDOW = 4096
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]


def _tool_simulator(tool_parser: bool) -> SimulatorConfig:
    return SimulatorConfig(
        models=[ServedModel(name=TOOL_MODEL, max_model_len=TOOL_WINDOW)], tool_parser=tool_parser, max_running=64
    )


@pytest.fixture(scope="module")
def tool_simulators() -> Iterator[tuple[SimulatorServer, SimulatorServer]]:
    """Two servers of one model: one started with a tool-call parser, one without."""
    with SimulatorServer(_tool_simulator(True)) as with_parser, SimulatorServer(_tool_simulator(False)) as without:
        yield with_parser, without


def _one_instance(fleet: Fleet, name: str, url: str, **extra: Any) -> Settings:
    return fleet.settings.model_copy(
        update={"instances": {name: InstanceSettings(name=name, base_url=url, concurrency=8, **extra)}}
    )


def _offered(model: str, instances: set[str]) -> bool:
    from tasks.routing import invalidate_route_cache
    from tasks.runtime import runtime

    invalidate_route_cache()
    return instances <= {o.instance_id for o in runtime().registry.all() if o.model == model}


@pytest.mark.parametrize("plain_claims_tools", [False, True], ids=["configured", "misconfigured"])
def test_tool_requests_reach_only_instances_with_a_tool_parser(
    fleet: Fleet, tool_simulators: tuple[SimulatorServer, SimulatorServer], plain_claims_tools: bool
) -> None:
    """Defect 1: two instances of one model on one shared lane, only one able to serve tools: 50 tool requests,
    none reaches the instance without a tool parser, whether its settings say it has no tools or (wrongly) that
    it has them (discovery checks the claim)."""
    from tasks import chat

    with_parser, without = tool_simulators
    with_parser.reset()
    without.reset()
    claim = {"model_capabilities": {TOOL_MODEL: ["tools"]}}
    workers = [
        WorkerProcess(_one_instance(fleet, "sim-tools", with_parser.url, **claim), "sim-tools"),
        WorkerProcess(
            _one_instance(fleet, "sim-plain", without.url, **(claim if plain_claims_tools else {})), "sim-plain"
        ),
    ]
    try:
        wait_for(lambda: _offered(TOOL_MODEL, {"sim-tools", "sim-plain"}), timeout_s=30, what="both offerings")
        replies: list[dict[str, Any]] = []
        for _ in range(TOOL_REQUESTS // BATCH):  # in batches: the test lanes hold at most 20 waiting requests
            batch = [
                chat.delay(model=TOOL_MODEL, messages=WEATHER, tools=[WEATHER_TOOL], max_tokens=64)
                for _ in range(BATCH)
            ]
            replies += [result.get() for result in batch]
        assert len(replies) == TOOL_REQUESTS
        assert all(reply["tool_calls"] for reply in replies)
        assert {reply["metadata"]["instance"] for reply in replies} == {"sim-tools"}
        probes = 1 if plain_claims_tools else 0  # discovery's one check of the claim
        assert without.stats()["requests"].get("chat", 0) == probes, "a tool request reached the server without tools"
        assert with_parser.stats()["requests"]["chat"] == TOOL_REQUESTS + 1  # and one check there
    finally:
        for worker in workers:
            worker.stop()


def test_prompt_and_max_tokens_over_the_window_are_served_with_max_tokens_shortened(fleet: Fleet) -> None:
    """Defect 5: prompt + max_tokens over the only window, the prompt fitting: vLLM 0.32 shortens max_tokens,
    so the fleet routes it (no ``no_fleet_queue``) and the result says what max_tokens vLLM really allowed."""
    from tasks import chat

    prompt = " ".join(["word"] * 1600)  # the producer's estimate is ~2,700 tokens; vLLM counts ~1,600
    reply = chat.delay(model=SMALL_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=3000).get()
    usage = reply["usage"]
    assert usage["prompt_tokens"] + 3000 > SMALL_WINDOW
    assert reply["metadata"]["max_tokens_shortened_to"] == SMALL_WINDOW - usage["prompt_tokens"]
    assert usage["total_tokens"] <= SMALL_WINDOW
    plain = chat.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=16).get()
    assert "max_tokens_shortened_to" not in plain["metadata"]


def test_max_tokens_larger_than_every_window_is_refused_at_submit(fleet: Fleet) -> None:
    """vLLM refuses max_tokens above max_model_len (recorded: err_max_tokens_too_large): so does submit."""
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=SMALL_WINDOW + 1)
    assert info.value.code == "no_fleet_queue"
    assert "larger than every context window" in info.value.message


def test_a_chat_prefers_the_lane_with_room_for_its_full_max_tokens() -> None:
    """Of two windows of one model, the smallest with room for prompt + max_tokens; when none has room, the
    largest (vLLM shortens max_tokens there); max_tokens over every window is refused."""
    from provider.fleet.offerings import Offering
    from tasks.routing import _fitting_offering

    small = Offering(model="m", instance_id="a", capabilities=["chat"], context_window=2048)
    large = Offering(model="m", instance_id="b", capabilities=["chat"], context_window=8192)
    assert _fitting_offering([small, large], 100, 1000, "m") is small
    assert _fitting_offering([small, large], 1750, 1000, "m") is large
    assert _fitting_offering([small, large], 7000, 2000, "m") is large
    assert _fitting_offering([small, large], 3000, None, "m") is large
    with pytest.raises(FleetError):
        _fitting_offering([small, large], 10, 9000, "m")


def _refusal(submit: Any, streamed: bool) -> FleetError:
    """The FleetError a request ends with: from the stream for a streamed one, else from its result."""
    from tasks import open_stream

    result = submit()
    with pytest.raises(FleetError) as info:
        if streamed:
            open_stream(result).text()
        else:
            result.get()
    return info.value


BAD_PARAMETERS = [
    ({"temperature": -1}, "temperature must be non-negative, got -1.0"),
    ({"response_format": {"type": "xml"}}, "Input should be 'text', 'json_object', 'json_schema' or 'structural_tag'"),
    ({"extra_body": {"logprobs": True, "top_logprobs": 50}}, "Requested sample logprobs of 50"),
]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("extra", "explanation"), BAD_PARAMETERS, ids=["temperature", "response_format", "logprobs"])
def test_vllm_explains_a_bad_parameter_with_one_code(
    fleet: Fleet, extra: dict[str, Any], explanation: str, streamed: bool
) -> None:
    """Defects 2 and 8: vLLM's explanation of a bad parameter reaches the caller (it quotes no content), and a
    bad request is ``bad_request`` whether vLLM said so with a 400 or with an error frame inside a 200 stream
    (top_logprobs over the limit, streamed)."""
    from tasks import chat, stream_chat

    task = stream_chat if streamed else chat
    error = _refusal(lambda: task.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=8, **extra), streamed)
    assert error.code == "bad_request"
    assert explanation in error.message
    assert "withheld" not in error.message


def test_an_error_quoting_the_callers_content_is_still_withheld(fleet: Fleet) -> None:
    """Defect 2's other half: a vLLM message that repeats the caller's message text is withheld."""
    from tasks import chat

    secret = "my private note about the quarterly numbers"
    fleet.simulator.configure(failures=[{"route": "chat", "status": 400, "message": f"cannot parse: {secret}"}])
    error = _refusal(lambda: chat.delay(model=SMALL_MODEL, messages=[{"role": "user", "content": secret}]), False)
    assert error.code == "bad_request"
    assert secret[:20] not in error.message
    assert "withheld" in error.message


ABORT_ITL_S = 0.03  # 60 tokens take 1.8 s: time to put the server to sleep in the middle, even on a busy host
LONG_ANSWER = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]


def _abort_by_sleep_when(fleet: Fleet, started: Any, wake_after_s: float | None) -> None:
    """Once ``started()`` holds, put the simulator to sleep with ``mode=abort``; wake it after a moment."""
    import httpx

    wait_for(started, timeout_s=10, what="generation under way")
    httpx.post(f"{fleet.simulator.url}/sleep", params={"level": 1, "mode": "abort"}, timeout=5)
    if wake_after_s is not None:
        time.sleep(wake_after_s)
        httpx.post(f"{fleet.simulator.url}/wake_up", timeout=5)


def test_a_stream_aborted_by_sleep_restarts_with_a_reset(fleet: Fleet) -> None:
    """Defect 3, streamed: an abort nobody asked for is retried; readers see a StreamReset, then the whole
    answer; the result is not a success with ``finish_reason="abort"``."""
    from tasks import StreamReset, open_stream, stream_chat

    fleet.simulator.configure(itl_s=ABORT_ITL_S)
    result = stream_chat.delay(model=SMALL_MODEL, messages=LONG_ANSWER, max_tokens=200, timeout_s=30)
    stream = open_stream(result)
    items: list[Any] = []
    reader = threading.Thread(target=lambda: items.extend(stream))
    reader.start()
    _abort_by_sleep_when(fleet, lambda: len(items) >= 5, wake_after_s=0.3)
    reader.join(timeout=30)
    resets = [index for index, item in enumerate(items) if isinstance(item, StreamReset)]
    assert resets, "the reader was not told that generation restarted"
    after = "".join(item.content or "" for item in items[resets[-1] + 1 :] if not isinstance(item, StreamReset))
    final = result.get()
    assert final["finish_reason"] == "stop"
    assert final["content"] == after == LONG_ANSWER[0]["content"]


def test_a_chat_aborted_by_sleep_is_retried(fleet: Fleet) -> None:
    """Defect 3, not streamed: the aborted generation is retried after wake-up and the answer is whole."""
    from tasks import chat

    fleet.simulator.configure(itl_s=ABORT_ITL_S)
    result = chat.delay(model=SMALL_MODEL, messages=LONG_ANSWER, max_tokens=200, timeout_s=30)
    _abort_by_sleep_when(fleet, lambda: fleet.simulator.stats()["running"] >= 1, wake_after_s=0.3)
    final = result.get()
    assert (final["finish_reason"], final["content"]) == ("stop", LONG_ANSWER[0]["content"])


def test_an_abort_that_outlasts_the_deadline_is_a_typed_error(fleet: Fleet) -> None:
    """Defect 3: when the server stays asleep, the caller gets a typed error by its deadline, not a success."""
    from tasks import chat

    fleet.simulator.configure(itl_s=ABORT_ITL_S)
    result = chat.delay(model=SMALL_MODEL, messages=LONG_ANSWER, max_tokens=200, timeout_s=4)
    try:
        _abort_by_sleep_when(fleet, lambda: fleet.simulator.stats()["running"] >= 1, wake_after_s=None)
        with pytest.raises(FleetError) as info:
            result.get()
        assert info.value.code in ("generation_aborted", "timeout", "fleet_timeout")
    finally:
        import httpx

        httpx.post(f"{fleet.simulator.url}/wake_up", timeout=5)


def test_text_after_iterating_returns_at_once(fleet: Fleet) -> None:
    """Defect 4: ``FleetStream.text()`` after iterating the same stream returns its text, without waiting."""
    from tasks import open_stream, stream_chat

    result = stream_chat.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=32, timeout_s=60)
    stream = open_stream(result)
    seen = "".join(item.content or "" for item in stream)
    finished = threading.Event()
    text: list[str] = []

    def read_text() -> None:
        text.append(stream.text())
        finished.set()

    threading.Thread(target=read_text, daemon=True).start()
    assert finished.wait(10), "text() waited for the stream's deadline"
    assert text == [seen] == [WEATHER[0]["content"]]
    half = open_stream(result)
    first = next(iter(half))
    assert first.content is not None
    assert half.text() == seen


SLEEPY_MODEL = "sleepy-chat"
MODELS_UNAVAILABLE = [{"route": "models", "mode": "status", "status": 503, "count": -1}]


@pytest.fixture(scope="module")
def sleepy_simulator() -> Iterator[SimulatorServer]:
    """A server whose /v1/models fails at first, as a vLLM asleep or still loading does for discovery."""
    with SimulatorServer(SimulatorConfig(models=[ServedModel(name=SLEEPY_MODEL, max_model_len=4096)])) as server:
        yield server


def test_an_instance_without_offerings_is_discovered_again_soon(
    fleet: Fleet, sleepy_simulator: SimulatorServer
) -> None:
    """Defect 7: a worker whose vLLM could not be discovered at start offers its models once vLLM answers,
    without a manual ``discover`` (Beat's is every 30 minutes)."""
    from tasks import chat

    sleepy_simulator.reset()
    sleepy_simulator.configure(failures=MODELS_UNAVAILABLE)
    settings = _one_instance(fleet, "sim-sleepy", sleepy_simulator.url).model_copy(
        update={"discovery_retry_s": 0.5, "discovery_retry_max_s": 1.0}
    )
    worker = WorkerProcess(settings, "sim-sleepy")
    try:
        wait_for(lambda: sleepy_simulator.stats()["requests"].get("models", 0) >= 1, timeout_s=30, what="discovery")
        assert not _offered(SLEEPY_MODEL, {"sim-sleepy"})
        sleepy_simulator.configure(failures=[])
        wait_for(lambda: _offered(SLEEPY_MODEL, {"sim-sleepy"}), timeout_s=20, what="rediscovery")
        reply = chat.delay(model=SLEEPY_MODEL, messages=WEATHER, max_tokens=8).get()
        assert reply["metadata"]["instance"] == "sim-sleepy"
    finally:
        worker.stop()


def test_wake_up_rediscovers_the_instance(fleet: Fleet, sleepy_simulator: SimulatorServer) -> None:
    """Defect 7: ``vllm.wake_up`` rediscovers its instance, so a server that slept through discovery offers its
    models right after waking (the backoff retry is set far away here, so only wake_up can do it)."""
    from tasks import wake_up

    sleepy_simulator.reset()
    sleepy_simulator.configure(failures=MODELS_UNAVAILABLE)
    settings = _one_instance(fleet, "sim-sleepy", sleepy_simulator.url).model_copy(update={"discovery_retry_s": 600.0})
    worker = WorkerProcess(settings, "sim-sleepy")
    try:
        wait_for(lambda: sleepy_simulator.stats()["requests"].get("models", 0) >= 1, timeout_s=30, what="discovery")
        wait_for(lambda: _instance_registered("sim-sleepy"), timeout_s=20, what="the management queue")
        assert not _offered(SLEEPY_MODEL, {"sim-sleepy"})
        sleepy_simulator.configure(failures=[])
        wake_up.delay(instance="sim-sleepy").get()
        assert _offered(SLEEPY_MODEL, {"sim-sleepy"})
    finally:
        worker.stop()


def _instance_registered(name: str) -> bool:
    from tasks.runtime import runtime

    return runtime().registry.instance(name) is not None


CANCEL_ROUNDS = 10
CANCEL_ITL_S = 0.01  # 100 tokens a second, a fast GPU's pace


@pytest.mark.parametrize("busy_streams", [0, 6], ids=["alone", "beside-6-streams"])
def test_cancellation_stops_generation_and_its_latency_is_reported(fleet: Fleet, busy_streams: int) -> None:
    """Defect 9: measure how long ``cancel()`` takes to stop vLLM's generation (until the simulator counts the
    abort) and how many chunks still reach the reader, at 100 tokens/s, alone or beside other streams on the
    same worker. Prints the figures (run with ``-s``); asserts only that every stream ended ``cancelled`` and
    vLLM aborted every generation."""
    from tasks import cancel, open_stream, stream_chat

    fleet.simulator.configure(itl_s=CANCEL_ITL_S, text_mode="lorem", output_tokens=2000)
    busy = [
        stream_chat.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=3000, ignore_eos=True, timeout_s=60)
        for _ in range(busy_streams)
    ]
    latencies_s: list[float] = []
    late_chunks: list[int] = []
    for round_number in range(CANCEL_ROUNDS):
        aborted_before = fleet.simulator.stats()["aborted"]
        result = stream_chat.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=2000, ignore_eos=True)
        seen, late, cancelled_at = 0, 0, 0.0
        with pytest.raises(FleetError) as info:
            for item in open_stream(result):
                if item.content:
                    seen += 1
                    if cancelled_at:
                        late += 1
                    elif seen == 20:
                        cancelled_at = time.monotonic()
                        cancel(result)
        assert info.value.code == "cancelled", round_number
        wait_for(lambda: fleet.simulator.stats()["aborted"] > aborted_before, timeout_s=10, what="vLLM's abort")  # noqa: B023
        latencies_s.append(time.monotonic() - cancelled_at)
        late_chunks.append(late)
    for result in busy:
        cancel(result)
    latencies_s.sort()
    print(
        f"\ncancel -> vLLM abort over {CANCEL_ROUNDS} streams at {1 / CANCEL_ITL_S:.0f} tokens/s beside "
        f"{busy_streams} others: "
        f"median {latencies_s[len(latencies_s) // 2] * 1000:.0f} ms, max {latencies_s[-1] * 1000:.0f} ms; "
        f"chunks read after cancel: median {sorted(late_chunks)[len(late_chunks) // 2]}, max {max(late_chunks)}"
    )


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_logprobs_asked_through_extra_body_come_back(fleet: Fleet, streamed: bool) -> None:
    """Defect 9: ``logprobs``/``top_logprobs`` in ``extra_body`` reach vLLM and its logprobs reach the caller
    (``result.logprobs``, vLLM's ``{"content": [...]}``; streamed, also on each chunk)."""
    from tasks import chat, open_stream, stream_chat

    extra = {"extra_body": {"logprobs": True, "top_logprobs": 3}}
    task = stream_chat if streamed else chat
    result = task.delay(model=SMALL_MODEL, messages=WEATHER, max_tokens=16, **extra)
    if streamed:
        chunks = [item for item in open_stream(result) if item.content]
        assert all(len(chunk.logprobs["content"]) == 1 for chunk in chunks)
    reply = result.get()
    entries = reply["result"]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in entries) == reply["content"] == WEATHER[0]["content"]
    assert all(len(entry["top_logprobs"]) == 3 for entry in entries)
    assert fleet.simulator.stats()["last_chat_body"]["top_logprobs"] == 3


def test_wake_up_says_whether_the_server_still_sleeps(fleet: Fleet) -> None:
    """vLLM answers ``{"status": "awake"}`` to ``wake_up?tags=weights`` yet still sleeps (its KV cache is not
    back): the fleet's answer says so (``is_sleeping``), and says awake once every part woke."""
    from tasks import sleep, wake_up

    sleep.delay(instance="sim-a", level=1).get()
    try:
        partial = wake_up.delay(instance="sim-a", tags=["weights"]).get()["result"]
        assert (partial["status"], partial["is_sleeping"]) == ("awake", True)
    finally:
        whole = wake_up.delay(instance="sim-a").get()["result"]
    assert whole["is_sleeping"] is False
