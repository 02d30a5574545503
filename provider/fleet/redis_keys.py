"""Every Redis key the fleet writes, built in one place under one prefix (default ``vllmfleet``).

| key | type | what |
|---|---|---|
| ``<p>:offering:<offering_id>`` | string (JSON) | one offering; expires unless its worker's heartbeat renews it |
| ``<p>:offerings`` | sorted set | offering ids scored by their expiry time (epoch s) |
| ``<p>:instance:<name>`` | string (JSON) | an instance served by a live worker, with its management queue |
| ``<p>:instances`` | sorted set | instance names scored by expiry |
| ``<p>:stream:<task_id>`` | stream | a streamed chat's chunks, then one terminal entry; expires after it ends |
| ``<p>:cancel:<task_id>`` | string | set by a producer that gives up on a stream or request |
| ``<p>:jti:<jti>``, ``<p>:idem:...`` | hash | replay leases and idempotency records (``provider.protocol.ledger``) |
| ``<p>:events`` | stream | registry events on a Redis broker |
| ``<p>:health:<instance>`` | hash | circuit breaker and latency of one instance |
| ``<p>:handbacks:<request_id>`` | string | how often a request was handed back (dead-lettered past the limit) |
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RedisKeys"]


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key builder for one prefix."""

    prefix: str = "vllmfleet"

    def offering(self, offering_id: str) -> str:
        """One offering's JSON."""
        return f"{self.prefix}:offering:{offering_id}"

    @property
    def offerings(self) -> str:
        """Index of offering ids by expiry."""
        return f"{self.prefix}:offerings"

    def instance(self, name: str) -> str:
        """One instance's record."""
        return f"{self.prefix}:instance:{name}"

    @property
    def instances(self) -> str:
        """Index of instance names by expiry."""
        return f"{self.prefix}:instances"

    def stream(self, task_id: str) -> str:
        """A streamed chat's chunk log."""
        return f"{self.prefix}:stream:{task_id}"

    def cancel(self, task_id: str) -> str:
        """A producer's cancel flag for one task."""
        return f"{self.prefix}:cancel:{task_id}"

    @property
    def ledger_prefix(self) -> str:
        """Prefix handed to the replay and idempotency ledger."""
        return f"{self.prefix}"

    @property
    def events(self) -> str:
        """Registry events on a Redis broker."""
        return f"{self.prefix}:events"

    def hand_backs(self, request_id: str) -> str:
        """How often a request was handed back to its lane."""
        return f"{self.prefix}:handbacks:{request_id}"

    def health(self, instance: str) -> str:
        """One instance's circuit and latency."""
        return f"{self.prefix}:health:{instance}"
