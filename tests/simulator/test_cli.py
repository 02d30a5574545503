"""``vllm-sim``: its command line, its environment variables, and a simulator in a child process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from simulator.cli import build_parser, config_from_args
from simulator.testing import SimulatorProcess


def test_flags_build_the_config() -> None:
    """Models, LoRA adapters, latencies in ms, capacity and modes map onto SimulatorConfig."""
    argv = [
        "--model", "qwen3-6-27b:32768", "--model", "small:4096", "--embed-model", "minilm:256",
        "--lora", "mylora:small", "--ttft-ms", "100", "--itl-ms", "20", "--output-tokens", "16",
        "--max-running", "64", "--max-queued", "8", "--api-key", "flag-key", "--reasoning", "server",
        "--text-mode", "lorem", "--keepalive-ms", "500", "--legacy-dev-routes",
    ]  # fmt: skip
    config = config_from_args(build_parser().parse_args(argv), {"VLLM_API_KEY": "env-key"})
    models = {model.name: model for model in config.models}
    assert [(m.name, m.max_model_len, m.kind) for m in config.models[:3]] == [
        ("qwen3-6-27b", 32768, "generate"),
        ("small", 4096, "generate"),
        ("minilm", 256, "embed"),
    ]
    assert models["mylora"].parent == "small"
    assert models["small"].reasoning == "server"
    assert (config.ttft_s, config.itl_s, config.keepalive_s) == (0.1, 0.02, 0.5)
    assert (config.output_tokens, config.max_running, config.max_queued) == (16, 64, 8)
    assert (config.api_key, config.text_mode, config.legacy_dev_routes) == ("flag-key", "lorem", True)


def test_defaults_and_environment() -> None:
    """Without flags: one chat and one embedding model, no latency, dev mode on; vLLM's variables apply."""
    config = config_from_args(build_parser().parse_args([]), {})
    assert [(m.name, m.max_model_len, m.kind) for m in config.models] == [
        ("qwen3-6-27b", 32768, "generate"),
        ("minilm", 256, "embed"),
    ]
    assert (config.ttft_s, config.itl_s, config.dev_mode, config.api_key) == (0.0, 0.0, True, None)
    environ = {"VLLM_API_KEY": "env-key", "VLLM_SERVER_DEV_MODE": "0"}
    from_env = config_from_args(build_parser().parse_args([]), environ)
    assert (from_env.api_key, from_env.dev_mode) == ("env-key", False)
    assert config_from_args(build_parser().parse_args(["--dev-mode"]), environ).dev_mode is True


def test_config_file_with_flag_overrides(tmp_path: Path) -> None:
    """--config loads a whole SimulatorConfig; flags given beside it win."""
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"models": [{"name": "filed", "max_model_len": 128}], "itl_s": 0.5}))
    config = config_from_args(build_parser().parse_args(["--config", str(path), "--ttft-ms", "5"]), {})
    assert [model.name for model in config.models] == ["filed"]
    assert (config.itl_s, config.ttft_s) == (0.5, 0.005)


def test_simulator_in_a_child_process() -> None:
    """SimulatorProcess starts vllm-sim on a free port, answers through it, and stops it."""
    with SimulatorProcess(["--model", "m1:1024", "--api-key", "k", "--log-level", "error"]) as sim:
        models = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [(entry["id"], entry["max_model_len"]) for entry in models["data"]] == [("m1", 1024)]
        assert sim.stats()["requests"] == {"models": 1}
        process = sim.process
    assert process is not None
    assert process.poll() is not None


def test_tool_parser_and_logprob_flags() -> None:
    """``--no-tool-parser`` and ``--max-logprobs`` set the matching config fields; by default a parser is on."""
    config = config_from_args(build_parser().parse_args(["--no-tool-parser", "--max-logprobs", "5"]), {})
    assert (config.tool_parser, config.max_logprobs) == (False, 5)
    default = config_from_args(build_parser().parse_args([]), {})
    assert (default.tool_parser, default.max_logprobs) == (True, 20)
