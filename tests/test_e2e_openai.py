"""The OpenAI-compatible API through the official `openai` SDK, on the real engine and model."""

import httpx
import openai
import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def sdk(llm_url):
    return openai.OpenAI(base_url=llm_url + "/v1", api_key=API_KEY, max_retries=0)


def test_chat_completion(sdk):
    completion = sdk.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE, temperature=0)
    assert "Paris" in completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


def test_stream_with_usage(sdk):
    whole = sdk.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)
    stream = sdk.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_sends_no_usage_chunk(sdk):
    chunks = list(sdk.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_vllm_sampling_features_pass_through(sdk):
    completion = sdk.chat.completions.create(
        model="smollm2", messages=FRANCE, max_tokens=5, n=2, seed=7, logprobs=True, top_logprobs=2
    )
    assert len(completion.choices) == 2
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == 2


def test_models_lists_the_configured_model(sdk):
    assert [m.id for m in sdk.models.list()] == ["smollm2-135m-instruct"]


def test_a_model_is_retrieved_by_id_or_alias(sdk):
    assert sdk.models.retrieve("smollm2").id == "smollm2-135m-instruct"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-9")


def test_models_with_a_trailing_slash_names_no_model(llm_url):
    response = httpx.get(llm_url + "/v1/models/", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404
    assert "GET /v1/models" in response.json()["error"]["message"]


def test_unknown_model_is_404_naming_models(sdk):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.chat.completions.create(model="gpt-9", messages=FRANCE)
    assert "smollm2-135m-instruct" in raised.value.body["message"]


def test_wrong_key_is_401(llm_url):
    sdk = openai.OpenAI(base_url=llm_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
