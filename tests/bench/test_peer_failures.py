"""The plain Celery peer's failures are a finding of the run, never its failure; the fleet's still fail it."""

from __future__ import annotations

from typing import Any

from bench.__main__ import exit_status, peer_notes
from bench.report import render_markdown
from bench.scenarios import Sanity


def _report(sanity: Sanity) -> dict[str, Any]:
    return {"mode": "quick", "errors": [], "sanity": sanity.as_dict(), "results": {}, "notes": peer_notes(sanity)}


def test_a_failed_peer_request_is_reported_and_the_run_still_passes() -> None:
    sanity = Sanity()
    sanity.ok(100)
    sanity.of("fleet").ok(50)
    sanity.of("peer").ok(46)
    for _ in range(4):
        sanity.of("peer").fail("throughput redis N=256 peer", "RemoteProtocolError: Server disconnected")
    assert sanity.passed
    assert (sanity.requests, sanity.failed) == (150, 0)
    report = _report(sanity)
    assert report["sanity"]["peer"] == {
        "requests": 50,
        "failed": 4,
        "wrong": 0,
        "problems": ["throughput redis N=256 peer: RemoteProtocolError: Server disconnected"] * 4,
    }
    assert exit_status(report) == 0
    (note,) = report["notes"]
    assert "peer failed 4" in note
    assert "of its 50 requests" in note
    assert "Server disconnected" in note
    page = render_markdown(report)
    assert "the plain Celery peer, counted apart" in page
    assert "50 requests, 4 failed, 0 wrong" in page
    assert "peer failed 4" in page


def test_a_wrong_peer_answer_is_a_finding_too() -> None:
    sanity = Sanity()
    sanity.ok(10)
    assert not sanity.of("peer").check("overhead peer", "other", 16, "stop", "right")
    assert sanity.passed
    assert exit_status(_report(sanity)) == 0
    assert "answered 1 wrongly" in peer_notes(sanity)[0]


def test_a_failed_fleet_request_still_fails_the_run() -> None:
    sanity = Sanity()
    sanity.ok(100)
    sanity.of("peer").ok(100)
    sanity.of("fleet").fail("throughput redis N=256 fleet", "TimeoutError")
    assert not sanity.passed
    assert exit_status(_report(sanity)) == 1
    assert peer_notes(sanity) == []  # a peer without failures has nothing to report


def test_a_failed_step_fails_the_run_whatever_the_peer_did() -> None:
    sanity = Sanity()
    sanity.ok(10)
    report = _report(sanity) | {"errors": ["RuntimeError: worker exited"]}
    assert exit_status(report) == 1
