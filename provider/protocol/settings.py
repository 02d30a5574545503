"""The protocol's own settings: keys, issuer and audience, leeway and limits (all the codec and key ring read).

``provider.settings.Settings`` holds one as ``security``; the protocol never reads the rest of the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["SecuritySettings"]


class SecuritySettings(BaseModel):
    """Envelope signing, verification and encryption keys (paths or inline values)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["EdDSA", "RS256", "ES256", "HS256"] = "EdDSA"
    issuer: str = "vllm-celery-fleet"
    accepted_issuers: list[str] = Field(default_factory=list)
    audience: str = "vllm-fleet-worker"
    signing_key: SecretStr | None = None
    signing_key_file: Path | None = None
    signing_kid: str = "k1"
    verify_keys: dict[str, SecretStr] = Field(default_factory=dict)
    verify_keys_dir: Path | None = None
    encrypt: bool = True
    encryption_keys: dict[str, SecretStr] = Field(default_factory=dict)
    encryption_keys_dir: Path | None = None
    encryption_kid: str = "e1"
    leeway_s: float = 30.0
    max_envelope_bytes: int = 1_048_576
    replay_memory_s: float = 600.0
    # Workers sign every response, error and stream entry (Ed25519); producers verify with the public keys.
    response_signing_key: SecretStr | None = None
    response_signing_key_file: Path | None = None
    response_signing_kid: str = "w1"
    response_verify_keys: dict[str, SecretStr] = Field(default_factory=dict)
    response_verify_keys_dir: Path | None = None
    # A token may live at most its own timeout (plus leeway), and never past this (None: the longest deadline).
    max_token_lifetime_s: float | None = None
