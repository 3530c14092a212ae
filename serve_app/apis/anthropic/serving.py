"""The Messages API's logic: vLLM's Anthropic answers and events passed through as vLLM gives
them (`event_streams`), the events read on the way for the request's usage and stop reason; and
token counts."""

import json
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from serve_app.apis.anthropic.protocol import parse_count_tokens, parse_messages, usage_counts
from serve_app.apis.event_streams import named_events
from serve_app.apis.model_call import ModelCall, ModelCalls
from serve_app.apis.request_policy import capped_max_tokens, for_model
from serve_app.http.lifecycle import RequestLifecycle
from serve_app.http.streaming import EventStream
from serve_app.routing.router import Router
from serve_app.telemetry.record import Answer
from serve_app.tenancy.keys import Caller


class AnthropicMessages:
    def __init__(self, router: Router, calls: ModelCalls, max_tokens_limit: int | None) -> None:
        self._router = router
        self._calls = calls
        self._max_tokens_limit = max_tokens_limit

    async def messages(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        body = parse_messages(await request.body())
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        capped_max_tokens(body.max_tokens, None, self._max_tokens_limit)  # refuses one above the cap
        call = await self._calls.start(route, for_model(body, route.model_id), caller, lifecycle)
        if body.stream:
            events = anthropic_events(call, lifecycle.answer, lifecycle.request_id)
            return EventStream(events, call.cancel, lifecycle, call.headers, done=None)
        message = call.first
        lifecycle.answer.token()
        lifecycle.answer.usage(usage_counts(message.usage))
        lifecycle.answer.finish_reason = message.stop_reason
        return JSONResponse(message.model_dump(exclude_none=True), headers=call.headers)

    async def count_tokens(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        body = parse_count_tokens(await request.body())
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        call = await self._calls.start(route, for_model(body, route.model_id), caller, lifecycle)
        return JSONResponse(call.first.model_dump(exclude_none=True), headers=call.headers)


def read_event(name: str, data: str, answer: Answer) -> None:
    """`message_start` and `message_delta` carry the usage so far, `message_delta` the stop
    reason, and a `content_block_delta` is new output."""
    if name == "content_block_delta":
        answer.token()
    elif name in ("message_start", "message_delta"):
        event = json.loads(data)
        answer.usage(usage_counts((event.get("message") or event).get("usage")))
        answer.finish_reason = (event.get("delta") or {}).get("stop_reason") or answer.finish_reason


def anthropic_events(call: ModelCall, answer: Answer, request_id: str) -> AsyncGenerator[str, None]:
    return named_events(call, answer, request_id, read_event, "anthropic")
