"""Discovery: which instances a worker serves and which offerings each one has right now.

vLLM's /v1/models lists served names and context windows but not what a model is for. A model whose
capabilities the settings do not give is probed once per discovery with a one-word embedding request:
a pooling model answers it, a generate model answers 404. A model the settings say serves ``tools`` is
checked once with a one-token tools request: a server started without a tool-call parser refuses it
(``"auto" tool choice requires --enable-auto-tool-choice ...``), and its offering then goes without ``tools``,
so tool requests never reach it.
"""

from __future__ import annotations

import logging
import socket
import threading

from provider.fleet.lanes import slug
from provider.fleet.offerings import Offering, normalize_capabilities, offerings_for_instance
from provider.settings import InstanceSettings, Settings, normalize_base_url
from provider.vllm.client import VllmClient, probe
from provider.vllm.errors import ProviderError
from provider.vllm.models import ChatRequest, EmbedRequest

__all__ = [
    "EMBEDDING_PROBE_TIMEOUT_S",
    "NO_TOOL_PARSER_HINT",
    "discover_offerings",
    "instances_to_serve",
    "localhost_instance_name",
    "no_instances_reason",
]

log = logging.getLogger("provider.vllm.discovery")


def localhost_instance_name() -> str:
    """The name of a vLLM found on localhost: unique per host, since every GPU host may have one."""
    return f"{slug(socket.gethostname()) or 'host'}-localhost"


EMBEDDING_PROBE_TIMEOUT_S = 5.0
# In vLLM's 400 for tools on a server without a tool-call parser.
NO_TOOL_PARSER_HINT = "--enable-auto-tool-choice"
_PROBE_TOOL = {"type": "function", "function": {"name": "fleet_probe", "parameters": {"type": "object"}}}


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


_tool_probes: dict[tuple[str, str], bool] = {}


def _serves_tools(client: VllmClient, instance: InstanceSettings, model: str) -> bool:
    """Whether the server takes tools with an ``auto`` tool choice (it has a tool-call parser); one probe per
    (server, model), remembered. A transient failure says nothing: the settings' claim stands until asked again."""
    key = (instance.base_url, model)
    with _probed_lock:
        known = _tool_probes.get(key)
    if known is not None:
        return known
    probe_request = ChatRequest(
        model=model,
        messages=[{"role": "user", "content": "ping"}],
        tools=[_PROBE_TOOL],
        tool_choice="auto",
        max_tokens=1,
    )
    try:
        client.chat(probe_request, timeout_s=EMBEDDING_PROBE_TIMEOUT_S)
        serves = True
    except ProviderError as exc:
        if exc.retryable:
            return True
        serves = NO_TOOL_PARSER_HINT not in exc.message
    if not serves:
        log.warning("instance %s claims tools for %s but its vLLM has no tool-call parser", instance.name, model)
    with _probed_lock:
        _tool_probes[key] = serves
    return serves


def _checked_tools(client: VllmClient, instance: InstanceSettings, offering: Offering) -> Offering:
    """The offering, without ``tools`` when its server turns tools away."""
    if "tools" not in offering.capabilities or offering.usage_type != "inference":
        return offering
    if _serves_tools(client, instance, offering.model):
        return offering
    kept = tuple(cap for cap in offering.capabilities if cap != "tools")
    return offering.model_copy(update={"capabilities": kept})


def discover_offerings(client: VllmClient, instance: InstanceSettings, settings: Settings) -> list[Offering]:
    """The offerings an instance serves now (raises ``ProviderError`` when it cannot be reached)."""
    entries = []
    for info in client.list_models():
        entry = info.model_dump(mode="json")
        if info.parent is None:
            entry["is_embedding"] = _is_embedding_model(client, instance, info.id)
        entries.append(entry)
    offerings = offerings_for_instance(
        instance,
        entries,
        settings.model_aliases,
        allow=settings.allow_models,
        deny=settings.deny_models,
    )
    return [_checked_tools(client, instance, offering) for offering in offerings]
