"""The producer's side of an answer: check the worker's signature, bind it to the request, open it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature

from provider.protocol.canonical import (
    CanonicalizationError,
    canonical_json,
)
from provider.protocol.envelope import (
    ERROR_MESSAGE_TYPE,
    RESPONSE_MESSAGE_TYPE,
    SEALED_RESPONSE_FIELDS,
    ErrorEnvelope,
    ResponseEnvelope,
    check_legacy_fields,
)
from provider.protocol.errors import (
    EncryptionRequiredError,
    EnvelopeError,
    FleetError,
    KeyConfigurationError,
    MalformedError,
    as_fleet_error,
    response_forged,
)
from provider.protocol.jws import decode_segment
from provider.protocol.sealing import (
    PURPOSE_RESULT,
    open_sealed,
)
from provider.protocol.wire import (
    ANSWER_SIGNATURE_PREFIX,
    SEALED_CONTEXT_FIELDS,
    WORKER_SIGNATURE_FIELD,
    CodecCore,
    loads_signed,
)

_ED25519_SIGNATURE_CHARS = 86


class AnswerReader(CodecCore):
    """Opens the answers fleet workers signed."""

    def open_response(
        self, envelope: object, *, request_id: str, lane: str | None = None, operation: str | None = None
    ) -> dict[str, Any]:
        """The plain response a fleet worker signed for this request (and, when known, this lane and operation).

        Raises ``FleetError``: the worker's typed error for an error envelope, ``response_forged`` for anything
        no configured worker key signed or that answers another request, lane or operation, and the refusal's
        own code for an authentic answer this side cannot open.
        """
        try:
            return self._open_response(envelope, request_id=request_id, lane=lane, operation=operation)
        except FleetError:
            raise
        except EnvelopeError as exc:
            raise as_fleet_error(exc) from None

    def _open_response(
        self, envelope: object, *, request_id: str, lane: str | None, operation: str | None
    ) -> dict[str, Any]:
        if not self._keys.response_verify_kids:
            raise KeyConfigurationError("no worker response keys are configured here (response_verify_keys)")
        try:
            data = self._load(envelope)
        except EnvelopeError:
            raise response_forged() from None
        if not self.answer_is_authentic(data):
            raise response_forged()
        return self._read_answer(data, request_id=request_id, lane=lane, operation=operation)

    def _read_answer(
        self, data: dict[str, Any], *, request_id: str, lane: str | None, operation: str | None
    ) -> dict[str, Any]:
        """An answer's content once its signature is checked: bound to this request, opened, validated."""
        if data.get("request_id") != request_id:
            raise response_forged("the answer was signed for another request")
        for name, expected in (("routing_key", lane), ("operation", operation)):
            signed = data.get(name)
            if expected is not None and signed is not None and signed != expected:
                raise response_forged(f"the answer was signed for another {name.replace('_', ' ')}")
        check_legacy_fields(data)
        message_type = data.get("message_type")
        if message_type == ERROR_MESSAGE_TYPE:
            error = self._validate(ErrorEnvelope, data)
            raise FleetError(
                error.message,
                code=error.code,
                retryable=error.retryable,
                error_class=error.error_class,
                request_id=error.request_id,
                metadata=error.metadata,
            )
        if message_type != RESPONSE_MESSAGE_TYPE:
            raise MalformedError("not a response or error envelope", field="message_type")
        response = self._validate(ResponseEnvelope, data)
        if response.routing_key is None or response.operation is None:
            raise response_forged("the response names no lane or operation")
        plain = {
            name: value
            for name, value in data.items()
            if name not in ("sealed_body", WORKER_SIGNATURE_FIELD) and value is not None
        }
        if response.sealed_body is None:
            if self._encrypt and any(name in plain for name in (*SEALED_RESPONSE_FIELDS, *SEALED_CONTEXT_FIELDS)):
                raise EncryptionRequiredError("the response payload must be sealed", field="sealed_body")
            return plain
        plaintext = open_sealed(
            self._keys,
            response.sealed_body,
            purpose=PURPOSE_RESULT,
            request_id=request_id,
            lane=response.routing_key or "",
        )
        body = loads_signed(plaintext, "sealed response body")
        if not isinstance(body, dict) or not set(body) <= {*SEALED_RESPONSE_FIELDS, *SEALED_CONTEXT_FIELDS}:
            raise MalformedError("the sealed response body has unexpected fields", field="sealed_body")
        merged = {**plain, **{name: value for name, value in body.items() if value is not None}}
        self._validate(ResponseEnvelope, merged)
        return merged

    def answer_is_authentic(self, data: Mapping[str, Any]) -> bool:
        """Whether a worker whose public key is configured here signed exactly this envelope."""
        signature = data.get(WORKER_SIGNATURE_FIELD)
        if not isinstance(signature, dict) or set(signature) != {"kid", "sig"}:
            return False
        kid, sig = signature["kid"], signature["sig"]
        if not isinstance(kid, str) or not isinstance(sig, str) or len(sig) != _ED25519_SIGNATURE_CHARS:
            return False
        public = self._keys.response_verify_key(kid)
        if public is None:
            return False
        try:
            raw = decode_segment(sig.encode("ascii"), "signature")
            if raw is None:
                return False
            signing_input = ANSWER_SIGNATURE_PREFIX + canonical_json(
                {name: value for name, value in data.items() if name != WORKER_SIGNATURE_FIELD}
            )
            public.verify(raw, signing_input)
        except (UnicodeEncodeError, CanonicalizationError, TypeError, ValueError, InvalidSignature):
            return False
        return True
