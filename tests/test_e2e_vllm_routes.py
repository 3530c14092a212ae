"""The routes served by vLLM's own serving classes beyond chat, on the real engine and model:
`/v1/completions` and `/v1/responses` through the official `openai` SDK and Anthropic's `/v1/messages` and
`/v1/messages/count_tokens` through the official `anthropic` SDK, streamed and not, and
`/tokenize` and `/detokenize`; each recorded in the ledger under its own endpoint, with the usage
its client was told. And the Livepeer runner's `/llm/chat/completions` alias of `/llm`."""

import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import API_KEY
from tests.polling import until

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


@pytest.fixture
def sdk(llm_url):
    return openai.OpenAI(base_url=llm_url + "/v1", api_key=API_KEY, max_retries=0)


def _ledger(client: httpx.Client, since: float, endpoint: str, requests: int) -> dict:
    def row() -> dict | None:
        rows = client.get("/admin/usage", params={"since": since, "group_by": "endpoint"}).json()["data"]
        found = [r for r in rows if r["endpoint"] == endpoint]
        return found[0] if found and found[0]["requests"] == requests else None

    return until(row, 15, f"the ledger to record {requests} request(s) on {endpoint}")


def test_completions_whole_and_streamed_are_answered_and_recorded(sdk, client):
    since = time.time()
    whole = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert "Paris" in whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(
        sdk.completions.create(
            model="smollm2",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Greedy decoding: the stream tells the same words, then the usage-only chunk.
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    row = _ledger(client, since, "/v1/completions", 2)
    assert row["failed_requests"] == 0
    assert row["prompt_tokens"] == 2 * whole.usage.prompt_tokens
    assert row["completion_tokens"] == 2 * whole.usage.completion_tokens


def test_responses_whole_and_streamed_are_answered_statelessly_and_recorded(sdk, client):
    since = time.time()
    ask = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 12, "temperature": 0}
    whole = sdk.responses.create(**ask)
    assert "Paris" in whole.output_text and whole.usage.output_tokens > 0
    events = list(sdk.responses.create(**ask | {"model": "smollm2"}, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == whole.output_text  # greedy decoding: the same words
    assert events[-1].response.usage == whole.usage

    row = _ledger(client, since, "/v1/responses", 2)
    assert row["failed_requests"] == 0
    assert row["prompt_tokens"] == 2 * whole.usage.input_tokens
    assert row["completion_tokens"] == 2 * whole.usage.output_tokens


def test_stored_and_chained_responses_are_refused_clearly(sdk):
    with pytest.raises(openai.BadRequestError) as stored:
        sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4, store=True)
    assert "store: stored responses are not kept by this server" in stored.value.body["message"]
    with pytest.raises(openai.BadRequestError) as chained:
        sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4, previous_response_id="resp_1")
    assert "previous_response_id" in chained.value.body["message"]


def test_a_bad_completion_request_is_refused_in_openais_shape(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model=MODEL, prompt="", max_tokens=4)
    assert "prompt" in refused.value.body["message"] and refused.value.body["code"] == 400
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=4)


def test_tokenize_then_detokenize_gives_the_text_back(client):
    since = time.time()
    text = "Hello, world! Tokens round trip."
    tokenized = client.post("/tokenize", json={"model": "smollm2", "prompt": text, "add_special_tokens": False})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    assert body["count"] == len(body["tokens"]) > 3 and body["max_model_len"] == 2048
    detokenized = client.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert detokenized.status_code == 200 and detokenized.json()["prompt"] == text
    # Messages are rendered with the model's chat template, which adds its role markers.
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["count"] > body["count"]
    _ledger(client, since, "/tokenize", 2)
    _ledger(client, since, "/detokenize", 1)


def test_tokenization_errors_are_in_openais_shape_with_the_request_id(client):
    refused = client.post("/detokenize", json={"tokens": "not a list"}, headers={"x-request-id": "detok-bad-1"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == 400 and refused.json()["request_id"] == "detok-bad-1"
    unauthorized = client.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
    assert unauthorized.status_code == 401 and "error" in unauthorized.json()


def test_the_livepeer_runners_chat_completions_alias_is_llm(client):
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    alias, llm = (client.post(path, json=body).json() for path in ("/llm/chat/completions", "/llm"))
    assert (alias["choices"], alias["usage"]) == (llm["choices"], llm["usage"])
    assert "Paris" in alias["choices"][0]["message"]["content"]


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
"""This SDK's release takes no `temperature` of its own; vLLM's Anthropic request does."""


@pytest.fixture
def claude(llm_url):
    """The SDK sends the key as `x-api-key`, as it does to Anthropic."""
    return anthropic.Anthropic(base_url=llm_url, api_key=API_KEY, max_retries=0)


def test_anthropic_messages_whole_and_streamed_and_their_token_count(claude, client):
    since = time.time()
    whole = claude.messages.create(model=MODEL, messages=FRANCE, max_tokens=12, extra_body=GREEDY)
    [block] = whole.content
    assert block.type == "text" and "Paris" in block.text
    assert whole.role == "assistant" and whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.output_tokens > 0
    with claude.messages.stream(model="smollm2", messages=FRANCE, max_tokens=12, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == block.text  # greedy decoding: the same words
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    counted = claude.messages.count_tokens(model=MODEL, messages=FRANCE)
    assert counted.input_tokens == whole.usage.input_tokens > 0

    row = _ledger(client, since, "/v1/messages", 2)
    assert row["failed_requests"] == 0
    assert row["prompt_tokens"] == 2 * whole.usage.input_tokens
    assert row["completion_tokens"] == 2 * whole.usage.output_tokens
    _ledger(client, since, "/v1/messages/count_tokens", 1)


def test_anthropic_errors_are_in_anthropics_shape(claude, llm_url):
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="claude-9", messages=FRANCE, max_tokens=4)
    assert unknown.value.body["type"] == "error" and unknown.value.body["error"]["type"] == "not_found_error"
    assert "smollm2-135m-instruct" in unknown.value.body["error"]["message"]  # the models this key may use
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=llm_url, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, messages=FRANCE, max_tokens=4
        )
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, messages=FRANCE, max_tokens=0)
    assert "max_tokens" in bad.value.body["error"]["message"] and bad.value.body["request_id"]
