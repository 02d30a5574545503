"""Signing key rotation without downtime (provider/protocol/keys.py): add the new kid, move producers, drop the old.

While workers verify both kids, messages signed with either are served; once a worker restarts with only the new
kid, a message signed with the old one (even one published during the window) is refused with ``unknown_key``.
Workers hold verify keys only: a process holding a signing key also trusts that key's own kid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from provider.protocol import EnvelopeCodec, FleetError, generate_keypair
from simulator.testing import SimulatorServer
from tests.tasks.conftest import Fleet
from tests.tasks.test_bad_input import chat_params, codec_with
from tests.tasks.test_replay import (
    forget_instance,
    lane_when_served,
    publish,
    settings_for,
    simulator_for,
    start_worker,
)

ROTATE_MODEL = "rotate-chat"
INSTANCE = "sim-rotate"
OLD_KID, NEW_KID = "test-k1", "test-k2"
RESULT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def rotation_simulator() -> Iterator[SimulatorServer]:
    """The vLLM behind the rotating workers."""
    with simulator_for(ROTATE_MODEL) as server:
        yield server


def signed(codec: EnvelopeCodec, lane: str, text: str) -> dict[str, Any]:
    """A chat envelope signed by ``codec``."""
    return codec.build_request(
        operation="chat",
        task_name="vllm.chat",
        lane=lane,
        model=ROTATE_MODEL,
        params=chat_params(ROTATE_MODEL, text),
        timeout_s=RESULT_TIMEOUT_S,
    )


def test_old_and_new_kids_are_served_during_rotation_and_the_old_refused_after(
    fleet: Fleet, rotation_simulator: SimulatorServer
) -> None:
    new_key = generate_keypair("ed25519", kid=NEW_KID)
    old_public = fleet.settings.security.verify_keys[OLD_KID]
    old_producer = codec_with(fleet)
    new_producer = codec_with(fleet, signing_key=new_key.private, signing_kid=NEW_KID)
    both = {OLD_KID: old_public, NEW_KID: SecretStr(new_key.public)}
    window = settings_for(fleet, rotation_simulator, INSTANCE, signing_key=None, verify_keys=both)
    after = settings_for(
        fleet, rotation_simulator, INSTANCE, signing_key=None, verify_keys={NEW_KID: SecretStr(new_key.public)}
    )

    worker = start_worker(window, "rotate-window")
    try:
        lane = lane_when_served(ROTATE_MODEL)
        assert publish(signed(old_producer, lane, "signed old")).get(timeout=RESULT_TIMEOUT_S)["content"] == (
            "signed old"
        )
        assert publish(signed(new_producer, lane, "signed new")).get(timeout=RESULT_TIMEOUT_S)["content"] == (
            "signed new"
        )
        served = rotation_simulator.stats()["requests"]["chat"]
        late = signed(old_producer, lane, "signed old, served late")  # signed in the window
    finally:
        worker.stop()

    queued = publish(late)  # waits on the lane while no worker runs
    worker = start_worker(after, "rotate-after")
    try:
        for result in (queued, publish(signed(old_producer, lane, "signed old, after"))):
            with pytest.raises(FleetError) as info:
                result.get(timeout=RESULT_TIMEOUT_S)
            assert (info.value.code, info.value.metadata.get("field")) == ("unknown_key", "kid")
        assert publish(signed(new_producer, lane, "signed new, after")).get(timeout=RESULT_TIMEOUT_S)["content"] == (
            "signed new, after"
        )
        assert rotation_simulator.stats()["requests"]["chat"] == served + 1
        worker.assert_refusals(["unknown_key", "unknown_key"])
    finally:
        worker.stop()
        forget_instance(INSTANCE)
