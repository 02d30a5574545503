"""The operations are written once (``provider.protocol.OPERATIONS``; ``MANAGEMENT_OPERATIONS`` and
``INFERENCE_OPERATIONS`` derive from it): the tasks, the worker's handlers and slot rule, the CLI and the README
all follow that list."""

from __future__ import annotations

import re
from pathlib import Path

from provider.protocol import INFERENCE_OPERATIONS, MANAGEMENT_OPERATIONS, OPERATIONS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_one_task_per_operation_and_no_other() -> None:
    import tasks
    from tasks.app import app

    assert (*sorted(INFERENCE_OPERATIONS, key=OPERATIONS.index), *MANAGEMENT_OPERATIONS) == OPERATIONS
    fleet_tasks = {name for name in app.tasks if name.startswith("vllm.")}
    assert fleet_tasks == {f"vllm.{operation}" for operation in OPERATIONS}
    for operation in OPERATIONS:  # the producer API names each task after its operation
        task = getattr(tasks, operation)
        assert (task.name, task.operation) == (f"vllm.{operation}", operation)
        assert operation in tasks.__all__


def test_one_handler_per_operation() -> None:
    from tasks.management import HANDLERS

    assert list(HANDLERS) == list(MANAGEMENT_OPERATIONS)


def test_the_cli_offers_every_operation_but_discover_which_has_its_own_command() -> None:
    from tasks.cli import build_parser

    parser = build_parser()
    choices = None
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        manage = action.choices["manage"]  # type: ignore[index]
        choices = next(a.choices for a in manage._actions if a.dest == "action")
    assert choices is not None
    assert [*choices, "discover"] == list(MANAGEMENT_OPERATIONS)
    assert "discover" in parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_the_readme_names_every_task() -> None:
    names = set(re.findall(r"`vllm\.([a-z_]+)`", README.read_text()))
    assert {*INFERENCE_OPERATIONS, *MANAGEMENT_OPERATIONS} <= names
