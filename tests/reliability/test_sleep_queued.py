"""Scenario 3 of issue 15, last item: vLLM put to sleep (``POST /sleep``) while requests are queued for it.

Requests sent while the instance sleeps wait in vLLM's queue (0.33 queues them, it does not refuse them): those
whose deadline outlasts the sleep are served after ``/wake_up``; those whose deadline passes first are answered
with a typed error by their deadline. Nothing is lost, nothing runs twice.
"""

from __future__ import annotations

import time

import httpx

from provider.settings import SecuritySettings
from tests.conftest import BROKER_DB
from tests.reliability.harness import Tally, sized, wait_until
from tests.reliability.scenarios import Calls, stage, typed_only

SLEEP_S = 5.0
SHORT_DEADLINE_S = 3.0  # passes while the instance still sleeps
LONG_DEADLINE_S = 25.0


def test_requests_queued_while_vllm_sleeps(redis_url: str, fault_security: SecuritySettings) -> None:
    served, short = sized(10, 60), sized(5, 30)
    tally = Tally("sleep while requests are queued")
    with stage(redis_url, f"{redis_url}/{BROKER_DB}", fault_security, sims={"sim-a": {"ttft_s": 0.2}}) as fleet:
        sim = fleet.sims["sim-a"]
        with httpx.Client(base_url=sim.url, timeout=10) as http:
            http.post("/sleep", params={"level": 1, "mode": "wait"}).raise_for_status()
            assert http.get("/is_sleeping").json()["is_sleeping"] is True
            slept_at = time.monotonic()
            long_calls = Calls(Tally("served after wake-up"), pool_size=served)
            short_calls = Calls(Tally("deadline passes asleep"), pool_size=short)
            for _ in range(served):
                long_calls.chat(timeout_s=LONG_DEADLINE_S)
            for _ in range(short):
                short_calls.chat(timeout_s=SHORT_DEADLINE_S)
            # requests reach vLLM and wait in its queue (none runs: it sleeps); past the worker's slots the rest
            # wait in the lane
            wait_until(lambda: sum(sim.received.values()) >= 1, 20, "requests queued in vLLM")
            time.sleep(max(0.0, SLEEP_S - (time.monotonic() - slept_at)))  # the fault: how long vLLM sleeps
            queued_in_vllm = sum(sim.ran(p) for p in long_calls.prompts + short_calls.prompts)
            waking_at = time.monotonic()  # anything answered 200 before this was answered while asleep
            http.post("/wake_up").raise_for_status()
            woke_at = time.monotonic()
            long_calls.collect(margin_s=5)
            short_calls.collect(margin_s=5)
        tally.recover_s = time.monotonic() - woke_at
        for part in (long_calls.tally, short_calls.tally):
            tally.submitted += part.submitted
            tally.ok += part.ok
            tally.errors.update(part.errors)
            tally.lost += part.lost
            tally.wrong += part.wrong
            tally.latencies_s.extend(part.latencies_s)
        tally.duplicated = sim.duplicated(long_calls.prompts + short_calls.prompts)
        runs = [run for key_runs in sim._runs_of(long_calls.prompts + short_calls.prompts) for run in key_runs]
        answered_asleep = sum(1 for run in runs if run.status == 200 and run.complete and (run.ended or 0) < waking_at)
        tally.notes.update(
            slept_s=SLEEP_S,
            served_after_wake=f"{long_calls.tally.ok}/{served}",
            short_deadline_errors=dict(short_calls.tally.errors),
            answered_while_asleep=answered_asleep,
            queued_in_vllm_at_wake=queued_in_vllm,
        )
    tally.report()
    assert tally.lost == 0, tally.row()
    assert answered_asleep == 0, "vLLM answered while asleep: the scenario did not test what it names"
    assert queued_in_vllm >= 1
    assert long_calls.tally.ok == served, tally.row()
    assert long_calls.tally.wrong == 0
    assert sum(short_calls.tally.errors.values()) + short_calls.tally.ok == short
    assert set(short_calls.tally.errors) <= {"fleet_timeout", "timeout", "expired"}, tally.row()
    assert short_calls.tally.ok == 0, "a deadline that passed while vLLM slept cannot have been served"
    assert typed_only(tally)
    assert tally.duplicated == 0
