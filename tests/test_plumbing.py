"""Routing, failure handling and limits through HTTP, on a test engine that fails on demand
(the real engine cannot be made to crash mid-stream). Real Ray cluster and Serve application."""

import pytest

from tests.sse import events, json_chunks

pytestmark = pytest.mark.e2e


def _ask(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], **fields}


@pytest.mark.parametrize(
    "model, served", [("", "fake-b"), (None, "fake-b"), ("a", "fake-a"), ("fake-a", "fake-a"), ("fake-b", "fake-b")]
)
def test_routes_by_model_name_alias_or_default(fake_client, model, served):
    body = _ask("one two three")
    if model is not None:
        body["model"] = model
    response = fake_client.post("/llm", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == served


def test_midstream_failure_ends_llm_stream_with_error_chunk(fake_client):
    response = fake_client.post("/llm", json=_ask("alpha beta FAIL MIDSTREAM gamma delta", stream=True))
    assert response.status_code == 200
    chunks = json_chunks(response.text)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["alpha ", "beta "]
    final = chunks[-1]
    assert final["choices"] == [{"index": 0, "finish_reason": "error", "delta": {"role": "assistant", "content": ""}}]
    assert "request id" in final["error"]["message"]
    assert "Traceback" not in final["error"]["message"]
    assert final["usage"]["completion_tokens"] == 2


def test_midstream_failure_ends_openai_stream_with_error_event(fake_client):
    response = fake_client.post(
        "/v1/chat/completions", json=_ask("alpha beta FAIL MIDSTREAM gamma", model="a", stream=True)
    )
    payloads = events(response.text)
    assert payloads[-1] == "[DONE]"
    assert '"error"' in payloads[-2] and "Traceback" not in payloads[-2]


@pytest.mark.parametrize("path, shape", [("/llm", "detail"), ("/v1/chat/completions", "error")])
def test_engine_failure_before_output_is_500_without_traceback(fake_client, path, shape):
    response = fake_client.post(path, json=_ask("FAIL AT START", model="a"), headers={"x-request-id": "trace-me-42"})
    assert response.status_code == 500
    body = response.json()
    message = body["detail"]["msg"] if shape == "detail" else body["error"]["message"]
    assert "trace-me-42" in message and "Traceback" not in message
    assert response.headers["x-request-id"] == "trace-me-42"


@pytest.mark.parametrize("path, shape", [("/llm", "detail"), ("/v1/chat/completions", "error")])
def test_an_error_event_before_any_token_is_a_real_status(fake_client, path, shape):
    response = fake_client.post(path, json=_ask("RETRYABLE one two", model="a", stream=True))
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    body = response.json()
    assert "retry" in (body["detail"]["msg"] if shape == "detail" else body["error"]["message"])


def test_max_tokens_above_the_limit_is_refused(fake_client):
    response = fake_client.post("/llm", json=_ask("one two", max_tokens=65))
    assert response.status_code == 400
    assert "limit of 64" in response.json()["detail"]["msg"]


def test_openai_request_without_max_tokens_gets_the_cap(fake_client):
    words = " ".join(f"w{i}" for i in range(100))
    body = fake_client.post("/v1/chat/completions", json=_ask(words, model="a")).json()
    assert body["usage"]["completion_tokens"] == 64
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_body_over_the_bound_is_413_in_shape_declared_or_chunked(fake_client):
    """The default bound, 4 MiB: a body one byte over it, with its length declared on `/llm` and in
    chunks without one on `/v1`; the replica answers the next request."""
    over = 4 * 1024 * 1024 + 1
    declared = fake_client.post("/llm", content=b" " * over, headers={"content-type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert declared.json()["detail"] == {
        "msg": "the request body is over this server's limit of 4,194,304 bytes",
        "request_id": declared.headers["x-request-id"],
    }
    chunked = fake_client.post("/v1/chat/completions", content=(b" " * 65536 for _ in range(over // 65536 + 1)))
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == 413
    assert chunked.json()["request_id"] == chunked.headers["x-request-id"]
    assert fake_client.post("/llm", json=_ask("still here")).json()["choices"][0]["message"]["content"] == "still here"
