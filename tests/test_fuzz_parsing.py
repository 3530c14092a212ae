"""The fuzz tests' bodies (tests/fuzz.py) parsed in process, thousands a second: every body is
a request or a 400 with a clean message, never another exception; and each fault the fuzzing
over HTTP found (tests/test_fuzz_http.py), pinned by its own example."""

import asyncio
import json
import pickle
from datetime import UTC, datetime

import pytest
from hypothesis import given
from pydantic import BaseModel
from starlette.requests import Request

from serve_app.apis.admin import instant, iso
from serve_app.apis.admin_keys import AdminKeys, KeyCreate, KeyRotate, KeyUpdate
from serve_app.apis.admin_registry import RegistryCalls, parsed
from serve_app.apis.admin_tenants import TenantCreate, TenantUpdate
from serve_app.apis.anthropic.protocol import parse_messages
from serve_app.apis.livepeer.protocol import LLMRequest
from serve_app.apis.openai.protocol import (
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embeddings,
    parse_responses,
    parse_tokenize,
)
from serve_app.errors import MAX_PROBLEMS, BadRequest
from serve_app.tenancy.limiter import LimitGate
from tests.fuzz import (
    chat_bodies,
    completion_bodies,
    encoded,
    fuzz_settings,
    key_change,
    leaks,
    llm_bodies,
    messages_bodies,
    new_key,
    new_tenant,
    responses_bodies,
    rotation,
    tenant_change,
    tokenize_bodies,
)

USER = [{"role": "user", "content": "hi"}]


def _refusal(parse, body: bytes) -> str:
    with pytest.raises(BadRequest) as refused:
        parse(body)
    return refused.value.message


def _clean(error: BadRequest, body: bytes) -> None:
    assert not leaks(error.message, body.decode("utf-8", "replace")), error.message


@fuzz_settings(400)
@given(body=encoded(chat_bodies))
def test_any_chat_completions_body_is_a_request_that_crosses_a_ray_hop_or_a_400(body):
    try:
        chat = parse_chat(body)
    except BadRequest as error:
        _clean(error, body)
        return
    pickle.dumps(chat)  # to the model's replica


@fuzz_settings(300)
@given(body=encoded(completion_bodies))
def test_any_completions_body_is_a_request_that_crosses_a_ray_hop_or_a_400(body):
    try:
        completion = parse_completion(body)
    except BadRequest as error:
        _clean(error, body)
        return
    pickle.dumps(completion)


@fuzz_settings(300)
@given(body=encoded(messages_bodies))
def test_any_anthropic_messages_body_is_a_request_that_crosses_a_ray_hop_or_a_400(body):
    try:
        message = parse_messages(body)
    except BadRequest as error:
        _clean(error, body)
        return
    pickle.dumps(message)


@fuzz_settings(300)
@given(body=encoded(responses_bodies))
def test_any_responses_body_is_a_request_that_crosses_a_ray_hop_or_a_400(body):
    try:
        response = parse_responses(body)
    except BadRequest as error:
        _clean(error, body)
        return
    pickle.dumps(response)


@fuzz_settings(200)
@given(body=encoded(tokenize_bodies))
def test_any_tokenization_body_is_a_request_or_a_400(body):
    for parse in (parse_tokenize, parse_detokenize):
        try:
            pickle.dumps(parse(body))
        except BadRequest as error:
            _clean(error, body)


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"prompt": ""}, "prompt: must be a text, a list of texts or token ids, not empty"),
        ({"prompt": []}, "prompt: must be a text, a list of texts or token ids, not empty"),
        ({"prompt": {"text": "hi"}}, "prompt: must be a string or a list"),
        ({"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds: not served here"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens: must be at least 1, not 0"),
        ({"prompt": "hi", "n": -1}, "n: must be at least 1, not -1"),
    ],
)
def test_a_completion_body_we_cannot_bound_or_serve_is_a_400_naming_its_field(fields, complaint):
    assert complaint in _refusal(parse_completion, json.dumps(fields).encode())


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({}, "input: must be a string or a list"),
        ({"input": []}, "input: must be a text, a list of texts or token ids, not empty"),
        ({"input": "hi", "encoding_format": "bytes"}, "encoding_format: must be float or base64"),
        ({"messages": "hi"}, "messages: must be a list"),
    ],
)
def test_an_embeddings_body_we_cannot_serve_is_a_400_naming_its_field(fields, complaint):
    assert complaint in _refusal(parse_embeddings, json.dumps(fields).encode())


def test_tokenize_reads_messages_as_a_chat_and_a_prompt_as_text():
    chat = parse_tokenize(json.dumps({"messages": USER}).encode())
    text = parse_tokenize(json.dumps({"prompt": "hi"}).encode())
    assert (type(chat).__name__, type(text).__name__) == ("TokenizeChatRequest", "TokenizeCompletionRequest")
    assert "messages: must be a list" in _refusal(parse_tokenize, b'{"messages": "hi"}')


@fuzz_settings(400)
@given(body=encoded(llm_bodies))
def test_any_llm_body_is_a_request_for_the_engine_or_a_400(body):
    try:
        request = LLMRequest.from_body(body)
    except BadRequest as error:
        _clean(error, body)
        return
    pickle.dumps(request.to_chat_request())


def _admin_parse(model: type[BaseModel]):
    """The admin routes' parsing of a body into `model`, as a route does it."""

    def parse(body: bytes):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({"type": "http", "method": "POST", "path": "/admin", "headers": []}, receive)
        return asyncio.run(parsed(model, request, empty_ok=model is KeyRotate))

    return parse


@pytest.mark.parametrize(
    "model, bodies",
    [
        (KeyCreate, new_key),
        (KeyUpdate, key_change),
        (KeyRotate, rotation),
        (TenantCreate, new_tenant),
        (TenantUpdate, tenant_change),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_any_admin_body_is_one_the_routes_can_store_and_show_or_a_400(model: type[BaseModel], bodies):
    """What a body holds is stored and shown again by every listing: it must have a JSON form
    (no infinity) and a UTC date."""

    parse = _admin_parse(model)

    @fuzz_settings(120)
    @given(body=encoded(bodies))
    def check(body: bytes) -> None:
        try:
            value = parse(body)
        except BadRequest as error:
            _clean(error, body)
            return
        json.dumps(value.model_dump(), allow_nan=False, default=str)
        expires_at = getattr(value, "expires_at", None)
        if expires_at is not None:
            iso(expires_at.timestamp())

    check()


# /v1/chat/completions: vLLM's checks on the raw JSON assumed its types (500s), its model read
# some content parts only when first iterated (an iterator a Ray hop cannot carry).


@pytest.mark.parametrize("messages", [5, None, True, "hello", {"role": "user"}, []])
def test_messages_that_are_not_a_list_of_messages_are_a_400_naming_them(messages):
    message = _refusal(parse_chat, json.dumps({"messages": messages}).encode())
    assert message == "invalid request body: messages: must be a list of at least one message"


@pytest.mark.parametrize(
    "message, place, complaint",
    [
        (5, "messages.0", "must be an object with a role and content"),
        ({"role": ["user"], "content": "x"}, "messages.0.role", '["user"] is not one of'),
        ({"role": "user", "content": 5}, "messages.0.content", "must be a string, null or a list of content parts"),
        ({"role": "user", "content": {"text": "x"}}, "messages.0.content", "must be a string, null or a list"),
        ({"role": "user", "content": [5]}, "messages.0.content.0", "must be a string or an object with a string type"),
        ({"role": "user", "content": [{"type": 5}]}, "messages.0.content.0", "an object with a string type"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages.0.content.0.text", "must be a string"),
        ({"role": "user", "content": [{"type": "refusal"}]}, "messages.0.content.0.refusal", "must be a string"),
        ({"role": "user", "content": "x", "name": 5}, "messages.0.name", "must be a string"),
        ({"role": "user", "content": "x", "tool_calls": 5}, "messages.0.tool_calls", "must be a list"),
        ({"role": "assistant", "content": None, "tool_calls": [5]}, "messages.0.tool_calls.0", "must be an object"),
    ],
)
def test_a_message_of_the_wrong_shape_is_a_400_naming_its_place(message, place, complaint):
    refused = _refusal(parse_chat, json.dumps({"messages": [message]}).encode())
    assert refused.startswith(f"invalid request body: {place}: ") and complaint in refused, refused


@pytest.mark.parametrize(
    "part",
    [
        "words as a part",
        {"type": "image_url", "image_url": {"url": 5}},
        {"type": "no-such-part"},
    ],
)
def test_a_content_part_vllm_reads_only_later_is_read_now(part):
    refused = _refusal(parse_chat, json.dumps({"messages": [{"role": "user", "content": [part]}]}).encode())
    assert refused == "invalid request body: messages.0.content.0: not a content part this server reads"


def test_text_parts_stay_a_list_that_crosses_a_ray_hop():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    chat = parse_chat(json.dumps({"messages": [{"role": "user", "content": parts}]}).encode())
    assert pickle.loads(pickle.dumps(chat)).messages[0]["content"] == parts


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"tools": {"f": 1}, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools: must be a list"),
        ({"tools": [5], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.0: must be an object"),
        ({"tools": [{"type": "function"}]}, "tools.0.function: must be an object"),
        ({"tools": [{"function": {}}]}, "tools.0.function.name: must be a string"),
        ({"structured_outputs": [1]}, "structured_outputs: must be an object"),
    ],
)
def test_fields_vllms_raw_checks_read_are_checked_first(fields, complaint):
    assert complaint in _refusal(parse_chat, json.dumps({"messages": USER} | fields).encode())


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(literal):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + b"}"
    assert _refusal(parse_chat, body).startswith("the request body is not valid JSON: ")


# Pydantic's own path names the members of a union it tried, in its and vLLM's terms.


def test_a_union_field_names_only_the_clients_path_and_what_each_member_wanted():
    refused = _refusal(parse_chat, json.dumps({"messages": USER, "stop": 5}).encode())
    assert refused == "invalid request body: stop: Input should be a valid string or Input should be a valid list"
    refused = _refusal(parse_chat, json.dumps({"messages": USER, "response_format": 5}).encode())
    assert refused == "invalid request body: response_format: Input should be an object"
    refused = _refusal(LLMRequest.from_body, json.dumps({"messages": [{"role": "user", "content": 5}]}).encode())
    assert refused == (
        "invalid request body: messages.0.content: Input should be a valid string or Input should be a valid array"
    )


def test_a_field_left_out_is_named_and_a_body_of_many_problems_names_the_first_few():
    assert _refusal(LLMRequest.from_body, b'{"messages": [{"role": "user"}]}') == (
        "invalid request body: messages.0.content: Field required"
    )
    many = json.dumps({"messages": [{"role": "wizard", "content": "x"}] * 50}).encode()
    refused = _refusal(LLMRequest.from_body, many)
    assert refused.count("messages.") == MAX_PROBLEMS and refused.endswith(f"and {50 - MAX_PROBLEMS} more")


# The admin routes: a body or query whose time or number could be stored but not shown.


@pytest.mark.parametrize("expires_at", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_an_expiry_outside_years_1_to_9999_in_utc_is_refused(expires_at):
    refused = _refusal(_admin_parse(KeyCreate), json.dumps({"name": "k", "expires_at": expires_at}).encode())
    assert refused == "invalid request body: expires_at: must be a time whose UTC date is within years 1 to 9999"


def test_an_expiry_at_the_edges_of_the_range_is_kept_and_shown():
    for edge in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"):
        expires_at = KeyCreate.model_validate_json(json.dumps({"name": "k", "expires_at": edge})).expires_at
        assert iso(expires_at.timestamp()).startswith(edge[:10])


@pytest.mark.parametrize(
    "limits, place",
    [({"spend_per_day": 1e999}, "spend_per_day"), ({"soft": {"spend_per_month": 1e999}}, "soft.spend_per_month")],
)
def test_a_budget_of_infinite_spend_is_refused(limits, place):
    """1e999 reads as infinity, which JSON cannot show again."""
    refused = _refusal(_admin_parse(TenantCreate), json.dumps({"name": "t", "limits": limits}).encode())
    assert refused == f"invalid request body: limits.{place}: Input should be a finite number"


def test_a_usage_bound_shown_in_utc_must_be_a_time_there():
    with pytest.raises(BadRequest, match="is not a time this server can represent"):
        instant("0001-01-01T00:00:00+14:00", "since")
    assert instant("1969-12-31T23:00:00-01:00", "until") == datetime(1970, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("limit", ["0", "-1", "-99999999999999999999999"])
async def test_an_audit_limit_below_one_is_refused_before_the_database_reads_it_as_none(limit):
    admin = AdminKeys(RegistryCalls(None), [], set(), LimitGate(None))
    query = {"type": "http", "method": "GET", "path": "/admin/audit", "query_string": f"limit={limit}".encode()}
    with pytest.raises(BadRequest, match="limit: must be at least 1"):
        await admin.audit(Request(query | {"headers": []}))
