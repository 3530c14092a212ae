"""One engine and its outputs per request, wherever the engine runs: in a model deployment's
replica, or in the ingress's own replica when the config colocates them."""

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import nullcontext
from typing import ClassVar

from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from cluster.schema import ModelConfig
from serve_app.models.autoscaling import EngineLoad
from serve_app.models.bounds import Slots
from serve_app.models.engine import EngineFactory
from serve_app.models.outputs import ModelError, ModelOutput
from serve_app.models.requests import EngineRequest
from serve_app.telemetry.metrics import EngineMetrics


class ModelRunner:
    """With `slots`, the runner keeps its own bounds on the requests it takes (colocated: Serve
    bounds a model deployment's requests itself)."""

    def __init__(self, model: ModelConfig, engine_factory: EngineFactory, slots: Slots | None = None) -> None:
        self._tags = {"model": model.id}
        self._metrics = EngineMetrics()
        self._engine = engine_factory(model)
        self._slots = slots

    async def start(self) -> None:
        await self._engine.start()

    async def answer(self, request: EngineRequest) -> AsyncGenerator[ModelOutput, None]:
        """A whole answer or an error gives its place back before it is handed on: the engine is
        done with it, and the caller need not read on for the place to be free."""
        async with self._slots.taken() if self._slots else nullcontext():
            started = time.perf_counter()
            try:
                try:
                    result = await self._engine.answer(request)
                except Exception:
                    if await self._serves():
                        raise
                    result = self._stopped()
                if not isinstance(result, AsyncIterator):
                    # A whole answer's one output is its first output too, as the ingress counts it.
                    self._metrics.ttft.observe(time.perf_counter() - started, self._tags)
                else:
                    first = True
                    async for output in _stream_outputs(result):
                        if first:
                            self._metrics.ttft.observe(time.perf_counter() - started, self._tags)
                            first = False
                        yield await self._told(output) if isinstance(output, ModelError) else output
                    return
            finally:
                self._metrics.duration.observe(time.perf_counter() - started, self._tags)
        if isinstance(result, ErrorResponse):
            result = await self._told(ModelError(result.error.code, result.error.message))
        yield result

    async def _told(self, error: ModelError) -> ModelError:
        """A failure of an engine that has stopped (its process killed, or crashed) is a 503 to
        retry, not a 500: the replica's health check finds the engine dead and Serve replaces the
        replica, so the same request is served shortly, by it or by another replica."""
        if error.status < 500 or error.status == 503 or await self._serves():
            return error
        return self._stopped()

    async def _serves(self) -> bool:
        try:
            await self._engine.check_health()
        except Exception:
            return False
        return True

    def _stopped(self) -> ModelError:
        return ModelError(503, f"model {self._tags['model']!r} is restarting after its engine stopped; retry shortly")

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        await self._engine.load_adapter(adapter_id, path)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self._engine.unload_adapter(adapter_id)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests()

    def load(self) -> EngineLoad:
        return self._engine.load()

    def shutdown(self) -> None:
        self._engine.shutdown()


ERROR_EVENT = "event: error\ndata: "
"""A named `error` event: Anthropic's (its error under `error`) or the Responses API's (at the top)."""


async def _stream_outputs(lines: AsyncIterator[str]) -> AsyncIterator[str | ModelError]:
    """vLLM's SSE lines as chunk payloads (a named event's whole frame); its error event (a
    failure before the first token, or one midway, in the terms of OpenAI's chat, Anthropic's or
    the Responses API) as a `ModelError`, which ends the stream."""
    async for line in lines:
        payload = line.removeprefix("data: ").rstrip()
        if payload == "[DONE]":
            return
        if payload.startswith('{"error"'):
            error = json.loads(payload)["error"]
            yield ModelError(error.get("code") or 500, error.get("message") or "generation failed")
            return
        if payload.startswith(ERROR_EVENT):
            event = json.loads(payload.removeprefix(ERROR_EVENT))
            yield ModelError(500, (event.get("error") or event).get("message") or "generation failed")
            return
        yield payload


class InProcessStream:
    """A colocated model's outputs for one request, with the handle stream's `cancel()`."""

    _closing: ClassVar[set[asyncio.Task]] = set()
    """Closing tasks under way, held so that they are not collected before they are done."""

    def __init__(self, outputs: AsyncGenerator[ModelOutput, None]) -> None:
        self._outputs = outputs

    def __aiter__(self) -> "InProcessStream":
        return self

    def __anext__(self):
        return self._outputs.__anext__()

    def cancel(self) -> None:
        """Closing the generator runs its cleanup, which aborts the engine's request."""
        task = asyncio.get_running_loop().create_task(self._outputs.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
