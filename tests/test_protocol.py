"""The `/llm` wire rules, as pure functions: request defaults and the chunk shapes."""

import pytest
from pydantic import ValidationError

from serve_app.apis.livepeer import chunks as livepeer
from serve_app.apis.livepeer.protocol import LLM_DEFAULTS, LLMRequest
from serve_app.apis.openai.protocol import ChatCompletionResponse
from serve_app.apis.request_policy import capped_max_tokens, for_engine

USER = [{"role": "user", "content": "hi"}]


def test_defaults_apply_when_absent_or_null():
    for body in ({"messages": USER}, {"messages": USER, "temperature": None, "max_tokens": None, "model": None}):
        request = LLMRequest.model_validate(body)
        assert (
            request.model,
            request.temperature,
            request.max_tokens,
            request.top_p,
            request.top_k,
            request.stream,
        ) == ("", 0.7, 256, 1.0, -1, False)


def _for_engine(body: dict, limit: int | None):
    request = LLMRequest.model_validate(body)
    max_tokens = capped_max_tokens(request.asked_max_tokens, LLM_DEFAULTS["max_tokens"], limit)
    return for_engine(request.to_chat_request(), "m", max_tokens)


def test_conversion_to_a_vllm_request():
    chat = _for_engine({"messages": USER, "top_k": 5, "stream": True}, None)
    assert (chat.model, chat.top_k, chat.max_tokens, chat.temperature) == ("m", 5, 256, 0.7)
    assert chat.stream_options.include_usage and chat.stream_options.continuous_usage_stats


def test_default_max_tokens_bows_to_the_limit_but_an_explicit_one_is_kept():
    assert _for_engine({"messages": USER}, 64).max_tokens == 64
    assert _for_engine({"messages": USER, "max_tokens": 50}, 64).max_tokens == 50


def test_text_parts_are_joined():
    request = LLMRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert request.to_chat_request().messages[0]["content"] == "ab"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("top_k", 0),
        ("top_k", -2),
    ],
)
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValidationError):
        LLMRequest.model_validate({"messages": USER, field: value})


def _vllm_chunk(content=None, finish=None, completion=0, choices=True):
    chunk = {
        "id": "c1",
        "model": "m",
        "created": 5,
        "usage": {"prompt_tokens": 4, "completion_tokens": completion, "total_tokens": 4 + completion},
    }
    chunk["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": finish}] if choices else []
    return chunk


def test_stream_chunks_follow_the_contract():
    state = livepeer.StreamState()
    out = []
    for chunk in [
        _vllm_chunk("", None, 0),
        _vllm_chunk("Hel", None, 1),
        _vllm_chunk("lo", "stop", 2),
        _vllm_chunk(choices=False, completion=2),
    ]:
        out += livepeer.stream_chunks(chunk, state)
    assert [c["choices"][0]["delta"]["content"] for c in out] == ["Hel", "lo", ""]
    assert [c["choices"][0]["finish_reason"] for c in out] == [None, None, "stop"]
    assert [c["usage"]["completion_tokens"] for c in out] == [1, 2, 2]
    assert all(c["id"] == "c1" and c["choices"][0]["delta"]["role"] == "assistant" for c in out)


def test_error_chunk_is_a_well_formed_final_chunk():
    state = livepeer.StreamState()
    livepeer.stream_chunks(_vllm_chunk("a", None, 1), state)
    final = livepeer.failure_chunk(state, "boom")
    assert final["choices"] == [{"index": 0, "finish_reason": "error", "delta": {"role": "assistant", "content": ""}}]
    assert final["error"] == {"message": "boom"} and final["usage"]["completion_tokens"] == 1


def test_full_response_fills_message_and_delta():
    response = ChatCompletionResponse.model_validate(
        {
            "id": "c",
            "model": "m",
            "created": 1,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    body = livepeer.full_response(response)
    assert body["choices"][0] == {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": "Paris"},
        "delta": {"role": "assistant", "content": "Paris"},
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
