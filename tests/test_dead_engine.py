"""A request that meets a dead engine (its process killed, or crashed) is refused with a 503 to
retry, not a 500: the replica's health check finds the engine dead and Serve replaces the replica,
so the same request is served shortly. `ModelRunner` here runs a stand-in engine that fails as
vLLM's does once its engine core is gone (vLLM's `EngineDeadError` raised by a whole answer, an
error event as a stream's first item); the real engine killed is tests/test_e2e_engine_faults.py."""

from collections.abc import AsyncIterator

import pytest
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse
from vllm.v1.engine.exceptions import EngineDeadError

from cluster.schema import ModelConfig
from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.models.outputs import ModelError
from serve_app.models.runner import ModelRunner

CHAT = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}])
RESTARTING = ModelError(503, "model 'tiny' is restarting after its engine stopped; retry shortly")


class _Engine:
    """Answers with `answer` (raised if an exception); healthy unless `dead`."""

    def __init__(self, answer: object, dead: bool) -> None:
        self.answer_with, self.dead = answer, dead

    async def answer(self, request):
        if isinstance(self.answer_with, Exception):
            raise self.answer_with
        return self.answer_with

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError()


def _runner(answer: object, dead: bool) -> ModelRunner:
    model = ModelConfig.model_validate({"id": "tiny", "source": {"path": "/models/tiny"}})
    return ModelRunner(model, lambda _: _Engine(answer, dead))


async def _outputs(runner: ModelRunner) -> list:
    return [output async for output in runner.answer(CHAT)]


def _error(status: int, message: str = "EngineCore encountered an issue.") -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type="x", code=status))


async def _stream(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_a_whole_answer_that_meets_a_dead_engine_is_503():
    assert await _outputs(_runner(EngineDeadError(), dead=True)) == [RESTARTING]


async def test_a_live_engines_failure_is_raised_as_it_was():
    with pytest.raises(RuntimeError, match="a bug"):
        await _outputs(_runner(RuntimeError("a bug"), dead=False))


@pytest.mark.parametrize(
    "dead, told", [(True, RESTARTING), (False, ModelError(500, "EngineCore encountered an issue."))]
)
async def test_an_error_answer_is_503_only_once_the_engine_is_dead(dead, told):
    assert await _outputs(_runner(_error(500), dead)) == [told]


async def test_a_clients_mistake_stays_a_400_though_the_engine_is_dead():
    assert await _outputs(_runner(_error(400, "bad"), dead=True)) == [ModelError(400, "bad")]


@pytest.mark.parametrize("dead, told", [(True, RESTARTING), (False, ModelError(500, "gone"))])
async def test_a_stream_that_fails_is_told_503_once_the_engine_is_dead(dead, told):
    stream = _stream('data: {"id": 1}\n\n', 'data: {"error": {"code": 500, "message": "gone"}}\n\n')
    assert await _outputs(_runner(stream, dead)) == ['{"id": 1}', told]
