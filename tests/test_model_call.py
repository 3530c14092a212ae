"""A chat request's trip to its model (`ModelCalls.start`): the key's lease, then the model's first
output, which decides the HTTP status; the model's work is cancelled whenever the request will
not read on."""

import asyncio
import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from cluster.schema import ApiKey, KeyLimits, Price
from serve_app.apis.model_call import ModelCall, ModelCalls, payloads
from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.errors import BadRequest, EngineFailure, Overloaded, RateLimited
from serve_app.http.lifecycle import Listeners, RequestLifecycle
from serve_app.models.outputs import ModelError
from serve_app.routing.router import Route
from serve_app.tenancy.budgets import Ask
from serve_app.tenancy.keys import Caller
from serve_app.tenancy.limiter import LimitGate
from serve_app.tenancy.quotas import Decision
from tests.captured_logs import serve_records
from tests.scripted_model import ScriptedStream, Stall, answer_script

CHAT = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=20, n=2)


class _Gate:
    """Stands for the rate limiter's gate: admits with headers, or refuses; notes releases."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.admitted: list[int] = []
        self.budget_reserved: list[Ask] = []
        self.released: list[tuple[object, Ask]] = []

    async def admit(self, caller: Caller, reserve_tokens: int, ask: Ask):
        if self.refuse is not None:
            raise self.refuse
        self.admitted.append(reserve_tokens)
        self.budget_reserved.append(ask)
        return SimpleNamespace(decision=Decision("lease", headers={"x-ratelimit-remaining-requests": "4"}))

    def release(self, admission, used: Ask) -> None:
        self.released.append((admission, used))


def _route(stream: ScriptedStream, timeout_s: float = 5, price: Price | None = None) -> tuple[Route, list]:
    sent: list = []

    def call(chat):
        sent.append(chat)
        return stream

    return Route("m", call, timeout_s, price), sent


def _lifecycle(finished: list | None = None) -> RequestLifecycle:
    return RequestLifecycle("rid-3", "/llm", Listeners(finished=(finished.append,) if finished is not None else ()))


async def test_a_streams_first_chunk_is_read_and_the_rest_left_to_the_caller():
    script = answer_script("a", "b")
    stream = ScriptedStream(script)
    route, sent = _route(stream)
    gate, lifecycle = _Gate(), _lifecycle()
    call = await ModelCalls(gate).start(route, CHAT, Caller(None), lifecycle)
    assert sent == [CHAT] and call.first == script[0] and call.rest is stream
    assert stream.taken == 1 and stream.cancelled == 0
    assert call.headers == {"x-ratelimit-remaining-requests": "4"}
    assert gate.admitted == [40]  # max_tokens 20 for each of 2 choices
    # Budgets reserve the prompt's bound on top: at least a token per byte of it.
    assert gate.budget_reserved[0].tokens >= 40 + len(json.dumps(CHAT.messages))
    assert gate.budget_reserved[0].spend == 0  # the model has no price
    assert lifecycle.reached_engine is True


async def test_the_lease_is_released_with_the_requests_tokens_when_it_finishes():
    gate, finished = _Gate(), []
    lifecycle = _lifecycle(finished)
    route, _ = _route(ScriptedStream(answer_script("a")))
    await ModelCalls(gate).start(route, CHAT, Caller(None), lifecycle)
    assert gate.released == []
    lifecycle.answer.usage({"prompt_tokens": 7, "completion_tokens": 5})
    lifecycle.finish(200)
    lifecycle.finish(200)
    assert [used for _, used in gate.released] == [Ask(12, 0.0)]


async def test_a_priced_model_reserves_its_tokens_at_its_prices_and_settles_to_the_real_cost():
    gate, finished = _Gate(), []
    lifecycle = _lifecycle(finished)
    price = Price(prompt_per_million=1_000_000, completion_per_million=2_000_000)  # 1 and 2 per token
    route, _ = _route(ScriptedStream(answer_script("a")), price=price)
    await ModelCalls(gate).start(route, CHAT, Caller(None), lifecycle)
    lifecycle.routed("m", price)
    [ask] = gate.budget_reserved
    assert ask.spend == (ask.tokens - 40) * 1 + 40 * 2  # the prompt's bound at 1, max_tokens × n at 2
    lifecycle.answer.usage({"prompt_tokens": 7, "completion_tokens": 5})
    lifecycle.finish(200)
    assert [used for _, used in gate.released] == [Ask(12, 17.0)] and finished[0].cost == 17.0


async def test_a_refused_request_never_reaches_the_model():
    refusal = RateLimited("API key 'k' is at its limit", 3, {})
    route, sent = _route(ScriptedStream(answer_script("a")))
    lifecycle = _lifecycle()
    with pytest.raises(RateLimited):
        await ModelCalls(_Gate(refuse=refusal)).start(route, CHAT, Caller(None), lifecycle)
    assert sent == [] and lifecycle.reached_engine is False


async def test_without_a_limiter_nothing_is_leased():
    route, _ = _route(ScriptedStream(answer_script("a")))
    call = await ModelCalls(LimitGate(None)).start(route, CHAT, Caller(None), _lifecycle())
    assert call.headers == {}


@pytest.mark.parametrize(
    "status, cls, headers",
    [(400, BadRequest, {}), (503, Overloaded, {"Retry-After": "1"}), (422, BadRequest, {})],
)
async def test_a_model_error_first_is_a_real_status_and_cancels_the_models_work(status, cls, headers):
    stream = ScriptedStream([ModelError(status, "prompt is 5000 tokens, the context 4096")])
    route, _ = _route(stream)
    lifecycle = _lifecycle()
    with pytest.raises(cls) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), lifecycle)
    assert (raised.value.status, raised.value.message) == (status, "prompt is 5000 tokens, the context 4096")
    assert raised.value.headers == headers
    assert stream.cancelled == 1 and lifecycle.reached_engine is True


VLLM_OWN = "EngineCore encountered an issue. See stack trace (above) for the root cause."


async def test_the_models_own_failure_is_told_in_fixed_words_and_its_own_logged():
    """First or midway, an error the engine reports about itself (a 500) speaks of vLLM's
    insides: the client gets a fixed sentence, the log vLLM's words with the request id."""
    stream = ScriptedStream([ModelError(500, VLLM_OWN)])
    route, _ = _route(stream)
    with serve_records() as records, pytest.raises(EngineFailure) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), _lifecycle())
    assert raised.value.message == "the model engine failed (request id rid-3)"
    [logged] = records.at(logging.ERROR)
    assert "rid-3" in logged.getMessage() and VLLM_OWN in logged.getMessage()

    midway = ModelCall(first=answer_script("Hel")[0], rest=ScriptedStream([ModelError(500, VLLM_OWN)]), headers={})
    midway.request_id = "rid-9"
    with serve_records(), pytest.raises(EngineFailure) as raised:
        async for _ in payloads(midway):
            pass
    assert raised.value.message == "the model engine failed mid-stream"  # the stream's end tells the id


async def test_a_model_that_fails_before_its_first_output_is_500_logged_once_cancelled_and_recorded():
    stream = ScriptedStream([RuntimeError("CUDA out of memory")])
    route, _ = _route(stream)
    lifecycle = _lifecycle()
    with serve_records() as records, pytest.raises(EngineFailure) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), lifecycle)
    assert raised.value.status == 500 and raised.value.message == "the model engine failed (request id rid-3)"
    assert stream.cancelled == 1
    assert lifecycle.reached_engine is True  # the ledger records it, failed
    [logged] = records.at(logging.ERROR)
    assert "rid-3" in logged.getMessage() and isinstance(logged.exc_info[1], RuntimeError)


@pytest.mark.parametrize(
    "lost",
    [ActorDiedError(), ActorUnavailableError("Actor is unavailable.", None)],
    ids=["died", "unavailable"],
)
async def test_a_replica_lost_before_its_first_output_is_503_to_retry_logged_and_recorded(lost):
    """Its node or process gone with the request on it (Serve's handle raises Ray's actor errors):
    a retry goes to a live replica, so the client is told to retry, without Ray's words."""
    stream = ScriptedStream([lost])
    route, _ = _route(stream)
    lifecycle = _lifecycle()
    with serve_records() as records, pytest.raises(Overloaded) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), lifecycle)
    assert raised.value.status == 503 and raised.value.headers == {"Retry-After": "1"}
    assert raised.value.message == "model 'm' lost the replica serving this request; retry shortly (request id rid-3)"
    assert stream.cancelled == 1 and lifecycle.reached_engine is True
    [logged] = records.at(logging.ERROR)
    assert "rid-3" in logged.getMessage() and logged.exc_info[1] is lost


async def test_a_model_at_capacity_is_503():
    route, _ = _route(ScriptedStream([BackPressureError(num_queued_requests=4, max_queued_requests=4)]))
    with pytest.raises(Overloaded) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), _lifecycle())
    assert raised.value.status == 503 and raised.value.headers == {"Retry-After": "1"}
    assert "'m' is at capacity" in raised.value.message


async def test_a_model_silent_past_its_first_output_timeout_is_503_retry_after_5_and_cancelled():
    stall = Stall()
    stream = ScriptedStream([stall, *answer_script("late")])
    route, _ = _route(stream, timeout_s=0.05)
    with pytest.raises(Overloaded) as raised:
        await ModelCalls(_Gate()).start(route, CHAT, Caller(None), _lifecycle())
    assert raised.value.headers == {"Retry-After": "5"} and "within 0.05 s" in raised.value.message
    assert stall.reached.is_set() and stream.cancelled == 1


async def test_a_request_cancelled_while_it_waits_for_the_model_cancels_the_models_work():
    stall = Stall()
    stream = ScriptedStream([stall, *answer_script("late")])
    route, _ = _route(stream)
    lifecycle = _lifecycle()
    starting = asyncio.create_task(ModelCalls(_Gate()).start(route, CHAT, Caller(None), lifecycle))
    await asyncio.wait_for(stall.reached.wait(), 5)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert stream.cancelled == 1
    assert lifecycle.reached_engine is True  # sent, perhaps begun: the ledger records it


STREAMED = CHAT.model_copy(update={"stream": True})


async def test_a_slow_first_output_sends_keepalives_until_it_comes_then_the_stream_goes_on():
    stall = Stall()
    script = answer_script("a")
    stream = ScriptedStream([stall, *script])
    route, _ = _route(stream)
    call = await ModelCalls(_Gate(), stream_keepalive_s=0.01).start(route, STREAMED, Caller(None), _lifecycle())
    assert call.first is None and call.pending is not None  # the 200 may go out now
    ticks = 0
    async for _ in call.keepalives():
        ticks += 1
        if ticks == 3:
            stall.resume.set()
    assert ticks == 3 and call.first == script[0] and call.rest is stream and call.pending is None


async def test_a_first_output_within_the_keepalive_delay_is_read_as_before():
    script = answer_script("a")
    route, _ = _route(ScriptedStream(script))
    call = await ModelCalls(_Gate(), stream_keepalive_s=5).start(route, STREAMED, Caller(None), _lifecycle())
    assert call.first == script[0] and call.pending is None
    assert [tick async for tick in call.keepalives()] == []


async def test_an_error_after_keepalives_is_raised_for_the_stream_to_end_with():
    stall = Stall()
    stream = ScriptedStream([stall, ModelError(400, "the prompt is too long")])
    route, _ = _route(stream)
    call = await ModelCalls(_Gate(), stream_keepalive_s=0.01).start(route, STREAMED, Caller(None), _lifecycle())
    await stall.reached.wait()
    stall.resume.set()
    with pytest.raises(BadRequest, match="the prompt is too long"):
        async for _ in call.keepalives():
            pass


async def test_a_whole_answer_waits_for_its_output_whatever_the_keepalive():
    stall = Stall()
    stream = ScriptedStream([stall, *answer_script("a")])
    route, _ = _route(stream)
    starting = asyncio.create_task(
        ModelCalls(_Gate(), stream_keepalive_s=0.01).start(route, CHAT, Caller(None), _lifecycle())
    )
    await stall.reached.wait()
    await asyncio.sleep(0.05)
    assert not starting.done()  # no 200 before the answer: its errors keep their status
    stall.resume.set()
    assert (await starting).pending is None


async def test_cancelling_a_call_cancels_the_models_work_waiting_or_not():
    stall = Stall()
    stream = ScriptedStream([stall, *answer_script("a")])
    route, _ = _route(stream)
    lifecycle = _lifecycle()
    call = await ModelCalls(_Gate(), stream_keepalive_s=0.01).start(route, STREAMED, Caller(None), lifecycle)
    await stall.reached.wait()
    call.cancel()  # the client left while the first output was awaited
    await asyncio.gather(call.pending, return_exceptions=True)
    assert stream.cancelled == 1 and lifecycle.reached_engine is True

    late = Stall()
    second = ScriptedStream([late, *answer_script("b")])
    route, _ = _route(second)
    call = await ModelCalls(_Gate(), stream_keepalive_s=0.01).start(route, STREAMED, Caller(None), _lifecycle())
    late.resume.set()
    await asyncio.wait({call.pending})
    call.cancel()  # the first output came, but no one read it: its stream is cancelled
    assert second.cancelled == 1 and call.pending is None


BUDGETED = Caller(ApiKey(name="b", sha256="0" * 64, limits=KeyLimits(tokens_per_day=10**6)))


async def test_a_limited_request_without_max_tokens_reserves_the_models_context_for_each_choice():
    """It may generate up to the context: reserving less would let budgets be overrun."""
    unbounded = CHAT.model_copy(update={"max_tokens": None, "n": 3})
    gate = _Gate()
    route, _ = _route(ScriptedStream(answer_script("a")))
    route = replace(route, max_model_len=2048)
    await ModelCalls(gate).start(route, unbounded, BUDGETED, _lifecycle())
    assert gate.admitted == [3 * 2048] and gate.budget_reserved[0].tokens > 3 * 2048
    await ModelCalls(gate).start(route, unbounded, Caller(None), _lifecycle())  # no limits: nothing to hold
    assert gate.admitted[-1] == 0
    with pytest.raises(BadRequest, match="set max_tokens: API key 'b' has token limits"):
        await ModelCalls(gate).start(replace(route, max_model_len=None), unbounded, BUDGETED, _lifecycle())
    per_request = Caller(ApiKey(name="r", sha256="1" * 64, limits=KeyLimits(requests_per_minute=5)))
    await ModelCalls(gate).start(replace(route, max_model_len=None), unbounded, per_request, _lifecycle())
    assert gate.admitted[-1] == 0  # a limit on requests counts no tokens: nothing to reserve
