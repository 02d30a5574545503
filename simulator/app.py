"""The simulator's ASGI app: vLLM's routes, its api-key guard, the dev routes and the ``/_sim`` controls.

``create_app(config)`` returns a Starlette app. Requests to ``/v1`` need the api key when one is set;
``/_sim/config``, ``/_sim/stats`` and ``/_sim/reset`` let tests steer and observe a running simulator.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from simulator.config import FailureRule, ModelKind, ServedModel, SimulatorConfig
from simulator.embeddings import embedding_vector, encode_base64
from simulator.engine import Engine, QueueFullError, Ticket
from simulator.generation import ToolChoice, new_hex_id, plan_chat, plan_completion
from simulator.metrics import render_metrics
from simulator.schemas import (
    BodyT,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    StreamOptions,
    TokenizeRequest,
    parse_body,
    validation_error,
)
from simulator.serving import (
    TRANSPORT_SCOPE_KEY,
    ChatJob,
    CompletionJob,
    GenerationStream,
    Job,
    answer,
    drop_connection,
    failure_message,
    race_disconnect,
)
from simulator.tokenizer import Tokenizer, count_tokens, last_user_text, render_chat
from simulator.wire import (
    BUSY_MESSAGE,
    DONE_FRAME,
    SSE_MEDIA_TYPE,
    detail_response,
    error_frame,
    error_response,
    json_response,
)

__all__ = ["SimulatorApp", "create_app"]

SIM_PREFIX = "/_sim"
PROTECTED_PREFIX = "/v1"
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EMBED_SPECIAL_TOKENS = 2
SLEEP_MODES = ("abort", "wait", "keep")
DEFAULT_SLEEP_LEVEL = "1"
VARY_HEADER = (b"vary", b"Origin")
UNAUTHORIZED_BODY = {"error": "Unauthorized"}
NO_TOOL_PARSER_MESSAGE = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
EMPTY_PROMPT_MESSAGE = "The decoder prompt cannot be empty"


def _transport_of(send: Send) -> Any:
    """The server's transport behind ``send`` (uvicorn's), so that a ``drop`` failure can cut the link."""
    return getattr(getattr(send, "__self__", None), "transport", None)


def _authorized(header: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries the bearer ``api_key``."""
    expected = f"Bearer {api_key}".encode()
    return header is not None and hmac.compare_digest(header.encode("latin-1"), expected)


def _context_error(max_model_len: int, prompt_tokens: int) -> Response | None:
    """vLLM's 400 when the prompt alone does not fit the context, else None (vLLM counts at most N + 1)."""
    if prompt_tokens <= max_model_len:
        return None
    shown = max_model_len + 1
    message = (
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains at least "
        f"{shown} input tokens, which exceeds this limit even without any output tokens. Please reduce the length "
        f"of the input prompt. (parameter=input_tokens, value={shown})"
    )
    return error_response(message, 400, param="input_tokens")


def _output_budget(max_model_len: int, prompt_tokens: int, requested: int | None, param: str) -> int | Response:
    """How many tokens the answer may have, or vLLM's 400 for a bad ``max_tokens`` or an oversized prompt.

    As vLLM 0.32 does, a ``max_tokens`` that fits the window by itself but not beside the prompt is shortened
    to the room the prompt leaves (the answer then ends with ``finish_reason`` "length"), never refused.
    """
    if requested is not None:
        if requested < 1:
            message = f"{param} must be at least 1, got {requested}. (parameter={param}, value={requested})"
            return error_response(message, 400, param=param)
        if requested > max_model_len:
            message = (
                f"{param}={requested} cannot be greater than max_model_len={max_model_len}. "
                f"Please request fewer output tokens. (parameter={param}, value={requested})"
            )
            return error_response(message, 400, param=param)
    too_long = _context_error(max_model_len, prompt_tokens)
    if too_long is not None:
        return too_long
    room = max(1, max_model_len - prompt_tokens)
    return room if requested is None else min(requested, room)


def _sampling_error(temperature: float | None, stop: str | list[str] | None) -> Response | None:
    """vLLM's 400 for sampling parameters ``SamplingParams`` refuses, else None."""
    if temperature is not None and temperature < 0:
        shown = float(temperature)
        message = f"temperature must be non-negative, got {shown}. (parameter=temperature, value={shown})"
        return error_response(message, 400, param="temperature")
    stops = [stop] if isinstance(stop, str) else stop or []
    if any(not text for text in stops):
        return error_response("stop cannot contain an empty string.", 400)
    return None


def _logprobs_error(requested: int | None, max_logprobs: int) -> str | None:
    """The engine's refusal of more sample logprobs than ``--max-logprobs`` allows, else None."""
    if not requested or max_logprobs == -1 or requested <= max_logprobs:
        return None
    return (
        f"Requested sample logprobs of {requested}, which is greater than max allowed: {max_logprobs} "
        f"(parameter=logprobs, value={requested})"
    )


async def _error_frames(message: str) -> AsyncIterator[str]:
    """An error inside a 200 stream, as vLLM sends an engine-side refusal: the error frame, then ``[DONE]``."""
    yield error_frame(message, 400, param="logprobs")
    yield DONE_FRAME


def _engine_refusal(message: str, stream: bool) -> Response:
    """An engine-side refusal: a 400 for a plain request, an error frame inside a 200 stream for a streamed one."""
    if stream:
        return StreamingResponse(_error_frames(message), media_type=SSE_MEDIA_TYPE)
    return error_response(message, 400, param="logprobs")


def _function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The ``function`` object of a tool definition ({} when malformed)."""
    function = tool.get("function")
    return function if isinstance(function, dict) else {}


def _select_tool(request: ChatRequest, tool_parser: bool) -> ToolChoice | Response | None:
    """The tool the answer calls (None for a text answer), or vLLM's 400 for an impossible choice."""
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = _function_of(choice).get("name")
        for tool in tools:
            function = _function_of(tool)
            if function.get("name") == name:
                return ToolChoice(name=str(name), parameters=function.get("parameters") or {}, named=True)
        return error_response(f"Tool '{name}' has not been passed in `tools`.", 400, param="tool_choice")
    if choice not in ("none", "auto", "required"):
        error = {
            "type": "literal_error",
            "loc": ("tool_choice",),
            "msg": "Input should be 'none', 'auto' or 'required'",
        }
        return validation_error([{**error, "input": choice}])
    if choice == "none" or not tools:
        return None
    if choice == "auto" and not tool_parser:
        return error_response(NO_TOOL_PARSER_MESSAGE, 400)
    function = _function_of(tools[0])
    return ToolChoice(name=str(function.get("name", "")), parameters=function.get("parameters") or {}, named=False)


class SimulatorApp:
    """The route handlers of one simulated server, over its engine and tokenizer."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.engine = Engine(config)
        self.tokenizer = Tokenizer()

    # ---- helpers ----

    def _resolve(self, name: str | None, kind: ModelKind | None) -> ServedModel | Response:
        """The served model a request names (or the default one of ``kind``), or vLLM's 404.

        A server that serves no model of ``kind`` has no such route at all: FastAPI's 404, whatever the name.
        Routes every server has (``kind`` None) default to the first served model.
        """
        config = self.engine.config
        default = config.models[0] if kind is None else config.default_model(kind)
        if default is None:
            return detail_response(404)
        if name is None:
            return default
        model = config.find_model(name)
        if model is None:
            aliases = ", ".join(served.name for served in config.models)
            message = f"The model `{name}` does not exist. Valid aliases: {aliases}."
            return error_response(message, 404, param="model")
        return model

    async def _parse_for_model(
        self, request: Request, route: str, schema: type[BodyT], kind: ModelKind
    ) -> tuple[BodyT, ServedModel, ServedModel] | Response:
        """Count the request, parse its body and resolve the model it names and its base, which must be of ``kind``.

        A LoRA adapter takes its base model's kind; a model of another kind gets vLLM's bare 404 for the route.
        """
        engine = self.engine
        engine.count_request(route)
        parsed = await parse_body(request, schema)
        if isinstance(parsed, Response):
            return parsed
        engine.last_bodies[route] = request.state.body
        model = self._resolve(getattr(parsed, "model", None), kind)
        if isinstance(model, Response):
            return model
        base = engine.config.base_of(model)
        if base.kind != kind:
            return detail_response(404)
        return parsed, model, base

    @staticmethod
    def _request_id(request: Request, body_id: str | None) -> str:
        """The request id: the ``X-Request-Id`` header, else the body's ``request_id``, else a random one."""
        return request.headers.get("x-request-id") or body_id or new_hex_id()

    async def _before_work(
        self, request: Request, ticket: Ticket, rule: FailureRule | None, stream: bool
    ) -> Response | None:
        """Apply a failure that hits before any answer (status, hang, a plain drop); None: go on."""
        engine = self.engine
        if rule is None or (stream and rule.mode in ("error_frame", "drop")):
            return None
        if rule.mode == "hang":
            engine.enter(ticket)
            finished, _ = await race_disconnect(request.receive, asyncio.sleep(rule.hang_s))
            if finished:
                return None
            engine.finish(ticket, "aborted", "abort")
            return Response()
        engine.finish(ticket, "failed")
        if rule.mode == "drop":
            await drop_connection(request.scope, request.receive)
            return Response()
        return error_response(failure_message(rule), rule.status, rule.error_type)

    async def _execute(self, request: Request, job: Job, stream: bool) -> Response:
        """Run a generation job: injected failures, admission (503 when the queue is full), the answer."""
        engine = self.engine
        early = await self._before_work(request, job.ticket, job.rule, stream)
        if early is not None:
            return early
        if job.rule is not None and job.rule.mode == "hang":
            job.rule = None
        try:
            engine.admit(job.ticket)
        except QueueFullError:
            engine.finish(job.ticket, "rejected")
            return error_response(BUSY_MESSAGE, 503)
        if stream:
            return GenerationStream(job)
        finished, response = await race_disconnect(request.receive, answer(job))
        if finished and response is not None:
            return response
        engine.finish(job.ticket, "aborted", "abort")
        return Response()

    # ---- always-on routes ----

    async def health(self, request: Request) -> Response:
        """``GET /health`` and ``/ping``: 200, or 503 when the engine is dead; empty either way."""
        self.engine.count_request(request.url.path.strip("/"))
        return Response(status_code=503 if self.engine.config.dead else 200)

    async def version(self, request: Request) -> Response:
        """``GET /version``."""
        self.engine.count_request("version")
        return json_response({"version": self.engine.config.version})

    async def load(self, request: Request) -> Response:
        """``GET /load``: the requests in flight."""
        self.engine.count_request("load")
        return json_response({"server_load": self.engine.in_flight})

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus text."""
        engine = self.engine
        engine.count_request("metrics")
        for model in engine.config.models:
            engine.load_for(model)
        text = render_metrics(engine.loads, engine.config.kv_cache_tokens)
        return Response(text, media_type=METRICS_MEDIA_TYPE)

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: every served name, LoRA adapters with their parent."""
        engine = self.engine
        engine.count_request("models")
        rule = engine.take_failure("models", None)
        if rule is not None:
            ticket = engine.ticket(engine.config.models[0], 0, 0)
            early = await self._before_work(request, ticket, rule, stream=False)
            if early is not None:
                return early
        created = int(time.time())
        data = []
        for model in engine.config.models:
            permission = {
                "id": f"modelperm-{new_hex_id()}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            data.append(
                {
                    "id": model.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": f"/loras/{model.name}" if model.parent else f"/models/{model.name}",
                    "parent": model.parent,
                    "max_model_len": None if model.parent else model.max_model_len,
                    "permission": [permission],
                }
            )
        return json_response({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        admitted = await self._parse_for_model(request, "chat", ChatRequest, "generate")
        if isinstance(admitted, Response):
            return admitted
        parsed, model, base = admitted
        engine = self.engine
        config = engine.config
        tool = _select_tool(parsed, config.tool_parser)
        if isinstance(tool, Response):
            return tool
        if not parsed.messages:
            return error_response(EMPTY_PROMPT_MESSAGE, 400)
        prompt_tokens = count_tokens(render_chat(parsed.messages, parsed.tools, parsed.add_generation_prompt))
        requested: int | None = parsed.max_completion_tokens
        param = "max_completion_tokens"
        if requested is None:
            requested, param = parsed.max_tokens, "max_tokens"
        budget = _output_budget(base.max_model_len, prompt_tokens, requested, param)
        if isinstance(budget, Response):
            return budget
        refused = _sampling_error(parsed.temperature, parsed.stop)
        if refused is not None:
            return refused
        logprobs = _logprobs_error(parsed.top_logprobs or 0 if parsed.logprobs else None, config.max_logprobs)
        if logprobs is not None:
            return _engine_refusal(logprobs, bool(parsed.stream))
        thinking = bool((parsed.chat_template_kwargs or {}).get("enable_thinking"))
        plan = plan_chat(
            config,
            reasoning=base.reasoning,
            thinking=thinking,
            tool=tool,
            source_text=last_user_text(parsed.messages),
            budget=budget,
            ignore_eos=parsed.ignore_eos,
            min_tokens=parsed.min_tokens,
        )
        stream = bool(parsed.stream)
        options = parsed.stream_options or StreamOptions()
        job = ChatJob(
            engine,
            engine.ticket(model, prompt_tokens, plan.total),
            plan,
            reasoning=base.reasoning,
            reasoning_field=config.reasoning_field,
            thinking=thinking,
            named_tool=tool is not None and tool.named,
            top_logprobs=(parsed.top_logprobs or 0) if parsed.logprobs else None,
            continuous_usage=bool(options.include_usage and options.continuous_usage_stats),
            request_id="chatcmpl-" + self._request_id(request, parsed.request_id),
            created=int(time.time()),
            model=model.name,
            include_usage=stream and bool(options.include_usage),
            rule=engine.take_failure("chat", model.name),
            scope=request.scope,
        )
        return await self._execute(request, job, stream)

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: one choice per prompt."""
        admitted = await self._parse_for_model(request, "completions", CompletionRequest, "generate")
        if isinstance(admitted, Response):
            return admitted
        parsed, model, base = admitted
        engine = self.engine
        config = engine.config
        prompt = parsed.prompt
        prompts: list[Any] = [prompt] if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else prompt
        texts: list[str] = []
        lengths: list[int] = []
        for item in prompts:
            if isinstance(item, str):
                texts.append(item)
                lengths.append(count_tokens(item))
            else:
                texts.append(self.tokenizer.decode(item))
                lengths.append(len(item))
        if not prompts or not any(lengths):
            message = "Either prompt or prompt_embeds must be provided and non-empty."
            return error_response(message, 400, param="prompt")
        budget = _output_budget(base.max_model_len, max(lengths), parsed.max_tokens, "max_tokens")
        if isinstance(budget, Response):
            return budget
        refused = _sampling_error(parsed.temperature, parsed.stop)
        if refused is not None:
            return refused
        logprobs = _logprobs_error(parsed.logprobs, config.max_logprobs)
        if logprobs is not None:
            return _engine_refusal(logprobs, bool(parsed.stream))
        plans = [
            plan_completion(
                config,
                prompt_text=text,
                budget=budget,
                ignore_eos=parsed.ignore_eos,
                min_tokens=parsed.min_tokens,
            )
            for text in texts
        ]
        stream = bool(parsed.stream)
        options = parsed.stream_options or StreamOptions()
        job = CompletionJob(
            engine,
            engine.ticket(model, sum(lengths), sum(plan.total for plan in plans)),
            plans,
            continuous_usage=bool(options.include_usage and options.continuous_usage_stats),
            request_id="cmpl-" + self._request_id(request, parsed.request_id),
            created=int(time.time()),
            model=model.name,
            include_usage=stream and bool(options.include_usage),
            rule=engine.take_failure("completions", model.name),
            scope=request.scope,
        )
        return await self._execute(request, job, stream)

    async def embeddings(self, request: Request) -> Response:
        """``POST /v1/embeddings``: deterministic unit vectors, as floats or base64 float32."""
        admitted = await self._parse_for_model(request, "embeddings", EmbeddingRequest, "embed")
        if isinstance(admitted, Response):
            return admitted
        parsed, model, base = admitted
        engine = self.engine
        dimensions = parsed.dimensions
        if dimensions is not None:
            if not base.matryoshka:
                message = (
                    f"Model '{model.name}' does not support Matryoshka embeddings; "
                    f"dimensions must be unset (received dimensions={dimensions})."
                )
                return error_response(message, 400)
            if not 1 <= dimensions <= base.embedding_dim:
                limit = base.embedding_dim
                message = f"dimensions must be between 1 and {limit} (received dimensions={dimensions})."
                return error_response(message, 400, param="dimensions")
        raw = parsed.input
        inputs: list[Any] = [raw] if isinstance(raw, str) or not raw or isinstance(raw[0], int) else raw
        keys: list[str] = []
        lengths: list[int] = []
        for item in inputs:
            if isinstance(item, str):
                keys.append(item)
                lengths.append(count_tokens(item) + EMBED_SPECIAL_TOKENS)
            else:
                keys.append(json.dumps(item))
                lengths.append(len(item))
        for length in lengths:
            too_long = _context_error(base.max_model_len, length)
            if too_long is not None:
                return too_long
        ticket = engine.ticket(model, sum(lengths), 0)
        early = await self._before_work(request, ticket, engine.take_failure("embeddings", model.name), False)
        if early is not None:
            return early
        engine.enter(ticket)
        data = []
        for index, key in enumerate(keys):
            vector = embedding_vector(key, base.embedding_dim, dimensions)
            embedding: Any = encode_base64(vector) if parsed.encoding_format == "base64" else list(vector)
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        engine.first_token(ticket)
        engine.finish(ticket, "completed")
        prompt_tokens = sum(lengths)
        body = {
            "id": "embd-" + self._request_id(request, parsed.request_id),
            "object": "list",
            "created": int(time.time()),
            "model": model.name,
            "data": data,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }
        return json_response(body)

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize``: a prompt, or chat messages through the chat template."""
        engine = self.engine
        engine.count_request("tokenize")
        parsed = await parse_body(request, TokenizeRequest)
        if isinstance(parsed, Response):
            return parsed
        model = self._resolve(parsed.model, None)
        if isinstance(model, Response):
            return model
        if parsed.messages is not None:
            text = render_chat(parsed.messages, parsed.tools, parsed.add_generation_prompt)
        elif parsed.prompt is not None:
            text = parsed.prompt
        else:
            return validation_error([{"type": "missing", "loc": ("prompt",), "msg": "Field required", "input": {}}])
        ids, pieces = self.tokenizer.encode(text)
        return json_response(
            {
                "count": len(ids),
                "max_model_len": engine.config.base_of(model).max_model_len,
                "tokens": ids,
                "token_strs": pieces if parsed.return_token_strs else None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize``."""
        engine = self.engine
        engine.count_request("detokenize")
        parsed = await parse_body(request, DetokenizeRequest)
        if isinstance(parsed, Response):
            return parsed
        model = self._resolve(parsed.model, None)
        if isinstance(model, Response):
            return model
        return json_response({"prompt": self.tokenizer.decode(parsed.tokens)})

    # ---- dev routes (only with dev_mode) ----

    async def sleep(self, request: Request) -> Response:
        """``POST /sleep?level=&mode=``: new requests queue; running ones are aborted, drained or paused."""
        engine = self.engine
        if not engine.config.dev_mode:
            return detail_response(404)
        engine.count_request("sleep")
        level_text = request.query_params.get("level", DEFAULT_SLEEP_LEVEL)
        mode = request.query_params.get("mode", SLEEP_MODES[0])
        if not level_text.isdigit() or mode not in SLEEP_MODES:
            return error_response(f"Invalid sleep parameters: level={level_text!r}, mode={mode!r}.", 400)
        await engine.sleep(mode)
        if engine.config.legacy_dev_routes:
            return Response()
        return json_response({"status": "sleeping", "level": int(level_text)})

    async def wake_up(self, request: Request) -> Response:
        """``POST /wake_up?tags=...``: wake the given parts, or everything."""
        engine = self.engine
        if not engine.config.dev_mode:
            return detail_response(404)
        engine.count_request("wake_up")
        tags = request.query_params.getlist("tags") or None
        engine.wake_up(tags)
        if engine.config.legacy_dev_routes:
            return Response()
        return json_response({"status": "awake", "tags": tags})

    async def is_sleeping(self, request: Request) -> Response:
        """``GET /is_sleeping``."""
        engine = self.engine
        if not engine.config.dev_mode:
            return detail_response(404)
        engine.count_request("is_sleeping")
        return json_response({"is_sleeping": engine.sleeping})

    async def reset_prefix_cache(self, request: Request) -> Response:
        """``POST /reset_prefix_cache``."""
        engine = self.engine
        if not engine.config.dev_mode:
            return detail_response(404)
        engine.count_request("reset_prefix_cache")
        if engine.config.legacy_dev_routes:
            return Response()
        return json_response({"success": True})

    async def reset_mm_cache(self, request: Request) -> Response:
        """``POST /reset_mm_cache``: empty 200 on every version."""
        engine = self.engine
        if not engine.config.dev_mode:
            return detail_response(404)
        engine.count_request("reset_mm_cache")
        return Response()

    # ---- test control ----

    async def sim_config(self, request: Request) -> Response:
        """``GET /_sim/config``: the live config; ``POST``: merge a JSON patch into it."""
        engine = self.engine
        if request.method == "POST":
            try:
                patch = json.loads(await request.body())
            except json.JSONDecodeError as exc:
                return json_response({"detail": f"invalid JSON: {exc}"}, 400)
            if not isinstance(patch, dict):
                return json_response({"detail": "the patch must be a JSON object"}, 400)
            try:
                config = SimulatorConfig.model_validate({**engine.config.model_dump(), **patch})
            except ValidationError as exc:
                return json_response({"detail": json.loads(exc.json(include_url=False))}, 400)
            engine.replace_config(config)
        return json_response(engine.config.model_dump(mode="json"))

    async def sim_stats(self, request: Request) -> Response:
        """``GET /_sim/stats``."""
        return json_response(self.engine.stats())

    async def sim_reset(self, request: Request) -> Response:
        """``POST /_sim/reset``: the start config, awake, counters zeroed."""
        self.engine.reset()
        return json_response(self.engine.stats())

    def routes(self) -> list[Route]:
        """Every route of the simulated server."""
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ping", self.health, methods=["GET", "POST"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/load", self.load, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/sleep", self.sleep, methods=["POST"]),
            Route("/wake_up", self.wake_up, methods=["POST"]),
            Route("/is_sleeping", self.is_sleeping, methods=["GET"]),
            Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
            Route("/reset_mm_cache", self.reset_mm_cache, methods=["POST"]),
            Route(f"{SIM_PREFIX}/config", self.sim_config, methods=["GET", "POST"]),
            Route(f"{SIM_PREFIX}/stats", self.sim_stats, methods=["GET"]),
            Route(f"{SIM_PREFIX}/reset", self.sim_reset, methods=["POST"]),
        ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's ``{"detail": ...}`` answer for a missing route or a wrong method."""
    status_code = exc.status_code if isinstance(exc, HTTPException) else 500
    return detail_response(status_code)


class _SimulatorStarlette(Starlette):
    """Starlette with vLLM's front: the transport noted for drops, the api-key guard, ``vary: Origin``."""

    def __init__(self, simulator: SimulatorApp) -> None:
        super().__init__(routes=simulator.routes(), exception_handlers={404: _http_error, 405: _http_error})
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard ``/v1`` with the api key, record the request headers, then serve."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[TRANSPORT_SCOPE_KEY] = _transport_of(send)
        engine = self.simulator.engine
        path: str = scope["path"]
        if not path.startswith(SIM_PREFIX):
            headers: dict[str, str] = {}
            for raw_name, raw_value in scope["headers"]:
                name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            engine.last_request_headers = headers
            api_key = engine.config.api_key
            if (
                api_key is not None
                and path.startswith(PROTECTED_PREFIX)
                and scope["method"] != "OPTIONS"
                and not _authorized(headers.get("authorization"), api_key)
            ):
                await json_response(UNAUTHORIZED_BODY, 401)(scope, receive, send)
                return

        async def send_with_vary(message: Message) -> None:
            """Add ``vary: Origin`` to the response head, as vLLM's CORS middleware does."""
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), VARY_HEADER]
            await send(message)

        await super().__call__(scope, receive, send_with_vary)


def create_app(config: SimulatorConfig | None = None) -> Starlette:
    """A Starlette app that speaks vLLM's HTTP API as ``config`` describes."""
    return _SimulatorStarlette(SimulatorApp(config if config is not None else SimulatorConfig()))
