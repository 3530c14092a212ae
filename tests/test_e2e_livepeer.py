"""The Livepeer `/llm` contract through HTTP, on the real engine and model."""

import pytest
from livepeer_ai import Livepeer
from livepeer_ai.models import errors
from pydantic import TypeAdapter

from serve_app.apis.livepeer.protocol import LLMResponse
from tests.conftest import API_KEY
from tests.sse import json_chunks

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
DOCUMENTED = TypeAdapter(LLMResponse)
"""The response type the route's OpenAPI documents, and the one the code builds."""


def test_answers_paris_with_message_and_delta(client):
    response = client.post("/llm", json={"messages": FRANCE, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    DOCUMENTED.validate_python(body)
    assert set(body) == {"id", "model", "created", "usage", "choices"}
    assert body["model"] == "smollm2-135m-instruct"
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["delta"] == choice["message"] == {"role": "assistant", "content": choice["message"]["content"]}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_trailing_slash_route_and_alias(client):
    response = client.post("/llm/", json={"messages": FRANCE, "temperature": 0, "model": "smollm2"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "smollm2-135m-instruct"


def test_streams_token_by_token_in_contract_shape(client):
    whole = client.post("/llm", json={"messages": FRANCE, "temperature": 0}).json()
    response = client.post("/llm", json={"messages": FRANCE, "temperature": 0, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = json_chunks(response.text)
    for chunk in chunks:
        DOCUMENTED.validate_python(chunk)
        assert set(chunk) == {"id", "model", "created", "usage", "choices"}
        assert len(chunk["choices"]) == 1
        assert chunk["choices"][0]["delta"]["role"] == "assistant"
    *content, final = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    # One chunk per generated token, nothing batched (the end-of-sequence token, counted in
    # usage, carries no text).
    completions = [c["usage"]["completion_tokens"] for c in content]
    assert completions == list(range(1, len(content) + 1))
    assert final["choices"][0] == {"index": 0, "finish_reason": "stop", "delta": {"role": "assistant", "content": ""}}
    assert final["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == whole["choices"][0]["message"]["content"]


def test_max_tokens_cut_says_length(client):
    body = client.post("/llm", json={"messages": FRANCE, "max_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_livepeer_sdk_gets_an_answer(llm_url):
    sdk = Livepeer(http_bearer=API_KEY, server_url=llm_url)
    result = sdk.generate.llm(request={"messages": FRANCE, "model": "", "temperature": 0, "max_tokens": 32})
    assert "Paris" in result.llm_response.choices[0].message.content
    assert result.llm_response.usage.completion_tokens > 0


def test_livepeer_sdk_reads_our_errors(llm_url):
    sdk = Livepeer(http_bearer="wrong-token", server_url=llm_url)
    with pytest.raises(errors.HTTPError) as raised:
        sdk.generate.llm(request={"messages": FRANCE})
    assert raised.value.data.detail.msg == "invalid bearer token"
