"""Fuzzing over real HTTP, on the shared test-engine app (`fake_url`: two model deployments behind
the ingress, so that a chat request crosses a Ray hop): generated bodies (tests/fuzz.py) on
`/llm`, `/v1/chat/completions` and the admin routes (with the app's admin key), and malformed
`Authorization` headers on every route. No answer is a 5xx, every error is in its endpoint's shape
with its request id, none shows the server's insides, and the app still answers afterwards, its
key listings too. The run's count and statuses are printed when the module ends (`pytest -s`)
and written to REPORT.
"""

import json
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import example, given
from hypothesis import strategies as st

from serve_app.errors import api_of
from tests.conftest import FAKE_ADMIN_KEY, FAKE_KEY
from tests.fuzz import (
    Api,
    Tally,
    audit_query,
    chat_bodies,
    check_answer,
    encoded,
    fuzz_settings,
    key_change,
    llm_bodies,
    new_key,
    new_tenant,
    path_names,
    raw_queries,
    rotation,
    tenant_change,
    usage_query,
)
from tests.sse import json_chunks

pytestmark = pytest.mark.e2e

REPORT = Path("/tmp/llm-serve-fuzz.txt")
MIN_REQUESTS = 1000
CHAT_EXAMPLES = {"/llm": 300, "/v1/chat/completions": 320}
ADMIN_EXAMPLES = 260
HEADER_EXAMPLES = 10
"""Each header goes to every route: 20 of them, and the explicit examples too."""

TALLY = Tally()
ADMIN_SENT: list[bytes] = []
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    summary = TALLY.summary()
    print("\n" + summary)
    REPORT.write_text(summary + "\n")


@pytest.fixture(scope="module")
def chat(fake_url):
    with httpx.Client(base_url=fake_url, headers={"Authorization": f"Bearer {FAKE_KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def admin(fake_url):
    with httpx.Client(base_url=fake_url, headers={"Authorization": f"Bearer {FAKE_ADMIN_KEY}"}, timeout=30) as client:
        yield client


def check_chat_success(response: httpx.Response, api: Api) -> None:
    """A whole answer or a stream as the route promises it; never a failure told inside a 200."""
    if not response.is_success:
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        chunks = json_chunks(response.text)
        assert not any("error" in chunk for chunk in chunks), response.text
        if api == "livepeer":
            assert chunks and all(chunk["choices"] for chunk in chunks), response.text
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), response.text
        return
    body = response.json()
    assert body["choices"] and body["choices"][0]["finish_reason"] in ("stop", "length"), body


@fuzz_settings(CHAT_EXAMPLES["/llm"], shrink=False)
@given(body=encoded(llm_bodies))
def test_llm_answers_any_body_in_its_shape(chat, body):
    response = chat.post("/llm", content=body, headers=JSON)
    TALLY.add("POST /llm", response)
    check_answer(response, "livepeer", body)
    check_chat_success(response, "livepeer")


@fuzz_settings(CHAT_EXAMPLES["/v1/chat/completions"], shrink=False)
@given(body=encoded(chat_bodies))
@example(body=b'{"messages": 5}')
@example(body=b'{"messages": [{"role": "user", "content": [5]}]}')
@example(body=b'{"messages": [{"role": "user", "content": ["words as a part"]}]}')
def test_chat_completions_answer_any_body_in_their_shape(chat, body):
    response = chat.post("/v1/chat/completions", content=body, headers=JSON)
    TALLY.add("POST /v1/chat/completions", response)
    check_answer(response, "openai", body)
    check_chat_success(response, "openai")


# The admin routes: keys and tenants made, changed, rotated and deleted, usage and the audit read.


def _request(method: str, route: str, body: st.SearchStrategy | None = None, query=st.just("")):
    """A request as (route, method, path, body, query): the route's `{name}` filled with any name."""
    paths = path_names.map(lambda name: route.format(name=quote(name, safe=""))) if "{" in route else st.just(route)
    return st.tuples(st.just(route), st.just(method), paths, st.none() if body is None else encoded(body), query)


admin_requests = st.one_of(
    _request("POST", "/admin/keys", new_key),
    _request("POST", "/admin/keys", new_key),
    _request("GET", "/admin/keys"),
    _request("GET", "/admin/keys/{name}"),
    _request("PATCH", "/admin/keys/{name}", key_change),
    _request("POST", "/admin/keys/{name}/rotate", rotation),
    _request("DELETE", "/admin/keys/{name}"),
    _request("POST", "/admin/tenants", new_tenant),
    _request("GET", "/admin/tenants"),
    _request("GET", "/admin/tenants/{name}"),
    _request("PATCH", "/admin/tenants/{name}", tenant_change),
    _request("DELETE", "/admin/tenants/{name}"),
    _request("GET", "/admin/usage", query=st.one_of(usage_query, raw_queries)),
    _request("GET", "/admin/audit", query=audit_query),
)


@fuzz_settings(ADMIN_EXAMPLES, shrink=False)
@given(request=admin_requests)
@example(request=("/admin/keys", "POST", "/admin/keys", b'{"name": "inf", "limits": {"spend_per_day": 1e999}}', ""))
@example(request=("/admin/keys", "POST", "/admin/keys", b'{"name": "y0", "expires_at": "0001-01-01T00:00+14:00"}', ""))
@example(request=("/admin/audit", "GET", "/admin/audit", None, "limit=-99999999999999999999999"))
@example(request=("/admin/usage", "GET", "/admin/usage", None, "since=0001-01-01T00:00:00%2B14:00"))
def test_admin_routes_answer_any_request_in_their_shape(admin, request):
    """The keys and tenants made persist: an answer may quote a name any earlier request sent."""
    route, method, path, body, query = request
    ADMIN_SENT.append((body or b"") + (unquote(path) + unquote_plus(query)).encode())
    response = admin.request(method, path + ("?" + query if query else ""), content=body, headers=JSON)
    TALLY.add(f"{method} {route}", response)
    check_answer(response, "openai", b"\n".join(ADMIN_SENT))


# Malformed Authorization headers, on every route but /health (which is open to all).


def _routes() -> list[tuple[str, str]]:
    """Every route of the ingress's table, with its path's parameters filled."""
    import serve_app.ingress  # noqa: F401  (declares the routes on the app)
    from serve_app.http.app import app

    return sorted(
        (method, route.path.replace("{name:path}", "fake-a").replace("{name}", "fake"))
        for route in app.routes
        if isinstance(route, APIRoute) and route.path != "/health"
        for method in route.methods
    )


ROUTES = _routes()
header_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=40)
"""What a header's value can carry: no control characters (HTTP refuses CR, LF and NUL)."""
malformed = st.one_of(
    st.none(),
    st.builds(
        # HTTP strips the spaces around a header's value: a client cannot send them.
        lambda scheme, gap, token: (scheme + gap + token).strip(" \t").encode(),
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", "Digest", "", "Bearer:", "Bearer\u0131"]),
        st.sampled_from(["", " ", "   ", "\t", " \t "]),
        header_text,
    ),
    st.sampled_from(
        ["Basic {}", "Token {}", "{}", "Bearer{}", "Bearer\t{}", "Bearer {}x", "Bearer x{}", "Bearer {0} {0}"]
    ).map(lambda form: form.format(FAKE_KEY).encode()),
    st.sampled_from([FAKE_KEY.upper(), FAKE_KEY[:-1], FAKE_KEY + "\u00e9", "\u200b" + FAKE_KEY]).map(
        lambda token: f"Bearer {token}".encode()
    ),
    st.integers(1_000, 65_536).map(lambda size: b"Bearer " + b"x" * size),
)
"""No header; schemes and separators of every sort around any text (UTF-8 too); the right key
under a wrong scheme, glued to its scheme, doubled, or one character off; a very long token."""


@fuzz_settings(HEADER_EXAMPLES, shrink=False)
@given(authorization=malformed)
@example(authorization=None)
@example(authorization=b"")
@example(authorization=b"Bearer")
@example(authorization=b"Bearer      several  spaces")
@example(authorization=b"Basic " + FAKE_KEY.encode())
@example(authorization="Bearer clé-ünïcødé-🔑".encode())
def test_a_malformed_authorization_header_is_401_on_every_route(fake_url, authorization):
    sent = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = JSON | ({} if authorization is None else {"Authorization": authorization})
    with httpx.Client(base_url=fake_url, timeout=30) as client:
        for method, path in ROUTES:
            response = client.request(
                method, path, content=sent if method in ("POST", "PATCH") else None, headers=headers
            )
            TALLY.add("any route, bad Authorization", response)
            assert response.status_code == 401, (method, path, authorization, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            check_answer(response, api_of(path), sent + (authorization or b""))


def test_both_apps_still_answer_after_the_fuzzing(chat, admin):
    """Run last in this module: a stored row or a replica that the fuzzing broke shows here."""
    hello = {"messages": [{"role": "user", "content": "still here"}]}
    assert chat.post("/llm", json=hello).json()["choices"][0]["message"]["content"] == "still here"
    assert chat.post("/v1/chat/completions", json=hello | {"stream": True}).status_code == 200
    for path in ("/admin/keys", "/admin/tenants", "/admin/audit", "/admin/usage"):
        response = admin.get(path)
        assert response.status_code == 200, (path, response.text)
    assert httpx.get(str(chat.base_url).rstrip("/") + "/health", timeout=30).json()["status"] == "OK"


FUZZERS = (
    test_llm_answers_any_body_in_its_shape,
    test_chat_completions_answer_any_body_in_their_shape,
    test_admin_routes_answer_any_request_in_their_shape,
    test_a_malformed_authorization_header_is_401_on_every_route,
)


def test_the_run_sent_at_least_a_thousand_requests(request):
    if not {item.name for item in request.session.items} >= {fuzzer.__name__ for fuzzer in FUZZERS}:
        pytest.skip("only part of the fuzzing was selected")
    assert TALLY.total() >= MIN_REQUESTS, TALLY.summary()
