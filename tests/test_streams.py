"""Both APIs' SSE generators on scripted model streams, and the `EventStream` that sends them and
finishes the request when the stream ends: a normal end, a length end, a stream that stops without
a finish reason, an exception or a `ModelError` midway, and a client that leaves.

Every `/llm` chunk is checked against the documented response type and the gateway's reading of
the stream (docs/livepeer-contract.md): `choices` never empty, and one finishing chunk, the last."""

import asyncio
import json
import logging

import pytest
from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect

from serve_app.apis.livepeer.protocol import LLMResponse
from serve_app.apis.livepeer.serving import livepeer_events
from serve_app.apis.openai.serving import openai_events
from serve_app.http.lifecycle import Listeners, RequestLifecycle
from serve_app.http.streaming import DONE, EventStream
from serve_app.models.outputs import ModelError
from serve_app.telemetry.record import CLIENT_CLOSED_REQUEST, Answer
from tests.captured_logs import serve_records
from tests.scripted_model import PROMPT_TOKENS, Stall, answer_script, chunk, model_call

REQUEST_ID = "req-7f3a"
LLM_RESPONSE = TypeAdapter(LLMResponse)


@pytest.fixture
def serve_log():
    with serve_records() as records:
        yield records


def _payload(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2], event
    return json.loads(event.removeprefix("data: "))


async def _drain(events) -> list[dict]:
    return [_payload(event) async for event in events]


def _llm_contract(chunks: list[dict]) -> list[dict]:
    """Each chunk is an `LLMResponse` (extra keys forbidden), `choices` is never empty, and only
    the last chunk finishes: the gateway stops reading at the first finish reason."""
    assert chunks, "a stream has at least its final chunk"
    for chunk_ in chunks:
        LLM_RESPONSE.validate_python(chunk_)
        assert len(chunk_["choices"]) == 1
        assert chunk_["choices"][0]["delta"]["role"] == "assistant"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert [bool(r) for r in reasons] == [False] * (len(chunks) - 1) + [True], f"one final chunk, the last: {reasons}"
    assert all("error" not in c for c in chunks[:-1])
    final = chunks[-1]["choices"][0]
    assert final["delta"]["content"] == ""
    return chunks


def _texts(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks]


# The /llm stream.


@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_llm_stream_relays_each_text_then_one_final_chunk(finish):
    answer = Answer()
    call = model_call(answer_script("Hel", "lo", " there", finish=finish))
    chunks = _llm_contract(await _drain(livepeer_events(call, answer, REQUEST_ID)))
    assert _texts(chunks) == ["Hel", "lo", " there", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == PROMPT_TOKENS for c in chunks)
    assert all(c["usage"]["total_tokens"] == PROMPT_TOKENS + c["usage"]["completion_tokens"] for c in chunks)
    assert {(c["id"], c["model"], c["created"]) for c in chunks} == {("chatcmpl-1", "m", 1700000000)}
    assert (answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == (finish, PROMPT_TOKENS, 3)
    assert answer.token_chunks == 3 and answer.failed_with is None
    assert call.rest.taken == len(answer_script("Hel", "lo", " there")) - 1  # read to its end, usage chunk too


async def test_llm_stream_that_stops_without_a_finish_reason_ends_with_an_error_chunk():
    answer = Answer()
    call = model_call(answer_script("a", "b", finish=None))
    chunks = _llm_contract(await _drain(livepeer_events(call, answer, REQUEST_ID)))
    assert _texts(chunks) == ["a", "b", ""]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "error"
    assert "stopped without finishing" in final["error"]["message"] and REQUEST_ID in final["error"]["message"]
    assert final["usage"]["completion_tokens"] == 2
    assert answer.failed_with == 500 and answer.stream_status() == 500
    assert (answer.finish_reason, answer.completion_tokens) == ("error", 2)


async def test_llm_stream_whose_model_raises_midway_ends_well_formed_and_keeps_the_usage(serve_log):
    answer = Answer()
    script = answer_script("one", "two", "three")
    call = model_call([*script[:3], RuntimeError("engine core died: secret detail"), *script[3:]])
    chunks = _llm_contract(await _drain(livepeer_events(call, answer, REQUEST_ID)))
    assert _texts(chunks) == ["one", "two", ""]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "error"
    assert final["error"] == {"message": f"the model engine failed mid-stream (request id {REQUEST_ID})"}
    assert final["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": PROMPT_TOKENS + 2}
    assert answer.failed_with == 500 and answer.stream_status() == 500
    assert (answer.prompt_tokens, answer.completion_tokens, answer.token_chunks) == (PROMPT_TOKENS, 2, 2)
    logged = serve_log.at(logging.ERROR)
    assert len(logged) == 1 and REQUEST_ID in logged[0].getMessage()
    assert "secret detail" in str(logged[0].exc_info[1])  # the operator's log has it; the client's chunk not


@pytest.mark.parametrize("status", [400, 503])
async def test_llm_stream_with_a_model_error_midway_reports_its_status(status):
    answer = Answer()
    script = answer_script("one", "two")
    call = model_call([*script[:2], ModelError(status, "the engine refused: reason"), *script[2:]])
    chunks = _llm_contract(await _drain(livepeer_events(call, answer, REQUEST_ID)))
    assert _texts(chunks) == ["one", ""]
    assert chunks[-1]["error"]["message"] == f"the engine refused: reason (request id {REQUEST_ID})"
    assert chunks[-1]["usage"]["completion_tokens"] == 1
    assert answer.failed_with == status and answer.stream_status() == status
    assert answer.completion_tokens == 1


async def test_llm_stream_closed_midway_keeps_the_usage_so_far_and_is_a_departed_client():
    answer = Answer()
    call = model_call(answer_script("one", "two", "three", "four"))
    events = livepeer_events(call, answer, REQUEST_ID)
    received = [_payload(await anext(events)), _payload(await anext(events))]
    await events.aclose()
    assert _texts(received) == ["one", "two"]
    assert (answer.prompt_tokens, answer.completion_tokens, answer.token_chunks) == (PROMPT_TOKENS, 2, 2)
    assert answer.failed_with is None and answer.finish_reason is None
    assert answer.stream_status() == CLIENT_CLOSED_REQUEST
    with pytest.raises(StopAsyncIteration):
        await anext(events)


async def test_llm_stream_whose_model_fails_after_its_finishing_chunk_sends_no_second_final_chunk(serve_log):
    """The model can fail after the finishing chunk (between it and the usage-only chunk, say):
    the client already has its final chunk, and the contract has one final chunk, then [DONE].
    The failure is the operator's to read, in the log."""
    answer = Answer()
    script = answer_script("one", "two")
    call = model_call([*script[:-1], RuntimeError("replica died"), script[-1]])
    chunks = _llm_contract(await _drain(livepeer_events(call, answer, REQUEST_ID)))
    assert _texts(chunks) == ["one", "two", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert (answer.failed_with, answer.finish_reason, answer.completion_tokens) == (None, "stop", 2)
    [logged] = serve_log.at(logging.ERROR)
    assert REQUEST_ID in logged.getMessage() and isinstance(logged.exc_info[1], RuntimeError)


async def test_llm_stream_with_text_on_its_finishing_chunk_sends_the_text_then_the_final_chunk():
    answer = Answer()
    script = [chunk(role=True), chunk("Hel", None, 1), chunk("lo", "stop", 2), chunk(completion=2, choices=False)]
    chunks = _llm_contract(await _drain(livepeer_events(model_call(script), answer, REQUEST_ID)))
    assert _texts(chunks) == ["Hel", "lo", ""]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 2]
    assert answer.token_chunks == 2 and answer.finish_reason == "stop"


async def test_llm_stream_whose_only_chunks_are_roles_and_usage_still_ends_with_a_final_chunk():
    """A stream can finish without text (an empty answer): its final chunk is still sent."""
    answer = Answer()
    chunks = _llm_contract(await _drain(livepeer_events(model_call(answer_script(finish="stop")), answer, REQUEST_ID)))
    assert _texts(chunks) == [""] and chunks[0]["choices"][0]["finish_reason"] == "stop"
    assert answer.token_chunks == 0 and answer.first_token_at is None


# The OpenAI stream.


def _stripped(payload: str, keep_usage: bool) -> dict:
    parsed = json.loads(payload)
    if not keep_usage:
        parsed.pop("usage", None)
    return parsed


@pytest.mark.parametrize("wants_usage", [False, True])
@pytest.mark.parametrize("per_chunk", [False, True])
@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_openai_stream_passes_vllm_chunks_on_with_only_the_usage_asked(wants_usage, per_chunk, finish):
    answer = Answer()
    script = answer_script("Hel", "lo", finish=finish)
    chunks = await _drain(openai_events(model_call(script), answer, REQUEST_ID, wants_usage, per_chunk))
    with_choices = [_stripped(p, per_chunk) for p in script if json.loads(p)["choices"]]
    usage_only = [json.loads(p) for p in script if not json.loads(p)["choices"]]
    assert chunks == with_choices + (usage_only if wants_usage else [])
    assert all(("usage" in c) == per_chunk for c in chunks if c["choices"])
    assert [c["usage"]["completion_tokens"] for c in chunks if not c["choices"]] == ([2] if wants_usage else [])
    assert (answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == (finish, PROMPT_TOKENS, 2)
    assert answer.token_chunks == 2 and answer.failed_with is None


async def test_openai_stream_that_stops_without_a_finish_reason_ends_with_an_error_event():
    answer = Answer()
    chunks = await _drain(openai_events(model_call(answer_script("a", finish=None)), answer, REQUEST_ID, True, False))
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-2]] == ["", "a"]
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 1
    assert chunks[-1] == {
        "error": {
            "message": "the model stopped without finishing",
            "type": "internal_error",
            "param": None,
            "code": 500,
        },
        "request_id": REQUEST_ID,
    }
    assert answer.failed_with == 500 and answer.stream_status() == 500 and answer.completion_tokens == 1


async def test_openai_stream_whose_model_raises_midway_ends_with_an_error_event(serve_log):
    answer = Answer()
    script = answer_script("one", "two", "three")
    call = model_call([*script[:3], RuntimeError("secret detail"), *script[3:]])
    chunks = await _drain(openai_events(call, answer, REQUEST_ID, False, False))
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-1]] == ["", "one", "two"]
    error = chunks[-1]
    assert set(error) == {"error", "request_id"} and error["request_id"] == REQUEST_ID
    assert error["error"]["message"] == f"the model engine failed mid-stream (request id {REQUEST_ID})"
    assert (error["error"]["code"], error["error"]["type"]) == (500, "internal_error")
    assert answer.failed_with == 500 and (answer.prompt_tokens, answer.completion_tokens) == (PROMPT_TOKENS, 2)
    assert len(serve_log.at(logging.ERROR)) == 1


async def test_openai_stream_with_a_model_error_midway_reports_its_status():
    answer = Answer()
    script = answer_script("one", "two")
    call = model_call([*script[:2], ModelError(400, "bad logits processor"), *script[2:]])
    chunks = await _drain(openai_events(call, answer, REQUEST_ID, True, True))
    assert chunks[-1]["error"] == {
        "message": "bad logits processor",
        "type": "invalid_request_error",
        "param": None,
        "code": 400,
    }
    assert chunks[-2]["usage"]["completion_tokens"] == 1  # usage asked per chunk
    assert answer.failed_with == 400 and answer.completion_tokens == 1


async def test_openai_stream_closed_midway_keeps_the_usage_so_far_and_is_a_departed_client():
    answer = Answer()
    events = openai_events(model_call(answer_script("one", "two", "three")), answer, REQUEST_ID, True, False)
    received = [_payload(await anext(events)) for _ in range(3)]  # the role chunk, "one", "two"
    await events.aclose()
    assert all("usage" not in c for c in received)
    assert (answer.prompt_tokens, answer.completion_tokens) == (PROMPT_TOKENS, 2)
    assert answer.stream_status() == CLIENT_CLOSED_REQUEST


# The EventStream that sends them and finishes the request.


class _Client:
    """An ASGI server's side of one streaming response: the messages sent, and a client that
    leaves after `leave_after` bodies (spec 2.4: the next send fails, as uvicorn's does)."""

    def __init__(self, leave_after: int | None = None) -> None:
        self.messages: list[dict] = []
        self._leave_after = leave_after
        self.left = asyncio.Event()

    async def receive(self) -> dict:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        bodies = sum(m["type"] == "http.response.body" for m in self.messages)
        if self._leave_after is not None and message["type"] == "http.response.body" and bodies >= self._leave_after:
            self.left.set()
            raise OSError("connection reset by peer")
        self.messages.append(message)

    @property
    def body(self) -> str:
        return "".join(m["body"].decode() for m in self.messages if m["type"] == "http.response.body")

    @property
    def headers(self) -> dict[str, str]:
        [start] = [m for m in self.messages if m["type"] == "http.response.start"]
        return {k.decode(): v.decode() for k, v in start["headers"]}


def _lifecycle(finished: list) -> RequestLifecycle:
    return RequestLifecycle(REQUEST_ID, "/llm", Listeners(finished=(finished.append,)))


def _scope(spec_version: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "method": "POST",
        "path": "/llm",
        "headers": [],
    }


async def test_a_whole_stream_ends_with_done_and_finishes_its_request_as_200():
    finished: list = []
    lifecycle = _lifecycle(finished)
    call = model_call(answer_script("Hel", "lo"), headers={"x-ratelimit-remaining-requests": "9"})
    events = livepeer_events(call, lifecycle.answer, REQUEST_ID)
    client = _Client()
    await EventStream(events, call.rest.cancel, lifecycle, call.headers)(_scope("2.4"), client.receive, client.send)
    assert client.body.endswith(DONE) and client.body.count(DONE) == 1
    chunks = _llm_contract([json.loads(block.removeprefix("data: ")) for block in client.body.split("\n\n")[:-2]])
    assert _texts(chunks) == ["Hel", "lo", ""]
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["cache-control"] == "no-cache" and client.headers["x-ratelimit-remaining-requests"] == "9"
    assert [f.status for f in finished] == [200]
    assert (finished[0].completion_tokens, finished[0].finish_reason) == (2, "stop")
    assert call.rest.cancelled == 1  # the model's work is released however the stream ended


async def test_a_stream_that_failed_midway_still_ends_with_done_and_finishes_with_the_failure():
    finished: list = []
    lifecycle = _lifecycle(finished)
    script = answer_script("one", "two")
    call = model_call([*script[:2], ModelError(503, "draining"), *script[2:]])
    client = _Client()
    stream = EventStream(livepeer_events(call, lifecycle.answer, REQUEST_ID), call.rest.cancel, lifecycle, {})
    await stream(_scope("2.4"), client.receive, client.send)
    assert client.body.endswith("\n\n" + DONE)
    assert [(f.status, f.finish_reason, f.completion_tokens) for f in finished] == [(503, "error", 1)]


async def test_a_client_that_leaves_midway_closes_the_events_and_finishes_the_request_as_499():
    finished: list = []
    lifecycle = _lifecycle(finished)
    call = model_call(answer_script("one", "two", "three", "four"))
    events = livepeer_events(call, lifecycle.answer, REQUEST_ID)
    client = _Client(leave_after=2)
    with pytest.raises(ClientDisconnect):
        await EventStream(events, call.rest.cancel, lifecycle, {})(_scope("2.4"), client.receive, client.send)
    assert _texts([_payload(b + "\n\n") for b in client.body.split("\n\n")[:-1]]) == ["one", "two"]
    assert events.ag_frame is None  # closed, its cleanup run before the request was recorded
    assert call.rest.cancelled == 1
    assert [(f.status, f.completion_tokens, f.finish_reason) for f in finished] == [(CLIENT_CLOSED_REQUEST, 3, None)]


async def test_a_client_that_leaves_a_stalled_stream_cancels_the_model_and_finishes_as_499():
    """ASGI before 2.4: Starlette listens for the disconnect while the model stalls."""
    finished: list = []
    lifecycle = _lifecycle(finished)
    stall = Stall()
    script = answer_script("one", "two")
    call = model_call([*script[:2], stall, *script[2:]])
    client = _Client()
    stream = EventStream(livepeer_events(call, lifecycle.answer, REQUEST_ID), call.rest.cancel, lifecycle, {})
    sending = asyncio.create_task(stream(_scope("2.0"), client.receive, client.send))
    await asyncio.wait_for(stall.reached.wait(), 5)
    assert finished == []
    client.left.set()
    await asyncio.wait_for(sending, 5)
    assert DONE not in client.body
    assert call.rest.cancelled == 1
    assert [(f.status, f.completion_tokens) for f in finished] == [(CLIENT_CLOSED_REQUEST, 1)]
