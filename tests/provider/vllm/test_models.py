"""Request validation and parsing of the recorded non-streamed answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from provider.vllm import (
    ChatRequest,
    EmbedRequest,
    InvalidResponseError,
    MetricsSnapshot,
    ModelMetrics,
    Readiness,
    StreamChunk,
    ToolCallDelta,
    Usage,
)
from provider.vllm.models import (
    parse_chat_response,
    parse_completion_response,
    parse_embedding_response,
    parse_model_list,
    parse_tokenize_result,
)
from tests.provider.conftest import transcript_body

MESSAGES = [{"role": "user", "content": "Hi"}]


def recorded(name: str) -> Any:
    return json.loads(transcript_body(name))


class TestChatRequest:
    def test_unknown_fields_are_refused(self) -> None:
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=MESSAGES, logit_bias={"1": 1})  # type: ignore[call-arg]

    def test_n_is_not_supported(self) -> None:
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=MESSAGES, n=2)  # type: ignore[call-arg]
        with pytest.raises(ValidationError, match="extra_body may not set n"):
            ChatRequest(model="m", messages=MESSAGES, extra_body={"n": 2})

    def test_stream_cannot_ride_in_extra_body(self) -> None:
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=MESSAGES, extra_body={"stream": True})

    def test_thinking_takes_only_enabled(self) -> None:
        assert ChatRequest(model="m", messages=MESSAGES, thinking={"enabled": False}).thinking.enabled is False
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=MESSAGES, thinking={"enabled": True, "budget": 3})

    def test_messages_are_required(self) -> None:
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=[])

    def test_round_trips_through_json(self) -> None:
        request = ChatRequest(
            model="m",
            messages=MESSAGES,
            stop="x",
            thinking={"enabled": True},
            include_reasoning=True,
            reasoning_effort="high",
            extra_body={"top_a": 1},
        )
        dumped = request.model_dump(mode="json")
        assert ChatRequest.model_validate(json.loads(json.dumps(dumped))) == request


class TestEmbedRequest:
    def test_encoding_format_is_float_or_base64(self) -> None:
        assert EmbedRequest(model="e", input=["a", "b"]).encoding_format == "float"
        with pytest.raises(ValidationError):
            EmbedRequest(model="e", input="a", encoding_format="bytes")  # type: ignore[arg-type]


class TestParsers:
    def test_chat(self) -> None:
        response = parse_chat_response(recorded("chat"))
        assert response.id == "chatcmpl-8c46e9c611df81f5"
        assert response.content == "\n" * 8
        assert response.reasoning is None
        assert response.finish_reason == "length"
        assert response.usage is not None
        assert response.usage.total_tokens == 24
        assert response.tool_calls == []

    def test_chat_with_thinking_kwargs_on_a_server_without_reasoning_parser(self) -> None:
        assert parse_chat_response(recorded("chat_thinking_kwargs")).content == "\n" * 4

    def test_chat_reasoning(self) -> None:
        response = parse_chat_response(recorded("chat_reasoning"))
        assert (response.content, response.reasoning) == (None, " worldParis.")
        assert response.usage is not None
        assert response.usage.reasoning_tokens == 0

    def test_reasoning_content_of_older_servers(self) -> None:
        body = recorded("chat_reasoning")
        message = body["choices"][0]["message"]
        message["reasoning_content"] = message.pop("reasoning")
        assert parse_chat_response(body).reasoning == " worldParis."

    def test_named_tool_call(self) -> None:
        response = parse_chat_response(recorded("chat_tool_call_named"))
        assert response.finish_reason == "stop"
        assert response.content is None
        assert response.tool_calls[0].model_dump() == {
            "id": "chatcmpl-tool-a8c29f0c90d98625",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "2.66666e+101"},
        }

    def test_auto_tool_call(self) -> None:
        response = parse_chat_response(recorded("chat_tool_call_auto"))
        assert response.finish_reason == "tool_calls"
        assert response.reasoning == " world"
        assert json.loads(response.tool_calls[0].function.arguments) == {"city": "Paris"}

    def test_completion(self) -> None:
        response = parse_completion_response(recorded("completions"))
        assert (response.id, response.text, response.finish_reason) == ("cmpl-a8a3e82b364c046c", "", "length")

    def test_float_embeddings_keep_input_order(self) -> None:
        body = recorded("embeddings")
        body["data"].reverse()
        response = parse_embedding_response(body)
        assert len(response.vectors) == 2
        assert all(len(vector) == 384 for vector in response.vectors)
        assert response.vectors[0][0] == pytest.approx(-0.03447726368904114)

    def test_base64_embeddings_decode_to_floats(self) -> None:
        response = parse_embedding_response(recorded("embeddings_base64"))
        (vector,) = response.vectors
        assert len(vector) == 384
        assert sum(value * value for value in vector) == pytest.approx(1.0, rel=1e-3)

    def test_model_list(self) -> None:
        (model,) = parse_model_list(recorded("models"))
        assert model.model_dump() == {
            "id": "tiny-llama",
            "root": "/models/tiny-llama",
            "parent": None,
            "owned_by": "vllm",
            "max_model_len": 2048,
            "context_window": 2048,
        }
        assert parse_model_list(recorded("embed_models"))[0].context_window == 256

    def test_lora_adapter_inherits_its_parents_context_window(self) -> None:
        body = recorded("models")
        body["data"].append({"id": "sql-lora", "root": "/adapters/sql", "parent": "tiny-llama", "max_model_len": None})
        adapter = parse_model_list(body)[1]
        assert (adapter.parent, adapter.max_model_len, adapter.context_window) == ("tiny-llama", None, 2048)

    def test_tokenize(self) -> None:
        result = parse_tokenize_result(recorded("tokenize"))
        assert (result.count, result.tokens, result.max_model_len) == (2, [411, 408], 2048)

    @pytest.mark.parametrize(
        ("parser", "body"),
        [
            (parse_chat_response, {"choices": []}),
            (parse_chat_response, ["not", "an", "object"]),
            (parse_chat_response, {"id": "x", "model": "m", "choices": [{"message": {"tool_calls": [{}]}}]}),
            (parse_completion_response, {"id": "x"}),
            (parse_embedding_response, {"model": "e", "data": [{"index": 0, "embedding": "***"}]}),
            (parse_model_list, {"object": "list"}),
            (parse_tokenize_result, {"tokens": "x"}),
        ],
    )
    def test_wrong_shapes_are_invalid_responses(self, parser: Any, body: Any) -> None:
        with pytest.raises(InvalidResponseError):
            parser(body)


def test_every_answer_type_is_json_serializable() -> None:
    answers = [
        parse_chat_response(recorded("chat_tool_call_auto")),
        parse_completion_response(recorded("completions")),
        parse_embedding_response(recorded("embeddings_base64")),
        parse_model_list(recorded("models"))[0],
        parse_tokenize_result(recorded("tokenize")),
        StreamChunk(tool_calls=[ToolCallDelta(index=0, name="f")], usage=Usage(prompt_tokens=1)),
        MetricsSnapshot(models={"m": ModelMetrics(running=1)}),
        Readiness(instance="i", configured=True, ready=False, local=True, base_url="http://h", live=False),
    ]
    for answer in answers:
        dumped = answer.model_dump(mode="json")
        assert type(answer).model_validate(json.loads(json.dumps(dumped))) == answer
