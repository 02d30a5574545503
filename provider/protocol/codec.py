"""Build, verify and answer fleet protocol v2 envelopes: ``EnvelopeCodec`` joins the two directions.

Requests: ``request_signer`` (producer: build, seal, sign) and ``request_verifier`` (worker: verify, open).
Answers: ``answer_signer`` (worker: response and error envelopes) and ``answer_reader`` (producer: open).
PyJWT is touched only in ``jws``; what both directions share is in ``wire``.

The producer signs a token (PyJWT; the algorithm fixed by configuration, the key named by ``kid``) that
binds the issuer, the audience, the lane, the task, the request id (as ``jti``), the times, every scalar field
of the envelope, and a SHA-256 of the RFC 8785 form of ``message_context``, ``params`` (the plaintext),
``caller`` and ``trace_context``. No prompt text is in the token. Params are sealed (AES-256-GCM) when
encryption is on; the sealed plaintext is the canonical JSON of the params, so its hash is ``params_hash``.

``verify_request`` checks, in order, and raises the typed ``EnvelopeError`` of the first failure: size,
legacy fields, protocol version, operation, schema, token (algorithm, kid, signature, issuer, audience,
nbf/iat, jti), claims against the envelope, the lane it came from and the task that runs it, the hashed
claims, the sealed params and their hash, the execution contract. The deadline is not refused there: a worker
looks the ``jti`` up first (a completed one is answered with its stored result even past the deadline), then
calls ``check_deadline``.
"""

from __future__ import annotations

from provider.protocol.answer_reader import AnswerReader
from provider.protocol.answer_signer import AnswerSigner
from provider.protocol.request_signer import RequestSigner
from provider.protocol.request_verifier import RequestVerifier
from provider.protocol.wire import DEFAULT_PROVIDER, REPLY_TO_PREFIX, WORKER_SIGNATURE_FIELD, VerifiedRequest

__all__ = [
    "DEFAULT_PROVIDER",
    "REPLY_TO_PREFIX",
    "WORKER_SIGNATURE_FIELD",
    "EnvelopeCodec",
    "VerifiedRequest",
]


class EnvelopeCodec(RequestSigner, RequestVerifier, AnswerSigner, AnswerReader):
    """Signs, seals, verifies and answers envelopes with one ``SecuritySettings`` and its ``KeyRing``."""
