"""The fleet's Python core, in three packages and one settings module; none imports Celery or kombu.

- ``provider.vllm``: the vLLM client (httpx) and its models, streaming, reasoning split, errors, discovery.
- ``provider.fleet``: the fleet's model: offerings, lane keys, the Redis registry, registry events, instance
  health (circuit breaker) and capacity. Never imports httpx.
- ``provider.protocol``: envelopes, signed tokens, sealing, answer signatures, the replay ledger and the
  caller's error tree (``FleetError``); it reads only its own ``SecuritySettings``.
- ``provider.settings``: the typed settings every other part reads (``security`` is the protocol's).
- ``provider.sizing``: how big a worker is (processes, each one's share of the slots, threads, Redis pool).
"""
