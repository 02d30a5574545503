"""Settings: the seeds' aliases, URL normalisation, tier inference, environment and YAML/TOML config files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from provider.protocol.settings import SecuritySettings
from provider.settings import InstanceSettings, Settings, normalize_base_url, tier_for_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``VLLM_FLEET_*`` variable of the machine or another test leaks into these settings."""
    for name in list(os.environ):
        if name.startswith("VLLM_FLEET_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("alias", ["base_url", "api_base", "endpoint", "vllm_api_base"])
def test_every_seed_alias_names_the_base_url(alias: str) -> None:
    instance = InstanceSettings.model_validate({alias: "http://10.0.0.5:8000/v1"})
    assert instance.base_url == "http://10.0.0.5:8000"


def test_seed_nested_forms_for_key_and_concurrency() -> None:
    instance = InstanceSettings.model_validate(
        {"base_url": "http://gpu1:8000", "credentials": {"api_key": "sk-1"}, "limits": {"concurrency": 8}}
    )
    assert instance.api_key is not None
    assert instance.api_key.get_secret_value() == "sk-1"
    assert instance.concurrency == 8
    flat = InstanceSettings.model_validate({"api_key": "flat", "credentials": {"api_key": "nested"}})
    assert flat.api_key is not None
    assert flat.api_key.get_secret_value() == "flat"  # the flat key wins over the nested one


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("http://gpu1:8000/v1", "http://gpu1:8000"),
        ("http://gpu1:8000/v1/", "http://gpu1:8000"),
        ("  https://vllm.example.com/v1//  ", "https://vllm.example.com"),
        ("http://gpu1:8000/", "http://gpu1:8000"),
        ("http://gpu1:8000/api/v1", "http://gpu1:8000/api"),
        ("http://gpu1:8000/v10", "http://gpu1:8000/v10"),
    ],
)
def test_a_trailing_v1_and_slashes_are_stripped(given: str, normalized: str) -> None:
    assert normalize_base_url(given) == normalized
    assert InstanceSettings(base_url=given).base_url == normalized


def test_a_url_without_scheme_is_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="write it as 'http://gpu1:8000'"):
        InstanceSettings(base_url="gpu1:8000")
    with pytest.raises(ValidationError, match="no http:// or https:// scheme"):
        InstanceSettings(base_url="ftp://gpu1:8000")


@pytest.mark.parametrize(
    ("url", "tier"),
    [
        ("http://localhost:8000", "local"),
        ("http://LOCALHOST:8000", "local"),
        ("http://127.0.0.1:8000", "local"),
        ("http://127.0.0.2:8000", "local"),
        ("http://[::1]:8000", "local"),
        ("http://10.0.0.5:8000", "direct"),
        ("https://vllm.example.com", "direct"),
    ],
)
def test_the_tier_is_inferred_from_the_host(url: str, tier: str) -> None:
    assert tier_for_url(url) == tier
    assert InstanceSettings(base_url=url).resolved_tier == tier


def test_an_explicit_tier_wins_over_the_inferred_one() -> None:
    assert InstanceSettings(base_url="http://localhost:8000", tier="fleet").resolved_tier == "fleet"


def test_instances_know_their_names_and_only_usable_ones_are_served() -> None:
    settings = Settings(
        instances={
            "gpu1": {"base_url": "http://gpu1:8000"},
            "off": {"base_url": "http://off:8000", "enabled": False},
            "nourl": {},
        }
    )
    assert settings.instances["gpu1"].name == "gpu1"
    assert [instance.name for instance in settings.usable_instances()] == ["gpu1"]


def test_the_environment_uses_the_prefix_nesting_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_FLEET_TIMEOUTS__CHAT_S", "12.5")
    monkeypatch.setenv("VLLM_FLEET_INSTANCES", '{"gpu1": {"api_base": "http://10.0.0.5:8000/v1"}}')
    monkeypatch.setenv("VLLM_FLEET_SECURITY__LEEWAY_S", "7")
    settings = Settings()
    assert settings.timeouts.chat_s == 12.5
    assert settings.instances["gpu1"].base_url == "http://10.0.0.5:8000"
    assert settings.security.leeway_s == 7
    assert isinstance(settings.security, SecuritySettings)


YAML_CONFIG = """
log_payloads: false
timeouts:
  chat_s: 45
instances:
  gpu1:
    endpoint: http://10.0.0.7:8000/v1
    credentials:
      api_key: from-yaml
    limits:
      concurrency: 4
"""

TOML_CONFIG = """
key_prefix = "from-toml"

[timeouts]
chat_s = 50

[instances.gpu2]
vllm_api_base = "http://127.0.0.1:9000/v1/"
tier = "private"
"""


def test_a_yaml_config_file_is_read_after_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(YAML_CONFIG)
    monkeypatch.setenv("VLLM_FLEET_CONFIG", str(path))
    settings = Settings()
    assert settings.timeouts.chat_s == 45
    gpu1 = settings.instances["gpu1"]
    assert (gpu1.name, gpu1.base_url, gpu1.concurrency, gpu1.resolved_tier) == (
        "gpu1",
        "http://10.0.0.7:8000",
        4,
        "direct",
    )
    assert gpu1.api_key is not None
    assert gpu1.api_key.get_secret_value() == "from-yaml"
    monkeypatch.setenv("VLLM_FLEET_TIMEOUTS__CHAT_S", "9")
    assert Settings().timeouts.chat_s == 9  # the environment wins over the file


def test_a_toml_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML_CONFIG)
    monkeypatch.setenv("VLLM_FLEET_CONFIG", str(path))
    settings = Settings()
    assert settings.key_prefix == "from-toml"
    assert settings.timeouts.chat_s == 50
    gpu2 = settings.instances["gpu2"]
    assert (gpu2.base_url, gpu2.resolved_tier) == ("http://127.0.0.1:9000", "private")


def test_a_config_file_with_an_unknown_instance_field_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("instances:\n  gpu1:\n    base_url: http://gpu1:8000\n    concurrencyy: 3\n")
    monkeypatch.setenv("VLLM_FLEET_CONFIG", str(path))
    with pytest.raises(ValidationError, match="concurrencyy"):
        Settings()


def test_to_env_round_trips_with_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        instances={"gpu1": {"base_url": "http://gpu1:8000", "api_key": "sk-9", "concurrency": 3}},
        timeouts={"chat_s": 21},
        pause_when_waiting_over=None,
    )
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert again.instances["gpu1"].api_key is not None
    assert again.instances["gpu1"].api_key.get_secret_value() == "sk-9"
    assert again.timeouts.chat_s == 21
    assert again.model_dump(mode="json") == original.model_dump(mode="json")


def test_a_worker_process_takes_its_share_of_each_instance() -> None:
    def share(index: int) -> int:
        settings = Settings(
            instances={"gpu1": {"base_url": "http://gpu1:8000", "concurrency": 5}},
            worker_processes=3,
            worker_process_index=index,
        )
        return settings.instances["gpu1"].concurrency

    assert [share(1), share(2), share(3)] == [2, 2, 1]
    with pytest.raises(ValidationError, match="beyond worker_processes"):
        Settings(worker_processes=2, worker_process_index=3)
