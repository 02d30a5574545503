"""A vLLM-compatible HTTP simulator: vLLM 0.32's wire format, latency, queueing, sleep and failure injection.

``create_app(config)`` gives the ASGI app; ``simulator.testing.SimulatorServer`` runs it in a thread for
tests; ``vllm-sim`` (``simulator.cli``) runs it as a server.
"""

from simulator.app import create_app
from simulator.config import FailureRule, ServedModel, SimulatorConfig

__all__ = ["FailureRule", "ServedModel", "SimulatorConfig", "create_app"]
