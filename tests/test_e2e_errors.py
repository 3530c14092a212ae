"""Bad input and auth on both APIs: a clear 4xx in the endpoint's own error shape, and the
replica keeps serving. Real engine and model (the prompt-length check is the engine's)."""

from importlib.metadata import version

import httpx
import pytest

pytestmark = pytest.mark.e2e

USER = [{"role": "user", "content": "Hi"}]
TOO_LONG = [{"role": "user", "content": "hi " * 3000}]

BAD_BODIES = [
    ("malformed JSON", b'{"messages": [', "not valid JSON"),
    ("messages not a list", {"messages": "hello"}, "messages"),
    ("no messages", {"model": ""}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("temperature too high", {"messages": USER, "temperature": 5}, "temperature"),
    ("temperature not a number", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("negative max_tokens", {"messages": USER, "max_tokens": -1}, "max_tokens"),
    ("top_p zero", {"messages": USER, "top_p": 0}, "top_p"),
    ("prompt longer than context", {"messages": TOO_LONG}, "2048"),
]

OPENAI_BAD_BODIES = [
    *BAD_BODIES,
    # Checks across fields that vLLM's request model makes with an error type of its own.
    ("stream_options without stream", {"messages": USER, "stream_options": {"include_usage": True}}, "stream"),
    ("empty tools", {"messages": USER, "tools": []}, "tools"),
    ("n zero", {"messages": USER, "n": 0}, "n: must be at least 1"),
    ("max_completion_tokens zero", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
]


def _post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize("case, body, mentions", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_llm_bad_input_is_400_with_detail_msg(client, case, body, mentions):
    response = _post(client, "/llm", body)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert mentions in detail["msg"]
    assert "Traceback" not in detail["msg"]
    assert detail["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("case, body, mentions", OPENAI_BAD_BODIES, ids=[c[0] for c in OPENAI_BAD_BODIES])
def test_openai_bad_input_is_400_with_error_object(client, case, body, mentions):
    if isinstance(body, dict) and "model" not in body:
        body = {**body, "model": "smollm2-135m-instruct"}
    response = _post(client, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert mentions in error["message"]
    assert error["type"] and error["code"] == 400


def test_no_such_route_or_method_answers_in_the_endpoints_shape(client):
    wrong_method = client.get("/llm")
    assert wrong_method.status_code == 405
    assert "GET /llm" in wrong_method.json()["detail"]["msg"]
    assert wrong_method.headers["allow"] == "POST"
    no_route = client.get("/v1/no-such-route")
    assert no_route.status_code == 404
    assert no_route.json()["error"]["type"] == "not_found_error"
    openai_wrong_method = client.get("/v1/chat/completions")
    assert openai_wrong_method.status_code == 405
    assert openai_wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_llm_unknown_model_names_the_models(client):
    response = client.post("/llm", json={"messages": USER, "model": "llama-70b"})
    assert response.status_code == 404
    assert "smollm2-135m-instruct" in response.json()["detail"]["msg"]


def test_replica_keeps_serving_after_bad_input(client):
    for _, body, _ in BAD_BODIES:
        _post(client, "/llm", body)
    response = client.post(
        "/llm", json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}
    )
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert client.get("/health").json()["status"] == "OK"


@pytest.mark.parametrize(
    "method, path, shape",
    [
        ("POST", "/llm", "detail"),
        ("POST", "/v1/chat/completions", "error"),
        ("GET", "/v1/models", "error"),
        ("GET", "/version", "detail"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic abc", "Bearer"])
def test_every_route_but_health_needs_the_token(llm_url, client, method, path, shape, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, llm_url + path, headers=headers, json={"messages": USER}, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert shape in response.json()


def test_auth_is_checked_before_the_body_is_read(llm_url):
    response = httpx.post(llm_url + "/llm", content=b"{not json", timeout=30)
    assert response.status_code == 401


def test_health_needs_no_token_and_version_names_the_model(llm_url, client):
    health = httpx.get(llm_url + "/health", timeout=30).json()
    assert health == {"status": "OK", "models": {"smollm2-135m-instruct": "ready"}}
    assert client.get("/version").json() == {
        "pipeline": "llm",
        "model_id": "smollm2-135m-instruct",
        "version": version("livepeer-llm-serve"),
    }
