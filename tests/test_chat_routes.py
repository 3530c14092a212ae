"""Both chat routes' logic end to end without Ray: `Admission.serve` into `LivepeerChat` and
`OpenAIAPI`, the real router and `ModelCalls` over a stand-in model handle whose answers are
scripted. What the engine is sent, what the client gets, and what is recorded, once."""

import asyncio
import json

import pytest
from pydantic import TypeAdapter
from starlette.requests import Request
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

from cluster.schema import AuthConfig, ClusterConfig
from serve_app.apis.livepeer.protocol import LLMResponse
from serve_app.apis.livepeer.serving import LivepeerChat
from serve_app.apis.model_call import ModelCalls
from serve_app.apis.openai.serving import OpenAIAPI
from serve_app.http.admission import Admission
from serve_app.http.lifecycle import Listeners
from serve_app.http.streaming import DONE, EventStream
from serve_app.routing.router import Router
from serve_app.tenancy.keys import KeyRing
from serve_app.tenancy.limiter import LimitGate
from tests.scripted_model import PROMPT_TOKENS, ScriptedStream, answer_script

LLM_RESPONSE = TypeAdapter(LLMResponse)
LIMIT = 64


def _whole(text: str, finish: str = "stop") -> ChatCompletionResponse:
    return ChatCompletionResponse.model_validate(
        {
            "id": "chatcmpl-w",
            "model": "model-a",
            "created": 1700000001,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )


class _Model:
    """A model deployment's handle: a whole answer or a scripted stream, by the request."""

    def __init__(self) -> None:
        self.sent: list = []
        self.streams: list[ScriptedStream] = []

    def options(self, **_) -> "_Model":
        return self

    @property
    def answer(self) -> "_Model":
        return self

    def remote(self, chat):
        self.sent.append(chat)
        stream = ScriptedStream(answer_script("Hel", "lo") if chat.stream else [_whole("Hello")])
        self.streams.append(stream)
        return stream


class _Server:
    def __init__(self) -> None:
        config = ClusterConfig.model_validate(
            {
                "models": [
                    {"id": "model-a", "aliases": ["a"], "source": {"path": "/a"}},
                    {"id": "model-b", "source": {"path": "/b"}},
                ],
                "ingress": {"max_tokens_limit": LIMIT},
            }
        )
        self.models = {"model-a": _Model(), "model-b": _Model()}
        router = Router(config, self.models)
        calls = ModelCalls(LimitGate(None))
        self.finished: list = []
        self.admission = Admission(KeyRing(AuthConfig()), Listeners(finished=(self.finished.append,)))
        self.livepeer = LivepeerChat(router, calls, LIMIT)
        self.openai = OpenAIAPI(router, calls, LIMIT)

    async def post(self, path: str, body: dict | bytes):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler = self.livepeer.complete if path == "/llm" else self.openai.chat
        return await self.admission.serve(_request(path, raw), path, "chat", handler)


def _request(path: str, body: bytes) -> Request:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect while the test reads the answer
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(b"x-request-id", b"rid-c")], "scheme": "http", "server": ("test", 80)}  # fmt: skip
    return Request(scope, receive)


async def _streamed(response: EventStream) -> list:
    messages = []

    async def send(message):
        messages.append(message)

    async def receive():
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/", "headers": []}
    await response(scope, receive, send)
    body = "".join(m["body"].decode() for m in messages if m["type"] == "http.response.body")
    assert body.endswith(DONE)
    return [json.loads(block.removeprefix("data: ")) for block in body.split("\n\n")[:-2]]


USER = [{"role": "user", "content": "hi"}]


async def test_llm_whole_answer_fills_message_and_delta_and_is_recorded():
    server = _Server()
    response = await server.post("/llm", {"messages": USER, "model": "a", "temperature": 0.2})
    assert response.status_code == 200
    body = LLM_RESPONSE.validate_python(json.loads(response.body))
    assert body["choices"][0]["message"] == body["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    [sent] = server.models["model-a"].sent
    assert (sent.model, sent.max_tokens, sent.temperature, sent.stream) == ("model-a", LIMIT, 0.2, False)
    [done] = server.finished
    assert (done.status, done.model, done.prompt_tokens, done.completion_tokens, done.finish_reason) == (
        200, "model-a", 3, 2, "stop")  # fmt: skip
    assert done.reached_engine and done.ttft_s is not None


async def test_llm_stream_is_finished_by_its_end_not_before():
    server = _Server()
    response = await server.post("/llm", {"messages": USER, "stream": True, "max_tokens": 10})
    assert isinstance(response, EventStream) and server.finished == []
    [sent] = server.models["model-a"].sent  # the default model
    assert sent.max_tokens == 10 and sent.stream_options.include_usage and sent.stream_options.continuous_usage_stats
    chunks = await _streamed(response)
    for chunk in chunks:
        LLM_RESPONSE.validate_python(chunk)
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["Hel", "lo", ""]
    assert [(f.status, f.completion_tokens, f.prompt_tokens) for f in server.finished] == [(200, 2, PROMPT_TOKENS)]
    assert server.models["model-a"].streams[0].cancelled == 1


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "the request body is not valid JSON"),
        ({"messages": []}, "messages"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "max_tokens": LIMIT + 1}, f"above this server's limit of {LIMIT}"),
        ({"messages": USER, "model": "nope"}, "model 'nope' does not exist"),
    ],
)
async def test_llm_refusals_never_reach_the_model_and_are_recorded_once(body, message):
    server = _Server()
    response = await server.post("/llm", body)
    assert response.status_code in (400, 404)
    assert message in json.loads(response.body)["detail"]["msg"]
    assert all(not model.sent for model in server.models.values())
    assert [(f.status, f.reached_engine) for f in server.finished] == [(response.status_code, False)]


async def test_openai_whole_answer_is_vllms_and_the_cap_applies_when_none_asked():
    server = _Server()
    response = await server.post("/v1/chat/completions", {"model": "model-b", "messages": USER})
    assert response.status_code == 200
    assert json.loads(response.body)["choices"][0]["message"]["content"] == "Hello"
    [sent] = server.models["model-b"].sent
    assert sent.max_tokens == LIMIT
    assert [(f.status, f.model, f.completion_tokens) for f in server.finished] == [(200, "model-b", 2)]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_openai_stream_forwards_the_usage_chunk_only_when_asked(include_usage):
    server = _Server()
    body = {"model": "a", "messages": USER, "stream": True, "stream_options": {"include_usage": include_usage}}
    chunks = await _streamed(await server.post("/v1/chat/completions", body))
    usage_only = [c for c in chunks if not c["choices"]]
    assert len(usage_only) == int(include_usage)
    assert all("usage" not in c for c in chunks if c["choices"])
    assert [(f.status, f.completion_tokens) for f in server.finished] == [(200, 2)]  # counted either way


async def test_openai_refuses_max_completion_tokens_above_the_limit():
    server = _Server()
    body = {"model": "a", "messages": USER, "max_completion_tokens": LIMIT + 1}
    response = await server.post("/v1/chat/completions", body)
    assert response.status_code == 400 and "limit of 64" in json.loads(response.body)["error"]["message"]
    assert not server.models["model-a"].sent
