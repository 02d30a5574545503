"""The worker pipeline's steps, one by one, without a broker: a real Redis (ledger, idempotency, circuit), the
simulator over HTTP, and a real Celery task object on a private app (its backend on the test Redis)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject

from provider.fleet.capacity import CapacityGate
from provider.fleet.health import HealthTracker
from provider.protocol import EnvelopeError
from provider.settings import Settings
from provider.vllm.client import VllmClient
from provider.vllm.discovery import discover_offerings
from simulator.testing import SimulatorServer
from tasks.errors import FleetTaskError
from tasks.execution import run_chat
from tasks.metrics import ENVELOPE_REJECTIONS, REQUESTS
from tasks.pipeline import (
    RequestContext,
    call_instance,
    check_deadline,
    claim,
    complete,
    fail,
    hand_back,
    idempotent,
    observe,
    pick_instance,
    run_in_slot,
    verify,
)
from tasks.queues import management_queue_name
from tasks.runtime import FleetRuntime
from tasks.worker import HandBack, ServedInstance, WorkerFleet
from tests.conftest import BROKER_DB
from tests.tasks.conftest import CHAT_MODEL, fleet_settings

PROMPT = "hello pipeline"


@dataclass
class Bench:
    """A worker's parts with no broker and no Celery worker: runtime, fleet (one served instance), a task."""

    rt: FleetRuntime
    fleet: WorkerFleet
    served: ServedInstance
    task: Task[Any, Any]
    lane: str
    sim: SimulatorServer

    def envelope(self, **kwargs: Any) -> dict[str, Any]:
        """A chat request envelope for the bench's lane."""
        fields: dict[str, Any] = {
            "operation": "chat",
            "task_name": "vllm.chat",
            "lane": self.lane,
            "model": CHAT_MODEL,
            "params": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8},
            "timeout_s": 10.0,
        }
        return self.rt.codec.build_request(**{**fields, **kwargs})

    def context(self, raw: Any, *, task_id: str | None = None) -> RequestContext:
        """The context of ``raw`` delivered on the bench's lane as task ``task_id`` (its request id by default)."""
        task_id = task_id or (raw["request_id"] if isinstance(raw, dict) else str(uuid.uuid4()))
        self.task.push_request(id=task_id, delivery_info={"routing_key": self.lane})
        return RequestContext(self.task, raw, self.rt, self.fleet, self.lane, time.monotonic())

    def verified(self, **kwargs: Any) -> RequestContext:
        """A verified context of a fresh envelope."""
        ctx = self.context(self.envelope(**kwargs))
        verify(ctx)
        return ctx


@pytest.fixture(scope="module")
def bench(redis_url: str, session_prefix: str, simulator: SimulatorServer) -> Iterator[Bench]:
    from tests.tasks.conftest import fleet_security

    settings: Settings = fleet_settings(
        f"{redis_url}/{BROKER_DB}",
        redis_url,
        f"{session_prefix}-pipe-{uuid.uuid4().hex[:6]}",
        simulator.url,
        fleet_security(),
    )
    dead_letters = f"llm.fleet.dead-pipe-{uuid.uuid4().hex[:6]}"  # this module's own dead-letter list
    settings = settings.model_copy(
        update={"lanes": settings.lanes.model_copy(update={"dead_letter_queue": dead_letters})}
    )
    rt = FleetRuntime(settings)
    fleet = WorkerFleet(rt)
    instance = settings.instances["sim-a"]
    client = VllmClient(instance, timeouts=settings.timeouts)
    health = HealthTracker.from_settings(rt.redis, settings)
    served = ServedInstance(
        instance, client, management_queue_name("sim-a"), health, CapacityGate.from_settings(client.metrics, settings)
    )
    served.offerings = discover_offerings(client, instance, settings)
    fleet.instances[instance.name] = served
    lane = next(o.lane(settings.lanes.style) for o in served.offerings if o.model == CHAT_MODEL)
    app = Celery("pipeline-bench", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False)

    @app.task(name="vllm.chat", bind=True, shared=False)
    def chat(self: Task[Any, Any], envelope: dict[str, Any]) -> None:  # a task object: its body never runs
        raise AssertionError("not run")

    yield Bench(rt, fleet, served, chat, lane, simulator)
    client.close()
    fleet.bus.close(timeout_s=1.0)
    rt.broker.client.delete(dead_letters)  # type: ignore[attr-defined]
    app.close()


@pytest.fixture(autouse=True)
def _fresh(bench: Bench) -> Iterator[None]:
    bench.sim.reset()
    redis.Redis.from_url(bench.rt.settings.redis_url).delete(bench.rt.keys.health("sim-a"))
    bench.served.sync_health()
    yield
    bench.sim.reset()


def test_verify_sets_the_verified_request(bench: Bench) -> None:
    raw = bench.envelope()
    ctx = bench.context(raw)
    verify(ctx)
    assert ctx.verified.request_id == raw["request_id"]
    assert ctx.verified.lane == bench.lane


def test_verify_refuses_an_envelope_under_another_task_id_with_a_typed_error(bench: Bench) -> None:
    ctx = bench.context(bench.envelope(), task_id=str(uuid.uuid4()))
    with pytest.raises(FleetTaskError) as refused:
        verify(ctx)
    assert refused.value.envelope["code"] == "claim_mismatch"
    assert refused.value.envelope["request_id"] == ctx.request_id


def test_verify_ignores_a_refused_copy_of_a_request_with_a_stored_answer(bench: Bench) -> None:
    ctx = bench.verified()
    assert claim(ctx) is None
    complete(ctx, bench.rt.codec.response(ctx.verified, {"content": "first"}), None)
    tampered = {**ctx.raw, "model": "other"}
    with pytest.raises(Ignore):  # a refusal never overwrites a stored answer
        verify(bench.context(tampered))


def test_claim_runs_a_new_request_then_replays_its_stored_answer(bench: Bench) -> None:
    ctx = bench.verified()
    assert claim(ctx) is None, "a fresh request is ours to run"
    response = bench.rt.codec.response(ctx.verified, {"content": "stored answer"})
    complete(ctx, response, None)
    again = bench.context(ctx.raw)
    verify(again)
    assert claim(again) == response


def test_claim_refuses_the_same_request_id_with_another_token_and_keeps_the_first(bench: Bench) -> None:
    first = bench.verified()
    assert claim(first) is None
    other_params = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "another prompt"}], "max_tokens": 8}
    # other params make another token even within the same second (Ed25519 signs the same claims identically)
    copy = bench.context(bench.envelope(request_id=first.verified.request_id, params=other_params))
    verify(copy)
    rejected = ENVELOPE_REJECTIONS.labels(code="replayed")
    before = rejected._value.get()
    with pytest.raises(Ignore):  # refused (counted), and the first request's record is never overwritten
        claim(copy)
    assert rejected._value.get() == before + 1
    assert bench.rt.ledger.peek(first.verified.request_id) is not None


def test_check_deadline_refuses_a_request_past_its_deadline(bench: Bench) -> None:
    ctx = bench.verified()
    check_deadline(ctx)  # in time: nothing happens
    ctx.verified = dataclasses.replace(ctx.verified, expires_at_epoch=time.time() - 60)
    with pytest.raises(EnvelopeError) as late:
        check_deadline(ctx)
    assert late.value.code == "expired"


def test_check_deadline_starts_no_work_past_the_deadline_even_within_the_clock_leeway(bench: Bench) -> None:
    ctx = bench.verified()
    assert bench.rt.codec.security.leeway_s > 1  # the codec would still accept it: the step must not
    ctx.verified = dataclasses.replace(ctx.verified, expires_at_epoch=time.time() - 0.5)
    bench.rt.codec.check_deadline(ctx.verified)
    with pytest.raises(EnvelopeError) as late:
        check_deadline(ctx)
    assert late.value.code == "expired"


def test_idempotent_answers_a_duplicate_with_the_first_requests_body(bench: Bench) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    runs: list[str] = []

    def runner(ctx: RequestContext) -> dict[str, Any]:
        runs.append(ctx.verified.request_id)
        return {"content": f"ran {ctx.verified.request_id}"}

    first = bench.verified(idempotency_key=key)
    assert claim(first) is None
    body = idempotent(first, runner)
    complete(first, bench.rt.codec.response(first.verified, body), None)
    second = bench.verified(idempotency_key=key)
    assert claim(second) is None
    assert idempotent(second, runner)["content"] == f"ran {first.verified.request_id}"
    assert runs == [first.verified.request_id], "the duplicate ran the work again"


def test_idempotent_refuses_the_same_key_with_other_params(bench: Bench) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    first = bench.verified(idempotency_key=key)
    idempotent(first, lambda ctx: {"content": "x"})
    other_params = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "other"}], "max_tokens": 8}
    second = bench.verified(idempotency_key=key, params=other_params)
    with pytest.raises(EnvelopeError) as conflict:
        idempotent(second, lambda ctx: {"content": "y"})
    assert conflict.value.code == "idempotency_conflict"


def test_pick_instance_and_run_chat_answer_from_the_simulator(bench: Bench) -> None:
    ctx = bench.verified()
    body = run_in_slot(ctx, run_chat)
    assert ctx.served is bench.served
    assert body["metadata"]["instance"] == "sim-a"
    assert body["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_pick_instance_hands_back_a_lane_this_worker_does_not_serve(bench: Bench) -> None:
    ctx = bench.verified()
    ctx.verified = dataclasses.replace(ctx.verified, lane="llm.fleet.inference.not-served-here.ctx4096")
    with pytest.raises(HandBack) as handed:
        pick_instance(ctx)
    assert not handed.value.tried


def test_call_instance_retries_a_transient_failure_and_counts_it_once(bench: Bench) -> None:
    bench.sim.configure(failures=[{"route": "chat", "mode": "status", "status": 500, "count": 1}])
    ctx = bench.verified()
    body = run_in_slot(ctx, run_chat)
    assert body["content"]
    assert ctx.failed_attempts == 1
    state = bench.served.health.state("sim-a")
    assert state.circuit == "closed"


def test_call_instance_hands_back_untried_while_the_circuit_is_open(bench: Bench) -> None:
    state = redis.Redis.from_url(bench.rt.settings.redis_url)
    state.hset(
        bench.rt.keys.health("sim-a"), mapping={"circuit": "open", "failures": 3, "opened_at": repr(time.time() + 60)}
    )
    bench.served.sync_health()
    ctx = bench.verified()
    pick_instance(ctx)
    calls: list[float] = []
    with pytest.raises(HandBack) as handed:
        call_instance(ctx, calls.append)
    assert calls == [], "a call went to an instance whose circuit is open"
    assert not handed.value.tried


def test_fail_stores_and_raises_a_typed_error_envelope(bench: Bench) -> None:
    ctx = bench.verified()
    assert claim(ctx) is None
    with pytest.raises(FleetTaskError) as failed:
        fail(ctx, RuntimeError(f"secret prompt {PROMPT}"))
    envelope = failed.value.envelope
    assert envelope["request_id"] == ctx.verified.request_id
    assert PROMPT not in str(envelope), "an unexpected exception's text reached the caller"
    again = bench.context(ctx.raw)
    verify(again)
    with pytest.raises(FleetTaskError) as replayed:  # the stored error answers a copy
        claim(again)
    assert replayed.value.envelope["code"] == envelope["code"]


def test_observe_counts_the_answer_by_lane_operation_and_outcome(bench: Bench) -> None:
    ctx = bench.verified()
    counter = REQUESTS.labels(lane=bench.lane, operation="chat", outcome="ok")
    before = counter._value.get()
    observe(ctx, "ok", {"prompt_tokens": 3, "completion_tokens": 2})
    assert counter._value.get() == before + 1


def test_hand_back_returns_the_message_to_its_lane_and_releases_the_lease(bench: Bench) -> None:
    ctx = bench.verified()
    assert claim(ctx) is None
    with pytest.raises(Reject) as rejected:
        hand_back(ctx, HandBack("the circuit of instance sim-a is open"))
    assert rejected.value.requeue is True
    again = bench.context(ctx.raw)
    verify(again)
    assert claim(again) is None, "the lease was not released for the redelivery"


def test_hand_back_past_the_delivery_limit_dead_letters_and_tells_the_caller(bench: Bench) -> None:
    rt = bench.rt
    ctx = bench.verified()
    assert claim(ctx) is None
    dead_letters = rt.settings.lanes.dead_letter_queue
    before = rt.broker.lane_depth(dead_letters)
    for _ in range(rt.settings.lanes.delivery_limit):  # earlier tried hand-backs of this request
        rt.count_hand_back(ctx.verified.request_id, ttl_s=30)
    with pytest.raises(Reject) as rejected:
        hand_back(ctx, HandBack("instance sim-a failed server_error; its circuit opened", tried=True))
    assert rejected.value.requeue is False
    assert rt.broker.lane_depth(dead_letters) == before + 1, "a Redis lane needs the dead letter copied"
    stored = rt.ledger.wait_for_result(ctx.verified.request_id, timeout_s=1.0)
    assert stored is not None
    assert stored.result["code"] == "fleet_dead_lettered"
    assert bench.task.AsyncResult(ctx.verified.request_id).state == "FAILURE"
