"""A test engine for plumbing tests: no model, replies with the words of the prompt's last
message echoed back, in vLLM's own response and chunk shapes. Never used outside `tests/`.

Prompts steer it: "FAIL MIDSTREAM" raises after two chunks, "FAIL AT START" raises before any,
"RETRYABLE" streams only vLLM's error event for a request to retry (503) before any token,
"STALL" streams two chunks and then nothing until it is cancelled, "NO CHOICES" answers a whole
response without choices (which our `/llm` shaping cannot read: a bug of ours on demand), "WAIT <path> …" holds the
request while that file exists (and touches `<path>.waiting` to say it has arrived), "HOLD <path> …" does the same
mid-stream, after two chunks. Either writes the id of the Ray node it runs on into `<path>.waiting`, for tests
that must know where a request is held (a node to remove).
Like vLLM, it puts usage on every chunk only when asked (`continuous_usage_stats`), and sends the
usage-only chunk only when asked (`include_usage`). A whole answer names the replica that gave it
in `system_fingerprint` (its Serve replica id), for tests of routing. Its load, for autoscaling on
the engine's signals, is scripted by the prompts: a request held by "WAIT" counts as waiting in
the engine's queue, a stream being sent as running.
Its model's source path steers start-up: a path containing "broken" fails to load, and while a
file `<path>.hold` exists the engine keeps loading.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatMessage,
)
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse, UsageInfo

from cluster.schema import ModelConfig
from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.models.autoscaling import EngineLoad
from serve_app.models.requests import EngineRequest


class FakeEngine:
    def __init__(self, model: ModelConfig) -> None:
        self._model_id = model.id
        self._source = Path(model.source.path)
        self._unfinished = 0
        self._held = 0
        self._replica = _replica_id()

    async def start(self) -> None:
        if "broken" in str(self._source):
            raise RuntimeError(f"weights missing at {self._source}")
        await _while_exists(self._source.with_name(self._source.name + ".hold"))

    async def answer(self, request: EngineRequest):
        """Chat only: other APIs are refused as vLLM refuses an API a model does not serve."""
        if not isinstance(request, ChatCompletionRequest):
            return ErrorResponse(
                error=ErrorInfo(message="the test engine serves chat only", type="NotImplementedError", code=501)
            )
        words = _last_message(request).split()
        if "FAIL AT START" in _last_message(request):
            raise RuntimeError("fake engine failed before generating")
        if words[:1] == ["WAIT"]:
            _arrived(words[1])
            self._held += 1
            try:
                await _while_exists(Path(words[1]))
            finally:
                self._held -= 1
        reply = words[: request.max_tokens or len(words)]
        if request.stream:
            return self._stream(request, reply)
        return ChatCompletionResponse(
            model=self._model_id,
            system_fingerprint=self._replica,
            choices=[]
            if "NO CHOICES" in _last_message(request)
            else [
                ChatCompletionResponseChoice(
                    index=0,
                    message=ChatMessage(role="assistant", content=" ".join(reply)),
                    finish_reason="length" if len(reply) < len(words) else "stop",
                )
            ],
            usage=UsageInfo(
                prompt_tokens=len(words), completion_tokens=len(reply), total_tokens=len(words) + len(reply)
            ),
        )

    async def _stream(self, request: ChatCompletionRequest, reply: list[str]) -> AsyncGenerator[str, None]:
        self._unfinished += 1
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model_id,
        }
        prompt = _last_message(request)
        prompt_tokens = len(prompt.split())
        options = request.stream_options
        try:
            if "RETRYABLE" in prompt:
                error = {
                    "message": "the engine is draining; retry",
                    "type": "ServiceUnavailableError",
                    "param": None,
                    "code": 503,
                }
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
            # vLLM ends every stream with a chunk that has a finish reason, an empty answer's too.
            reply = reply or [""]
            for index, word in enumerate(reply):
                if index == 2 and "FAIL MIDSTREAM" in prompt:
                    raise RuntimeError("fake engine crashed mid-stream")
                if index == 2 and "STALL" in prompt:
                    await asyncio.Event().wait()
                if index == 2 and prompt.split()[:1] == ["HOLD"]:
                    _arrived(prompt.split()[1])
                    await _while_exists(Path(prompt.split()[1]))
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": index + 1,
                    "total_tokens": prompt_tokens + index + 1,
                }
                finish = "stop" if index == len(reply) - 1 else None
                chunk = base | {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": finish}]}
                if options and options.continuous_usage_stats:
                    chunk["usage"] = usage
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0)
            if options and options.include_usage:
                yield f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._unfinished -= 1

    async def check_health(self) -> None:
        return None

    def num_unfinished_requests(self) -> int:
        return self._unfinished

    def load(self) -> EngineLoad:
        return EngineLoad(waiting=self._held, running=self._unfinished)

    def shutdown(self) -> None:
        return None


def _replica_id() -> str | None:
    """The Serve replica this engine is in, if it is in one."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


def _arrived(hold: str) -> None:
    """Says that a request held by `hold` has reached the engine, and on which node."""
    Path(hold + ".waiting").write_text(ray.get_runtime_context().get_node_id())


async def _while_exists(path: Path) -> None:
    while path.exists():
        await asyncio.sleep(0.02)


def fake_engine(model: ModelConfig) -> FakeEngine:
    return FakeEngine(model)


def _last_message(request: ChatCompletionRequest) -> str:
    """Its text, as vLLM's chat parser reads it: the string, or the parts' texts; none for a
    message without content (an assistant's tool calls) or a part without text (an image)."""
    content = request.messages[-1].get("content")
    if content is None or isinstance(content, str):
        return content or ""
    texts = (part if isinstance(part, str) else part.get("text") for part in content)
    return " ".join(text for text in texts if isinstance(text, str))
