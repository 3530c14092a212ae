"""OpenAI's Responses API without Ray: stateless only (what needs a stored response is refused by
name), its reservation and prompt bound, and its named events read for usage and output."""

import json

import pytest

from serve_app.apis.event_streams import named_events
from serve_app.apis.openai.protocol import parse_responses
from serve_app.apis.openai.serving import read_response_event
from serve_app.apis.request_policy import reserved_tokens
from serve_app.errors import BadRequest
from serve_app.telemetry.record import Answer
from tests.scripted_model import model_call


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"store": True}, "store: stored responses are not kept by this server"),
        ({"previous_response_id": "resp_1"}, "previous_response_id: previous responses are not kept"),
        ({"background": True}, "background: background responses are not kept"),
        ({"previous_input_messages": [{"role": "user", "content": "x"}]}, "previous_input_messages: previous messages"),
        ({"max_output_tokens": 0}, "max_output_tokens: must be at least 1, not 0"),
    ],
)
def test_what_needs_server_state_or_cannot_be_bounded_is_refused(fields, complaint):
    with pytest.raises(BadRequest) as refused:
        parse_responses(json.dumps({"model": "m", "input": "hi"} | fields).encode())
    assert complaint in refused.value.message


def test_a_response_is_stateless_and_reserves_its_max_output_tokens():
    response = parse_responses(json.dumps({"model": "m", "input": "hi", "max_output_tokens": 9}).encode())
    assert response.store is False and reserved_tokens(response) == 9
    with pytest.raises(BadRequest, match="input: must be a string or a list"):
        parse_responses(b'{"model": "m"}')


def _event(name: str, **data) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name} | data)}"


async def test_named_events_pass_through_and_tell_the_answer_its_usage_and_status():
    usage = {"input_tokens": 11, "output_tokens": 2, "total_tokens": 13}
    script = [
        _event("response.created", response={"status": "in_progress"}),
        _event("response.output_text.delta", delta="Par"),
        _event("response.output_text.delta", delta="is"),
        _event("response.completed", response={"status": "completed", "usage": usage}),
    ]
    answer = Answer()
    sent = [item async for item in named_events(model_call(script), answer, "r1", read_response_event, "openai")]
    assert sent == [item + "\n\n" for item in script]
    assert (answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == (11, 2, "completed")
    assert answer.token_chunks == 2


async def test_a_failed_response_ends_the_stream_with_an_error_event_in_openais_shape():
    script = [_event("response.created", response={}), _event("response.failed", response={"status": "failed"})]
    answer = Answer()
    sent = [item async for item in named_events(model_call(script), answer, "r2", read_response_event, "openai")]
    name, _, data = sent[-1].rstrip().partition("\ndata: ")
    assert name == "event: error" and json.loads(data)["error"]["code"] == 500
    assert json.loads(data)["request_id"] == "r2" and answer.failed_with == 500
