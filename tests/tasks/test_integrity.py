"""End-to-end integrity against a live worker, on both brokers: a caller only ever reads what a fleet worker
wrote for its request, and a worker runs nothing but fleet tasks (issue 10's attacks, one test each)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest

from provider.protocol import EnvelopeError, FleetError, RequestRefused
from tests.tasks.conftest import CHAT_MODEL, Fleet, wait_for
from tests.tasks.test_bad_input import (  # noqa: F401 (dead_letters is a fixture)
    RESULT_TIMEOUT_S,
    TIMEOUT_S,
    assert_dead_lettered,
    dead_letters,
    lane_of,
    stored_meta,
)

CELERY_BUILT_INS = (
    "celery.accumulate",
    "celery.chord_unlock",
    "celery.backend_cleanup",
    "celery.group",
    "celery.chain",
    "celery.chord",
    "celery.map",
    "celery.starmap",
    "celery.chunks",
)


def forged_response(request_id: str, content: str) -> dict[str, Any]:
    """A response envelope no worker wrote: the ids right, the content the forger's."""
    return {
        "message_type": "llm.fleet.response",
        "protocol_version": 2,
        "request_id": request_id,
        "correlation_id": request_id,
        "reply_to": f"celery:{request_id}",
        "content": content,
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "finish_reason": "stop",
    }


def management_queue() -> str:
    """The in-process worker's management queue."""
    from tasks.routing import pick_management_queue

    return pick_management_queue("sim-a")


# ------------------------------------------------------------------------------------ fleet tasks only


@pytest.mark.parametrize("name", CELERY_BUILT_INS)
@pytest.mark.parametrize("where", ["lane", "management"])
def test_celery_built_in_tasks_are_refused_on_fleet_queues(
    fleet: Fleet,
    dead_letters: Any,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
    name: str,
    where: str,
) -> None:
    """``send_task("celery.accumulate", args=[<forged response>], task_id=<request id>)`` never runs: it is
    dead-lettered and counted, and the caller reading that id gets a typed error, never the forged SUCCESS."""
    from tasks import app, chat
    from tasks.routing import queue_for

    request_id = uuid.uuid4().hex
    queue = queue_for(lane_of(CHAT_MODEL)) if where == "lane" else queue_for(management_queue())

    def send(marker: bytes) -> None:
        app.send_task(
            name,
            args=[forged_response(request_id, marker.decode())],
            task_id=request_id,
            queue=queue,
            expires=TIMEOUT_S,
        )

    dead = assert_dead_lettered(
        fleet, dead_letters, caplog, "unknown_task", send, source=None if where == "lane" else management_queue()
    )
    assert dead.headers["task"] == name
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(request_id).get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "operation_not_allowed"
    stored = stored_meta(request_id)
    assert stored is not None
    assert b'"SUCCESS"' not in stored


# ------------------------------------------------------------------------------ authenticated responses


def store_forged(request_id: str, status: str, result: Any) -> None:
    """Write a result record straight into the result backend, as anyone with Redis access can."""
    from tasks import app

    meta = {"status": status, "result": result, "traceback": None, "children": [], "task_id": request_id}
    app.backend.client.set(app.backend.get_key_for_task(request_id), json.dumps(meta))


def forged_failure(request_id: str) -> dict[str, Any]:
    """A FAILURE record as Celery stores a FleetTaskError, carrying the forger's error envelope."""
    envelope = {
        "message_type": "llm.fleet.error",
        "protocol_version": 2,
        "code": "forger_code",
        "category": "provider_error",
        "message": "the forger speaks",
        "error_class": "X",
        "retryable": False,
        "request_id": request_id,
    }
    return {"exc_type": "FleetTaskError", "exc_message": [envelope], "exc_module": "tasks.errors"}


@pytest.mark.parametrize("status", ["SUCCESS", "FAILURE"])
def test_a_result_no_worker_wrote_is_refused(fleet: Fleet, status: str) -> None:
    """A SUCCESS with only usage/finish_reason, or a FAILURE with the forger's code: ``response_forged``."""
    from tasks import chat

    request_id = uuid.uuid4().hex
    forged = forged_response(request_id, "forged") if status == "SUCCESS" else forged_failure(request_id)
    if status == "SUCCESS":
        forged.pop("content")  # usage and finish_reason only: what passed as an answer with encryption on
    store_forged(request_id, status, forged)
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(request_id).get(timeout=1.0)
    assert info.value.code == "response_forged"
    assert "forger" not in info.value.message


@pytest.mark.parametrize("status", ["SUCCESS", "FAILURE"])
def test_a_forged_result_stored_before_the_worker_answers_does_not_hide_its_answer(fleet: Fleet, status: str) -> None:
    from tests.tasks.test_bad_input import build, publish

    envelope = build(fleet)
    rid = envelope["request_id"]
    forged = forged_response(rid, "forged early") if status == "SUCCESS" else forged_failure(rid)
    if status == "FAILURE":
        forged["exc_message"][0]["message"] = "forged early"
    store_forged(rid, status, forged)
    reply = publish(envelope).get(timeout=RESULT_TIMEOUT_S)
    assert reply["content"] == "hello bad input"
    # the producer may read the worker's ledger copy a moment before Celery stores the result
    wait_for(lambda: b"forged early" not in (stored_meta(rid) or b"forged early"), RESULT_TIMEOUT_S, "the replacement")


def test_a_forged_result_stored_after_the_worker_answered_does_not_hide_its_answer(fleet: Fleet) -> None:
    from tasks import chat
    from tests.tasks.test_bad_input import build, publish

    envelope = build(fleet)
    answer = publish(envelope).get(timeout=RESULT_TIMEOUT_S)
    store_forged(envelope["request_id"], "SUCCESS", forged_response(envelope["request_id"], "forged late"))
    assert chat.AsyncResult(envelope["request_id"]).get(timeout=RESULT_TIMEOUT_S) == answer  # from the ledger


def test_a_real_answer_moved_to_another_request_is_refused(fleet: Fleet) -> None:
    """The worker's genuine answer copied under another request id (a replay across requests)."""
    from tasks import chat
    from tests.tasks.test_bad_input import build, publish

    donor = build(fleet)
    publish(donor).get(timeout=RESULT_TIMEOUT_S)
    record = json.loads(stored_meta(donor["request_id"]) or b"{}")
    victim = uuid.uuid4().hex
    store_forged(victim, "SUCCESS", record["result"])
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(victim).get(timeout=1.0)
    assert info.value.code == "response_forged"


# ---------------------------------------------------------------------------------------------- streams


def streamed(fleet: Fleet) -> Any:
    """A finished stream_chat request whose stream holds several entries."""
    from tasks import stream_chat

    result = stream_chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": STREAM_TEXT}], max_tokens=64)
    result.get(timeout=RESULT_TIMEOUT_S)
    return result


STREAM_TEXT = "one two three four five six"


def stream_entries(fleet: Fleet, request_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    from tasks.runtime import runtime

    entries: Any = fleet.state.xrange(runtime().keys.stream(request_id))
    return list(entries)


def rewrite_stream(fleet: Fleet, request_id: str, entries: list[dict[bytes, bytes]]) -> None:
    """Replace a stream's entries with ``entries`` (as someone with Redis access can)."""
    from tasks.runtime import runtime

    key = runtime().keys.stream(request_id)
    fleet.state.delete(key)
    for fields in entries:
        fleet.state.xadd(key, fields)  # type: ignore[arg-type]


def read_text(request_id: str) -> str:
    from tasks import open_stream

    return open_stream(request_id, timeout_s=2.0).text()


@pytest.mark.parametrize("attack", ["replayed", "done-copy", "re-kinded", "plaintext", "other-request"])
def test_stream_readers_skip_entries_no_worker_wrote_there_and_read_the_genuine_ones(fleet: Fleet, attack: str) -> None:
    """A re-XADDed entry is not read twice, a chunk copied as ``d`` or re-kinded ``r`` does not end or reset the
    stream, a plaintext entry or one from another request is not read: the genuine text comes through whole."""
    result = streamed(fleet)
    other = streamed(fleet)
    genuine = [fields for _, fields in stream_entries(fleet, result.id)]
    first_chunk = genuine[0]
    assert first_chunk[b"k"] in (b"c", b"b")
    injected = {
        "replayed": first_chunk,
        "done-copy": {**first_chunk, b"k": b"d"},
        "re-kinded": {**first_chunk, b"k": b"r"},
        "plaintext": {b"k": b"c", b"d": b'{"content":"forged"}'},
        "other-request": stream_entries(fleet, other.id)[0][1],
    }[attack]
    rewrite_stream(fleet, result.id, [genuine[0], injected, *genuine[1:]])
    assert read_text(result.id) == STREAM_TEXT


def test_reordered_stream_entries_are_refused(fleet: Fleet) -> None:
    """Genuine entries moved out of order: the reader stops with a typed error instead of reading them so."""
    fleet.simulator.configure(itl_s=0.02)  # one entry per chunk
    result = streamed(fleet)
    genuine = [fields for _, fields in stream_entries(fleet, result.id)]
    assert len(genuine) >= 3
    rewrite_stream(fleet, result.id, [genuine[0], genuine[2], genuine[1], *genuine[3:]])
    with pytest.raises(FleetError) as info:
        read_text(result.id)
    assert info.value.code == "stream_gap"


def test_the_async_reader_skips_a_replayed_entry_too(fleet: Fleet) -> None:
    import asyncio

    from tasks.aio import astream

    result = streamed(fleet)
    genuine = [fields for _, fields in stream_entries(fleet, result.id)]
    rewrite_stream(fleet, result.id, [genuine[0], genuine[0], *genuine[1:]])

    async def read() -> str:
        parts = [getattr(item, "content", None) or "" async for item in astream(result.id, timeout_s=2.0)]
        return "".join(parts)

    assert asyncio.run(read()) == STREAM_TEXT


def test_a_truncated_stream_is_refused(fleet: Fleet) -> None:
    fleet.simulator.configure(itl_s=0.02)  # one entry per chunk
    result = streamed(fleet)
    genuine = [fields for _, fields in stream_entries(fleet, result.id)]
    assert len(genuine) >= 3
    rewrite_stream(fleet, result.id, [genuine[0], *genuine[2:]])
    with pytest.raises(FleetError) as info:
        read_text(result.id)
    assert info.value.code == "stream_gap"


def test_a_stream_of_forged_entries_only_never_ends_as_genuine(fleet: Fleet) -> None:
    """Everything forged: nothing is read, and the reader ends at its deadline with a typed error."""
    result = streamed(fleet)
    rewrite_stream(fleet, result.id, [{b"k": b"c", b"d": b'{"content":"forged"}'}, {b"k": b"d", b"d": b"{}"}])
    with pytest.raises(FleetError) as info:
        read_text(result.id)
    assert info.value.code == "fleet_timeout"


# ---------------------------------------------------------------------------------------------- registry


def registry_count(reason: str) -> float:
    from tests.tasks.test_bad_input import sample

    return sample("vllm_fleet_refused_registry_records_total", reason=reason)


def plant_offering(offering_id: str, value: str | bytes) -> None:
    """Put a record into the registry directly, as anyone with Redis access can."""
    import time

    from tasks.runtime import runtime

    rt = runtime()
    rt.redis.set(rt.keys.offering(offering_id), value, px=30_000)
    rt.redis.zadd(rt.keys.offerings, {offering_id: time.time() + 30})


def real_offering() -> Any:
    from tasks.runtime import runtime

    return next(o for o in runtime().registry.all() if o.model == CHAT_MODEL)


def assert_routes_to_the_real_lane() -> None:
    from tasks import chat
    from tasks.routing import invalidate_route_cache

    invalidate_route_cache()
    assert lane_of(CHAT_MODEL) == real_offering().shared_lane
    reply = chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "routed"}], max_tokens=8)
    assert reply.get(timeout=RESULT_TIMEOUT_S)["content"] == "routed"


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "worker-signed"])
def test_a_record_whose_alias_is_not_its_models_own_never_redirects_it(fleet: Fleet, signed: bool) -> None:
    """``model="qwen3-6-27b", canonical_alias="attacker-lane"``, planted with Redis access (no signature) or even
    signed with a worker key: the model's requests still go to its own lane."""
    from tasks.runtime import runtime

    poisoned = real_offering().model_copy(
        update={"offering_id": f"vllm:evil:inference:{uuid.uuid4().hex[:6]}", "canonical_alias": "attacker-lane"}
    )
    before = registry_count("offering_unauthenticated" if not signed else "offering_alias_mismatch")
    if signed:
        runtime().registry.register([poisoned], ttl_s=30)
    else:
        plant_offering(poisoned.offering_id, json.dumps({"record": poisoned.model_dump(mode="json")}))
    try:
        assert_routes_to_the_real_lane()
        reason = "offering_unauthenticated" if not signed else "offering_alias_mismatch"
        assert registry_count(reason) > before
    finally:
        runtime().registry.unregister([poisoned.offering_id])


@pytest.mark.parametrize("value", [b"not json {", b'{"record": {"model": 1}}', b"[]"], ids=["text", "bad", "list"])
def test_a_malformed_registry_record_is_skipped_and_counted(fleet: Fleet, value: bytes) -> None:
    from tasks.runtime import runtime

    offering_id = f"vllm:junk:inference:{uuid.uuid4().hex[:6]}"
    before = registry_count("offering_unauthenticated")
    plant_offering(offering_id, value)
    try:
        assert_routes_to_the_real_lane()
        assert registry_count("offering_unauthenticated") > before
    finally:
        runtime().registry.unregister([offering_id])


def test_an_instance_record_no_worker_wrote_gets_no_management_request(fleet: Fleet) -> None:
    """An instance record planted with Redis access (naming an attacker's queue) is not an instance to route to."""
    import time

    from tasks import health
    from tasks.runtime import runtime

    rt = runtime()
    record = {"name": "evil", "queue": "llm.fleet.mgmt.attacker", "tier": "local", "holder": "x", "models": []}
    rt.redis.set(rt.keys.instance("evil"), json.dumps({"record": record}), px=30_000)
    rt.redis.zadd(rt.keys.instances, {"evil": time.time() + 30})
    before = registry_count("instance_unauthenticated")
    try:
        with pytest.raises(FleetError) as info:
            health.delay(instance="evil")
        assert info.value.code == "no_fleet_queue"
        assert registry_count("instance_unauthenticated") > before
        assert health.delay(instance="sim-a").get(timeout=RESULT_TIMEOUT_S)["result"]["live"] is True
    finally:
        rt.redis.delete(rt.keys.instance("evil"))
        rt.redis.zrem(rt.keys.instances, "evil")


# ------------------------------------------------------------------------------------------- model names


@pytest.mark.parametrize("name", ["QWEN3-6-27B", "qwen3-6-27b\u200b", "qwen3.6.27b"], ids=["case", "zwsp", "dots"])
def test_a_model_name_that_only_matches_once_slugged_is_refused_at_submit(fleet: Fleet, name: str) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=name, messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "no_fleet_queue"
    assert info.value.message == f"unknown model {name!r}; did you mean {CHAT_MODEL!r}?"


# ---------------------------------------------------------------------------------------- nothing in clear


def canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


def everything_stored(fleet: Fleet, request_id: str) -> bytes:
    """The result record and the ledger record of a request, as bytes."""
    from tasks.runtime import runtime

    ledger: Any = fleet.state.hgetall(runtime().ledger.key(request_id))
    return (stored_meta(request_id) or b"") + b"".join(k + v for k, v in ledger.items())


@pytest.fixture
def celery_info_logs(fleet: Fleet) -> Any:
    """Celery's per-task INFO lines (``Task vllm.chat[…] succeeded in …: …``) on, as a worker at INFO logs them.

    Celery decides whether to log them when it builds a task's tracer: rebuilt here with its logger at INFO."""
    from celery.app.trace import build_tracer

    from tasks import app, chat

    logger = logging.getLogger("celery.app.trace")
    level, tracer = logger.level, chat.__trace__
    logger.setLevel(logging.INFO)
    chat.__trace__ = build_tracer(chat.name, chat, app.loader, "integrity-test", app=app)
    yield
    chat.__trace__ = tracer
    logger.setLevel(level)


def test_secrets_in_contexts_are_sealed_in_results_and_ledger_and_never_logged(
    fleet: Fleet, caplog: pytest.LogCaptureFixture, celery_info_logs: Any
) -> None:
    from tasks import chat

    bearer, trace, user, prompt = canary(), canary(), canary(), canary()
    caplog.set_level(logging.INFO)
    result = chat.delay(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=64,
        message_context={"authorization": f"Bearer {bearer}"},
        trace_context={"traceparent": trace},
        caller={"user": user},
    )
    reply = result.get(timeout=RESULT_TIMEOUT_S)
    assert reply["message_context"] == {"authorization": f"Bearer {bearer}"}  # the caller gets them back
    assert reply["trace_context"] == {"traceparent": trace}
    stored = everything_stored(fleet, result.id)
    logged = caplog.text
    assert any("succeeded" in record.getMessage() for record in caplog.records), "Celery's success line not seen"
    for secret in (bearer, trace, user, prompt):
        assert secret.encode() not in stored
        assert secret not in logged


def test_a_prompt_in_params_the_worker_cannot_validate_is_never_logged(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Params that pass the token checks but not ``ChatRequest`` (built by another producer): a typed error,
    and the log names the fields, never pydantic's ``input_value``."""
    from tests.tasks.test_bad_input import build, publish

    prompt = canary()
    caplog.set_level(logging.INFO)
    messages = [{"role": "user", "content": prompt}]
    bad = build(fleet, params={"model": CHAT_MODEL, "messages": messages, "max_tokens": prompt})
    with pytest.raises(FleetError) as info:
        publish(bad).get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "invalid_request"
    assert prompt not in info.value.message
    assert prompt not in caplog.text
    assert prompt.encode() not in everything_stored(fleet, bad["request_id"])


def test_arguments_a_sender_rendered_itself_never_reach_task_received(fleet: Fleet) -> None:
    """A Celery client other than the fleet's producer sends ``argsrepr`` = the envelope (contexts in clear):
    the worker's ``task-received`` (Flower's view) gets the id-only summary instead."""
    from celery import signals

    from tasks import app, chat
    from tasks.routing import queue_for
    from tests.tasks.test_bad_input import build

    bearer = canary()
    envelope = build(fleet, message_context={"authorization": f"Bearer {bearer}"})
    seen: list[str] = []

    def received(request: Any, **_: Any) -> None:
        if request.id == envelope["request_id"]:
            seen.append(f"{request.argsrepr} {request.kwargsrepr}")

    signals.task_received.connect(received, weak=False)
    try:
        app.send_task(
            "vllm.chat", args=[envelope], task_id=envelope["request_id"], queue=queue_for(envelope["routing_key"])
        )
        chat.AsyncResult(envelope["request_id"]).get(timeout=RESULT_TIMEOUT_S)
    finally:
        signals.task_received.disconnect(received)
    assert seen == [f"(<envelope request_id={envelope['request_id']}>,) {{}}"]
    assert bearer not in seen[0]


def test_task_events_show_the_summary_not_the_result(fleet: Fleet) -> None:
    """What a worker puts in the ``task-succeeded`` event (Flower's view) is the tracer's rendering of the return
    value: run the task through Celery's own tracer and read it: ``<response op=… request_id=…>`` only."""
    from celery.app.trace import build_tracer

    from tasks import app, chat
    from tests.tasks.test_bad_input import build

    bearer = canary()
    envelope = build(fleet, message_context={"authorization": f"Bearer {bearer}"})
    rid = envelope["request_id"]
    tracer = build_tracer(chat.name, chat, app.loader, "integrity-test", app=app)
    request = {"id": rid, "delivery_info": {"routing_key": envelope["routing_key"]}}
    outcome = tracer(rid, [envelope], {}, request)
    rendered = outcome[3]  # (retval, info, runtime, rendered retval): the event's ``result``
    assert rendered.startswith(f"<response op=chat request_id={rid} lane={envelope['routing_key']}")
    assert bearer not in rendered
    assert outcome[0]["request_id"] == rid


# ----------------------------------------------------------------------------- tokens and what carries them


def resigned(fleet: Fleet, envelope: dict[str, Any], **claims: Any) -> dict[str, Any]:
    """The envelope with its token re-signed by the fleet's real request key over changed claims."""
    import jwt

    from tests.tasks.test_bad_input import token_parts

    header, old, _ = token_parts(envelope)
    key = fleet.settings.security.signing_key
    assert key is not None
    token = jwt.encode({**old, **claims}, key.get_secret_value(), algorithm="EdDSA", headers={"kid": header["kid"]})
    return {**envelope, "signed_token": token}


def test_a_token_that_outlives_its_timeout_is_refused(fleet: Fleet) -> None:
    """Signed with the real key, ``timeout_seconds`` 5 but ``exp``/``expires_at`` ten years ahead."""
    import time

    from provider.protocol.envelope import format_expires_at
    from tests.tasks.test_bad_input import assert_refused, build, publish

    good = build(fleet)
    later = time.time() + 10 * 365 * 86400
    expires_at = format_expires_at(later)
    forever = resigned(fleet, {**good, "expires_at": expires_at}, exp=int(later) + 1, expires_at=expires_at)
    assert_refused(fleet, "token_lifetime", lambda: publish(forever), field="exp")


def test_a_timeout_over_the_fleets_maximum_is_refused(fleet: Fleet) -> None:
    """Another producer configured with a longer maximum: the worker still holds its own (120 s here)."""
    from tests.tasks.test_bad_input import assert_refused, build, codec_with, publish

    generous = codec_with(fleet, max_token_lifetime_s=10_000.0)
    long_lived = build(fleet, generous, timeout_s=600.0)
    assert_refused(fleet, "token_lifetime", lambda: publish(long_lived), field="timeout_seconds")


def test_the_producer_refuses_a_timeout_over_the_maximum_at_submit(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], timeout_s=600)
    assert info.value.code == "token_lifetime"


def test_a_duplicate_key_in_the_token_claims_is_refused(fleet: Fleet) -> None:
    """The claims JSON with ``"lane"`` twice (the last one the real lane): refused, not read last-wins."""
    import base64

    from tests.tasks.test_bad_input import assert_refused, b64url, build, publish

    good = build(fleet)
    header_b64, claims_b64, _ = good["signed_token"].split(".")
    claims_text = base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)).decode()
    doubled = claims_text.replace('"lane":', '"lane":"llm.fleet.elsewhere","lane":', 1)
    signing_input = f"{header_b64}.{b64url(doubled.encode())}"
    key = fleet.settings.security.signing_key
    assert key is not None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    private: Any = load_pem_private_key(key.get_secret_value().encode(), password=None)
    token = f"{signing_input}.{b64url(private.sign(signing_input.encode()))}"
    assert_refused(fleet, "malformed", lambda: publish({**good, "signed_token": token}), field=None)


def test_a_duplicate_key_in_a_broker_decoded_envelope_is_refused(
    fleet: Fleet,
    dead_letters: Any,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kombu decodes the body (last key wins) before the codec sees it: the strict decoder refuses it there."""
    from tasks import chat
    from tests.tasks.test_bad_input import build, publish_bytes

    envelope = build(fleet)

    def send(marker: bytes) -> None:
        text = json.dumps([[{**envelope, "correlation_id": marker.decode()}], {}, {}])
        doubled = text.replace('"model": ', '"model": "someone-else", "model": ', 1)
        publish_bytes(doubled.encode(), "application/json", {"task": "vllm.chat", "id": envelope["request_id"]})

    assert_dead_lettered(fleet, dead_letters, caplog, "decode_error", send)
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(envelope["request_id"]).get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "malformed"


@pytest.mark.only_broker("redis")
def test_a_redis_frame_claiming_another_lane_is_checked_against_the_list_it_came_from(fleet: Fleet) -> None:
    """A frame LPUSHed onto lane B's list, claiming lane A (where its envelope is signed for) in its own
    ``delivery_info``: the worker sees lane B, and refuses the lane mismatch."""
    import base64

    from tasks import app
    from tests.tasks.conftest import SMALL_MODEL
    from tests.tasks.test_bad_input import assert_refused, build, fleet_broker

    envelope = build(fleet)
    lane_a, lane_b = envelope["routing_key"], lane_of(SMALL_MODEL)
    assert lane_a != lane_b

    def send() -> Any:
        from tasks import chat

        message = app.amqp.as_task_v2(envelope["request_id"], "vllm.chat", args=[envelope], kwargs={})
        frame = {
            "body": base64.b64encode(json.dumps(message.body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": message.headers,
            "properties": {
                **message.properties,
                "body_encoding": "base64",
                "delivery_tag": uuid.uuid4().hex,
                "delivery_info": {"exchange": "llm.fleet", "routing_key": lane_a},
                "priority": 0,
                "delivery_mode": 2,
            },
        }
        fleet_broker().lpush(lane_b, json.dumps(frame))
        return chat.AsyncResult(envelope["request_id"])

    assert_refused(fleet, "claim_mismatch", send, field="lane")


def test_an_alias_from_the_alias_table_resolves_to_the_served_id(fleet: Fleet) -> None:
    """A worker registers ``served-id-x`` under its alias ``friendly`` (from the alias table): a request for
    ``friendly`` is sent naming ``served-id-x``, on the alias's lane; ``FRIENDLY`` only slug-matches."""
    from tasks.routing import invalidate_route_cache, pick_lane
    from tasks.runtime import runtime

    rt = runtime()
    served = real_offering().model_copy(
        update={"offering_id": "vllm:sim-x:inference:friendly", "model": "served-id-x", "canonical_alias": "friendly"}
    )
    aliases = rt.settings.model_aliases
    aliases["friendly"] = {"vllm": "served-id-x"}
    rt.registry.register([served], ttl_s=30)
    try:
        invalidate_route_cache()
        choice = pick_lane("chat", "friendly", {"messages": [{"role": "user", "content": "hi"}]})
        assert choice["model"] == "served-id-x"
        assert choice["lane"] == served.shared_lane
        assert pick_lane("chat", "served-id-x", {"messages": []})["model"] == "served-id-x"
        with pytest.raises(FleetError) as info:
            pick_lane("chat", "FRIENDLY", {"messages": []})
        assert "did you mean 'friendly'?" in info.value.message
    finally:
        aliases.pop("friendly", None)
        rt.registry.unregister([served.offering_id])
        invalidate_route_cache()


def test_a_forged_ledger_record_is_never_replayed_over_the_answer(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis access rewrites the ledger's stored answer, then the message comes again (broker redelivery or a
    copy): the worker does not store the forgery, and the caller still reads the genuine answer."""
    from tasks import chat
    from tasks.runtime import runtime
    from tests.tasks.test_bad_input import build, publish, send_raw

    envelope = build(fleet)
    rid = envelope["request_id"]
    answer = publish(envelope).get(timeout=RESULT_TIMEOUT_S)
    stored = stored_meta(rid)
    key = runtime().ledger.key(rid)
    fields: Any = fleet.state.hgetall(key)
    result_field = next(name for name, value in fields.items() if value.startswith(b"{"))
    forged = {**forged_response(rid, "forged ledger"), "worker_signature": {"kid": "w1", "sig": "A" * 86}}
    fleet.state.hset(key, result_field, json.dumps(forged))
    caplog.set_level(logging.WARNING, logger="tasks.execution")
    send_raw(envelope)
    wait_for(lambda: "not replaying it" in caplog.text, RESULT_TIMEOUT_S, "the copy being consumed")
    assert stored_meta(rid) == stored
    assert chat.AsyncResult(rid).get(timeout=RESULT_TIMEOUT_S) == answer


# ------------------------------------------------------------------------------ every failure is a FleetError


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"timeout_s": -1}, "malformed"),
        ({"message_context": {"x": float("nan")}}, "malformed"),
        ({"caller": ["not", "an", "object"]}, "malformed"),
        ({"timeout_s": 10_000}, "token_lifetime"),
    ],
    ids=["negative-timeout", "nan-context", "caller-list", "too-long"],
)
def test_submit_refusals_are_fleet_errors_with_a_code(fleet: Fleet, options: dict[str, Any], code: str) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], **options)
    assert isinstance(info.value, RequestRefused)  # the protocol's refusal, as callers catch it
    assert not isinstance(info.value, EnvelopeError)
    assert info.value.code == code


def test_reading_a_stream_from_a_position_that_is_not_one_is_a_fleet_error(fleet: Fleet) -> None:
    import asyncio

    from tasks import open_stream
    from tasks.aio import astream

    with pytest.raises(FleetError) as info:
        list(open_stream("some-request", start_id="1-0/x", timeout_s=1.0))
    assert info.value.code == "malformed"

    async def read() -> None:
        async for _ in astream("some-request", start_id="1-0/x", timeout_s=1.0):
            pass

    with pytest.raises(FleetError) as async_info:
        asyncio.run(read())
    assert async_info.value.code == "malformed"


# ------------------------------------------------------------------------------------------ encryption off

PLAIN_MODEL = "plain-chat"


@pytest.mark.slow
def test_with_encryption_off_answers_are_still_authenticated(fleet: Fleet) -> None:
    """A real worker process with ``SECURITY__ENCRYPT=false``: its answer (content in clear) opens, while the
    same answer with forged content, or a forged answer written straight into Redis, is ``response_forged``."""
    from provider.protocol import EnvelopeCodec
    from tests.tasks.test_bad_input import chat_params
    from tests.tasks.test_replay import forget_instance, lane_when_served, settings_for, simulator_for, start_worker

    with simulator_for(PLAIN_MODEL) as sim:
        settings = settings_for(fleet, sim, "sim-plain", encrypt=False)
        plain = EnvelopeCodec(settings.security, max_lifetime_s=settings.timeouts.longest_s)
        worker = start_worker(settings, "plain-worker")
        try:
            lane = lane_when_served(PLAIN_MODEL)
            envelope = plain.build_request(
                operation="chat",
                task_name="vllm.chat",
                lane=lane,
                model=PLAIN_MODEL,
                params=chat_params(PLAIN_MODEL, "in the clear"),
                timeout_s=10.0,
            )
            rid = envelope["request_id"]
            from tests.tasks.test_bad_input import publish

            publish(envelope)
            wait_for(lambda: stored_meta(rid) is not None, RESULT_TIMEOUT_S, "the worker's answer")
            answer = json.loads(stored_meta(rid) or b"{}")["result"]
            assert "sealed_body" not in answer
            assert plain.open_response(answer, request_id=rid, lane=lane, operation="chat")["content"] == "in the clear"
            for forged in ({**answer, "content": "forged"}, forged_response(rid, "forged")):
                with pytest.raises(FleetError) as info:
                    plain.open_response(forged, request_id=rid, lane=lane, operation="chat")
                assert info.value.code == "response_forged"
        finally:
            worker.process.stop()
            forget_instance("sim-plain")
