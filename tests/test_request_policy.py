"""What reaches vLLM from an `/llm` request, through vLLM's own conversion into sampling
parameters, and the server's `max_tokens` cap and token reservation for every API's requests
(`request_policy`)."""

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeCompletionRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.sampling_params import RequestOutputKind, SamplingParams

from serve_app.apis.livepeer.protocol import LLM_DEFAULTS, LLMRequest
from serve_app.apis.request_policy import (
    PROMPT_OVERHEAD_TOKENS,
    capped_max_tokens,
    for_engine,
    prompt_token_bound,
    reserved_tokens,
)
from serve_app.errors import BadRequest

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Spain?"}]},
]
NON_DEFAULT = {"temperature": 0.3, "max_tokens": 17, "top_p": 0.85, "top_k": 7}


def _engine_request(body: dict, limit: int | None = None) -> ChatCompletionRequest:
    """As `LivepeerChat.complete` builds it."""
    request = LLMRequest.model_validate(body)
    max_tokens = capped_max_tokens(request.asked_max_tokens, LLM_DEFAULTS["max_tokens"], limit)
    return for_engine(request.to_chat_request(), "model-id", max_tokens)


def _sampling(chat: ChatCompletionRequest, prompt_tokens: int = 10, max_model_len: int = 4096) -> SamplingParams:
    """As vLLM's chat serving makes them, with no server defaults."""
    asked = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    max_tokens = get_max_tokens(max_model_len, asked, prompt_tokens, {})
    return chat.to_sampling_params(max_tokens, {})


def test_the_test_values_differ_from_the_defaults():
    """Else a field dropped on the way would still arrive with the expected value."""
    assert all(LLM_DEFAULTS[name] != value for name, value in NON_DEFAULT.items())
    bare = _sampling(ChatCompletionRequest(model="m", messages=MESSAGES[:2]))  # vLLM's own defaults
    assert all(getattr(bare, name) != value for name, value in NON_DEFAULT.items())


@pytest.mark.parametrize("stream", [True, False])
def test_every_llm_field_reaches_the_sampling_parameters(stream):
    chat = _engine_request({"messages": MESSAGES, "model": "alias", "stream": stream, **NON_DEFAULT})
    params = _sampling(chat)
    assert params.temperature == pytest.approx(0.3)
    assert params.top_p == pytest.approx(0.85)
    assert params.top_k == 7
    assert params.max_tokens == 17
    assert params.output_kind == (RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
    assert chat.stream is stream
    assert chat.model == "model-id"  # the router's id, not the client's alias
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
    ]


def test_the_llm_defaults_reach_the_sampling_parameters_too():
    """`/llm`'s defaults are not vLLM's (temperature 0.7 against 1.0, max_tokens 256 against the
    context's room), so they must be sent, not left to vLLM."""
    params = _sampling(_engine_request({"messages": MESSAGES}))
    assert params.temperature == pytest.approx(0.7)
    assert params.max_tokens == 256
    assert params.top_p == 1.0
    assert params.top_k in (0, -1)  # off, in whichever spelling this vLLM keeps


def test_the_servers_cap_reaches_the_sampling_parameters():
    assert _sampling(_engine_request({"messages": MESSAGES}, limit=40)).max_tokens == 40
    assert _sampling(_engine_request({"messages": MESSAGES, "max_tokens": 30}, limit=40)).max_tokens == 30


def test_a_stream_asks_vllm_for_usage_on_every_chunk_and_a_whole_answer_does_not():
    streamed = _engine_request({"messages": MESSAGES, "stream": True})
    assert streamed.stream_options.include_usage and streamed.stream_options.continuous_usage_stats
    assert _engine_request({"messages": MESSAGES}).stream_options is None


def test_for_engine_keeps_the_clients_own_stream_options_and_max_completion_tokens():
    chat = ChatCompletionRequest(
        model="alias",
        messages=MESSAGES[:2],
        stream=True,
        stream_options={"include_usage": False},
        max_completion_tokens=9,
    )
    sent = for_engine(chat, "model-id", 100)
    assert sent.max_completion_tokens == 9 and sent.max_tokens is None  # the client's own bound is kept
    assert sent.stream_options.include_usage and sent.stream_options.continuous_usage_stats
    assert chat.stream_options.include_usage is False  # the client's request is not changed
    assert _sampling(sent).max_tokens == 9


# The cap.


@pytest.mark.parametrize("asked, default, limit", [(65, 256, 64), (65, None, 64), (1000, 256, 999)])
def test_a_clients_max_tokens_above_the_limit_is_refused(asked, default, limit):
    with pytest.raises(BadRequest) as raised:
        capped_max_tokens(asked, default, limit)
    assert raised.value.status == 400
    assert raised.value.message == f"max_tokens is {asked}, above this server's limit of {limit}"


@pytest.mark.parametrize(
    "asked, default, limit, expected",
    [
        (64, 256, 64, 64),  # at the limit: kept
        (10, 256, 64, 10),
        (300, 256, None, 300),  # no limit: above the default is fine
        (None, 256, 64, 64),  # the default bows to the limit
        (None, 256, 1000, 256),  # and stays when below it
        (None, None, 64, 64),  # OpenAI's "none asked" gets the limit
        (None, None, None, None),
        (None, 256, None, 256),
    ],
)
def test_capped_max_tokens_keeps_a_clients_value_within_the_limit_and_bounds_the_default(
    asked, default, limit, expected
):
    assert capped_max_tokens(asked, default, limit) == expected


# The reservation.


@pytest.mark.parametrize(
    "fields, reserved",
    [
        ({"max_tokens": 10}, 10),
        ({"max_tokens": 10, "n": 3}, 30),
        ({"max_completion_tokens": 5, "max_tokens": 10, "n": 2}, 10),  # max_completion_tokens wins, as in vLLM
        ({"max_completion_tokens": 7}, 7),
        ({"n": 4}, 0),  # no bound: nothing known to reserve
        ({}, 0),
    ],
)
def test_reserved_tokens_are_the_most_every_choice_can_generate(fields, reserved):
    chat = ChatCompletionRequest(model="m", messages=MESSAGES[:2], **fields)
    assert reserved_tokens(chat) == reserved


def test_kv_transfer_params_never_reach_the_engine():
    """Their forwarded prompt token ids would replace the messages the budget's bound counts."""
    chat = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        kv_transfer_params={"prompt_token_ids": list(range(10_000)), "do_remote_prefill": True},
    )
    assert for_engine(chat, "m", None).kv_transfer_params is None


@pytest.mark.parametrize(
    "prompt, fields, reserved, bound",
    [
        ("abc", {"max_tokens": 10}, 10, 3 + PROMPT_OVERHEAD_TOKENS),
        ("abc", {}, 16, 3 + PROMPT_OVERHEAD_TOKENS),  # OpenAI's default of 16 tokens, as vLLM keeps it
        ("é", {"max_tokens": 4, "n": 2}, 8, 2 + PROMPT_OVERHEAD_TOKENS),  # bytes, not characters
        ([1, 2, 3], {"max_tokens": 5}, 5, 3),  # token ids count themselves
        (["ab", "c"], {"max_tokens": 5, "n": 3}, 30, 3 + 2 * PROMPT_OVERHEAD_TOKENS),  # a batch: each prompt's choices
        ([[1, 2], [3]], {"max_tokens": 5}, 10, 3),
    ],
)
def test_a_completion_reserves_every_prompts_choices_and_bounds_its_prompts(prompt, fields, reserved, bound):
    completion = CompletionRequest(model="m", prompt=prompt, **fields)
    assert reserved_tokens(completion) == reserved
    assert prompt_token_bound(completion) == bound


def test_tokenization_reserves_nothing():
    """It generates nothing: a key's token limits let it through, its request limits count it."""
    for request in (TokenizeCompletionRequest(prompt="hi " * 100), DetokenizeRequest(tokens=[1, 2, 3])):
        assert reserved_tokens(request) == prompt_token_bound(request) == 0


def test_for_engine_treats_a_completion_as_a_chat():
    completion = CompletionRequest(model="smollm2", prompt="hi", stream=True, kv_transfer_params={"x": 1})
    sent = for_engine(completion, "model-id", 32)
    assert (sent.model, sent.max_tokens, sent.kv_transfer_params) == ("model-id", 32, None)
    assert sent.stream_options.include_usage and sent.stream_options.continuous_usage_stats


def test_an_embedding_reserves_nothing_and_bounds_its_inputs():
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

    batch = EmbeddingCompletionRequest(model="m", input=["ab", "c"])
    assert reserved_tokens(batch) == 0
    assert prompt_token_bound(batch) == 3 + 2 * PROMPT_OVERHEAD_TOKENS
    assert prompt_token_bound(EmbeddingCompletionRequest(model="m", input=[5, 6, 7])) == 3


def test_every_apis_request_loses_its_transfer_fields_on_the_way_to_its_model():
    """Their prompt token ids would replace the prompt that the budget's bound counted."""
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    from serve_app.apis.request_policy import for_model

    smuggled = {"prompt_token_ids": list(range(5000)), "do_remote_prefill": True}
    for request in (
        AnthropicMessagesRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4),
        ResponsesRequest(model="m", input="hi"),
        CompletionRequest(model="m", prompt="hi"),
    ):
        sent = for_model(request.model_copy(update={"kv_transfer_params": smuggled, "ec_transfer_params": {}}), "id")
        assert (sent.model, sent.kv_transfer_params, sent.ec_transfer_params) == ("id", None, None)


def test_an_embedding_of_messages_bounds_them_like_a_chat():
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest

    chat = EmbeddingChatRequest(model="m", messages=[{"role": "user", "content": "x" * 300}])
    assert prompt_token_bound(chat) > 300
