"""The bound on a request body's size, without Ray: a body over it is a 413 in the endpoint's
shape with the request id, before the handler runs when its length is declared and as soon as it
passes the bound when it is not (chunked) or it is longer than it declared; the request is
recorded once, with its status."""

import hashlib

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from cluster.schema import AuthConfig, IngressSettings
from serve_app.errors import BodyTooLarge
from serve_app.http import handlers
from serve_app.http.admission import Admission
from serve_app.http.body_limit import bound_body
from serve_app.http.lifecycle import Listeners
from serve_app.tenancy.keys import KeyRing

TOKEN = "sk-chat-0001"
LIMIT = 1000
AUTH = {"Authorization": f"Bearer {TOKEN}", "x-request-id": "rid-big"}


class _Server:
    """Both error shapes' routes, each reading its whole body as the chat routes do."""

    def __init__(self) -> None:
        self.finished: list = []
        self.read: list[int] = []
        keys = KeyRing(AuthConfig.model_validate({"keys": [{"name": "chatter", "sha256": _digest(TOKEN)}]}))
        self.admission = Admission(keys, Listeners(finished=(self.finished.append,)), LIMIT)
        self.app = FastAPI()
        handlers.install(self.app)
        for path in ("/llm", "/v1/chat/completions"):
            self.app.add_api_route(path, self._route(path), methods=["POST"])

    def _route(self, path: str):
        async def route(request: Request):
            return await self.admission.serve(request, path, "chat", self._handler)

        return route

    async def _handler(self, request, caller, lifecycle):
        self.read.append(len(await request.body()))
        return {"bytes": self.read[-1]}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _chunks(total: int, size: int = 100):
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def _message(path: str, body: dict) -> tuple[str, str]:
    if path == "/llm":
        return body["detail"]["msg"], body["detail"]["request_id"]
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 413
    return body["error"]["message"], body["request_id"]


@pytest.mark.parametrize("path", ["/llm", "/v1/chat/completions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_bound_is_413_in_the_endpoints_shape(path, chunked):
    server = _Server()
    with TestClient(server.app) as client:
        content = _chunks(LIMIT + 1) if chunked else b"x" * (LIMIT + 1)
        response = client.post(path, content=content, headers=AUTH)
    assert response.status_code == 413, response.text
    assert _message(path, response.json()) == ("the request body is over this server's limit of 1,000 bytes", "rid-big")
    # A declared length is refused before the handler reads anything; a chunked body as it passes.
    assert server.read == []
    assert [(f.status, f.key_name) for f in server.finished] == [(413, "chatter")]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_at_the_bound_is_read_whole(chunked):
    server = _Server()
    with TestClient(server.app) as client:
        response = client.post("/llm", content=_chunks(LIMIT) if chunked else b"x" * LIMIT, headers=AUTH)
    assert (response.status_code, response.json(), server.read) == (200, {"bytes": LIMIT}, [LIMIT])


def test_a_caller_without_a_valid_token_is_401_whatever_its_body():
    server = _Server()
    with TestClient(server.app) as client:
        response = client.post("/llm", content=b"x" * (LIMIT + 1), headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_a_body_longer_than_it_declared_is_refused_as_it_passes_the_bound():
    sent = [b"x" * 600, b"x" * 600, b""]

    async def receive():
        return {"type": "http.request", "body": sent.pop(0), "more_body": bool(sent)}

    scope = {"type": "http", "method": "POST", "path": "/llm", "headers": [(b"content-length", b"10")]}
    request = Request(scope, receive)
    bound_body(request, LIMIT)
    with pytest.raises(BodyTooLarge):
        await request.body()
    assert sent == [b""]  # nothing read past the message that passed the bound


def test_the_default_bound_is_4_mib():
    assert IngressSettings().max_body_bytes == 4 * 1024 * 1024
