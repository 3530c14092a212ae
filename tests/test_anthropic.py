"""Anthropic's Messages API without Ray: its bodies checked, its events passed on as vLLM frames
them while the request's usage and stop reason are read from them, a failure midway ended with
Anthropic's `error` event, its error shape, and its `x-api-key` header."""

import json

import pytest
from starlette.requests import Request

from serve_app.apis.anthropic.protocol import parse_messages, usage_counts
from serve_app.apis.anthropic.serving import anthropic_events
from serve_app.apis.request_policy import PROMPT_OVERHEAD_TOKENS, prompt_token_bound, reserved_tokens
from serve_app.errors import BadRequest, Overloaded, api_of, error_body
from serve_app.http.admission import credentials
from serve_app.models.outputs import ModelError
from serve_app.telemetry.record import Answer
from tests.scripted_model import model_call

REQUEST_ID = "req-anth"
HI = [{"role": "user", "content": "hi"}]


def frame(name: str, **data) -> str:
    """One of vLLM's events as the model's replica hands it on: its frame, less the blank line."""
    return f"event: {name}\ndata: {json.dumps({'type': name} | data)}"


def script(*words: str, stop: str | None = "end_turn") -> list:
    usage = {"input_tokens": 7, "output_tokens": 0}
    events = [frame("message_start", message={"id": "msg_1", "usage": usage})]
    events.append(frame("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    events += [frame("content_block_delta", index=0, delta={"type": "text_delta", "text": w}) for w in words]
    events.append(frame("content_block_stop", index=0))
    if stop is not None:
        events.append(
            frame("message_delta", delta={"stop_reason": stop}, usage={"input_tokens": 7, "output_tokens": len(words)})
        )
        events.append(frame("message_stop"))
    return events


async def _drain(events) -> list[str]:
    return [item async for item in events]


async def test_events_pass_through_as_framed_and_tell_the_answer_its_usage():
    answer = Answer()
    sent = await _drain(anthropic_events(model_call(script("Hel", "lo")), answer, REQUEST_ID))
    assert sent == [item + "\n\n" for item in script("Hel", "lo")]
    assert (answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == (7, 2, "end_turn")
    assert answer.token_chunks == 2 and answer.failed_with is None


@pytest.mark.parametrize(
    "failure, status, kind",
    [
        (ModelError(503, "the engine is draining"), 503, "overloaded_error"),
        (RuntimeError("EngineDeadError: internals"), 500, "api_error"),
    ],
)
async def test_a_failure_midway_ends_the_stream_with_anthropics_error_event(failure, status, kind):
    answer = Answer()
    items = [*script("Hel")[:3], failure]
    sent = await _drain(anthropic_events(model_call(items), answer, REQUEST_ID))
    name, _, data = sent[-1].rstrip().partition("\ndata: ")
    body = json.loads(data)
    assert name == "event: error" and body["type"] == "error" and body["error"]["type"] == kind
    assert body["request_id"] == REQUEST_ID and "internals" not in data
    assert answer.failed_with == status and answer.finish_reason == "error"


async def test_a_stream_that_stops_without_a_stop_reason_is_a_failure():
    answer = Answer()
    sent = await _drain(anthropic_events(model_call(script("Hel", stop=None)), answer, REQUEST_ID))
    assert sent[-1].startswith("event: error\n") and answer.failed_with == 500


def test_usage_counts_cached_prompt_tokens_as_prompt_tokens():
    assert usage_counts({"input_tokens": 3, "cache_read_input_tokens": 10, "output_tokens": 2}) == {
        "prompt_tokens": 13,
        "completion_tokens": 2,
    }
    assert usage_counts(None) is None


@pytest.mark.parametrize(
    "body, complaint",
    [
        ({"model": "m", "messages": HI}, "max_tokens: Field required"),
        ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens: max_tokens must be positive"),
        ({"model": "m", "messages": [], "max_tokens": 5}, "messages: must be a list of at least one message"),
        ({"messages": HI, "max_tokens": 5}, "model: Field required"),
    ],
)
def test_a_messages_body_is_checked_before_any_budget_is_touched(body, complaint):
    with pytest.raises(BadRequest) as refused:
        parse_messages(json.dumps(body).encode())
    assert complaint in refused.value.message


def test_a_message_reserves_its_max_tokens_and_bounds_its_prompt_system_and_tools_included():
    plain = parse_messages(json.dumps({"model": "m", "messages": HI, "max_tokens": 9}).encode())
    system = "You are terse. " * 50
    with_system = parse_messages(json.dumps({"model": "m", "messages": HI, "max_tokens": 9, "system": system}).encode())
    assert reserved_tokens(plain) == reserved_tokens(with_system) == 9
    assert PROMPT_OVERHEAD_TOKENS < prompt_token_bound(plain) < prompt_token_bound(with_system) - len(system)


def test_errors_on_the_messages_api_are_in_anthropics_shape():
    assert api_of("/v1/messages") == api_of("/v1/messages/count_tokens") == "anthropic"
    assert api_of("/v1/chat/completions") == "openai"
    assert error_body("anthropic", Overloaded("busy"), "r1") == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy"},
        "request_id": "r1",
    }
    assert error_body("anthropic", BadRequest("no"), "r2")["error"]["type"] == "invalid_request_error"


def _request(headers: dict[str, str]) -> Request:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def test_x_api_key_stands_for_a_bearer_token_on_the_messages_api_only():
    assert credentials(_request({"x-api-key": "sk-1"}), "/v1/messages") == "Bearer sk-1"
    assert credentials(_request({"x-api-key": "sk-1", "authorization": "Bearer sk-2"}), "/v1/messages") == "Bearer sk-2"
    assert credentials(_request({"x-api-key": "sk-1"}), "/v1/chat/completions") is None


async def test_the_replica_turns_vllms_anthropic_error_event_into_a_model_error():
    """As it does with OpenAI's error event: the ingress never reads a payload to find one."""
    from serve_app.models.runner import _stream_outputs

    async def lines():
        yield script("Hel")[0] + "\n\n"
        error = {"type": "error", "error": {"type": "internal_error", "message": "engine gone"}}
        yield f"event: error\ndata: {json.dumps(error)}\n\n"
        yield script("Hel")[1] + "\n\n"  # never read: the error ends the stream

    outputs = [output async for output in _stream_outputs(lines())]
    assert outputs == [script("Hel")[0], ModelError(500, "engine gone")]
