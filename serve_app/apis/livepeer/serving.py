"""The Livepeer `/llm` route's logic: one JSON answer, or an SSE stream of `/llm` chunks that
always ends with a well-formed final chunk, a failure included (docs/livepeer-contract.md)."""

import logging
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from serve_app.apis.livepeer.chunks import StreamState, failure_chunk, full_response, stream_chunks
from serve_app.apis.livepeer.protocol import LLM_DEFAULTS, LLMRequest
from serve_app.apis.model_call import ModelCall, ModelCalls, chunks
from serve_app.apis.request_policy import capped_max_tokens, for_engine
from serve_app.errors import APIError
from serve_app.http.lifecycle import RequestLifecycle
from serve_app.http.streaming import KEEPALIVE, EventStream, event
from serve_app.routing.router import Router
from serve_app.telemetry.record import Answer
from serve_app.tenancy.keys import Caller

logger = logging.getLogger("ray.serve")


class LivepeerChat:
    def __init__(self, router: Router, calls: ModelCalls, max_tokens_limit: int | None) -> None:
        self._router = router
        self._calls = calls
        self._max_tokens_limit = max_tokens_limit

    async def complete(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        body = LLMRequest.from_body(await request.body())
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        max_tokens = capped_max_tokens(body.asked_max_tokens, LLM_DEFAULTS["max_tokens"], self._max_tokens_limit)
        chat = for_engine(body.to_chat_request(), route.model_id, max_tokens)
        call = await self._calls.start(route, chat, caller, lifecycle)
        if body.stream:
            events = livepeer_events(call, lifecycle.answer, lifecycle.request_id)
            return EventStream(events, call.cancel, lifecycle, call.headers)
        result = full_response(call.first)
        lifecycle.answer.token()
        lifecycle.answer.usage(result["usage"])
        lifecycle.answer.finish_reason = result["choices"][0]["finish_reason"]
        return JSONResponse(result, headers=call.headers)


async def livepeer_events(call: ModelCall, answer: Answer, request_id: str) -> AsyncGenerator[str, None]:
    """A failure after the 200 went out ends the stream with a final chunk whose finish reason is
    "error" and whose `error` tells it, and is reported in the answer; one after the final chunk
    went out (before the usage-only chunk, say) is only logged: the client has its whole answer,
    and the contract has one final chunk."""
    state = StreamState()
    try:
        async for _ in call.keepalives():
            yield KEEPALIVE
        async for chunk in chunks(call, answer):
            for out in stream_chunks(chunk, state):
                yield event(out)
    except Exception as error:
        if state.final_sent:
            logger.exception("stream failed after its final chunk (request id %s)", request_id)
            return
        if isinstance(error, APIError):
            message = f"{error.message} (request id {request_id})"
            answer.fail(error.status)
        else:
            logger.exception("stream failed (request id %s)", request_id)
            message = f"the model engine failed mid-stream (request id {request_id})"
            answer.fail(500)
        yield event(failure_chunk(state, message))
