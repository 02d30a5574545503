"""Queue, exchange and header names are spelled once, in ``provider.fleet.names``: no other module of provider/,
tasks/ or celeryconfig.py writes one as a literal. So is the one "is this RabbitMQ" check (``broker_is_amqp``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from provider.fleet import names

ROOT = Path(__file__).resolve().parents[3]
NAMES_MODULE = ROOT / "provider" / "fleet" / "names.py"
# Broker headers we write or read, beside the declared names' own values.
HEADER = re.compile(r"x-(fleet-|death|first-death|delivery-count)")
# An AMQP URL scheme written anywhere but in ``names`` is a second "is this RabbitMQ" check.
AMQP_SCHEME = re.compile(r"^(py)?amqps?(://)?$", re.IGNORECASE)


def _sources() -> list[Path]:
    files = [*ROOT.joinpath("provider").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py"), ROOT / "celeryconfig.py"]
    return [path for path in files if path != NAMES_MODULE]


def test_names_are_written_only_in_the_names_module() -> None:
    values = {getattr(names, name) for name in names.__all__}
    found: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and (node.value in values or HEADER.match(node.value) or AMQP_SCHEME.match(node.value))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_the_lane_prefix_is_the_fleet_exchange_and_management_queues_sit_under_it() -> None:
    assert names.LANE_PREFIX == names.FLEET_EXCHANGE
    assert names.MANAGEMENT_QUEUE_PREFIX.startswith(f"{names.LANE_PREFIX}.")
    assert names.CONTROL_QUEUE.startswith(f"{names.LANE_PREFIX}.")


@pytest.mark.parametrize(
    ("url", "amqp"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/vhost", True),
        ("amqps://rabbit.example:5671//", True),
        ("pyamqp://guest@localhost//", True),
        ("AMQP://guest@localhost//", True),
        ("redis://127.0.0.1:6379/0", False),
        ("rediss://redis.example:6380/1", False),
        ("sentinel://127.0.0.1:26379", False),
        ("memory://", False),
    ],
)
def test_one_check_tells_rabbitmq_from_redis(url: str, amqp: bool) -> None:
    assert names.broker_is_amqp(url) is amqp


def test_the_broker_seam_event_bus_and_celery_config_use_that_check() -> None:
    from celeryconfig import build_config
    from provider.settings import Settings
    from tasks.brokers import RabbitMqLaneBroker, RedisLaneBroker, broker_for

    upper = Settings(broker_url="AMQP://guest:guest@127.0.0.1:5672//")
    assert isinstance(broker_for(upper), RabbitMqLaneBroker)
    assert build_config(upper)["broker_transport_options"] == {"confirm_publish": True}
    assert isinstance(broker_for(Settings(broker_url="redis://127.0.0.1:6379/0")), RedisLaneBroker)
