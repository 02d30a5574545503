"""Errors a new user meets, worded so they can act on them: the field that is wrong, what to do instead."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from provider.protocol import FleetError
from provider.settings import InstanceSettings
from tests.tasks.conftest import CHAT_MODEL, EMBED_MODEL, Fleet

HELLO = [{"role": "user", "content": "hello"}]


def test_empty_messages_says_what_is_wrong(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages=[])
    assert info.value.code == "invalid_request"
    assert info.value.message == (
        'invalid chat request: messages is empty: give at least one message, e.g. [{"role": "user", "content": "Hi"}]'
    )
    assert info.value.metadata["field"] == "messages"


def test_negative_max_tokens_is_a_fleet_error_naming_the_field(fleet: Fleet) -> None:
    from tasks import chat, stream_chat

    for task in (chat, stream_chat):
        with pytest.raises(FleetError) as info:
            task.delay(model=CHAT_MODEL, messages=HELLO, max_tokens=-5)
        assert info.value.code == "invalid_request"
        operation = "chat" if task is chat else "stream_chat"
        assert info.value.message == f"invalid {operation} request: max_tokens must be at least 1 (got -5)"
        assert info.value.metadata["field"] == "max_tokens"


def test_prompt_text_never_appears_in_a_validation_message(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=CHAT_MODEL, messages="a secret prompt")
    assert info.value.message.startswith("invalid chat request: messages: ")
    assert "secret" not in info.value.message


def test_chat_on_an_embedding_model_says_what_the_model_is_for(fleet: Fleet) -> None:
    from tasks import chat

    with pytest.raises(FleetError) as info:
        chat.delay(model=EMBED_MODEL, messages=HELLO)
    assert info.value.code == "no_fleet_queue"
    assert info.value.message == (
        f"model {EMBED_MODEL!r} has no live offering that supports chat (its offerings are for embedding)"
    )


def test_base_url_without_a_scheme_says_so() -> None:
    with pytest.raises(ValidationError) as info:
        InstanceSettings(name="gpu-1", base_url="10.0.0.5:8000")
    assert "base_url '10.0.0.5:8000' has no http:// or https:// scheme: write it as 'http://10.0.0.5:8000'" in str(
        info.value
    )
    assert InstanceSettings(name="gpu-1", base_url="https://10.0.0.5:8000/v1/").base_url == "https://10.0.0.5:8000"


def test_worker_with_no_instances_says_why_and_how_to_configure() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FLEET_")}
    env |= {"VLLM_FLEET_INSTANCES": "{}", "VLLM_FLEET_PROBE_LOCALHOST": "false", "COLUMNS": "400"}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert " ".join(done.stderr.split()) == (
        "error no_instances: no vLLM instance to serve: VLLM_FLEET_INSTANCES is empty and probing localhost is off "
        "(VLLM_FLEET_PROBE_LOCALHOST=false); set for example "
        """VLLM_FLEET_INSTANCES='{"gpu-1": {"base_url": "http://HOST:8000", "concurrency": 16}}'"""
    )
