"""The fault suite's duplicate rule (``CountingSimulator``): what counts as a duplicated effect and what does not."""

from __future__ import annotations

import time
import uuid

from tests.reliability.harness import _KILLED_LOCK, KILLED, Run, _duplicated


def _identity() -> str:
    return f"rule-{uuid.uuid4().hex[:8]}"


def _killed(identity: str, at: float) -> str:
    with _KILLED_LOCK:
        KILLED[identity] = at
    return identity


def test_a_dead_workers_unfinished_run_and_its_rerun_are_not_a_duplicate() -> None:
    now = time.monotonic()
    dead = _killed(_identity(), now + 1.0)
    cut = Run(dead, now, ended=now + 1.5, disconnected=True)  # its socket closed by the kill
    rerun = Run(_identity(), now + 6.0, ended=now + 8.0, status=200, complete=True)
    assert not cut.delivered()
    assert rerun.delivered()
    assert not _duplicated([cut, rerun])


def test_two_delivered_answers_are_a_duplicate_even_from_one_worker() -> None:
    now = time.monotonic()
    worker = _identity()
    runs = [
        Run(worker, now, ended=now + 1, status=200, complete=True),
        Run(worker, now + 2, ended=now + 3, status=200, complete=True),
    ]
    assert _duplicated(runs)


def test_two_live_workers_running_it_at_once_is_a_duplicate_even_if_one_fails() -> None:
    now = time.monotonic()
    first = Run(_identity(), now, ended=now + 3, status=200, complete=True)
    second = Run(_identity(), now + 1, ended=now + 2, status=500, complete=True)
    assert _duplicated([first, second])


def test_a_retry_after_a_failed_attempt_is_not_a_duplicate() -> None:
    now = time.monotonic()
    worker, other = _identity(), _identity()
    failed = Run(worker, now, ended=now + 1, status=503, complete=True)
    retried = Run(worker, now + 1.5, ended=now + 2.5, status=200, complete=True)
    handed_back = Run(other, now + 3, ended=now + 4, status=200, complete=False)  # client gone mid-answer
    assert not _duplicated([failed, retried])
    assert not _duplicated([failed, handed_back])


def test_a_kill_after_the_full_answer_was_sent_still_counts_that_answer() -> None:
    now = time.monotonic()
    late_kill = _killed(_identity(), now + 5.0)
    answered = Run(late_kill, now, ended=now + 1, status=200, complete=True)
    again = Run(_identity(), now + 6, ended=now + 7, status=200, complete=True)
    assert answered.delivered()
    assert _duplicated([answered, again])
