"""Discovery: which instances a worker serves and which offerings each one has right now.

vLLM's /v1/models lists served names and context windows but not what a model is for. A model whose
capabilities the settings do not give is probed once per discovery with a one-word embedding request:
a pooling model answers it, a generate model answers 404.
"""

from __future__ import annotations

import logging
import socket
import threading

from provider.client import VllmClient, probe
from provider.errors import ProviderError
from provider.lanes import slug
from provider.models import EmbedRequest
from provider.offerings import Offering, normalize_capabilities, offerings_for_instance
from provider.settings import InstanceSettings, Settings, normalize_base_url

__all__ = [
    "EMBEDDING_PROBE_TIMEOUT_S",
    "discover_offerings",
    "instances_to_serve",
    "localhost_instance_name",
    "no_instances_reason",
]

log = logging.getLogger("provider.discovery")


def localhost_instance_name() -> str:
    """The name of a vLLM found on localhost: unique per host, since every GPU host may have one."""
    return f"{slug(socket.gethostname()) or 'host'}-localhost"


EMBEDDING_PROBE_TIMEOUT_S = 5.0


def instances_to_serve(settings: Settings) -> list[InstanceSettings]:
    """Configured, enabled instances, plus a server answering on localhost:8000 when none is configured there."""
    instances = settings.usable_instances()
    local_url = normalize_base_url(settings.localhost_url)
    unconfigured = all(i.base_url != local_url for i in instances)
    if settings.probe_localhost and unconfigured and probe(local_url, timeout_s=settings.localhost_probe_timeout_s):
        log.info("found a vLLM server on %s", local_url)
        instances.append(InstanceSettings(name=localhost_instance_name(), base_url=local_url))
    return instances


def no_instances_reason(settings: Settings) -> str:
    """Why a worker has nothing to serve, and how to configure it."""
    found = (
        f"no vLLM answers on {normalize_base_url(settings.localhost_url)}"
        if settings.probe_localhost
        else "probing localhost is off (VLLM_FLEET_PROBE_LOCALHOST=false)"
    )
    configured = "has no enabled instance with a base_url" if settings.instances else "is empty"
    return (
        f"no vLLM instance to serve: VLLM_FLEET_INSTANCES {configured} and {found}; set for example "
        """VLLM_FLEET_INSTANCES='{"gpu-1": {"base_url": "http://HOST:8000", "concurrency": 16}}'"""
    )


_probed: dict[tuple[str, str], bool] = {}
_probed_lock = threading.Lock()


def _is_embedding_model(client: VllmClient, instance: InstanceSettings, model: str) -> bool:
    """Settings first; else one probe per (server, model), remembered: a model's kind does not change while it is
    served, and a transient failure must not turn an embedding model into a chat one (its lanes would move).
    A retryable probe failure raises, so the refresh keeps the instance's offerings and tries again later."""
    configured = instance.model_capabilities.get(model)
    if configured is not None:
        return "embedding" in normalize_capabilities(configured)
    key = (instance.base_url, model)
    with _probed_lock:
        known = _probed.get(key)
    if known is not None:
        return known
    try:
        client.embed(EmbedRequest(model=model, input="ping"), timeout_s=EMBEDDING_PROBE_TIMEOUT_S)
        embedding = True
    except ProviderError as exc:
        if exc.retryable:
            raise
        embedding = False  # a generate model answers 404 (or 400): it is not an embedding model
    with _probed_lock:
        _probed[key] = embedding
    return embedding


def discover_offerings(client: VllmClient, instance: InstanceSettings, settings: Settings) -> list[Offering]:
    """The offerings an instance serves now (raises ``ProviderError`` when it cannot be reached)."""
    entries = []
    for info in client.list_models():
        entry = info.model_dump(mode="json")
        if info.parent is None:
            entry["is_embedding"] = _is_embedding_model(client, instance, info.id)
        entries.append(entry)
    return offerings_for_instance(
        instance,
        entries,
        settings.model_aliases,
        allow=settings.allow_models,
        deny=settings.deny_models,
    )
