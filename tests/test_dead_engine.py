"""A request that meets a dead engine (its process killed, or crashed) is refused with a 503 to
retry, not a 500: the replica's health check finds the engine dead and Serve replaces the replica,
so the same request will be served shortly. `VLLMEngine` here has stand-ins for the engine client
and its serving classes; the real engine killed is tests/test_e2e_engine_faults.py."""

from types import SimpleNamespace

from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.models.engine import VLLMEngine

CHAT = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
ENGINE_DEAD = ErrorResponse(error=ErrorInfo(message="EngineCore encountered an issue.", type="x", code=500))


def _engine(errored: bool, answer: object) -> tuple[VLLMEngine, list]:
    engine = VLLMEngine("tiny", "/models/tiny", {})
    served: list = []

    async def serve(request):
        served.append(request)
        return answer

    engine._client = SimpleNamespace(errored=errored)
    engine._serving = {ChatCompletionRequest: serve}
    return engine, served


def _is_restarting(result: object) -> bool:
    return (
        isinstance(result, ErrorResponse)
        and result.error.code == 503
        and result.error.message == "model 'tiny' is restarting after its engine stopped; retry shortly"
    )


async def test_a_request_to_an_engine_already_dead_is_503_without_reaching_it():
    engine, served = _engine(errored=True, answer="never")
    assert _is_restarting(await engine.answer(CHAT))
    assert served == []


async def test_the_engine_dying_under_a_request_turns_its_failure_into_a_503():
    engine, _ = _engine(errored=False, answer=ENGINE_DEAD)

    async def dies(request):
        engine._client.errored = True
        return ENGINE_DEAD

    engine._serving[ChatCompletionRequest] = dies
    assert _is_restarting(await engine.answer(CHAT))


async def test_a_live_engines_own_errors_and_answers_are_passed_on():
    engine, served = _engine(errored=False, answer=ENGINE_DEAD)
    assert await engine.answer(CHAT) is ENGINE_DEAD and served == [CHAT]
    engine, _ = _engine(errored=False, answer="an answer")
    assert await engine.answer(CHAT) == "an answer"
