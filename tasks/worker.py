"""The worker side of the fleet: the instances a worker serves, the lanes it consumes, and its heartbeat.

A worker needs only instance settings. At start (a consumer bootstep) it discovers each instance's models,
writes their offerings and its management queues to the registry, and consumes exactly those lanes; a
heartbeat renews the registry entries, and a refresh (``vllm.discover``, ``vllm.wake_up``, and a retry on a
short backoff for an instance without offerings) adds or cancels consumers to match.

Every call to an instance goes through its circuit breaker (shared in Redis). While an instance's circuit is
open, or its vLLM reports more waiting requests or KV-cache use than configured, the worker stops consuming
that instance's lanes (queued work stays in the shared lane for workers with room) and resumes when it
recovers; work already taken when the circuit opens is handed back to its lane. What changes is published
as registry events.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery import bootsteps
from redis import Redis

from provider.fleet.capacity import CapacityGate
from provider.fleet.events import RegistryEvent, RegistryEventError
from provider.fleet.health import HealthTracker
from provider.fleet.lanes import LaneStyle, parse_lane, slug
from provider.fleet.names import MANAGEMENT_QUEUE_PREFIX
from provider.fleet.offerings import Offering
from provider.protocol import OperationNotAllowedError
from provider.protocol.ledger import holder_client_name
from provider.settings import InstanceSettings
from provider.vllm.client import VllmClient
from provider.vllm.discovery import discover_offerings, instances_to_serve, no_instances_reason
from provider.vllm.errors import ProviderError, ProviderTimeoutError
from tasks.event_bus import EventBus
from tasks.logs import install
from tasks.metrics import CIRCUIT_OPEN, CIRCUIT_VALUES, IN_FLIGHT, serve_metrics
from tasks.queues import management_queue_name
from tasks.routing import invalidate_route_cache, queue_for
from tasks.runtime import FleetRuntime, runtime

__all__ = ["FleetConsumerStep", "HandBack", "ServedInstance", "WorkerFleet", "worker_fleet"]

log = logging.getLogger("tasks.worker")
_T = TypeVar("_T")
# A model detail the cache lacks costs one /v1/models call, bounded by this.
MODEL_DETAIL_TIMEOUT_S = 2.0
_LANE_OPERATIONS = {"inference": {"chat", "stream_chat"}, "embed": {"embed"}}
_FLEET_CAPABILITY = {"chat": "chat", "stream_chat": "stream_chat", "embed": "embed"}


class HandBack(Exception):
    """This worker's instance cannot serve now; the message goes back to its lane for another worker.

    ``tried``: the request was sent to the instance and failed. Only such hand-backs count towards the lane's
    delivery limit (a request that keeps failing is poison); one handed back untried (an open circuit, a lane
    this worker no longer serves) says nothing about the request and is bounded by its deadline instead.
    """

    def __init__(self, message: str, *, tried: bool = False) -> None:
        super().__init__(message)
        self.tried = tried


@dataclass
class ServedInstance:
    """One vLLM instance served by this worker."""

    settings: InstanceSettings
    client: VllmClient
    queue: str
    health: HealthTracker
    gate: CapacityGate
    offerings: list[Offering] = field(default_factory=list)
    live: bool = True
    _slots: threading.BoundedSemaphore = field(init=False)
    # Fast path: while the shared state last read was "closed, no failures", a call needs no Redis round trip
    # before or after it; latencies are summed here and written once per capacity check (``sync_health``).
    _known_healthy: bool = field(init=False, default=False)
    _latency_sum_s: float = field(init=False, default=0.0)
    _latency_count: int = field(init=False, default=0)
    _health_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.settings.concurrency)

    @property
    def name(self) -> str:
        """The instance's configured name."""
        return self.settings.name

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the instance's concurrency slots for the length of a request."""
        gauge = IN_FLIGHT.labels(instance=self.name)
        with self._slots:
            gauge.inc()
            try:
                yield
            finally:
                gauge.dec()

    def guarded(self, call: Callable[[float], _T], time_left_s: float, *, count_failure: bool = True) -> _T:
        """Run one call through the instance's circuit breaker; an open circuit hands the work back.

        ``count_failure=False`` (a retry of a request whose earlier attempt already failed) does not count a
        failure again: a short blip seen by one request's retries does not open the circuit.
        """
        if not self._known_healthy and not self.health.allow(self.name, time_left_s):
            raise HandBack(f"the circuit of instance {self.name} is open")
        started = time.monotonic()
        try:
            result = call(time_left_s)
        except ProviderError as exc:
            if not exc.retryable:  # the instance answered: it is healthy, the request was not
                self._succeeded(time.monotonic() - started)
                raise
            self._known_healthy = False
            if isinstance(exc, ProviderTimeoutError) and time_left_s < self.health.probe_min_time_left_s:
                raise  # cut short by the request's own deadline: it says nothing about the instance
            if count_failure:
                circuit = self.health.record_failure(self.name, exc.code)
            else:
                circuit = self.health.state(self.name).circuit
            if circuit == "open":
                raise HandBack(f"instance {self.name} failed {exc.code}; its circuit opened", tried=True) from exc
            raise
        self._succeeded(time.monotonic() - started)
        return result

    def _succeeded(self, latency_s: float) -> None:
        if self._known_healthy:
            with self._health_lock:
                self._latency_sum_s += latency_s
                self._latency_count += 1
            return
        self._known_healthy = self.health.record_success(self.name, latency_s) == "closed"

    def sync_health(self) -> None:
        """Write the latencies summed since the last sync, and re-read the shared circuit state."""
        with self._health_lock:
            total_s, count = self._latency_sum_s, self._latency_count
            self._latency_sum_s, self._latency_count = 0.0, 0
        if count:
            self.health.record_success(self.name, total_s / count)
        state = self.health.state(self.name)
        self._known_healthy = state.circuit == "closed" and state.consecutive_failures == 0

    def accepting(self) -> bool:
        """Whether this instance should take more work: circuit not open and below its capacity thresholds."""
        return self.health.state(self.name).circuit != "open" and not self.gate.should_pause()

    def context_window(self, model: str) -> int | None:
        """The context window this instance serves ``model`` with (by id or alias), when known: from its offerings,
        else from the client's model detail (``/v1/models``, cached 24 h, warmed by discovery; a miss is not cached)."""
        for offering in self.offerings:
            if model in (offering.model, offering.canonical_alias) and offering.context_window is not None:
                return offering.context_window
        try:
            return self.client.model_detail(model, timeout_s=MODEL_DETAIL_TIMEOUT_S).context_window
        except ProviderError:
            return None

    def lanes(self, style: LaneStyle) -> list[str]:
        """The lanes this instance's offerings serve, for the fleet operations it allows."""
        if not self.settings.fleet.respond_to_requests:
            return []
        allowed = set(self.settings.fleet.capabilities)
        lanes: list[str] = []
        for offering in self.offerings:
            if not offering.enabled:
                continue
            wants = {"embed"} if offering.usage_type == "embedding" else {"chat", "stream_chat"}
            if wants & allowed:
                lanes.append(offering.lane(style))
                if style == "shared":  # requests needing tools (or vision) only reach instances that have them
                    lanes.extend(offering.capability_lanes())
        return lanes


class LeaseKeeper:
    """Renews the jti leases of requests running in this process, so a dead worker's leases lapse quickly.

    The heartbeat and the renewals go over a Redis connection of their own, named after the holder
    (``CLIENT SETNAME``): a busy request pool never delays them, and while this process lives that connection is
    listed by ``CLIENT LIST``, so a redelivered copy never takes over its leases even if a heartbeat comes late.
    """

    def __init__(self, rt: FleetRuntime) -> None:
        self._rt = rt
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._client: Redis | None = None

    @property
    def client(self) -> Redis:
        """This holder's own named connection (made on first use, in the process that uses it)."""
        if self._client is None:
            self._client = Redis.from_url(
                self._rt.settings.redis_url,
                client_name=holder_client_name(self._rt.holder),
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
                max_connections=2,
            )
        return self._client

    def hold(self, jti: str) -> None:
        """Keep renewing this jti's lease until ``drop``."""
        with self._lock:
            self._held.add(jti)

    def drop(self, jti: str) -> None:
        """Stop renewing (the request finished or was handed back)."""
        with self._lock:
            self._held.discard(jti)

    def renew_all(self) -> int:
        """One renewal round, one round trip: how many leases were renewed."""
        with self._lock:
            held = list(self._held)
        return sum(self._rt.ledger.renew_many(held, self._rt.holder, client=self.client))

    def heartbeat(self) -> None:
        """Say this worker process is alive (a redelivered copy of its work waits for it while it is)."""
        self._rt.ledger.heartbeat(self._rt.holder, self._rt.settings.holder_ttl_s, client=self.client)


def touch_held_messages(rt: FleetRuntime) -> int:
    """Redis broker: mark the messages this worker holds (reserved or running) as just delivered.

    kombu gives an unacked message to another worker once it is older than the visibility timeout; touching
    them keeps a live worker's messages, so that timeout can be short and only a dead worker's messages come
    back. ``ZADD XX`` never re-adds a message kombu already restored or that was acked.
    """
    from celery.worker import state as worker_state

    held = (*worker_state.reserved_requests, *worker_state.active_requests)
    tags = [str(tag) for request in held if (tag := _delivery_tag(request)) is not None]
    rt.broker.touch_unacked(tags)
    return len(tags)


def _delivery_tag(request: Any) -> object | None:
    message = getattr(request, "message", None)
    return getattr(message, "delivery_tag", None)


class WorkerFleet:
    """The instances of this worker process and the lanes they serve."""

    def __init__(self, rt: FleetRuntime) -> None:
        self.rt = rt
        self.leases = LeaseKeeper(rt)
        self.instances: dict[str, ServedInstance] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.hostname: str | None = None
        self.consuming: set[str] = set()
        self.bus: EventBus = rt.broker.event_bus(rt.redis, rt.keys, maxlen=rt.settings.events_stream_max_len)
        self._accepting: dict[str, bool] = {}
        self._reconcile_lock = threading.Lock()

    def start(self) -> list[str]:
        """Discover every instance (concurrently), register offerings, and return the queues to consume."""
        settings = self.rt.settings
        if not settings.security.encrypt:
            log.warning("envelope encryption is OFF (security.encrypt=false): payloads and results travel in clear")
        health = HealthTracker.from_settings(self.rt.redis, settings)
        for instance in instances_to_serve(settings):
            client = VllmClient(
                instance,
                enable_thinking=settings.thinking_default(instance),
                model_cache_ttl_s=settings.model_cache_ttl_s,
                timeouts=settings.timeouts,
            )
            gate = CapacityGate.from_settings(client.metrics, settings)
            queue = management_queue_name(slug(instance.name))
            self.instances[instance.name] = ServedInstance(instance, client, queue, health, gate)
        if self.instances:
            with ThreadPoolExecutor(max_workers=len(self.instances), thread_name_prefix="fleet-discovery") as pool:
                list(pool.map(self.refresh, list(self.instances)))
        self.leases.heartbeat()
        for target, name in ((self._beat, "fleet-heartbeat"), (self._renew_leases, "fleet-leases")):
            threading.Thread(target=target, name=name, daemon=True).start()
        if self.rt.broker.redelivers_unacked_after_visibility:
            threading.Thread(target=self._touch_messages, name="fleet-visibility", daemon=True).start()
        threading.Thread(target=self._watch_capacity, name="fleet-capacity", daemon=True).start()
        threading.Thread(target=self._retry_discovery, name="fleet-rediscovery", daemon=True).start()
        return self.queues()

    def _undiscovered(self) -> list[str]:
        """Instances with no offerings yet, or unreachable at their last discovery."""
        return [name for name, served in self.instances.items() if not served.offerings or not served.live]

    def _retry_discovery(self) -> None:
        """Discover instances that have no offerings (or were unreachable) again, on a short doubling backoff, so
        a worker started while its vLLM slept or loaded offers its models soon after, not at the next Beat."""
        settings = self.rt.settings
        delay_s = settings.discovery_retry_s
        while not self._stop.wait(delay_s):
            missing = self._undiscovered()
            for name in missing:
                try:
                    self.refresh(name)
                except Exception:  # a retry round must never kill the worker
                    log.exception("discovery retry failed for %s", name)
            still_missing = bool(missing) and bool(self._undiscovered())
            delay_s = min(delay_s * 2, settings.discovery_retry_max_s) if still_missing else settings.discovery_retry_s

    def _renew_leases(self) -> None:
        """Heartbeat every quarter of ``holder_ttl_s``; renew the leases every third of ``lease_s``."""
        settings = self.rt.settings
        interval = max(0.05, min(settings.lease_s / 3, settings.holder_ttl_s / 4))
        renew_every = max(1, round(settings.lease_s / 3 / interval))
        rounds = 0
        while not self._stop.wait(interval):
            rounds += 1
            try:
                self.leases.heartbeat()
                if rounds % renew_every == 0:
                    self.leases.renew_all()
            except Exception:  # a renewal round must never kill the worker
                log.exception("lease renewal failed")

    def _touch_messages(self) -> None:
        """Redis broker: keep this worker's unacked messages from coming back while it is alive."""
        from celery import current_app

        visibility_s = float(current_app.conf.broker_transport_options.get("visibility_timeout") or 5)
        while not self._stop.wait(max(0.2, visibility_s / 3)):
            try:
                touch_held_messages(self.rt)
            except Exception:  # the broker may be down: the worker reconnects by itself
                log.warning("could not touch held messages", exc_info=True)

    def refresh(self, name: str) -> list[Offering]:
        """Re-read one instance's models and rewrite its offerings; publish what changed.

        An unreachable instance keeps its offerings, marked unavailable (routers stop sending to them).
        """
        served = self.instances[name]
        settings = self.rt.settings
        before = {o.offering_id: o for o in served.offerings}
        try:
            offerings = discover_offerings(served.client, served.settings, settings)
            served.live = True
        except ProviderError as exc:
            log.warning("instance %s unreachable during discovery: %s", name, exc.code)
            served.live = False
            offerings = [_with_status(o, "unavailable") for o in served.offerings]
        after = {o.offering_id: o for o in offerings}
        served.offerings = offerings
        self.rt.registry.unregister(set(before) - set(after))
        self._register(served)
        for offering_id, offering in after.items():
            was = before.get(offering_id)
            if was is None or was.status != offering.status:
                self._publish(
                    served,
                    offering,
                    "offering_unavailable" if offering.status == "unavailable" else "offering_available",
                )
        for offering_id in set(before) - set(after):
            self._publish(served, _with_status(before[offering_id], "unavailable"), "offering_unavailable")
        invalidate_route_cache()
        self.reconcile()
        return offerings

    def _publish(self, served: ServedInstance, offering: Offering, event_type: str) -> None:
        """Publish one registry event, best effort (the bus never blocks and never raises for transport)."""
        state = served.health.state(served.name)
        try:
            self.bus.publish(
                RegistryEvent.build(
                    event_type,
                    offering,
                    runtime={"provider": "vllm", "tier": served.settings.resolved_tier, "live": served.live},
                    capacity={
                        "concurrency": served.settings.concurrency,
                        "accepting": self._accepting.get(served.name, True),
                    },
                    health={"circuit": state.circuit, "consecutive_failures": state.consecutive_failures},
                    lane=offering.lane(self.rt.settings.lanes.style),
                )
            )
        except RegistryEventError:
            log.exception("a registry event was refused by the sanitizer")

    def _watch_capacity(self) -> None:
        """Pause and resume consumers as instances' circuits and load change."""
        interval = self.rt.settings.capacity_check_interval_s
        while not self._stop.wait(interval):
            try:
                self.reconcile()
            except Exception:  # the watcher must never kill the worker
                log.exception("capacity check failed")

    def reconcile(self) -> None:
        """Consume the lanes of instances that accept work; publish degraded/available on every change."""
        with self._reconcile_lock:
            for served in self.instances.values():
                served.sync_health()
                self._mark_circuit(served)
                accepting = served.live and served.accepting()
                CIRCUIT_OPEN.labels(instance=served.name).set(
                    CIRCUIT_VALUES.get(served.health.state(served.name).circuit, 0)
                )
                if self._accepting.get(served.name, True) != accepting:
                    log.warning("instance %s %s", served.name, "accepts work again" if accepting else "paused")
                    for offering in served.offerings:
                        self._publish(served, offering, "offering_available" if accepting else "offering_degraded")
                self._accepting[served.name] = accepting
            self._follow_lanes()

    def _mark_circuit(self, served: ServedInstance) -> None:
        """Offerings of an instance whose circuit is open read ``degraded`` in the registry (producers route
        elsewhere or fail fast with ``fleet_unavailable``), and ``available`` again once it half-opens."""
        if not served.live:
            return  # discovery marked them unavailable
        wanted = "degraded" if served.health.state(served.name).circuit == "open" else "available"
        if all(offering.status == wanted for offering in served.offerings):
            return
        served.offerings = [_with_status(offering, wanted) for offering in served.offerings]
        self._register(served)
        invalidate_route_cache()

    def _follow_lanes(self) -> None:
        """Add consumers for new lanes and cancel those no instance here serves any more."""
        if self.hostname is None:
            return  # not consuming yet: the bootstep consumes ``queues()`` when it starts
        from tasks.app import app

        # Through Celery's remote control, so the change runs inside the consumer's own event loop the way
        # ``celery control add_consumer`` does (kombu's Redis poller picks new queues up reliably that way).
        wanted = set(self.queues())
        for name in sorted(wanted - self.consuming):
            app.amqp.queues[name] = queue_for(name)
            app.control.add_consumer(name, destination=[self.hostname])
        for name in sorted(self.consuming - wanted):
            app.control.cancel_consumer(name, destination=[self.hostname])
        self.consuming = wanted

    def _register(self, served: ServedInstance) -> None:
        self.rt.registry.register(served.offerings)
        self.rt.registry.register_instance(
            {
                "name": served.name,
                "queue": served.queue,
                "tier": served.settings.resolved_tier,
                "holder": self.rt.holder,
                "models": sorted(o.model for o in served.offerings),
                "live": served.live,
                "accepting": self._accepting.get(served.name, True),
            }
        )

    def _beat(self) -> None:
        interval = self.rt.settings.heartbeat_interval_s
        while not self._stop.wait(interval):
            for served in list(self.instances.values()):
                try:
                    self._register(served)
                    for offering in served.offerings:
                        self._publish(served, offering, "offering_heartbeat")
                except Exception:  # a heartbeat must never kill the worker
                    log.exception("heartbeat failed for %s", served.name)

    def stop(self) -> None:
        """Leave the registry (offerings and instances, announced unavailable), stop threads, close clients."""
        self._stop.set()
        for served in self.instances.values():
            try:
                record = self.rt.registry.instance(served.name)
                if record is not None and record.get("holder") == self.rt.holder:  # no other worker renewed it
                    self.rt.registry.unregister(o.offering_id for o in served.offerings)
                    self.rt.registry.unregister_instance(served.name, holder=self.rt.holder)
                    for offering in served.offerings:
                        self._publish(served, _with_status(offering, "unavailable"), "offering_unavailable")
            except Exception:  # leaving is best effort: entries expire anyway
                log.exception("could not leave the registry for %s", served.name)
            served.client.close()
        self.bus.close(timeout_s=2.0)

    def queues(self) -> list[str]:
        """Every lane and management queue this worker consumes."""
        style = self.rt.settings.lanes.style
        names: list[str] = []
        for served in self.instances.values():
            names.append(served.queue)
            if self._accepting.get(served.name, True):
                names.extend(lane for lane in served.lanes(style) if lane not in names)
        return names

    def instance_for(self, lane: str, provider_instance: str, model: str | None, operation: str) -> ServedInstance:
        """The instance that serves a request arriving on ``lane``; refuses operations the lane does not allow."""
        if lane.startswith(MANAGEMENT_QUEUE_PREFIX):
            for served in self.instances.values():
                if served.queue == lane and provider_instance in (served.name, "any"):
                    return served
            raise OperationNotAllowedError(f"no instance here owns {lane}")
        kind = "embed" if parse_lane(lane).kind == "embed" else "inference"
        if operation not in _LANE_OPERATIONS[kind]:
            raise OperationNotAllowedError(f"{operation} is not served on {kind} lanes")
        style = self.rt.settings.lanes.style
        for served in self.instances.values():
            if provider_instance not in ("any", served.name):
                continue
            if _FLEET_CAPABILITY[operation] not in served.settings.fleet.capabilities:
                continue
            if lane in served.lanes(style) or lane in (o.offering_lane for o in served.offerings):
                return served
        # Consumed before a refresh moved this lane away (the consumer is being cancelled): another worker serves it.
        raise HandBack(f"this worker no longer serves {lane}")


def _with_status(offering: Offering, status: str) -> Offering:
    """The same offering with another health status."""
    return offering.model_copy(update={"health": {**offering.health, "status": status}})


_fleet: WorkerFleet | None = None


def worker_fleet() -> WorkerFleet:
    """This process's worker fleet (started by the consumer bootstep)."""
    if _fleet is None:
        raise RuntimeError("this process is not a fleet worker (the consumer bootstep did not run)")
    return _fleet


WORKER_MODULES = ("tasks.pipeline", "tasks.execution", "tasks.management")


class FleetConsumerStep(bootsteps.StartStopStep):
    """Consumer bootstep: discover instances and consume exactly their lanes and management queues."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Start serving: discover, register, add consumers."""
        global _fleet
        for module in WORKER_MODULES:  # the task bodies' code, loaded now rather than on the first request
            importlib.import_module(module)
        if _fleet is None:
            rt = runtime()
            _install_logging(rt.settings.log_format == "json")
            if rt.settings.metrics_port:
                serve_metrics(rt.settings.metrics_port)
                log.info("serving Prometheus metrics on port %d", rt.settings.metrics_port)
            _fleet = WorkerFleet(rt)
            names = _fleet.start()
        else:
            names = _fleet.queues()
        declare_dead_letters(c)
        for name in names:
            add_consumer(c, name)
        _fleet.hostname = c.hostname
        _fleet.consuming = set(names)
        log.info("fleet worker consuming %s", ", ".join(names) or "nothing")
        if not _fleet.instances:
            log.warning("%s", no_instances_reason(_fleet.rt.settings))

    def shutdown(self, c: Any) -> None:
        """Stop the heartbeat and close clients when the worker stops."""
        global _fleet
        if _fleet is not None:
            _fleet.stop()
            _fleet = None


def declare_dead_letters(consumer: Any) -> None:
    """Declare the dead-letter exchange and queue, so RabbitMQ's own dead-lettering (TTL, delivery limit)
    never drops a message for want of a destination."""
    broker = worker_fleet().rt.broker
    with consumer.app.connection_for_write() as conn:
        broker.declare_dead_letters(conn)


def _install_logging(json_lines: bool) -> None:
    """Request ids on every log line of the worker (and JSON lines when configured)."""
    for logger in (logging.getLogger(), logging.getLogger("celery")):
        install(logger, json_lines=json_lines)


def add_consumer(consumer: Any, name: str) -> None:
    """Consume one more lane with its exact declaration, from the event loop on.

    ``Consumer.add_task_queue`` would start consuming at once, before the loop sets the message callback: on
    RabbitMQ a message already waiting on the lane then arrives with no callback and kills the worker.
    """
    queues = consumer.app.amqp.queues
    queues[name] = queue_for(name)
    declared = queues.select_add(queues[name])
    if not consumer.task_consumer.consuming_from(name):
        consumer.task_consumer.add_queue(declared)
