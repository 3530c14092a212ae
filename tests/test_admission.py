"""Every route's way in and out (`Admission.serve`), without Ray: the request is recorded once
however its handler ends, and errors come back in the endpoint's shape. Also the errors' status
mapping and FastAPI's own answers (no such path, a method the path does not take)."""

import asyncio
import hashlib
import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from cluster.schema import AuthConfig
from serve_app import errors
from serve_app.errors import APIError, BadRequest, NotFound, Overloaded, for_status
from serve_app.http import handlers
from serve_app.http.admission import Admission
from serve_app.http.lifecycle import Listeners
from serve_app.http.streaming import EventStream
from serve_app.telemetry.record import CLIENT_CLOSED_REQUEST
from serve_app.tenancy.keys import KeyRing
from tests.captured_logs import serve_records

CHAT_TOKEN, ADMIN_TOKEN = "sk-chat-0001", "sk-admin-0002"


@pytest.fixture
def serve_log():
    with serve_records() as records:
        yield records


def _keys() -> KeyRing:
    return KeyRing(
        AuthConfig.model_validate(
            {
                "keys": [
                    {"name": "chatter", "sha256": hashlib.sha256(CHAT_TOKEN.encode()).hexdigest()},
                    {"name": "ops", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(), "scopes": ["admin"]},
                ]
            }
        )
    )


def _request(path: str, token: str | None = CHAT_TOKEN, request_id: str | None = "rid-1") -> Request:
    headers = []
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": path,
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "scheme": "http",
            "server": ("test", 80),
        }
    )


class _Recorder:
    def __init__(self) -> None:
        self.finished: list = []

    def listeners(self, *before) -> Listeners:
        return Listeners(finished=(*before, self.finished.append))


def _body(response: Response) -> dict:
    return json.loads(response.body)


async def test_a_json_answer_is_recorded_once_with_its_status_and_key():
    recorder = _Recorder()
    seen = []

    async def handler(request, caller, lifecycle):
        seen.append((caller.key_name, lifecycle.request_id, lifecycle.endpoint))
        lifecycle.routed("m")
        return {"ok": True}

    response = await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert (response.status_code, _body(response)) == (200, {"ok": True})
    assert seen == [("chatter", "rid-1", "/llm")]
    [done] = recorder.finished
    assert (done.status, done.key_name, done.request_id, done.endpoint, done.model) == (
        200,
        "chatter",
        "rid-1",
        "/llm",
        "m",
    )


async def test_a_response_is_recorded_with_its_own_status():
    recorder = _Recorder()

    async def handler(*_):
        return JSONResponse({"queued": True}, status_code=202)

    response = await Admission(_keys(), recorder.listeners()).serve(_request("/v1/models"), "/v1/models", None, handler)
    assert response.status_code == 202 and [f.status for f in recorder.finished] == [202]


async def test_a_request_without_an_id_gets_one():
    recorder = _Recorder()

    async def handler(*_):
        return {}

    await Admission(_keys(), recorder.listeners()).serve(_request("/llm", request_id=None), "/llm", "chat", handler)
    [done] = recorder.finished
    assert len(done.request_id) == 32 and int(done.request_id, 16) >= 0


@pytest.mark.parametrize("path", ["/llm", "/v1/chat/completions"])
async def test_an_api_error_is_answered_in_the_endpoint_shape(path):
    recorder = _Recorder()

    async def handler(*_):
        raise NotFound("model 'x' does not exist")

    response = await Admission(_keys(), recorder.listeners()).serve(_request(path), path, "chat", handler)
    assert response.status_code == 404
    if path == "/llm":
        assert _body(response) == {"detail": {"msg": "model 'x' does not exist", "request_id": "rid-1"}}
    else:
        assert _body(response) == {
            "error": {"message": "model 'x' does not exist", "type": "not_found_error", "param": None, "code": 404},
            "request_id": "rid-1",
        }
    assert [(f.status, f.key_name) for f in recorder.finished] == [(404, "chatter")]


async def test_an_error_keeps_its_headers():
    recorder = _Recorder()

    async def handler(*_):
        raise Overloaded("busy", retry_after_s=7)

    response = await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert response.status_code == 503 and response.headers["retry-after"] == "7"


@pytest.mark.parametrize("token, message", [(None, "missing bearer token"), ("sk-wrong", "invalid bearer token")])
@pytest.mark.parametrize("path", ["/llm", "/v1/chat/completions"])
async def test_a_bad_token_is_401_with_www_authenticate_before_the_handler_runs(path, token, message):
    recorder = _Recorder()
    called = []

    async def handler(*_):
        called.append(True)
        return {}

    response = await Admission(_keys(), recorder.listeners()).serve(_request(path, token), path, "chat", handler)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    body = _body(response)
    told = body["detail"]["msg"] if path == "/llm" else body["error"]["message"]
    assert message in told
    assert called == []
    assert [(f.status, f.key_name) for f in recorder.finished] == [(401, None)]


async def test_a_key_without_the_routes_scope_is_403_before_the_handler_runs():
    recorder = _Recorder()
    called = []

    async def handler(*_):
        called.append(True)
        return {}

    admission = Admission(_keys(), recorder.listeners())
    response = await admission.serve(_request("/admin/usage", CHAT_TOKEN), "/admin/usage", "admin", handler)
    assert response.status_code == 403 and "lacks the 'admin' scope" in _body(response)["error"]["message"]
    assert called == [] and [(f.status, f.key_name) for f in recorder.finished] == [(403, "chatter")]
    # A route without a scope takes any valid key; the scoped route its own key.
    assert (await admission.serve(_request("/version", ADMIN_TOKEN), "/version", None, handler)).status_code == 200
    admin = await admission.serve(_request("/admin/usage", ADMIN_TOKEN), "/admin/usage", "admin", handler)
    assert admin.status_code == 200
    assert [f.status for f in recorder.finished] == [403, 200, 200]


@pytest.mark.parametrize("path", ["/llm", "/v1/chat/completions"])
async def test_an_unexpected_exception_is_500_in_shape_without_a_traceback_and_logged_once(path, serve_log):
    recorder = _Recorder()

    async def handler(*_):
        raise KeyError("internal secret")

    response = await Admission(_keys(), recorder.listeners()).serve(_request(path), path, "chat", handler)
    assert response.status_code == 500
    raw = response.body.decode()
    assert "Traceback" not in raw and "internal secret" not in raw and "KeyError" not in raw
    body = _body(response)
    message = body["detail"]["msg"] if path == "/llm" else body["error"]["message"]
    assert message == "internal error (request id rid-1)"
    assert [f.status for f in recorder.finished] == [500]
    logged = serve_log.at(logging.ERROR)
    assert len(logged) == 1
    assert "rid-1" in logged[0].getMessage() and isinstance(logged[0].exc_info[1], KeyError)


async def test_a_handler_that_raises_cancelled_is_recorded_as_499_and_reraised():
    recorder = _Recorder()

    async def handler(*_):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert [(f.status, f.key_name) for f in recorder.finished] == [(CLIENT_CLOSED_REQUEST, "chatter")]


async def test_a_request_cancelled_while_its_handler_waits_is_recorded_once_as_499():
    recorder = _Recorder()
    waiting, never = asyncio.Event(), asyncio.Event()

    async def handler(request, caller, lifecycle):
        lifecycle.routed("m")
        waiting.set()
        await never.wait()
        return {}

    admission = Admission(_keys(), recorder.listeners())
    serving = asyncio.create_task(admission.serve(_request("/llm"), "/llm", "chat", handler))
    await asyncio.wait_for(waiting.wait(), 5)
    assert recorder.finished == []
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert [(f.status, f.model) for f in recorder.finished] == [(CLIENT_CLOSED_REQUEST, "m")]


async def test_a_failing_listener_does_not_stop_the_others(serve_log):
    recorder = _Recorder()

    def broken(_):
        raise RuntimeError("listener bug")

    async def handler(request, caller, lifecycle):
        lifecycle.on_finish(broken)
        lifecycle.on_finish(recorder.finished.append)
        return {"ok": 1}

    response = await Admission(_keys(), recorder.listeners(broken)).serve(_request("/llm"), "/llm", "chat", handler)
    assert response.status_code == 200
    assert [f.status for f in recorder.finished] == [200, 200]  # the ingress's listener and the request's own
    assert [r.getMessage() for r in serve_log.at(logging.ERROR)] == ["a listener of request rid-1 failed"] * 2


async def test_a_stream_is_not_finished_by_admission_but_by_its_end():
    recorder = _Recorder()

    async def events():
        yield "data: {}\n\n"

    async def handler(request, caller, lifecycle):
        return EventStream(events(), lambda: None, lifecycle, {})

    response = await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert isinstance(response, EventStream) and recorder.finished == []


async def test_without_keys_the_chat_routes_are_open_and_the_admin_routes_closed():
    recorder = _Recorder()

    async def handler(request, caller, lifecycle):
        return {"key": caller.key_name}

    admission = Admission(KeyRing(AuthConfig()), recorder.listeners())
    chat = await admission.serve(_request("/llm", token=None), "/llm", "chat", handler)
    assert (chat.status_code, _body(chat)) == (200, {"key": None})
    admin = await admission.serve(_request("/admin/usage", token=None), "/admin/usage", "admin", handler)
    assert admin.status_code == 403 and "admin scope" in _body(admin)["error"]["message"]


# The errors' statuses.


@pytest.mark.parametrize(
    "status, cls, kind",
    [
        (400, errors.BadRequest, "invalid_request_error"),
        (401, errors.Unauthorized, "authentication_error"),
        (403, errors.Forbidden, "permission_error"),
        (404, errors.NotFound, "not_found_error"),
        (503, errors.Overloaded, "overloaded_error"),
    ],
)
def test_for_status_maps_known_statuses_to_their_errors(status, cls, kind):
    error = for_status(status, "why")
    assert type(error) is cls and (error.status, error.kind, error.message) == (status, kind, "why")


def test_for_status_keeps_headers_of_the_errors_that_have_them():
    assert for_status(401, "x").headers == {"WWW-Authenticate": "Bearer"}
    assert for_status(503, "x").headers == {"Retry-After": "1"}
    assert for_status(400, "x").headers == {}


@pytest.mark.parametrize(
    "status, expected, kind",
    [
        (405, 405, "invalid_request_error"),
        (413, 413, "invalid_request_error"),
        (422, 422, "invalid_request_error"),
        (502, 502, "internal_error"),
        (500, 500, "internal_error"),
        (200, 500, "internal_error"),
        (302, 500, "internal_error"),
        (600, 500, "internal_error"),
        (-1, 500, "internal_error"),
    ],
)
def test_for_status_keeps_other_error_statuses_and_makes_the_rest_500(status, expected, kind):
    error = for_status(status, "why")
    assert (error.status, error.kind) == (expected, kind)
    assert BadRequest.status == 400 and APIError.status == 500  # set on the instance, not its class


def test_api_of_path():
    assert errors.api_of("/v1/chat/completions") == "openai" and errors.api_of("/v1/models") == "openai"
    assert [errors.api_of(path) for path in ("/llm", "/v1", "/health")] == ["livepeer"] * 3


# FastAPI's own answers.


def _app() -> FastAPI:
    """The handlers on an app of their own, with a route for each case."""
    app = FastAPI()
    handlers.install(app)

    @app.post("/llm")
    async def llm():
        return {}

    @app.post("/v1/chat/completions")
    async def chat():
        return {}

    @app.get("/v1/boom")
    async def boom():
        raise ValueError("hidden detail")

    @app.get("/boom")
    async def boom_llm():
        raise ValueError("hidden detail")

    return app


def test_the_served_app_answers_an_unknown_path_in_each_shape():
    from serve_app.http.app import app

    with TestClient(app) as client:
        livepeer = client.get("/nowhere", headers={"x-request-id": "r-404"})
        openai = client.get("/v1/nowhere", headers={"x-request-id": "r-404b"})
    assert livepeer.status_code == 404
    assert livepeer.json() == {"detail": {"msg": "GET /nowhere: Not Found", "request_id": "r-404"}}
    assert openai.status_code == 404
    assert openai.json() == {
        "error": {"message": "GET /v1/nowhere: Not Found", "type": "not_found_error", "param": None, "code": 404},
        "request_id": "r-404b",
    }


@pytest.mark.parametrize("path, shape", [("/llm", "detail"), ("/v1/chat/completions", "error")])
def test_a_method_the_path_does_not_take_is_405_in_shape_with_allow(path, shape):
    with TestClient(_app()) as client:
        response = client.get(path, headers={"x-request-id": "r-405"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    body = response.json()
    if shape == "detail":
        assert body == {"detail": {"msg": f"GET {path}: Method Not Allowed", "request_id": "r-405"}}
    else:
        assert body["error"] == {
            "message": f"GET {path}: Method Not Allowed",
            "type": "invalid_request_error",
            "param": None,
            "code": 405,
        }


@pytest.mark.parametrize("path, shape", [("/boom", "detail"), ("/v1/boom", "error")])
def test_a_bug_outside_any_route_lifecycle_is_500_in_shape_without_a_traceback(path, shape):
    with TestClient(_app(), raise_server_exceptions=False) as client:
        response = client.get(path, headers={"x-request-id": "r-500"})
    assert response.status_code == 500 and "hidden detail" not in response.text and "Traceback" not in response.text
    body = response.json()
    message = body["detail"]["msg"] if shape == "detail" else body["error"]["message"]
    assert message == "internal error (request id r-500)"


def test_an_app_under_a_root_path_picks_the_shape_by_the_path_within_it():
    with TestClient(_app(), root_path="/fake") as client:
        response = client.get("/fake/v1/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


async def test_a_client_that_leaves_while_its_body_is_read_is_recorded_as_departed_not_failed():
    recorder = _Recorder()

    async def handler(request, caller, lifecycle):
        raise ClientDisconnect()

    with serve_records() as records:
        response = await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert response.status_code == 499 and [f.status for f in recorder.finished] == [499]
    assert records.at(logging.ERROR) == []


async def test_a_frameworks_http_error_inside_a_handler_keeps_its_status_in_the_endpoints_shape():
    recorder = _Recorder()

    async def handler(request, caller, lifecycle):
        raise StarletteHTTPException(413, "body too large")

    response = await Admission(_keys(), recorder.listeners()).serve(_request("/llm"), "/llm", "chat", handler)
    assert response.status_code == 413 and _body(response)["detail"]["msg"] == "body too large"
    assert [f.status for f in recorder.finished] == [413]
