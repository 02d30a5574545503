"""Redelivery and replay against real worker processes (design.md, "Deadlines, delivery, retries and replay").

A redelivered message (its worker died) completes once and is never refused as a replay; an identical copy of a
completed message, published later by someone with broker access, runs nothing and leaves the stored result as it
was; a copy with any field changed is refused and leaves it as well. Each worker process serves its own simulated
vLLM and model, so the session's in-process worker never takes these lanes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from provider.settings import InstanceSettings, Settings
from simulator.config import ServedModel, SimulatorConfig
from simulator.testing import SimulatorServer
from tests.tasks.conftest import Fleet, WorkerProcess, wait_for
from tests.tasks.test_bad_input import b64url, chat_params, stored_meta, unb64url, with_ciphertext

REPLAY_MODEL = "replay-chat"
KILL_MODEL = "kill-chat"
PROMPT = "hello replay"
RESULT_TIMEOUT_S = 10.0
LOG_WAIT_S = 2.0
_REFUSED = re.compile(r"envelope refused: ([a-z_]+)")


# ------------------------------------------------------------------------------------- worker process helpers


@dataclass
class LoggedWorker:
    """A ``WorkerProcess`` whose log (WARNING and up) the test reads."""

    process: WorkerProcess

    @property
    def holder(self) -> str:
        """The jti lease holder name this process uses (``FleetRuntime.holder``)."""
        return f"{socket.gethostname()}:{self.process.process.pid}"

    def refusals(self) -> list[str]:
        """The codes of the envelopes this worker refused, in order, as read so far."""
        return [match.group(1) for line in self.process.logs().splitlines() if (match := _REFUSED.search(line))]

    def assert_refusals(self, expected: list[str]) -> None:
        """The worker logged exactly these refusals (allow its log a moment to reach the file)."""
        with contextlib.suppress(AssertionError):  # compared below, with the difference shown
            wait_for(lambda: self.refusals() == expected, timeout_s=LOG_WAIT_S, what="the refusals in the log")
        assert self.refusals() == expected

    def stop(self) -> None:
        """Warm shutdown."""
        self.process.stop()


def simulator_for(model: str) -> SimulatorServer:
    """A simulated vLLM serving one chat model."""
    return SimulatorServer(SimulatorConfig(models=[ServedModel(name=model, max_model_len=8192)], max_running=16))


def settings_for(fleet: Fleet, sim: SimulatorServer, instance: str, **security: Any) -> Settings:
    """The fleet's settings with one instance of its own (and some security settings changed)."""
    changes: dict[str, Any] = {
        "instances": {instance: InstanceSettings(name=instance, base_url=sim.url, concurrency=4)}
    }
    if security:
        changes["security"] = fleet.settings.security.model_copy(update=security)
    return fleet.settings.model_copy(update=changes)


def start_worker(settings: Settings, name: str, *, concurrency: int = 4) -> LoggedWorker:
    """A real ``celery worker`` process with these settings."""
    return LoggedWorker(WorkerProcess(settings, name, concurrency=concurrency))


def lane_when_served(model: str) -> str:
    """The chat lane of ``model`` once a worker has registered it."""
    from tasks.routing import invalidate_route_cache, pick_lane
    from tasks.runtime import runtime

    def registered() -> bool:
        invalidate_route_cache()
        return any(offering.model == model for offering in runtime().registry.all())

    wait_for(registered, what=f"a worker serving {model}")
    return str(pick_lane("chat", model, chat_params(model, PROMPT))["lane"])


def forget_instance(name: str) -> None:
    """Drop a stopped worker's registry entries now, not at their TTL (other tests count live instances)."""
    from tasks.routing import invalidate_route_cache
    from tasks.runtime import runtime

    rt = runtime()
    rt.registry.unregister([o.offering_id for o in rt.registry.all() if o.instance_id == name])
    rt.redis.delete(rt.keys.instance(name))
    rt.redis.zrem(rt.keys.instances, name)
    invalidate_route_cache()


def envelope_for(lane: str, model: str, **kwargs: Any) -> dict[str, Any]:
    """A chat envelope signed and sealed with the session's keys."""
    from tasks.runtime import runtime

    kwargs.setdefault("params", chat_params(model, PROMPT))
    kwargs.setdefault("timeout_s", 10.0)
    return runtime().codec.build_request(operation="chat", task_name="vllm.chat", lane=lane, model=model, **kwargs)


def publish(envelope: dict[str, Any], **options: Any) -> Any:
    """Publish a pre-built envelope unchanged (to its own lane unless ``queue=``)."""
    from tasks import chat

    return chat.apply_async(args=[envelope], **options)


def token_digest(envelope: dict[str, Any]) -> str:
    """The SHA-256 of the token's signing input: what the jti ledger records as the message's name."""
    header, payload, _ = envelope["signed_token"].split(".")
    return hashlib.sha256(f"{header}.{payload}".encode("ascii")).hexdigest()


def chat_calls(sim: SimulatorServer) -> int:
    """Chat completions the simulator has been asked for."""
    return int(sim.stats()["requests"].get("chat", 0))


# ------------------------------------------------------------------------------------------------- redelivery


@pytest.fixture(scope="module")
def kill_simulator() -> Iterator[SimulatorServer]:
    """The vLLM behind the workers this module kills."""
    with simulator_for(KILL_MODEL) as server:
        yield server


def test_redelivered_message_completes_once_and_is_not_a_replay(fleet: Fleet, kill_simulator: SimulatorServer) -> None:
    """Killed after validation, before finishing: the redelivery takes the lapsed lease over and answers once."""
    from tasks import app
    from tasks.runtime import runtime

    kill_simulator.reset()
    # restore unacked Redis messages after 3 s, not the session's 6 s: the second worker takes the message sooner
    settings = settings_for(fleet, kill_simulator, "sim-kill").model_copy(update={"redis_visibility_timeout_s": 3.0})
    first = start_worker(settings, "kill-first")
    second: LoggedWorker | None = None
    try:
        envelope = envelope_for(lane_when_served(KILL_MODEL), KILL_MODEL, timeout_s=40.0)
        request_id = envelope["request_id"]
        kill_simulator.configure(ttft_s=2.0)
        result = publish(envelope)
        wait_for(lambda: kill_simulator.stats()["in_flight"] >= 1, what="the request reaching vLLM")
        held = runtime().ledger.peek(request_id)
        assert held is not None
        assert (held["state"], held["holder"]) == ("held", first.holder)
        first.process.kill()
        kill_simulator.configure(ttft_s=0.0)
        second = start_worker(settings, "kill-second")

        reply = result.get(timeout=30)
        assert reply["content"] == PROMPT
        stats = kill_simulator.stats()
        assert (stats["completed"], stats["requests"]["chat"]) == (1, 2), stats

        record = runtime().ledger.peek(request_id)
        assert record is not None
        assert (record["state"], record["holder"], record["digest"]) == (
            "done",
            second.holder,
            token_digest(envelope),
        )
        stored = app.backend.get_task_meta(request_id, cache=False)
        assert stored["status"] == "SUCCESS"
        assert json.loads(record["result"]) == stored["result"]
        assert runtime().codec.open_response(stored["result"], request_id=request_id) == reply
        assert second.refusals() == []
    finally:
        first.stop()
        if second is not None:
            second.stop()
        forget_instance("sim-kill")


# ----------------------------------------------------------------------------------------------- broker replay


@dataclass
class Completed:
    """A request the replay worker answered, and what was stored for it."""

    envelope: dict[str, Any]
    answer: dict[str, Any]
    meta: bytes
    record: dict[str, str]


@dataclass
class ReplayFleet:
    """One worker process (concurrency 1, so it takes its lane in order) and its own simulator."""

    worker: LoggedWorker
    sim: SimulatorServer
    lane: str
    original: Completed


@pytest.fixture(scope="module")
def replay_fleet(fleet: Fleet) -> Iterator[ReplayFleet]:
    """The worker and a completed original request, shared by the replay tests of one broker."""
    from tasks.runtime import runtime

    with simulator_for(REPLAY_MODEL) as sim:
        worker = start_worker(settings_for(fleet, sim, "sim-replay"), "replay", concurrency=1)
        try:
            lane = lane_when_served(REPLAY_MODEL)
            envelope = envelope_for(lane, REPLAY_MODEL)
            answer = publish(envelope).get(timeout=RESULT_TIMEOUT_S)
            meta, record = stored_meta(envelope["request_id"]), runtime().ledger.peek(envelope["request_id"])
            assert meta is not None
            assert record is not None
            assert record["state"] == "done"
            yield ReplayFleet(worker, sim, lane, Completed(envelope, answer, meta, record))
        finally:
            worker.stop()
            forget_instance("sim-replay")


def after_barrier(replay: ReplayFleet) -> None:
    """Wait until the worker has handled everything published before: it takes its lane one message at a time."""
    barrier = publish(envelope_for(replay.lane, REPLAY_MODEL, params=chat_params(REPLAY_MODEL, "barrier")))
    assert barrier.get(timeout=RESULT_TIMEOUT_S)["content"] == "barrier"


def assert_original_unchanged(replay: ReplayFleet) -> None:
    """The stored result (byte for byte), the jti record and the answer are what they were."""
    from tasks import chat
    from tasks.runtime import runtime

    original = replay.original
    request_id = original.envelope["request_id"]
    assert stored_meta(request_id) == original.meta
    assert runtime().ledger.peek(request_id) == original.record
    assert chat.AsyncResult(request_id).get(timeout=RESULT_TIMEOUT_S) == original.answer


def test_identical_copy_of_a_completed_message_runs_nothing(replay_fleet: ReplayFleet) -> None:
    calls, refusals = chat_calls(replay_fleet.sim), replay_fleet.worker.refusals()
    publish(copy.deepcopy(replay_fleet.original.envelope))
    after_barrier(replay_fleet)
    assert chat_calls(replay_fleet.sim) == calls + 1, "the copy ran again (only the barrier may run)"
    assert replay_fleet.worker.refusals() == refusals, "an identical copy is not a replay to refuse"
    assert_original_unchanged(replay_fleet)


def _changed(original: dict[str, Any], name: str, other_lane: str) -> dict[str, Any]:
    """A copy of the original envelope with one field changed the way someone without the keys could."""
    changes: dict[str, Any] = {
        "correlation_id": "someone-else",
        "idempotency_key": "someone-elses-key",
        "provider_instance": "sim-replay",
        "model": "another-model",
        "reply_to": "celery:elsewhere",
        "timeout_seconds": 600.0,
        "expires_at": "2099-01-01T00:00:00.000Z",
        "message_context": {"ticket": "T-1"},
        "caller": {"user": "mallory"},
        "trace_context": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        "routing_key": other_lane,
    }
    changed = copy.deepcopy(original)
    if name in changes:
        changed[name] = changes[name]
    elif name == "sealed_params":
        changed = with_ciphertext(changed, lambda data: data[:-1] + bytes([data[-1] ^ 0x01]))
    elif name == "signed_token":  # claims edited, signature kept
        header, claims, signature = changed["signed_token"].split(".")
        edited = {**json.loads(unb64url(claims)), "caller_hash": "0" * 64}
        changed["signed_token"] = f"{header}.{b64url(json.dumps(edited).encode())}.{signature}"
    elif name == "protocol_version":
        changed["protocol_version"] = 3
    else:
        raise AssertionError(f"no change defined for {name}")
    assert changed != original
    return changed


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("correlation_id", "claim_mismatch"),
        ("idempotency_key", "claim_mismatch"),
        ("provider_instance", "claim_mismatch"),
        ("model", "claim_mismatch"),
        ("reply_to", "claim_mismatch"),
        ("timeout_seconds", "claim_mismatch"),
        ("expires_at", "claim_mismatch"),
        ("message_context", "claim_mismatch"),
        ("caller", "claim_mismatch"),
        ("trace_context", "claim_mismatch"),
        ("routing_key", "claim_mismatch"),
        ("sealed_params", "decrypt_failed"),
        ("signed_token", "invalid_signature"),
        ("protocol_version", "unsupported_version"),
    ],
)
def test_copy_with_a_field_changed_is_refused_and_changes_nothing(
    replay_fleet: ReplayFleet, name: str, code: str
) -> None:
    from tasks.routing import queue_for

    original = replay_fleet.original.envelope
    calls, refusals = chat_calls(replay_fleet.sim), replay_fleet.worker.refusals()
    changed = _changed(original, name, other_lane=f"{replay_fleet.lane}-other")
    publish(changed, queue=queue_for(replay_fleet.lane))
    after_barrier(replay_fleet)
    replay_fleet.worker.assert_refusals([*refusals, code])
    assert chat_calls(replay_fleet.sim) == calls + 1, "a changed copy ran (only the barrier may run)"
    assert_original_unchanged(replay_fleet)


def test_new_message_signed_for_a_used_request_id_is_refused_as_replayed(
    replay_fleet: ReplayFleet,
) -> None:
    """The producer's keys, a used request id, other params: a valid token, but not the message that ran."""
    original = replay_fleet.original.envelope
    calls, refusals = chat_calls(replay_fleet.sim), replay_fleet.worker.refusals()
    other = envelope_for(
        replay_fleet.lane,
        REPLAY_MODEL,
        request_id=original["request_id"],
        params=chat_params(REPLAY_MODEL, f"not the original {uuid.uuid4().hex}"),
    )
    publish(other)
    after_barrier(replay_fleet)
    replay_fleet.worker.assert_refusals([*refusals, "replayed"])
    assert chat_calls(replay_fleet.sim) == calls + 1
    assert_original_unchanged(replay_fleet)
