"""Bad input against a live worker, on both brokers: every refusal reaches the producer as a typed error.

Each case asserts the exact code ``FleetResult.get()`` raises, that the worker counted the refusal, that nothing
reached vLLM, that no prompt text came back in the error, and that the worker then still serves a good request.
Messages no task can be made of (garbage bytes, non-JSON, unknown tasks) go to the dead-letter queue instead,
counted by reason, with nothing of their body in the logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from prometheus_client import REGISTRY

from provider.protocol import EnvelopeCodec, FleetError, generate_encryption_key, generate_keypair
from provider.settings import SecuritySettings
from provider.vllm.models import ChatRequest
from tests.tasks.conftest import CHAT_MODEL, SMALL_MODEL, Fleet, wait_for

PROMPT = "hello bad input"
TIMEOUT_S = 5.0
RESULT_TIMEOUT_S = 10.0
DEAD_LETTER_TIMEOUT_S = 5.0
_REJECTIONS = "vllm_fleet_envelope_rejections_total"
_UNDECODABLE = "vllm_fleet_undecodable_messages_total"

Envelope = dict[str, Any]


# ------------------------------------------------------------------------------------------------------ helpers


def chat_params(model: str = CHAT_MODEL, text: str = PROMPT) -> dict[str, Any]:
    """A chat request's params as the producer validates them."""
    request = ChatRequest(model=model, messages=[{"role": "user", "content": text}], max_tokens=16)
    return request.model_dump(mode="json", exclude_none=True)


def lane_of(model: str) -> str:
    """The lane the in-process worker serves a chat of ``model`` on."""
    from tasks.routing import pick_lane

    return str(pick_lane("chat", model, chat_params(model))["lane"])


def codec_with(fleet: Fleet, **changes: Any) -> EnvelopeCodec:
    """A producer's codec (it holds no verify keys): the session's security settings with some of them changed."""
    current = {**fleet.settings.security.model_dump(), "verify_keys": {}}
    security = SecuritySettings.model_validate({**current, **changes})
    return EnvelopeCodec(security)


def build(fleet: Fleet, codec: EnvelopeCodec | None = None, *, model: str = CHAT_MODEL, **kwargs: Any) -> Envelope:
    """A signed, sealed chat envelope for ``model``'s lane (the session's own codec unless another is given)."""
    from tasks.runtime import runtime

    kwargs.setdefault("params", chat_params(model))
    kwargs.setdefault("timeout_s", TIMEOUT_S)
    kwargs.setdefault("lane", lane_of(model))
    return (codec or runtime().codec).build_request(operation="chat", task_name="vllm.chat", model=model, **kwargs)


def publish(envelope: Envelope, **options: Any) -> Any:
    """Publish a pre-built envelope unchanged through the producer API (its own lane unless ``queue=``)."""
    from tasks import chat

    return chat.apply_async(args=[envelope], **options)


def send_raw(envelope: Envelope, *, task: str = "vllm.chat", lane: str | None = None) -> Any:
    """Publish any dict as a task's only argument (``send_task``, as another language would); its FleetResult."""
    from tasks import app, chat
    from tasks.routing import queue_for

    task_id = str(envelope.get("request_id") or uuid.uuid4().hex)
    app.send_task(
        task, args=[envelope], task_id=task_id, queue=queue_for(lane or lane_of(CHAT_MODEL)), expires=TIMEOUT_S
    )
    return chat.AsyncResult(task_id)


def sample(name: str, **labels: str) -> float:
    """A counter of this process (the in-process worker counts here)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def stored_meta(task_id: str) -> bytes | None:
    """The task's result record exactly as the backend stores it (status, result, date_done)."""
    from tasks import app

    raw: bytes | None = app.backend.get(app.backend.get_key_for_task(task_id))
    return raw


def chat_calls(fleet: Fleet) -> int:
    """Chat completions the simulator has been asked for."""
    return int(fleet.simulator.stats()["requests"].get("chat", 0))


def assert_still_serves(fleet: Fleet) -> None:
    """A good request right after: the worker is alive and the lane flows."""
    from tasks import chat

    reply = chat.delay(model=CHAT_MODEL, messages=[{"role": "user", "content": "still there"}], max_tokens=8)
    assert reply.get(timeout=RESULT_TIMEOUT_S)["content"] == "still there"


def assert_refused(
    fleet: Fleet, code: str, send: Callable[[], Any], *, field: str | None = None, counted: bool = True
) -> FleetError:
    """``send()`` publishes one bad message: the producer sees ``code``, nothing ran, the lane flows on."""
    calls, refused = chat_calls(fleet), sample(_REJECTIONS, code=code)
    result = send()
    with pytest.raises(FleetError) as info:
        result.get(timeout=RESULT_TIMEOUT_S)
    error = info.value
    assert (error.code, error.metadata.get("field") if field else None) == (code, field), error.message
    assert error.retryable is False
    assert PROMPT not in error.message
    if counted:
        assert sample(_REJECTIONS, code=code) == refused + 1
    assert chat_calls(fleet) == calls, "a refused message reached vLLM"
    assert_still_serves(fleet)
    return error


def b64url(data: bytes) -> str:
    """JOSE base64url, unpadded."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Inverse of ``b64url``."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_parts(envelope: Envelope) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The header, claims and signature segment of an envelope's token."""
    header, claims, signature = envelope["signed_token"].split(".")
    return json.loads(unb64url(header)), json.loads(unb64url(claims)), signature


def compact(header: dict[str, Any], claims: dict[str, Any], signature: str) -> str:
    """A compact JWS from its parts (the signature as given: nothing is signed here)."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{signature}"


def with_ciphertext(envelope: Envelope, change: Callable[[bytes], bytes]) -> Envelope:
    """The envelope with its sealed params' ciphertext bytes changed (still valid base64)."""
    sealed = dict(envelope["sealed_params"])
    sealed["ciphertext"] = base64.b64encode(change(base64.b64decode(sealed["ciphertext"]))).decode("ascii")
    return {**envelope, "sealed_params": sealed}


def flip_middle_byte(data: bytes) -> bytes:
    """One bit of the ciphertext flipped."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


# ------------------------------------------------------------------------------------------- signature and keys


def test_wrong_signing_key_is_refused(fleet: Fleet) -> None:
    intruder = generate_keypair("ed25519", kid="test-k1")  # the right kid, another key
    codec = codec_with(fleet, signing_key=intruder.private)
    assert_refused(fleet, "invalid_signature", lambda: publish(build(fleet, codec)), field="signed_token")


def test_unknown_kid_is_refused(fleet: Fleet) -> None:
    stranger = generate_keypair("ed25519", kid="test-k9")
    codec = codec_with(fleet, signing_key=stranger.private, signing_kid=stranger.kid)
    assert_refused(fleet, "unknown_key", lambda: publish(build(fleet, codec)), field="kid")


@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"], ids=["no-signature", "junk-signature"])
def test_alg_none_is_refused(fleet: Fleet, signature: str) -> None:
    good = build(fleet)
    header, claims, _ = token_parts(good)
    token = compact({**header, "alg": "none"}, claims, signature)
    if not signature:  # PyJWT makes the same unsigned token
        assert token.split(".")[2] == jwt.encode(claims, None, algorithm="none").split(".")[2]
    field = "alg" if signature else "signed_token"
    assert_refused(fleet, "invalid_signature", lambda: publish({**good, "signed_token": token}), field=field)


def test_hs256_signed_with_the_public_key_is_refused(fleet: Fleet) -> None:
    """Key confusion: HMAC keyed with the Ed25519 public key PEM, which every worker holds."""
    good = build(fleet)
    header, claims, _ = token_parts(good)
    public_pem = fleet.settings.security.verify_keys["test-k1"].get_secret_value().encode()
    signing_input = compact({**header, "alg": "HS256"}, claims, "").rstrip(".")
    signature = b64url(hmac.new(public_pem, signing_input.encode("ascii"), hashlib.sha256).digest())
    token = f"{signing_input}.{signature}"
    assert_refused(fleet, "invalid_signature", lambda: publish({**good, "signed_token": token}), field="alg")


@pytest.mark.parametrize("part", ["claims", "signature"])
def test_tampered_token_is_refused(fleet: Fleet, part: str) -> None:
    good = build(fleet)
    header, claims, signature = token_parts(good)
    if part == "claims":  # a longer deadline, the envelope changed to match, the old signature kept
        token = compact(header, {**claims, "timeout_seconds": 600.0}, signature)
        bad = {**good, "signed_token": token, "timeout_seconds": 600.0}
    else:
        flipped = bytearray(unb64url(signature))
        flipped[0] ^= 0x01
        bad = {**good, "signed_token": compact(header, claims, b64url(bytes(flipped)))}
    assert_refused(fleet, "invalid_signature", lambda: publish(bad), field="signed_token")


def test_wrong_issuer_is_refused(fleet: Fleet) -> None:
    codec = codec_with(fleet, issuer="intruder")
    assert_refused(fleet, "wrong_issuer", lambda: publish(build(fleet, codec)), field="iss")


def test_wrong_audience_is_refused(fleet: Fleet) -> None:
    codec = codec_with(fleet, audience="another-fleet")
    assert_refused(fleet, "wrong_audience", lambda: publish(build(fleet, codec)), field="aud")


# ----------------------------------------------------------------------------------------- sealed params


def test_tampered_ciphertext_is_refused(fleet: Fleet) -> None:
    bad = with_ciphertext(build(fleet), flip_middle_byte)
    assert_refused(fleet, "decrypt_failed", lambda: publish(bad), field="ciphertext")


@pytest.mark.parametrize("keep", [-8, 10], ids=["tag-cut", "shorter-than-tag"])
def test_truncated_ciphertext_is_refused(fleet: Fleet, keep: int) -> None:
    bad = with_ciphertext(build(fleet), lambda data: data[:keep])
    assert_refused(fleet, "decrypt_failed", lambda: publish(bad), field="ciphertext")


def test_wrong_encryption_key_is_refused(fleet: Fleet) -> None:
    other = generate_encryption_key(kid="test-e1")  # the right kid, another key
    codec = codec_with(fleet, encryption_keys={other.kid: other.key_b64})
    assert_refused(fleet, "decrypt_failed", lambda: publish(build(fleet, codec)), field="ciphertext")


def test_unknown_encryption_kid_is_refused(fleet: Fleet) -> None:
    other = generate_encryption_key(kid="test-e9")
    codec = codec_with(fleet, encryption_keys={other.kid: other.key_b64}, encryption_kid=other.kid)
    assert_refused(fleet, "unknown_key", lambda: publish(build(fleet, codec)))


def test_swapped_sealed_params_are_refused(fleet: Fleet) -> None:
    """Params sealed for another request (its own id in the associated data) do not open here."""
    donor = build(fleet)
    bad = {**build(fleet), "sealed_params": donor["sealed_params"]}
    assert_refused(fleet, "decrypt_failed", lambda: publish(bad), field="ciphertext")


# ------------------------------------------------------------------------------------------- where it runs


def test_envelope_for_one_lane_published_to_another_is_refused(fleet: Fleet) -> None:
    from tasks.routing import queue_for

    other_lane = lane_of(SMALL_MODEL)
    assert other_lane != lane_of(CHAT_MODEL)
    good = build(fleet)
    assert_refused(fleet, "claim_mismatch", lambda: publish(good, queue=queue_for(other_lane)), field="lane")


def test_routing_key_rewritten_to_another_lane_is_refused(fleet: Fleet) -> None:
    other_lane = lane_of(SMALL_MODEL)
    bad = {**build(fleet), "routing_key": other_lane}
    assert_refused(fleet, "claim_mismatch", lambda: publish(bad), field="lane")


@pytest.mark.parametrize("task", ["vllm.embed", "vllm.stream_chat", "vllm.health"])
def test_envelope_for_chat_sent_as_another_task_is_refused(fleet: Fleet, task: str) -> None:
    good = build(fleet)
    assert_refused(fleet, "claim_mismatch", lambda: send_raw(good, task=task), field="task")


# ------------------------------------------------------------------------------------------------ times


def test_expired_envelope_is_refused(fleet: Fleet) -> None:
    leeway_s = fleet.settings.security.leeway_s
    stale = build(fleet, now=time.time() - leeway_s - 60, timeout_s=10)
    # the deadline is checked after the jti claim, outside the envelope refusals the counter sees
    assert_refused(fleet, "expired", lambda: publish(stale), field="expires_at", counted=False)


def test_envelope_not_yet_valid_is_refused(fleet: Fleet) -> None:
    leeway_s = fleet.settings.security.leeway_s
    early = build(fleet, now=time.time() + leeway_s + 60)
    assert_refused(fleet, "not_yet_valid", lambda: publish(early), field="nbf")


# ------------------------------------------------------------------------------------------- shape and size


@pytest.mark.parametrize(
    "name",
    [
        "message_type",
        "protocol_version",
        "correlation_id",
        "idempotency_key",
        "provider_instance",
        "reply_to",
        "caller",
        "timeout_seconds",
        "expires_at",
        "sealed_params",
    ],
)
def test_missing_field_is_refused(fleet: Fleet, name: str) -> None:
    bad = {key: value for key, value in build(fleet).items() if key != name}
    assert_refused(fleet, "malformed", lambda: publish(bad))


@pytest.mark.parametrize("name", ["signed_token", "routing_key"])
def test_missing_token_or_routing_key_is_refused(fleet: Fleet, name: str) -> None:
    """Not an envelope to the producer API; sent by name it still reaches a worker, which refuses it."""
    bad = {key: value for key, value in build(fleet).items() if key != name}
    assert_refused(fleet, "malformed", lambda: send_raw(bad))


@pytest.mark.parametrize("where", ["top", "nested", "sealed-params"])
def test_legacy_v1_field_is_refused(fleet: Fleet, where: str) -> None:
    if where == "top":
        bad = {**build(fleet), "schema_version": 1}
    elif where == "nested":
        bad = {**build(fleet), "message_context": {"origin": {"request_type": "chat"}}}
    else:  # signed and sealed by the producer: found once the params are opened
        bad = build(fleet, params={**chat_params(), "fleet_correlation_id": "v1-id"})
    assert_refused(fleet, "legacy_field", lambda: publish(bad))


@pytest.mark.parametrize("version", [1, 3, "2"])
def test_wrong_protocol_version_is_refused(fleet: Fleet, version: object) -> None:
    bad = {**build(fleet), "protocol_version": version}
    assert_refused(fleet, "unsupported_version", lambda: publish(bad), field="protocol_version")


def test_unknown_operation_is_refused(fleet: Fleet) -> None:
    bad = {**build(fleet), "operation": "launch_missiles"}
    assert_refused(fleet, "operation_not_allowed", lambda: publish(bad), field="operation")


def test_oversized_envelope_is_refused(fleet: Fleet) -> None:
    limit = fleet.settings.security.max_envelope_bytes
    big = build(fleet, params=chat_params(text=PROMPT + " " + "x" * limit))
    error = assert_refused(fleet, "too_large", lambda: publish(big), field="envelope")
    assert len(error.message) < 1024


# ------------------------------------------------------------------------------------------------ replay


def _outcome(result: Any) -> Any:
    """What ``get()`` gives: the opened answer, or the typed error's code and message."""
    try:
        return result.get(timeout=RESULT_TIMEOUT_S)
    except FleetError as exc:
        return (exc.code, exc.message)


@pytest.mark.parametrize("first_outcome", ["answer", "error"])
def test_another_message_reusing_a_completed_request_id_is_refused_and_changes_nothing(
    fleet: Fleet, first_outcome: str
) -> None:
    """A stored answer, or a stored error (vLLM refused the first request), stays what it was."""
    from tasks import chat
    from tasks.runtime import runtime

    if first_outcome == "error":
        fleet.simulator.configure(failures=[{"route": "chat", "mode": "status", "status": 400, "count": 1}])
    first = build(fleet)
    request_id = first["request_id"]
    answer = _outcome(publish(first))
    assert isinstance(answer, tuple) == (first_outcome == "error")
    stored = stored_meta(request_id)
    assert stored is not None
    record = runtime().ledger.peek(request_id)
    calls, replayed = chat_calls(fleet), sample(_REJECTIONS, code="replayed")

    other = build(fleet, request_id=request_id, params=chat_params(text="something else entirely"))
    publish(other)
    wait_for(lambda: sample(_REJECTIONS, code="replayed") == replayed + 1, 5.0, "the replay's refusal")

    assert stored_meta(request_id) == stored
    assert runtime().ledger.peek(request_id) == record
    assert chat_calls(fleet) == calls
    assert _outcome(chat.AsyncResult(request_id)) == answer
    assert_still_serves(fleet)


# ------------------------------------------------------------------------ messages no task can be made of


@pytest.fixture
def dead_letters(fleet: Fleet) -> Iterator[Callable[[bytes], Any]]:
    """``take(marker)``: the dead-lettered message whose body holds ``marker`` (acked), or a failed test."""
    from tasks import app
    from tasks.runtime import runtime

    rt = runtime()
    with app.connection_for_read() as conn:
        queue = rt.broker.dead_letter_queue()(conn.default_channel)
        queue.declare()
        held: list[Any] = []

        def take(marker: bytes) -> Any:
            deadline = time.monotonic() + DEAD_LETTER_TIMEOUT_S
            while time.monotonic() < deadline:
                message = queue.get(no_ack=False)
                if message is None:
                    time.sleep(0.05)
                elif marker in raw_body(message):
                    message.ack()
                    return message
                else:
                    held.append(message)  # someone else's: back on the queue when the channel closes
            raise AssertionError("nothing reached the dead-letter queue")

        yield take


def raw_body(message: Any) -> bytes:
    """A received message's body as bytes (py-amqp hands over text when the content encoding names a charset)."""
    body = message.body
    return body.encode(message.content_encoding or "utf-8") if isinstance(body, str) else bytes(body)


def publish_bytes(body: bytes, content_type: str, headers: dict[str, Any] | None = None) -> None:
    """Raw bytes onto the chat lane with kombu, no serializer: nothing a Celery producer would make."""
    from tasks import app
    from tasks.routing import queue_for

    lane = queue_for(lane_of(CHAT_MODEL))
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=lane.exchange,
            routing_key=lane.routing_key,
            declare=[lane],
            serializer=None,
            content_type=content_type,
            content_encoding="binary",
            headers=headers or {},
        )


def assert_dead_lettered(
    fleet: Fleet,
    take: Callable[[bytes], Any],
    caplog: pytest.LogCaptureFixture,
    reason: str,
    send: Callable[[bytes], None],
    *,
    source: str | None = None,
) -> Any:
    """``send(marker)`` publishes a message holding ``marker``: it is dead-lettered whole, counted, never logged."""
    marker = f"secret-{uuid.uuid4().hex}".encode()
    counted = sample(_UNDECODABLE, reason=reason)
    calls = chat_calls(fleet)
    send(marker)
    dead = take(marker)
    assert dead.headers["x-fleet-dead-letter-reason"] == reason
    assert dead.headers["x-fleet-dead-letter-source"] == (lane_of(CHAT_MODEL) if source is None else source)
    assert sample(_UNDECODABLE, reason=reason) == counted + 1
    assert marker.decode() not in caplog.text
    assert any(reason in record.getMessage() for record in caplog.records), "the dead-lettering was not logged"
    assert chat_calls(fleet) == calls
    assert_still_serves(fleet)
    return dead


def test_garbage_bytes_are_dead_lettered(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[bytes] = []

    def send(marker: bytes) -> None:
        sent.append(b"\x00\xff\xfe garbage " + marker + bytes(range(256)))
        publish_bytes(sent[0], "application/octet-stream")

    dead = assert_dead_lettered(fleet, dead_letters, caplog, "decode_error", send)
    assert raw_body(dead) == sent[0]


def test_non_json_body_is_dead_lettered(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[bytes] = []

    def send(marker: bytes) -> None:
        sent.append(b'{"task": "vllm.chat", "id": "' + marker + b'", "args": [')
        publish_bytes(sent[0], "application/json")

    dead = assert_dead_lettered(fleet, dead_letters, caplog, "decode_error", send)
    assert raw_body(dead) == sent[0]


def test_json_that_names_no_task_is_dead_lettered(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    def send(marker: bytes) -> None:
        publish_bytes(json.dumps({"hello": marker.decode()}).encode(), "application/json")

    assert_dead_lettered(fleet, dead_letters, caplog, "unknown_message", send)


def test_unparseable_task_headers_are_dead_lettered(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Headers Celery itself chokes on (a task name that is a list, no task id): the loop must not stop."""
    for headers in ({"task": ["vllm.chat"], "id": uuid.uuid4().hex}, {"task": "vllm.chat"}):

        def send(marker: bytes, headers: dict[str, Any] = headers) -> None:
            publish_bytes(json.dumps([[{"note": marker.decode()}], {}, {}]).encode(), "application/json", headers)

        assert_dead_lettered(fleet, dead_letters, caplog, "handler_error", send)


def test_unknown_task_is_dead_lettered_and_answered(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    results: list[Any] = []

    def send(marker: bytes) -> None:
        envelope = build(fleet, message_context={"note": marker.decode()})
        results.append(send_raw(envelope, task="vllm.no_such_task"))

    dead = assert_dead_lettered(fleet, dead_letters, caplog, "unknown_task", send)
    assert dead.headers["task"] == "vllm.no_such_task"
    with pytest.raises(FleetError) as info:
        results[0].get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "operation_not_allowed"


@pytest.mark.parametrize(
    ("reason", "headers", "body"),
    [
        ("decode_error", {}, b"[[{not json "),
        ("invalid_task", {"eta": "not-a-time"}, b'[["'),
        ("invalid_task", {}, b'[["'),
    ],
    ids=["garbage-body", "bad-eta", "content-type"],
)
def test_task_message_with_an_id_but_no_task_in_it_is_dead_lettered_and_answered(
    fleet: Fleet,
    dead_letters: Callable[[bytes], Any],
    caplog: pytest.LogCaptureFixture,
    reason: str,
    headers: dict[str, Any],
    body: bytes,
) -> None:
    """A message with Celery's headers and a task id whose body or options no task can be made of."""
    from tasks import chat

    task_id = uuid.uuid4().hex
    content_type = "application/x-python-serialize" if reason == "invalid_task" and not headers else "application/json"

    def send(marker: bytes) -> None:
        payload = body + marker + (b'"], {}, {}]' if body.endswith(b'"') else b"")
        publish_bytes(payload, content_type, {"task": "vllm.chat", "id": task_id, **headers})

    assert_dead_lettered(fleet, dead_letters, caplog, reason, send)
    with pytest.raises(FleetError) as info:
        chat.AsyncResult(task_id).get(timeout=RESULT_TIMEOUT_S)
    assert info.value.code == "malformed"


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [
        (b"not json at all ", b""),
        (b'["a list ', b'"]'),
        (b'"a json string ', b'"'),
        (b'{"no": "properties ', b'"}'),
        (b'{"body": "%%%', b'", "properties": {"delivery_tag": "t1", "body_encoding": "base64"}}'),
    ],
    ids=["text", "list", "string", "no-properties", "bad-body"],
)
@pytest.mark.only_broker("redis")  # RabbitMQ frames every message itself: there is no raw item to push
def test_raw_item_pushed_onto_a_redis_lane_is_dead_lettered(
    fleet: Fleet,
    dead_letters: Callable[[bytes], Any],
    caplog: pytest.LogCaptureFixture,
    prefix: bytes,
    suffix: bytes,
) -> None:
    """Not a kombu message at all (someone with Redis access LPUSHes it): kombu's reader must not stop the worker."""
    sent: list[bytes] = []

    def send(marker: bytes) -> None:
        sent.append(prefix + marker + suffix)
        fleet_broker().lpush(lane_of(CHAT_MODEL), sent[0])

    dead = assert_dead_lettered(fleet, dead_letters, caplog, "transport_frame", send, source="")
    assert dead.content_type == "application/x-fleet-undecodable"
    if not suffix:  # not JSON: the item itself
        assert raw_body(dead) == sent[0]
    else:  # JSON, but not a message: the same JSON value
        assert json.loads(raw_body(dead)) == json.loads(sent[0])


def fleet_broker() -> Any:
    """The Redis broker itself."""
    from tasks.runtime import runtime

    return runtime().broker.client


def test_unknown_task_reusing_a_completed_request_id_changes_nothing(
    fleet: Fleet, dead_letters: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer's typed answer for an unknown task never overwrites a stored result."""
    from tasks import chat

    envelope = build(fleet)
    answer = publish(envelope).get(timeout=RESULT_TIMEOUT_S)
    stored = stored_meta(envelope["request_id"])

    def send(marker: bytes) -> None:
        headers = {"task": "vllm.no_such_task", "id": envelope["request_id"]}
        publish_bytes(json.dumps([[{"note": marker.decode()}], {}, {}]).encode(), "application/json", headers)

    assert_dead_lettered(fleet, dead_letters, caplog, "unknown_task", send)
    assert stored_meta(envelope["request_id"]) == stored
    assert chat.AsyncResult(envelope["request_id"]).get(timeout=RESULT_TIMEOUT_S) == answer
