"""The chat payload vLLM receives, and reasoning extraction for the ``tags`` and ``preamble`` sources."""

from __future__ import annotations

from typing import Any

import pytest

from provider.vllm import ChatRequest, PreambleSplitter, TagSplitter, build_chat_payload, split_reasoning
from provider.vllm.thinking import make_splitter, sent_thinking

MESSAGES = [{"role": "user", "content": "Hi"}]


def payload(default: bool = True, **fields: Any) -> dict[str, Any]:
    return build_chat_payload(ChatRequest(model="m", messages=MESSAGES, **fields), enable_thinking_default=default)


def feed_all(splitter: TagSplitter | PreambleSplitter, deltas: list[str]) -> tuple[str, str]:
    content, reasoning = "", ""
    for delta in deltas:
        piece_content, piece_reasoning = splitter.feed(delta)
        content += piece_content
        reasoning += piece_reasoning
    rest_content, rest_reasoning = splitter.flush()
    return content + rest_content, reasoning + rest_reasoning


class TestPayload:
    def test_minimal_request_sends_model_messages_and_default_thinking(self) -> None:
        assert payload() == {
            "model": "m",
            "messages": MESSAGES,
            "chat_template_kwargs": {"enable_thinking": True},
        }

    def test_default_off_and_request_silent_sends_no_thinking_switch(self) -> None:
        assert "chat_template_kwargs" not in payload(default=False)

    def test_request_enables_thinking_over_a_false_default(self) -> None:
        assert payload(default=False, thinking={"enabled": True})["chat_template_kwargs"] == {"enable_thinking": True}

    def test_request_turning_thinking_off_is_sent_explicitly(self) -> None:
        assert payload(thinking={"enabled": False})["chat_template_kwargs"] == {"enable_thinking": False}

    def test_existing_template_kwargs_are_kept(self) -> None:
        body = payload(extra_body={"chat_template_kwargs": {"custom": 1}})
        assert body["chat_template_kwargs"] == {"custom": 1, "enable_thinking": True}

    def test_explicit_template_switch_in_extra_body_wins_over_the_default(self) -> None:
        body = payload(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert body["chat_template_kwargs"] == {"enable_thinking": False}

    def test_the_requests_own_switch_wins_over_extra_body(self) -> None:
        body = payload(thinking={"enabled": True}, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert body["chat_template_kwargs"] == {"enable_thinking": True}

    def test_reasoning_effort_and_max_thinking_tokens_are_never_sent(self) -> None:
        body = payload(reasoning_effort="high", max_thinking_tokens=100, extra_body={"reasoning_effort": "low"})
        assert "reasoning_effort" not in body
        assert "max_thinking_tokens" not in body

    def test_stop_sequences_become_stop(self) -> None:
        assert payload(stop_sequences=["END"])["stop"] == ["END"]
        assert payload(stop="a", stop_sequences=["b", "a"])["stop"] == ["a", "b"]
        assert "stop" not in payload()

    def test_vllm_fields_pass_through_and_unset_ones_are_left_out(self) -> None:
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
        body = payload(
            max_tokens=5,
            temperature=0.0,
            top_k=3,
            min_p=0.1,
            repetition_penalty=1.1,
            seed=7,
            priority=2,
            request_id="req-1",
            ignore_eos=True,
            min_tokens=2,
            response_format=schema,
            structured_outputs={"regex": "a+"},
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice="auto",
        )
        assert body["temperature"] == 0.0
        assert body["response_format"] == schema
        assert body["structured_outputs"] == {"regex": "a+"}
        assert {key: body[key] for key in ("max_tokens", "top_k", "seed", "priority", "min_tokens")} == {
            "max_tokens": 5,
            "top_k": 3,
            "seed": 7,
            "priority": 2,
            "min_tokens": 2,
        }
        assert "top_p" not in body
        assert "include_reasoning" not in body

    def test_extra_body_is_sent_verbatim(self) -> None:
        assert payload(extra_body={"skip_special_tokens": False, "logit_bias": {"6": 6}})["logit_bias"] == {"6": 6}

    def test_stream_payload_always_asks_for_usage(self) -> None:
        request = ChatRequest(
            model="m", messages=MESSAGES, extra_body={"stream_options": {"continuous_usage_stats": True}}
        )
        body = build_chat_payload(request, enable_thinking_default=True, stream=True)
        assert body["stream"] is True
        assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}

    def test_sent_thinking_reads_the_switch(self) -> None:
        assert sent_thinking(payload()) is True
        assert sent_thinking(payload(thinking={"enabled": False})) is False
        assert sent_thinking(payload(default=False)) is None


class TestTagSplitter:
    def test_whole_answer(self) -> None:
        assert feed_all(TagSplitter(), ["<think>plan</think>answer"]) == ("answer", "plan")

    def test_text_without_tags_is_all_content(self) -> None:
        assert feed_all(TagSplitter(), ["a < b", " and c <", " d"]) == ("a < b and c < d", "")

    def test_several_blocks(self) -> None:
        assert feed_all(TagSplitter(), ["x<think>1</think>y<think>2</think>z"]) == ("xyz", "12")

    def test_unclosed_block_is_reasoning(self) -> None:
        assert feed_all(TagSplitter(), ["<think>cut off by len"]) == ("", "cut off by len")

    @pytest.mark.parametrize("text", ["<think>plan</think>answer", "pre<think>a<b</think>post <x>"])
    def test_every_split_point_gives_the_same_result(self, text: str) -> None:
        whole = feed_all(TagSplitter(), [text])
        for cut in range(len(text) + 1):
            assert feed_all(TagSplitter(), [text[:cut], text[cut:]]) == whole
        assert feed_all(TagSplitter(), list(text)) == whole

    def test_blank_lines_after_the_close_tag_are_dropped(self) -> None:
        assert feed_all(TagSplitter(), ["<think>plan</think>\n\nanswer"]) == ("answer", "plan")
        assert feed_all(TagSplitter(), ["<think>plan</think>\n", "\n", " answer\n"]) == ("answer\n", "plan")

    def test_leading_whitespace_of_an_answer_without_tags_is_kept(self) -> None:
        assert feed_all(TagSplitter(), ["\n  answer"]) == ("\n  answer", "")

    def test_a_held_partial_tag_is_released_as_text(self) -> None:
        splitter = TagSplitter()
        assert splitter.feed("ok <thi") == ("ok ", "")
        assert splitter.feed("s is not a tag") == ("<this is not a tag", "")


class TestPreambleSplitter:
    def test_text_before_the_first_close_tag_is_reasoning(self) -> None:
        assert feed_all(PreambleSplitter(), ["plan", " more</think>", "answer"]) == ("answer", "plan more")

    def test_an_opening_tag_the_model_wrote_itself_is_dropped(self) -> None:
        assert feed_all(PreambleSplitter(), ["<think>plan</think>answer"]) == ("answer", "plan")

    def test_only_the_first_close_tag_counts(self) -> None:
        assert feed_all(PreambleSplitter(), ["a</think>b</think>c"]) == ("b</think>c", "a")

    def test_blank_lines_after_the_close_tag_are_dropped(self) -> None:
        assert feed_all(PreambleSplitter(), ["plan</think>\n", "\n", "answer"]) == ("answer", "plan")

    def test_a_model_that_never_thinks_keeps_its_whole_answer(self) -> None:
        assert feed_all(PreambleSplitter(), ["just ", "an ", "answer"]) == ("just an answer", "")

    def test_a_close_tag_split_over_many_deltas(self) -> None:
        text = "reasoning</think>answer"
        for cut in range(len(text) + 1):
            assert feed_all(PreambleSplitter(), [text[:cut], text[cut:]]) == ("answer", "reasoning")
        assert feed_all(PreambleSplitter(), list(text)) == ("answer", "reasoning")

    def test_reasoning_is_released_when_the_tag_arrives(self) -> None:
        splitter = PreambleSplitter()
        assert splitter.feed("plan</thi") == ("", "")
        assert splitter.feed("nk>ans") == ("ans", "plan")
        assert splitter.feed("wer") == ("wer", "")


class TestSplitReasoning:
    def test_server_source_leaves_content_alone(self) -> None:
        assert split_reasoning("<think>x</think>y", "r", "server", True) == ("<think>x</think>y", "r")

    def test_tags_source_joins_server_reasoning_and_tag_reasoning(self) -> None:
        assert split_reasoning("<think>x</think>y", "r", "tags", None) == ("y", "rx")

    def test_content_that_was_all_reasoning_becomes_none(self) -> None:
        assert split_reasoning("<think>x</think>", None, "tags", True) == (None, "x")

    def test_preamble_source(self) -> None:
        assert split_reasoning("x</think>y", None, "preamble", True) == ("y", "x")
        assert split_reasoning("no tags here", None, "preamble", True) == ("no tags here", None)

    def test_preamble_with_thinking_off_does_not_parse(self) -> None:
        assert make_splitter("preamble", False) is None
        assert split_reasoning("x</think>y", None, "preamble", False) == ("x</think>y", None)

    def test_empty_content(self) -> None:
        assert split_reasoning(None, "r", "tags", True) == (None, "r")
