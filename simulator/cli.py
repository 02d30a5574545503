"""``vllm-sim``: serve the simulator under uvicorn, configured like a ``vllm serve`` command line.

    vllm-sim --port 8000 --model qwen3-6-27b:32768 --embed-model minilm:256 --lora mylora:qwen3-6-27b \\
             --ttft-ms 100 --itl-ms 20 --output-tokens 16 --reasoning server --text-mode lorem

``VLLM_API_KEY`` and ``VLLM_SERVER_DEV_MODE`` are read as vLLM reads them. Once the port is bound the
server prints one line, ``vllm-sim ready http://HOST:PORT``, so that a parent process can find a server
started with ``--port 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from simulator.app import create_app
from simulator.config import (
    DEFAULT_EMBED_MAX_MODEL_LEN,
    DEFAULT_EMBED_MODEL,
    DEFAULT_EMBEDDING_DIM,
    DEFAULT_GENERATE_MAX_MODEL_LEN,
    DEFAULT_GENERATE_MODEL,
    ServedModel,
    SimulatorConfig,
)

__all__ = ["READY_PREFIX", "build_parser", "config_from_args", "main"]

READY_PREFIX = "vllm-sim ready "
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MS_PER_S = 1000.0


def _name_and_length(spec: str, default_length: int) -> tuple[str, int]:
    """``NAME[:MAX_MODEL_LEN]`` split into its parts."""
    name, sep, length = spec.rpartition(":")
    if sep and length.isdigit():
        return name, int(length)
    return spec, default_length


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``vllm-sim``."""
    parser = argparse.ArgumentParser(prog="vllm-sim", description="A vLLM-compatible HTTP simulator.")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--config", type=Path, help="a JSON file with a whole SimulatorConfig; flags override it")
    parser.add_argument("--model", action="append", default=[], metavar="NAME[:MAX_LEN]", help="a generate model")
    parser.add_argument("--embed-model", action="append", default=[], metavar="NAME[:MAX_LEN]", help="a pooling model")
    parser.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM)
    parser.add_argument("--matryoshka", action="store_true", help="embedding models accept `dimensions`")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME:PARENT", help="a LoRA adapter")
    parser.add_argument("--reasoning", choices=["none", "server", "tags"], help="how generate models show thinking")
    parser.add_argument("--reasoning-field", choices=["reasoning", "reasoning_content", "both"])
    parser.add_argument("--reasoning-tokens", type=int)
    parser.add_argument("--ttft-ms", type=float, help="time to first token")
    parser.add_argument("--itl-ms", type=float, help="inter-token latency")
    parser.add_argument("--output-tokens", type=int, help="answer length in lorem mode")
    parser.add_argument("--max-running", type=int, help="requests generating at once; more wait")
    parser.add_argument("--max-queued", type=int, help="waiting requests before 503 (0 = unbounded)")
    parser.add_argument("--api-key", default=None, help="required Bearer key on /v1 (default: $VLLM_API_KEY)")
    parser.add_argument("--dev-mode", action=argparse.BooleanOptionalAction, default=None, help="dev routes")
    parser.add_argument("--legacy-dev-routes", action="store_true", help="empty 200 answers of vLLM < 0.32")
    parser.add_argument("--text-mode", choices=["echo", "lorem"])
    parser.add_argument("--keepalive-ms", type=float, help="SSE keep-alive comment interval while idle")
    parser.add_argument("--vllm-version", help="the version /version reports")
    parser.add_argument(
        "--no-tool-parser",
        action="store_true",
        help="as a vLLM started without --enable-auto-tool-choice --tool-call-parser: tools with auto choice get 400",
    )
    parser.add_argument("--max-logprobs", type=int, help="vLLM's --max-logprobs (default 20)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _env_dev_mode(environ: Mapping[str, str]) -> bool | None:
    """``VLLM_SERVER_DEV_MODE`` as vLLM reads it (None when unset)."""
    value = environ.get("VLLM_SERVER_DEV_MODE")
    if value is None:
        return None
    return value.strip().lower() in ("1", "true")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SimulatorConfig:
    """The SimulatorConfig a parsed command line (and the environment) describes."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    models: list[ServedModel] = []
    for spec in args.model:
        name, length = _name_and_length(spec, DEFAULT_GENERATE_MAX_MODEL_LEN)
        models.append(ServedModel(name=name, max_model_len=length, reasoning=args.reasoning or "none"))
    for spec in args.embed_model:
        name, length = _name_and_length(spec, DEFAULT_EMBED_MAX_MODEL_LEN)
        models.append(
            ServedModel(
                name=name,
                max_model_len=length,
                kind="embed",
                embedding_dim=args.embedding_dim,
                matryoshka=args.matryoshka,
            )
        )
    if not models and "models" not in data:
        models = [
            ServedModel(name=DEFAULT_GENERATE_MODEL, reasoning=args.reasoning or "none"),
            ServedModel(
                name=DEFAULT_EMBED_MODEL,
                max_model_len=DEFAULT_EMBED_MAX_MODEL_LEN,
                kind="embed",
                embedding_dim=args.embedding_dim,
                matryoshka=args.matryoshka,
            ),
        ]
    for spec in args.lora:
        name, _, parent = spec.partition(":")
        models.append(ServedModel(name=name, parent=parent or None))
    if models:
        data["models"] = [model.model_dump() for model in models]
    options = {
        "reasoning_field": args.reasoning_field,
        "reasoning_tokens": args.reasoning_tokens,
        "ttft_s": None if args.ttft_ms is None else args.ttft_ms / MS_PER_S,
        "itl_s": None if args.itl_ms is None else args.itl_ms / MS_PER_S,
        "keepalive_s": None if args.keepalive_ms is None else args.keepalive_ms / MS_PER_S,
        "output_tokens": args.output_tokens,
        "max_running": args.max_running,
        "max_queued": args.max_queued,
        "api_key": args.api_key if args.api_key is not None else environ.get("VLLM_API_KEY"),
        "dev_mode": args.dev_mode if args.dev_mode is not None else _env_dev_mode(environ),
        "legacy_dev_routes": args.legacy_dev_routes or None,
        "text_mode": args.text_mode,
        "version": args.vllm_version,
        "tool_parser": False if args.no_tool_parser else None,
        "max_logprobs": args.max_logprobs,
    }
    data.update({key: value for key, value in options.items() if value is not None})
    return SimulatorConfig.model_validate(data)


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints its URL once the port is bound."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, then print the ready line."""
        await super().startup(sockets=sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"{READY_PREFIX}http://{host}:{port}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``vllm-sim`` (uvloop and httptools when installed, access log off)."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    server_config = uvicorn.Config(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="off",
        loop="auto",
        http="auto",
    )
    with contextlib.suppress(KeyboardInterrupt):
        _AnnouncingServer(server_config).run()


if __name__ == "__main__":
    main()
