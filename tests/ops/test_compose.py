"""docker-compose.yml and the Dockerfile, checked on a machine without a Docker engine.

Static half: the file as Compose reads it. ``docker compose config`` (or Debian's ``docker-compose config``)
validates it against the Compose schema when such a client is installed; our own Compose-style
interpolation plus structural checks always run (images and builds, healthchecks, ``depends_on`` conditions,
the gpu profile, key volumes, no secrets in the file).

Live half: every command the file runs is run here, on loopback, bounded in time: the keys one-shot, the
simulator, the three workers (the gpu worker talks to the simulator in vLLM's place), Beat, Flower, Redis'
own command line and every healthcheck; RabbitMQ boots a throwaway node with docker/rabbitmq.conf. Service
names in URLs become 127.0.0.1, container ports become free local ports, /keys and /data a temp dir, the
broker a private RabbitMQ vhost and Redis the test databases under a fresh key prefix. vLLM itself (GPU image)
is the one command that cannot run here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml

from provider.sizing import default_process_count
from tests.conftest import (
    BACKEND_DB,
    BROKER_DB,
    IN_CI,
    RABBIT_HOST,
    RABBIT_PORT,
    REDIS_HOST,
    REDIS_PORT,
    STATE_DB,
    _rabbitmqctl,
    require_server,
)
from tests.conftest import wait_until as shared_wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RABBITMQ_CONF = ROOT / "docker" / "rabbitmq.conf"
BIN = Path(sys.executable).parent

SECRETS = {
    "RABBITMQ_PASSWORD": "opsPw0a1b2c3d4",
    "REDIS_PASSWORD": "redisPw5e6f7g8h",
    "FLOWER_BASIC_AUTH": "ops:flowerPw9z8y",
}
COMPOSE_ENV = {"RABBITMQ_USER": "opsuser", **SECRETS}
REQUIRED_VARIABLES = ("RABBITMQ_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH")
ALL_SERVICES = {"redis", "rabbitmq", "keys", "simulator", "vllm", "worker-chat", "worker-embed", "worker-gpu"}
ALL_SERVICES |= {"beat", "flower"}
PROJECT_SERVICES = {"keys", "simulator", "worker-chat", "worker-embed", "worker-gpu", "beat", "flower"}
WORKERS = ("worker-chat", "worker-embed", "worker-gpu")
GPU_ONLY = {"vllm", "worker-gpu"}
CHAT_MODEL, EMBED_MODEL = "qwen3-6-27b", "minilm"
KEY_FILES = ("signing/k1.pem", "verify/k1.pub.pem", "sealing/e1.aes", "worker/w1.pem", "response-verify/w1.pub.pem")
OPS_VHOST = f"vllm-fleet-ops-{os.getpid()}"
REDIS_DBS = {0: BROKER_DB, 1: BACKEND_DB, 2: STATE_DB}
CONTAINER_PATHS = ("/keys", "/data")
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0
Completed = subprocess.CompletedProcess[str]
# Celery's task_time_limit is the longest deadline plus this margin (celeryconfig._BROKER_MARGIN_S).
CELERY_MARGIN_S = 60.0


# --- reading the file as Compose does -------------------------------------------------------------------


class MissingVariableError(ValueError):
    """A ``${NAME:?message}`` variable is not set."""


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}``..."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = env.get(name), match["op"], match["arg"] or ""
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise MissingVariableError(f"{name}: {arg}")
            return value
        return value or ""

    return _VARIABLE.sub(replace, text)


def _interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(value, env) for value in node]
    return node


def raw_compose() -> dict[str, Any]:
    """The YAML (anchors and merge keys resolved), before interpolation."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def load_compose(env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The services Compose would start with these variables and profiles."""
    data = _interpolate_tree(raw_compose(), COMPOSE_ENV if env is None else env)
    return {
        name: service
        for name, service in data["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict of strings (either Compose form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    """A service's ``command`` as argv."""
    value = service.get("command") or []
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def health_argv(service: dict[str, Any]) -> list[str]:
    """A healthcheck's ``test`` as argv (``CMD-SHELL`` and string forms run under ``sh -c``)."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return [str(item) for item in test[1:]]


def volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Short-syntax volumes as (source, target, mode)."""
    found = []
    for entry in service.get("volumes") or []:
        source, target, *mode = str(entry).split(":")
        found.append((source, target, mode[0] if mode else "rw"))
    return found


def compose_cli() -> list[str] | None:
    """A Compose client that can render the file without an engine, if one is installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


# --- static checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [(), ("gpu",)], ids=["default", "gpu"])
def test_compose_client_validates_the_file(profiles: tuple[str, ...], tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        message = "no Compose client here (`docker compose` plugin or Debian's docker-compose package)"
        if IN_CI:
            pytest.fail(message + " (.ci/run installs docker-compose)")
        pytest.skip(message)
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in COMPOSE_ENV.items()))
    clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV and not k.startswith("COMPOSE_")}
    base = [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    rendered = subprocess.run(
        [*base, *flags, "config"], capture_output=True, text=True, timeout=60, env=clean, cwd=tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr
    rendered_services = yaml.safe_load(rendered.stdout)["services"]
    services = {  # Compose v2 leaves inactive profiles out; Debian's v1 lists them with their profiles
        name: body
        for name, body in rendered_services.items()
        if not body.get("profiles") or set(body["profiles"]) & set(profiles)
    }
    expected = ALL_SERVICES if profiles else ALL_SERVICES - GPU_ONLY
    assert set(services) == expected
    ours = load_compose(profiles=profiles)
    services = _interpolate_tree(services, {})  # `config` keeps `$$` escaped; nothing else is left to resolve
    for name, body in services.items():  # the client and our interpolation agree on what runs, and how
        assert command(body) == command(ours[name]), name
        assert environment(body) == environment(ours[name]), name

    env_file.write_text("FLOWER_BASIC_AUTH=a:b\nREDIS_PASSWORD=r\n")
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=60, env=clean)
    assert missing.returncode != 0
    assert "RABBITMQ_PASSWORD" in missing.stderr + missing.stdout


def test_required_secrets_have_no_default() -> None:
    for name in REQUIRED_VARIABLES:
        env = {key: value for key, value in COMPOSE_ENV.items() if key != name}
        with pytest.raises(MissingVariableError, match=name):
            load_compose(env)


def test_services_profiles_and_images() -> None:
    assert set(load_compose()) == ALL_SERVICES - GPU_ONLY
    services = load_compose(profiles=("gpu",))
    assert set(services) == ALL_SERVICES
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        if name in PROJECT_SERVICES:
            assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
            assert service["image"].startswith("vllm-celery-fleet:"), name
        if name in GPU_ONLY:
            assert service["profiles"] == ["gpu"]
        elif name != "keys":
            assert service.get("restart") == "unless-stopped", name
    assert services["keys"]["restart"] == "no"
    assert services["redis"]["image"].startswith("redis:")
    script = command(services["redis"])
    assert script[:2] == ["sh", "-c"]
    assert script[2].startswith('exec redis-server --appendonly yes --appendfsync always --save ""')
    assert '--requirepass "${REDIS_PASSWORD}" "$@"' in script[2]  # the password never is an argument of sh
    repository, tag = services["rabbitmq"]["image"].split(":")
    version = tuple(int(part) for part in re.findall(r"\d+", tag)[:2])
    assert repository == "rabbitmq"
    assert version >= (3, 13)
    assert "management" in tag


def test_vllm_runs_on_a_gpu_in_its_profile() -> None:
    vllm = load_compose(profiles=("gpu",))["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert environment(vllm)["VLLM_SERVER_DEV_MODE"] == "1"
    assert vllm["entrypoint"] == ["vllm", "serve"]  # the model is its positional argument
    argv = command(vllm)
    assert argv[argv.index("--port") + 1] == "8000"
    assert "--enable-sleep-mode" in argv
    raw = raw_compose()["services"]["vllm"]["command"]
    assert raw[0].startswith("${VLLM_MODEL")
    assert raw[raw.index("--served-model-name") + 1].startswith("${VLLM_SERVED_MODEL_NAME")
    chosen = load_compose({**COMPOSE_ENV, "VLLM_MODEL": "org/m", "VLLM_SERVED_MODEL_NAME": "m"}, ("gpu",))["vllm"]
    assert command(chosen)[:3] == ["org/m", "--served-model-name", "m"]


SECOND_HOST = {"FLEET_BROKER_HOST": "10.0.0.1", "FLEET_REDIS_HOST": "10.0.0.1", "GPU_INSTANCE_NAME": "gpu-2"}


def _published(service: dict[str, Any]) -> dict[str, str]:
    """Container port → the host address it is published on."""
    return {entry.rsplit(":", 1)[1]: entry.split(":")[0] for entry in service.get("ports") or []}


def test_brokers_are_published_on_fleet_bind_address_and_flower_stays_on_loopback() -> None:
    services = load_compose(profiles=("gpu",))
    assert _published(services["redis"]) == {"6379": "127.0.0.1"}
    assert _published(services["rabbitmq"]) == {"5672": "127.0.0.1", "15672": "127.0.0.1"}
    assert _published(services["flower"]) == {"5555": "127.0.0.1"}
    shared = load_compose({**COMPOSE_ENV, "FLEET_BIND_ADDRESS": "10.0.0.1"}, ("gpu",))
    assert _published(shared["redis"]) == {"6379": "10.0.0.1"}
    assert _published(shared["rabbitmq"]) == {"5672": "10.0.0.1", "15672": "127.0.0.1"}
    assert _published(shared["flower"]) == {"5555": "127.0.0.1"}
    # a broker published beyond loopback always asks for a password
    assert environment(shared["redis"])["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert environment(shared["rabbitmq"])["RABBITMQ_DEFAULT_PASS"] == SECRETS["RABBITMQ_PASSWORD"]


def test_a_second_gpu_host_runs_vllm_and_its_worker_against_the_first_hosts_brokers() -> None:
    from provider.settings import Settings

    remote = load_compose({**COMPOSE_ENV, **SECOND_HOST}, ("gpu",))
    env = environment(remote["worker-gpu"])
    user, password = COMPOSE_ENV["RABBITMQ_USER"], SECRETS["RABBITMQ_PASSWORD"]
    redis_password = SECRETS["REDIS_PASSWORD"]
    assert env["VLLM_FLEET_BROKER_URL"] == f"amqp://{user}:{password}@10.0.0.1:5672//"
    assert env["VLLM_FLEET_RESULT_BACKEND"] == f"redis://:{redis_password}@10.0.0.1:6379/1"
    assert env["VLLM_FLEET_REDIS_URL"] == f"redis://:{redis_password}@10.0.0.1:6379/2"
    instances = json.loads(env["VLLM_FLEET_INSTANCES"])
    assert list(instances) == ["gpu-2"]
    assert instances["gpu-2"]["base_url"] == "http://vllm:8000"
    assert instances["gpu-2"]["model_capabilities"] == {"qwen3-0-6b": ["tools", "thinking"]}
    settings = Settings.model_validate(
        {"instances": instances, "broker_url": env["VLLM_FLEET_BROKER_URL"], "redis_url": env["VLLM_FLEET_REDIS_URL"]}
    )
    assert settings.instances["gpu-2"].base_url == "http://vllm:8000"
    # the worker's vLLM runs beside it on the second host; nothing else needs to run there
    assert set(remote["worker-gpu"]["depends_on"]) >= {"vllm"}
    local = environment(load_compose(profiles=("gpu",))["worker-gpu"])
    assert local["VLLM_FLEET_BROKER_URL"] == f"amqp://{user}:{password}@rabbitmq:5672//"
    assert local["VLLM_FLEET_REDIS_URL"] == f"redis://:{redis_password}@redis:6379/2"


def test_vllm_serves_a_qwen3_class_model_with_its_parsers_and_a_long_health_window() -> None:
    vllm = load_compose(profiles=("gpu",))["vllm"]
    argv = command(vllm)
    assert argv[argv.index("--reasoning-parser") + 1] == "qwen3"
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert vllm["image"] == "vllm/vllm-openai:v0.32.0"  # the release tests/data/vllm/ was recorded from
    window = vllm["healthcheck"]["start_period"]
    assert window == "1800s"
    other = {**COMPOSE_ENV, "VLLM_REASONING_PARSER": "deepseek_r1", "VLLM_TOOL_CALL_PARSER": "llama3_json"}
    other["VLLM_START_PERIOD"] = "3600s"
    changed = load_compose(other, ("gpu",))["vllm"]
    argv = command(changed)
    assert argv[argv.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert argv[argv.index("--tool-call-parser") + 1] == "llama3_json"
    assert changed["healthcheck"]["start_period"] == "3600s"


def test_compose_client_validates_the_second_host_recipe(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        message = "no Compose client here (`docker compose` plugin or Debian's docker-compose package)"
        if IN_CI:
            pytest.fail(message + " (make test installs docker-compose)")
        pytest.skip(message)
    env_file = tmp_path / "compose.env"
    values = {**COMPOSE_ENV, **SECOND_HOST, "FLEET_BIND_ADDRESS": "10.0.0.2"}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    clean = {k: v for k, v in os.environ.items() if k not in values and not k.startswith("COMPOSE_")}
    base = [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
    rendered = subprocess.run(
        [*base, "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        cwd=tmp_path,
    )
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    worker = environment(services["worker-gpu"])
    assert "@10.0.0.1:5672//" in worker["VLLM_FLEET_BROKER_URL"]
    assert "@10.0.0.1:6379/2" in worker["VLLM_FLEET_REDIS_URL"]
    assert '"gpu-2"' in worker["VLLM_FLEET_INSTANCES"]
    published = [str(port.get("host_ip") if isinstance(port, dict) else port) for port in services["redis"]["ports"]]
    assert any("10.0.0.2" in entry for entry in published), published


def test_healthchecks_gate_every_dependency() -> None:
    services = load_compose(profiles=("gpu",))
    without_probe = {"keys", "beat"}  # a one-shot, and Beat (nothing answers in it; nothing waits for it)
    for name, service in services.items():
        if name not in without_probe:
            assert health_argv(service), name
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            expected = "service_completed_successfully" if target == "keys" else "service_healthy"
            assert rule == {"condition": expected}, f"{name} -> {target}"
            if expected == "service_healthy":
                assert "healthcheck" in services[target], target
    assert services["worker-chat"]["healthcheck"] == services["worker-embed"]["healthcheck"]
    assert services["worker-chat"]["healthcheck"] == services["worker-gpu"]["healthcheck"]
    ready = {"redis", "rabbitmq", "keys"}
    for name in ("worker-chat", "worker-embed"):
        assert set(services[name]["depends_on"]) == ready | {"simulator"}
    assert set(services["worker-gpu"]["depends_on"]) == ready | {"vllm"}
    assert set(services["beat"]["depends_on"]) == ready
    assert set(services["flower"]["depends_on"]) == {"redis", "rabbitmq"}


def test_one_worker_per_lane_group_configured_only_by_instance_settings() -> None:
    services = load_compose(profiles=("gpu",))
    groups: dict[str, dict[str, Any]] = {}
    shared: list[dict[str, str]] = []
    for name in WORKERS:
        worker = services[name]
        env = environment(worker)
        group = env.pop("WORKER_GROUP")
        assert command(worker) == ["vllm-fleet", "worker", "--hostname", f"{group}@%h", "--loglevel", "INFO"]
        instances = json.loads(env.pop("VLLM_FLEET_INSTANCES"))
        assert len(instances) == 1, name
        groups[name] = next(iter(instances.values()))
        shared.append(env)
        assert worker["stop_grace_period"], name
    assert all(env == shared[0] for env in shared), "workers differ in more than their instance settings"
    assert groups["worker-chat"]["base_url"] == groups["worker-embed"]["base_url"] == "http://simulator:8000"
    assert groups["worker-chat"]["allow_models"] == [CHAT_MODEL]
    assert groups["worker-embed"]["allow_models"] == [EMBED_MODEL]
    assert groups["worker-gpu"]["base_url"] == "http://vllm:8000"
    simulator = command(services["simulator"])
    assert f"{CHAT_MODEL}:32768" in simulator
    assert f"{EMBED_MODEL}:256" in simulator
    assert environment(services["simulator"])["VLLM_SERVER_DEV_MODE"] == "1"


def test_exactly_one_beat() -> None:
    services = load_compose(profiles=("gpu",))
    beats = [name for name, service in services.items() if command(service)[:2] == ["vllm-fleet", "beat"]]
    assert beats == ["beat"]
    assert int(services["beat"].get("deploy", {}).get("replicas", 1)) == 1
    schedule = command(services["beat"])[command(services["beat"]).index("--schedule") + 1]
    assert any(target == str(Path(schedule).parent) for _, target, _ in volumes(services["beat"]))


def test_keys_live_in_named_volumes_mounted_read_only_by_role() -> None:
    services = load_compose(profiles=("gpu",))
    declared = set(raw_compose()["volumes"])
    for name, service in services.items():
        for source, _, _ in volumes(service):
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"

    def keys_of(name: str) -> dict[str, str]:
        return {source: mode for source, _, mode in volumes(services[name]) if source.startswith("keys-")}

    assert keys_of("keys") == {
        "keys-signing": "rw",
        "keys-verify": "rw",
        "keys-sealing": "rw",
        "keys-worker": "rw",
        "keys-response-verify": "rw",
    }
    for name in WORKERS:
        assert keys_of(name) == {"keys-verify": "ro", "keys-sealing": "ro", "keys-worker": "ro"}, name
        assert "SECURITY__SIGNING" not in " ".join(environment(services[name])), name
    assert keys_of("beat") == {"keys-signing": "ro", "keys-sealing": "ro", "keys-response-verify": "ro"}
    for name in ("simulator", "flower", "redis", "rabbitmq", "vllm"):
        assert keys_of(name) == {}, name
    script = command(services["keys"])
    assert script[:2] == ["sh", "-c"]
    assert "vllm-fleet keys generate" in script[2]


def test_no_secret_is_inlined() -> None:
    text = COMPOSE_FILE.read_text()
    assert "PRIVATE KEY" not in text
    assert "BEGIN" not in text
    for value in SECRETS.values():
        assert value not in text
    assert "guest" not in text
    secretive = re.compile(r"PASS|PASSWORD|AUTH|TOKEN|SECRET|API_KEY")
    raw = raw_compose()["services"]
    for name, service in raw.items():
        for key, value in environment(service).items():
            if secretive.search(key) or "@" in value:
                refs = re.findall(r"\$\{([A-Z_]+)(:?[-?])?([^}]*)\}", value)
                assert refs, f"{name}.{key} is inlined"
                for ref, op, default in refs:
                    if secretive.search(ref):
                        assert op in (":?", "?") or default == "", f"{name}.{key} defaults {ref}"
    flower = environment(load_compose()["flower"])
    assert flower["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    assert flower["FLOWER_BROKER_API"].startswith("http://")
    assert "@rabbitmq:15672/api/" in flower["FLOWER_BROKER_API"]
    assert "FLOWER_UNAUTHENTICATED_API" not in flower
    assert not any(k.startswith("VLLM_FLEET_SECURITY") for k in flower), "Flower needs no keys"


def test_rabbitmq_consumer_timeout_exceeds_every_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from celeryconfig import build_config
    from provider.settings import Settings

    services = load_compose(profiles=("gpu",))
    mounts = {source: (target, mode) for source, target, mode in volumes(services["rabbitmq"])}
    target, mode = mounts["./docker/rabbitmq.conf"]
    assert target.startswith("/etc/rabbitmq/conf.d/")
    assert target.endswith(".conf")
    assert mode == "ro"
    conf = dict(
        (part.strip() for part in line.split("=", 1))
        for line in RABBITMQ_CONF.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    timeout_ms = int(conf["consumer_timeout"])
    for name in sorted(os.environ):
        if name.startswith("VLLM_FLEET_"):
            monkeypatch.delenv(name)
    for name, service in services.items():
        env = {k: v for k, v in environment(service).items() if k.startswith("VLLM_FLEET_")}
        if not env:
            continue
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings()
        assert settings.broker_url.startswith("amqp://"), name
        limit_s = build_config(settings)["task_time_limit"]
        assert limit_s >= settings.timeouts.longest_s + CELERY_MARGIN_S
        assert timeout_ms > limit_s * 1000, f"{name}: consumer_timeout {timeout_ms} ms <= task time limit {limit_s} s"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts):
            return True
    return False


def test_dockerfile_builds_the_project_image_as_a_non_root_user() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    runs = " ".join(line for line in instructions if line.startswith("RUN "))
    assert 'pip install ".[simulator,flower]"' in runs
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    assert users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert "useradd" in runs
    assert users[-1] in runs
    for path in ("/keys/signing", "/keys/verify", "/keys/sealing", "/keys/worker", "/keys/response-verify", "/data"):
        assert path in runs, f"{path} must exist in the image, owned by the user (named volumes copy it)"

    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for line in instructions:
        if line.startswith(("COPY ", "ADD ")):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert not source.startswith("--"), line
                assert (ROOT / source).exists(), f"{source} does not exist"
                assert not _dockerignored(source, patterns), f"{source} is excluded by .dockerignore"
                assert "keys" not in Path(source).parts, "keys are never baked in"
                assert ".env" not in source, "secrets are never baked in"
                copied.add(source)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.split(".")[0] for name in project["tool"]["setuptools"]["packages"]}
    needed = {*packages, project["project"]["readme"], "pyproject.toml"}
    needed |= {f"{module}.py" for module in project["tool"]["setuptools"]["py-modules"]}
    assert needed <= copied, f"the image misses {needed - copied}"
    # The image installs the project for real (not editable): every sub-package must be declared.
    declared = set(project["tool"]["setuptools"]["packages"])
    for top in declared:
        for init in (ROOT / top.replace(".", "/")).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(ROOT).parts)
            assert package in declared, f"pyproject's packages miss {package}: the image would not have it"
    for private in ("keys", ".env", ".run", ".venv", ".git", "tests"):
        assert _dockerignored(private, patterns), f".dockerignore must exclude {private}"


# --- running the commands here --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_URL = re.compile(r"(?P<scheme>amqps?|pyamqp|rediss?|https?)://(?P<rest>[^\s\"'\]\\]+)")
_CONTAINER_PATH = re.compile(r"(?<![\w./:$-])(?P<path>" + "|".join(map(re.escape, CONTAINER_PATHS)) + r")(?=/|\b)")
_SHELL_PORT = re.compile(r"(?P<flag>(?:^|\s)(?:-p|--port)[ =])(?P<port>\d+)")


@dataclass
class Loopback:
    """Turns a service's command, environment and healthcheck into their loopback equivalents here."""

    services: dict[str, dict[str, Any]]
    tmp: Path
    amqp_url: str
    redis_base: str
    prefix: str
    ports: dict[tuple[str, int], int]

    def _url(self, service: str, match: re.Match[str]) -> str:
        url = match.group(0)
        scheme = match["scheme"]
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        if host in self.services:
            if scheme.startswith(("amqp", "pyamqp")):
                return self.amqp_url
            if scheme.startswith("redis"):
                return f"{self.redis_base}/{REDIS_DBS[int(parts.path.strip('/') or 0)]}"
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo + '@' if userinfo else ''}127.0.0.1:{self.ports[(host, port or 80)]}"
            return parts._replace(netloc=netloc).geturl()
        if host in ("127.0.0.1", "localhost") and (service, port) in self.ports:
            return parts._replace(netloc=f"127.0.0.1:{self.ports[(service, port or 80)]}").geturl()
        return url

    def text(self, service: str, value: str) -> str:
        value = _URL.sub(lambda m: self._url(service, m), value)
        value = _CONTAINER_PATH.sub(lambda m: str(self.tmp / m["path"].lstrip("/")), value)

        def port(match: re.Match[str]) -> str:
            mapped = self.ports.get((service, int(match["port"])))
            return match["flag"] + str(mapped if mapped else match["port"])

        return _SHELL_PORT.sub(port, value)

    def argv(self, service: str, argv: list[str]) -> list[str]:
        adapted = [self.text(service, arg) for arg in argv]
        for i, arg in enumerate(adapted):
            flag, eq, value = arg.partition("=")
            if flag in ("--port", "-p") and (eq or i + 1 < len(adapted)):
                number = value if eq else adapted[i + 1]
                if number.isdigit() and (service, int(number)) in self.ports:
                    mapped = str(self.ports[(service, int(number))])
                    if eq:
                        adapted[i] = f"{flag}={mapped}"
                    else:
                        adapted[i + 1] = mapped
            if flag in ("--host", "--address", "--bind"):
                if eq and value == "0.0.0.0":
                    adapted[i] = f"{flag}=127.0.0.1"
                elif not eq and i + 1 < len(adapted) and adapted[i + 1] == "0.0.0.0":
                    adapted[i + 1] = "127.0.0.1"
        return adapted

    def env(self, service: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_FLEET_", "FLOWER_", "CELERY_"))}
        base.update(PATH=f"{BIN}{os.pathsep}{base.get('PATH', '')}", HOSTNAME=socket.gethostname())
        base["PYTHONUNBUFFERED"] = "1"
        declared = environment(self.services[service])
        base.update({key: self.text(service, value) for key, value in declared.items()})
        if any(key.startswith("VLLM_FLEET_") for key in declared):
            base["VLLM_FLEET_KEY_PREFIX"] = self.prefix
        return base

    def run(
        self, service: str, argv: list[str], timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(service, argv),
            env=self.env(service),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def healthcheck(self, service: str) -> Completed:
        return self.run(service, health_argv(self.services[service]))


@dataclass
class Process:
    """One long-running service command, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class Stack:
    """The composed fleet, running here."""

    loop: Loopback
    keys_runs: list[subprocess.CompletedProcess[str]]
    processes: dict[str, Process] = field(default_factory=dict)

    def start(self, service: str) -> Process:
        argv = self.loop.argv(service, command(self.loop.services[service]))
        log = self.loop.tmp / f"{service}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                argv, env=self.loop.env(service), cwd=self.loop.tmp, stdout=sink, stderr=subprocess.STDOUT
            )
        self.processes[service] = Process(service, process, log)
        return self.processes[service]

    def url(self, service: str, port: int) -> str:
        return f"http://127.0.0.1:{self.loop.ports[(service, port)]}"

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.output()[-3000:]}" for name, p in self.processes.items())


def wait_until(predicate: Any, what: str, stack: Stack | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
    try:
        shared_wait_until(predicate, timeout_s, what, interval_s=0.1, ignore=(Exception,))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs() if stack else ''}") from None


def _answers(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


def _require_binary(name: str) -> None:
    if shutil.which(name) is None:
        message = f"{name} is not installed here (scripts/services.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def test_redis_command_and_healthcheck(tmp_path: Path) -> None:
    _require_binary("redis-server")
    services = load_compose()
    port = _free_port()
    loop = Loopback(services, tmp_path, "", "", "", {("redis", 6379): port})
    argv = [*command(services["redis"]), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=loop.env("redis"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: loop.healthcheck("redis").returncode == 0, "redis answering its healthcheck")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        client = redis.Redis(host="127.0.0.1", port=port, password=SECRETS["REDIS_PASSWORD"])
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.set("ops", "1")
        wait_until(lambda: any(tmp_path.rglob("*.aof")), "an append-only file")
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline
        assert SECRETS["REDIS_PASSWORD"].encode() not in cmdline  # the process list never shows it
    finally:
        process.terminate()
        process.wait(timeout=10)


_READ_AND_HALT = (
    "Timeout = application:get_env(rabbit, consumer_timeout), "
    "spawn(fun() -> timer:sleep(200), rabbit:stop_and_halt() end), Timeout."
)


def test_rabbitmq_boots_with_the_mounted_config() -> None:
    """A throwaway node with docker/rabbitmq.conf: cuttlefish rejects any key it does not know."""
    _require_binary("rabbitmq-server")
    server, ctl = str(shutil.which("rabbitmq-server")), str(shutil.which("rabbitmqctl"))
    node = f"opsconf{os.getpid()}@localhost"
    root = Path(tempfile.mkdtemp(prefix="ops-rabbit-"))
    try:
        shutil.copy(RABBITMQ_CONF, root / "rabbitmq.conf")
        (root / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:  # Debian's wrapper drops to the rabbitmq user
            with contextlib.suppress(LookupError, OSError):
                for path in (root, root / "rabbitmq.conf", root / "enabled_plugins"):
                    shutil.chown(path, "rabbitmq", "rabbitmq")
        amqp_port = _free_port()
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(root / "node.pid"),
        }
        halting = False
        process = subprocess.Popen(
            [server], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:

            def listening() -> bool:  # the AMQP listener opens once the node has booted with the config
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                with socket.create_connection(("127.0.0.1", amqp_port), timeout=0.5):
                    return True

            wait_until(listening, "the node booting with docker/rabbitmq.conf", timeout_s=60)
            # One CLI call (an Erlang VM start each): read the setting, then halt the node.
            answer = subprocess.run(
                [ctl, "-q", "-n", node, "eval", _READ_AND_HALT], capture_output=True, text=True, timeout=30
            )
            halting = answer.returncode == 0
            assert answer.stdout.strip() == "{ok,3600000}", answer.stderr
        finally:
            if process.poll() is None and not halting:
                subprocess.run([ctl, "-q", "-n", node, "stop"], capture_output=True, timeout=30)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ops_vhost() -> Iterator[str]:
    """A private RabbitMQ vhost: the composed lanes are declared with the file's own limits."""
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    _rabbitmqctl("delete_vhost", OPS_VHOST, check=False)
    _rabbitmqctl("add_vhost", OPS_VHOST)
    _rabbitmqctl("set_permissions", "-p", OPS_VHOST, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{OPS_VHOST}"
    _rabbitmqctl("delete_vhost", OPS_VHOST, check=False)


@pytest.fixture(scope="module")
def stack(ops_vhost: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Keys, simulator, three workers, Beat and Flower from the compose file, on loopback."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    services = load_compose(profiles=("gpu",))
    sim_port = _free_port()
    ports = {
        ("simulator", 8000): sim_port,
        ("vllm", 8000): sim_port,  # the simulator plays vLLM for the gpu worker
        ("flower", 5555): _free_port(),
        ("rabbitmq", 15672): _free_port(),  # nothing listens: Flower only needs it for its Broker page
    }
    prefix = f"vft-ops-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("compose")
    (tmp / "data").mkdir()
    loop = Loopback(services, tmp, ops_vhost, f"redis://{REDIS_HOST}:{REDIS_PORT}", prefix, ports)
    stack = Stack(loop, [])
    try:
        stack.start("simulator")
        keys_command = command(services["keys"])  # twice: the second run must leave the keys alone
        stack.keys_runs += [loop.run("keys", keys_command), loop.run("keys", keys_command)]
        wait_until(lambda: _answers(stack.url("simulator", 8000) + "/health"), "the simulator answering", stack)
        for name in (*WORKERS, "beat", "flower"):
            stack.start(name)
        yield stack
    finally:
        for process in stack.processes.values():  # warm shutdowns run side by side
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        for process in stack.processes.values():
            process.stop()
        state = redis.Redis.from_url(f"{loop.redis_base}/{STATE_DB}")
        for key in state.scan_iter(f"{prefix}*"):
            state.delete(key)


def test_keys_service_generates_keys_once(stack: Stack) -> None:
    first, second = stack.keys_runs
    assert first.returncode == 0, first.stderr
    assert "PRIVATE" not in first.stdout + first.stderr, "key material must never reach the logs"
    keys = stack.loop.tmp / "keys"
    for name in KEY_FILES:
        path = keys / name
        assert path.is_file(), name
        assert path.stat().st_mode & 0o777 == 0o600, name
    assert second.returncode == 0, second.stderr
    assert "already present" in second.stdout
    assert (keys / "signing" / "k1.pem").read_text() not in second.stdout


def test_simulator_serves_the_composed_models(stack: Stack) -> None:
    models = httpx.get(stack.url("simulator", 8000) + "/v1/models", timeout=5).json()
    assert {model["id"] for model in models["data"]} >= {CHAT_MODEL, EMBED_MODEL}


def _offerings(stack: Stack) -> dict[str, set[str]]:
    from provider.fleet.redis_keys import RedisKeys
    from provider.fleet.registry import OfferingRegistry

    client = redis.Redis.from_url(f"{stack.loop.redis_base}/{STATE_DB}")
    served: dict[str, set[str]] = {}
    for offering in OfferingRegistry(client, RedisKeys(stack.loop.prefix)).all():
        served.setdefault(offering.instance_id, set()).add(offering.model)
    return served


def test_workers_register_and_consume_their_lane_groups(stack: Stack) -> None:
    expected = {"sim-chat": {CHAT_MODEL}, "sim-embed": {EMBED_MODEL}, "gpu-1": {CHAT_MODEL, EMBED_MODEL}}
    wait_until(lambda: _offerings(stack) == expected, "every worker registering its offerings", stack)
    host = socket.gethostname()
    gpu_processes = default_process_count([64])  # VLLM_CONCURRENCY's default: one process per core here
    gpu_nodes = {f"gpu@{host}"} if gpu_processes == 1 else {f"gpu-{i}@{host}" for i in range(1, gpu_processes + 1)}
    wanted = {f"chat@{host}", f"embed@{host}", *gpu_nodes}

    def consumed() -> dict[str, set[str]]:
        answer = stack.loop.run("worker-chat", ["celery", "-A", "tasks.app", "inspect", "active_queues", "-j"])
        queues = json.loads(answer.stdout.strip().splitlines()[-1])
        return {node: {queue["name"] for queue in found} for node, found in queues.items()}

    lanes: dict[str, set[str]] = {}

    def all_lanes() -> bool:
        lanes.update(consumed())
        inference = [lane for lane in lanes.get(f"chat@{host}", set()) if lane.startswith("llm.fleet.inference.")]
        embeds = [lane for lane in lanes.get(f"embed@{host}", set()) if lane.startswith("llm.fleet.embed.")]
        return set(lanes) >= wanted and bool(inference) and bool(embeds)

    wait_until(all_lanes, "every worker consuming its lanes", stack)
    assert not any(lane.startswith("llm.fleet.embed.") for lane in lanes[f"chat@{host}"])
    assert not any(lane.startswith("llm.fleet.inference.") for lane in lanes[f"embed@{host}"])
    for node in gpu_nodes:
        assert any(lane.startswith("llm.fleet.inference.") for lane in lanes[node])


def test_beat_environment_produces_work_the_workers_verify(stack: Stack) -> None:
    """Beat's environment is a producer's: signing and sealing keys, and the workers verify what it signs."""
    wait_until(lambda: len(_offerings(stack)) == 3, "the workers registering", stack)
    chat = stack.loop.run("beat", ["vllm-fleet", "chat", CHAT_MODEL, "hello from compose", "--max-tokens", "32"])
    assert chat.returncode == 0, chat.stderr + stack.logs()
    assert "hello from compose" in chat.stdout
    embed = stack.loop.run("beat", ["vllm-fleet", "embed", EMBED_MODEL, "one line"])
    assert embed.returncode == 0, embed.stderr
    assert "dim=" in embed.stdout


def test_beat_starts(stack: Stack) -> None:
    beat = stack.processes["beat"]
    wait_until(lambda: "beat: Starting" in beat.output(), "beat starting", stack)
    time.sleep(0.5)
    assert beat.process.poll() is None, beat.output()


def test_flower_answers_behind_basic_auth(stack: Stack) -> None:
    base = stack.url("flower", 5555)
    wait_until(lambda: _answers(base + "/healthcheck"), "flower answering", stack)
    assert httpx.get(base + "/api/workers", timeout=5).status_code == 401
    user, password = SECRETS["FLOWER_BASIC_AUTH"].split(":")
    assert httpx.get(base + "/api/workers", auth=(user, "wrong"), timeout=5).status_code == 401
    host = socket.gethostname()

    def sees_workers() -> bool:
        workers = httpx.get(base + "/api/workers?refresh=1", auth=(user, password), timeout=10).json()
        return {f"chat@{host}", f"embed@{host}"} <= set(workers)

    wait_until(sees_workers, "flower listing the workers", stack)


def test_every_healthcheck_passes_here(stack: Stack) -> None:
    host = socket.gethostname()
    wait_until(lambda: len(_offerings(stack)) == 3, "the workers registering", stack)
    wait_until(lambda: _answers(stack.url("flower", 5555) + "/healthcheck"), "flower answering", stack)
    # The workers share one healthcheck: worker-gpu's instance (64 slots) makes it a group of processes here.
    probed = ("simulator", "worker-chat", "worker-gpu", "flower", "rabbitmq")
    with ThreadPoolExecutor(len(probed)) as pool:
        results = dict(zip(probed, pool.map(stack.loop.healthcheck, probed), strict=True))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    assert f"chat@{host}" in results["worker-chat"].stdout
    gpu_node = f"gpu@{host}" if default_process_count([64]) == 1 else f"gpu-1@{host}"
    assert gpu_node in results["worker-gpu"].stdout
