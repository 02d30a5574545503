"""Stream decoding of every recorded vLLM stream, error frames, interruptions, and the accumulator."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource

from provider.vllm import (
    InvalidResponseError,
    StreamAccumulator,
    StreamChunk,
    StreamDecoder,
    StreamErrorFrame,
    StreamInterruptedError,
    is_retryable,
)
from provider.vllm.thinking import PreambleSplitter, ReasoningSplitter, TagSplitter
from tests.provider.conftest import transcript_response


def decode_events(response: httpx.Response, splitter: ReasoningSplitter | None = None) -> list[StreamChunk]:
    decoder = StreamDecoder(splitter=splitter, instance="gpu1")
    chunks = []
    for event in EventSource(response).iter_sse():
        chunk = decoder.feed(event.data)
        if chunk is not None:
            chunks.append(chunk)
        if decoder.done:
            break
    decoder.finish()
    return chunks


def decode_transcript(name: str) -> list[StreamChunk]:
    return decode_events(transcript_response(name))


def accumulate(chunks: list[StreamChunk]) -> Any:
    accumulator = StreamAccumulator()
    for chunk in chunks:
        accumulator.add(chunk)
    return accumulator.result()


def sse(*frames: Any) -> httpx.Response:
    """A stream body made of the given frames (dicts as JSON, strings as they are) and nothing else."""
    lines = []
    for frame in frames:
        lines.append(frame if isinstance(frame, str) else f"data: {json.dumps(frame)}\n\n")
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content="".join(lines).encode())


def delta_frame(finish_reason: str | None = None, **delta: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


DONE = "data: [DONE]\n\n"


class TestTranscripts:
    def test_plain_stream_with_usage(self) -> None:
        chunks = decode_transcript("chat_stream_usage")
        assert chunks[0].content == ""
        assert chunks[-2].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.model_dump() == {
            "prompt_tokens": 16,
            "completion_tokens": 6,
            "total_tokens": 22,
            "reasoning_tokens": None,
        }
        result = accumulate(chunks)
        assert result.content == "\n" * 6
        assert result.id == "chatcmpl-a40a6ff9895a027e"
        assert result.model == "tiny-llama"
        assert result.finish_reason == "length"
        assert result.usage.total_tokens == 22

    def test_continuous_usage_keeps_the_last_count(self) -> None:
        chunks = decode_transcript("chat_stream_continuous_usage")
        assert [chunk.usage.completion_tokens for chunk in chunks if chunk.usage] == [0, 1, 2, 3, 3]
        assert accumulate(chunks).usage.total_tokens == 19

    def test_reasoning_stream(self) -> None:
        result = accumulate(decode_transcript("chat_reasoning_stream"))
        assert result.reasoning == " world"
        assert result.content == "Paris."
        assert result.finish_reason == "stop"
        assert result.usage.reasoning_tokens == 0

    def test_named_tool_call_stream(self) -> None:
        chunks = decode_transcript("chat_tool_call_named_stream")
        first = chunks[1].tool_calls[0]
        assert (first.index, first.id, first.type, first.name) == (
            0,
            "chatcmpl-tool-a4fd582f0a37814a",
            "function",
            "get_weather",
        )
        assert chunks[1].content is None
        result = accumulate(chunks)
        assert len(result.tool_calls) == 1
        call = result.tool_calls[0]
        assert call.id == "chatcmpl-tool-a4fd582f0a37814a"
        assert call.function.name == "get_weather"
        assert call.function.arguments == "266666e96"
        assert result.finish_reason == "stop"
        assert result.content is None

    def test_auto_tool_call_stream(self) -> None:
        result = accumulate(decode_transcript("chat_tool_call_auto_stream"))
        assert result.reasoning == " world"
        assert result.content is None
        assert result.finish_reason == "tool_calls"
        assert json.loads(result.tool_calls[0].function.arguments) == {"city": "Paris"}

    def test_stream_aborted_by_sleep(self) -> None:
        """An abort nobody asked for is a retryable failure, not a finished answer (issue 11, defect 3)."""
        from provider.vllm.errors import GenerationAbortedError

        with pytest.raises(GenerationAbortedError, match="after 272 chunks") as caught:
            decode_transcript("chat_stream_aborted_by_sleep")
        assert caught.value.retryable

    def test_completions_stream_is_not_a_chat_stream_but_decodes_without_content(self) -> None:
        chunks = decode_transcript("completions_stream")
        assert all(chunk.content is None for chunk in chunks)


class TestFraming:
    def test_keep_alive_comments_are_ignored(self) -> None:
        response = sse(": keep-alive\n\n", delta_frame(content="a"), ": keep-alive\n\n", delta_frame(content="b"), DONE)
        assert accumulate(decode_events(response)).content == "ab"

    def test_reasoning_content_of_older_servers(self) -> None:
        response = sse(delta_frame(reasoning_content="think"), delta_frame(content="say"), DONE)
        result = accumulate(decode_events(response))
        assert (result.reasoning, result.content) == ("think", "say")

    def test_both_reasoning_fields_are_not_doubled(self) -> None:
        response = sse(delta_frame(reasoning="x", reasoning_content="x"), DONE)
        assert accumulate(decode_events(response)).reasoning == "x"

    def test_error_frame_inside_a_200_stream(self) -> None:
        error = {"error": {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}}
        response = sse(delta_frame(content="a"), error, DONE)
        with pytest.raises(StreamErrorFrame) as caught:
            decode_events(response)
        assert caught.value.message == "engine died"
        assert caught.value.status_code == 500
        assert is_retryable(caught.value)
        assert caught.value.instance == "gpu1"

    def test_client_side_error_frame_is_not_retryable(self) -> None:
        response = sse({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}, DONE)
        with pytest.raises(StreamErrorFrame) as caught:
            decode_events(response)
        assert not is_retryable(caught.value)

    def test_older_flat_error_frame(self) -> None:
        response = sse({"object": "error", "message": "old style", "type": "x", "code": 503}, DONE)
        with pytest.raises(StreamErrorFrame, match="old style"):
            decode_events(response)

    def test_stream_ending_without_done_is_interrupted(self) -> None:
        response = sse(delta_frame(content="a"), delta_frame(finish_reason="stop"))
        with pytest.raises(StreamInterruptedError) as caught:
            decode_events(response)
        assert is_retryable(caught.value)

    def test_a_chunk_that_is_not_json_is_an_invalid_response(self) -> None:
        with pytest.raises(InvalidResponseError):
            decode_events(sse("data: {not json\n\n", DONE))

    def test_a_chunk_of_the_wrong_shape_is_an_invalid_response(self) -> None:
        with pytest.raises(InvalidResponseError):
            decode_events(sse({"choices": "nope"}, DONE))


class TestReasoningInStreams:
    def test_tags_split_across_deltas(self) -> None:
        response = sse(
            delta_frame(content="<thi"),
            delta_frame(content="nk>plan"),
            delta_frame(content=" more</th"),
            delta_frame(content="ink>ans"),
            delta_frame(content="wer", finish_reason="stop"),
            DONE,
        )
        chunks = decode_events(response, TagSplitter())
        assert [chunk.reasoning for chunk in chunks] == [None, "plan", " more", None, None]
        result = accumulate(chunks)
        assert (result.content, result.reasoning) == ("answer", "plan more")

    def test_a_held_partial_tag_is_flushed_with_the_finish_chunk(self) -> None:
        response = sse(delta_frame(content="a <"), delta_frame(finish_reason="stop"), DONE)
        chunks = decode_events(response, TagSplitter())
        assert chunks[-1].content == "<"
        assert accumulate(chunks).content == "a <"

    def test_preamble_without_close_tag_is_flushed_at_done(self) -> None:
        response = sse(delta_frame(content="just "), delta_frame(content="an answer"), DONE)
        chunks = decode_events(response, PreambleSplitter())
        result = accumulate(chunks)
        assert (result.content, result.reasoning) == ("just an answer", None)

    def test_preamble_stream(self) -> None:
        response = sse(
            delta_frame(content="plan</"),
            delta_frame(content="think>ans"),
            delta_frame(content="wer", finish_reason="stop"),
            DONE,
        )
        result = accumulate(decode_events(response, PreambleSplitter()))
        assert (result.content, result.reasoning) == ("answer", "plan")


class TestAccumulator:
    def test_interleaved_tool_calls_join_per_index(self) -> None:
        frames = [
            delta_frame(tool_calls=[{"index": 1, "id": "b", "type": "function", "function": {"name": "g"}}]),
            delta_frame(tool_calls=[{"index": 0, "id": "a", "type": "function", "function": {"name": "f"}}]),
            delta_frame(tool_calls=[{"index": 0, "function": {"arguments": '{"x":'}}]),
            delta_frame(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}]),
            delta_frame(tool_calls=[{"index": 0, "id": "ignored", "function": {"arguments": " 1}"}}]),
            delta_frame(finish_reason="tool_calls"),
            DONE,
        ]
        result = accumulate(decode_events(sse(*frames)))
        assert [(call.id, call.function.name, call.function.arguments) for call in result.tool_calls] == [
            ("a", "f", '{"x": 1}'),
            ("b", "g", "{}"),
        ]

    def test_empty_stream_result(self) -> None:
        result = StreamAccumulator().result()
        assert (result.content, result.reasoning, result.tool_calls, result.usage) == (None, None, [], None)

    def test_result_is_json_serializable(self) -> None:
        result = accumulate(decode_transcript("chat_tool_call_auto_stream"))
        assert json.loads(json.dumps(result.model_dump(mode="json")))["tool_calls"][0]["type"] == "function"
