"""A request no worker takes: ``.get()`` raises ``FleetTimeout`` (``fleet_timeout``, retryable) by its deadline."""

from __future__ import annotations

import pytest

from provider.protocol import FleetError, FleetTimeout, codes
from tests.tasks.conftest import Fleet
from tests.tasks.test_backpressure import GHOST_MODEL, HELLO, unserved_lane  # noqa: F401 (a fixture)


def test_get_raises_fleet_timeout_when_no_worker_takes_the_request(fleet: Fleet, unserved_lane: str) -> None:  # noqa: F811
    from tasks import chat

    result = chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=2)
    assert result.lane == unserved_lane
    with pytest.raises(FleetError) as info:  # what a caller catches, with its typed code
        result.get()
    assert isinstance(info.value, FleetTimeout)
    assert info.value.code == codes.FLEET_TIMEOUT
    assert info.value.retryable is True


def test_a_result_from_its_id_alone_also_ends_with_fleet_timeout(fleet: Fleet, unserved_lane: str) -> None:  # noqa: F811
    from tasks import chat

    submitted = chat.delay(model=GHOST_MODEL, messages=HELLO, timeout_s=2)
    with pytest.raises(FleetTimeout):
        chat.AsyncResult(submitted.id).get(timeout=1.0)  # no deadline known here: the caller's own wait
