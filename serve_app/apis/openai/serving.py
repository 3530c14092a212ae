"""The OpenAI-compatible routes' logic: chat completions and completions (vLLM's own answers and
chunks, passed through less the usage the client did not ask for), responses (vLLM's answers and
named events as they come), vLLM's tokenization, and the model list."""

import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from serve_app.apis.event_streams import named_events
from serve_app.apis.model_call import ModelCall, ModelCalls, chunks
from serve_app.apis.openai.protocol import (
    ChatCompletionRequest,
    StreamOptions,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_embeddings,
    parse_responses,
    parse_tokenize,
)
from serve_app.apis.request_policy import capped_max_tokens, for_engine, for_model
from serve_app.errors import APIError, EngineFailure, NotFound, error_body
from serve_app.http.lifecycle import RequestLifecycle
from serve_app.http.streaming import KEEPALIVE, EventStream, event
from serve_app.models.requests import EngineRequest, GenerationRequest
from serve_app.models.state import model_states
from serve_app.routing.router import Router
from serve_app.telemetry.record import Answer
from serve_app.tenancy.keys import Caller

logger = logging.getLogger("ray.serve")


class OpenAIAPI:
    """Every route takes its request through the same path to the model (`ModelCalls`): the key's
    allow-list and limits, the ledger and the request log see a completion or a tokenization as
    they see a chat."""

    def __init__(self, router: Router, calls: ModelCalls, max_tokens_limit: int | None) -> None:
        self._router = router
        self._calls = calls
        self._max_tokens_limit = max_tokens_limit

    async def chat(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        return await self._generate(parse_chat(await request.body()), caller, lifecycle)

    async def completion(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        return await self._generate(parse_completion(await request.body()), caller, lifecycle)

    async def responses(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        body = parse_responses(await request.body())
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        max_tokens = capped_max_tokens(body.max_output_tokens, None, self._max_tokens_limit)
        body = for_model(body, route.model_id).model_copy(update={"max_output_tokens": max_tokens})
        call = await self._calls.start(route, body, caller, lifecycle)
        if body.stream:
            events = named_events(call, lifecycle.answer, lifecycle.request_id, read_response_event, "openai")
            return EventStream(events, call.cancel, lifecycle, call.headers, done=None)
        response = call.first
        lifecycle.answer.token()
        lifecycle.answer.usage(response_usage(response.usage and response.usage.model_dump()))
        lifecycle.answer.finish_reason = response.status
        return JSONResponse(response.model_dump(mode="json", by_alias=True), headers=call.headers)

    async def embeddings(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        return await self._whole(parse_embeddings(await request.body()), caller, lifecycle)

    async def tokenize(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        return await self._whole(parse_tokenize(await request.body()), caller, lifecycle)

    async def detokenize(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        return await self._whole(parse_detokenize(await request.body()), caller, lifecycle)

    async def _whole(self, body: EngineRequest, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        """vLLM's answer as it gives it, for a request that generates nothing; an embedding's
        usage (its prompt's tokens) goes to the ledger."""
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        call = await self._calls.start(route, for_model(body, route.model_id), caller, lifecycle)
        usage = getattr(call.first, "usage", None)
        lifecycle.answer.usage(usage.model_dump() if usage is not None else None)
        return JSONResponse(call.first.model_dump(), headers=call.headers)

    async def _generate(self, body: GenerationRequest, caller: Caller, lifecycle: RequestLifecycle) -> Response:
        route = self._router.resolve(body.model, caller)
        lifecycle.routed(route.model_id, route.price)
        asked = body.stream_options or StreamOptions()
        # vLLM's completion request has OpenAI's default of 16 when the client sets none: a default
        # bows to the server's cap, a client's own value above it is refused.
        client_max = getattr(body, "max_completion_tokens", None) or (
            body.max_tokens if "max_tokens" in body.model_fields_set else None
        )
        default = None if isinstance(body, ChatCompletionRequest) else body.max_tokens
        max_tokens = capped_max_tokens(client_max, default, self._max_tokens_limit)
        chat = for_engine(body, route.model_id, max_tokens)
        call = await self._calls.start(route, chat, caller, lifecycle)
        if chat.stream:
            events = openai_events(
                call,
                lifecycle.answer,
                lifecycle.request_id,
                bool(asked.include_usage),
                bool(asked.continuous_usage_stats),
            )
            return EventStream(events, call.cancel, lifecycle, call.headers)
        first = call.first
        lifecycle.answer.token()
        lifecycle.answer.usage(first.usage.model_dump())
        lifecycle.answer.finish_reason = first.choices[0].finish_reason if first.choices else None
        return JSONResponse(first.model_dump(), headers=call.headers)

    async def models(self, request: Request, caller: Caller, lifecycle: RequestLifecycle) -> dict[str, Any]:
        """The models, then their LoRA adapters, each with its base model as `parent`."""
        listed = [(model_id, None) for model_id in self._router.models_for(caller)]
        return {"object": "list", "data": await self._entries(listed + self._router.adapters_for(caller))}

    async def model(self, name: str, caller: Caller) -> dict[str, Any]:
        """One model by id or alias, or an adapter, as OpenAI's SDK retrieves it."""
        if not name:  # the router reads an empty name as the default model's
            raise NotFound("name a model after /v1/models/, or GET /v1/models for the list")
        route = self._router.resolve(name, caller)
        [entry] = await self._entries([(route.model_id, route.parent)])
        return entry

    async def _entries(self, listed: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """An adapter is as ready as its base model: it is loaded on the base's replicas."""
        created = int(time.time())
        states = await model_states(list(dict.fromkeys(parent or model_id for model_id, parent in listed)))
        entries = []
        for model_id, parent in listed:
            state = states[parent or model_id]
            aliases = [f"{parent}:{model_id}"] if parent else list(self._router.names[model_id][1:])
            entry = {"id": model_id, "object": "model", "created": created, "owned_by": "livepeer-llm-serve"}
            entry |= {"aliases": aliases} | ({"parent": parent} if parent else {})
            entry |= {"state": state.state, "replicas": state.replicas}
            # Why a model is not ready, in fixed words: Serve's own message may hold internals.
            entries.append(entry | ({"message": state.reason} if state.reason else {}))
        return entries


async def openai_events(
    call: ModelCall, answer: Answer, request_id: str, wants_usage: bool, wants_usage_per_chunk: bool
) -> AsyncGenerator[str, None]:
    """vLLM is always asked for usage on every chunk (`request_policy.for_engine`); the client gets it
    only as far as it asked: per chunk, in the final usage-only chunk, or not at all. A failure
    after the 200 went out ends the stream with an error event, as vLLM's own server does."""
    try:
        async for _ in call.keepalives():
            yield KEEPALIVE
        async for chunk in chunks(call, answer):
            if chunk.get("choices"):
                if not wants_usage_per_chunk:
                    chunk.pop("usage", None)
                yield event(chunk)
            elif wants_usage:
                yield event(chunk)
    except APIError as error:
        answer.fail(error.status)
        yield event(error_body("openai", error, request_id))
    except Exception:
        logger.exception("stream failed (request id %s)", request_id)
        answer.fail(500)
        error = EngineFailure(f"the model engine failed mid-stream (request id {request_id})")
        yield event(error_body("openai", error, request_id))


OUTPUT_DELTAS = {
    "response.output_text.delta",
    "response.reasoning_text.delta",
    "response.function_call_arguments.delta",
}
ENDED = {"response.completed", "response.incomplete"}


def read_response_event(name: str, data: str, answer: Answer) -> None:
    """A delta of text, reasoning or a tool call's arguments is new output; the response's end
    carries its usage and status (`completed`, or `incomplete` at `max_output_tokens`)."""
    if name in OUTPUT_DELTAS:
        answer.token()
    elif name in ENDED:
        response = json.loads(data)["response"]
        answer.usage(response_usage(response.get("usage")))
        answer.finish_reason = response.get("status")
    elif name == "response.failed":
        raise EngineFailure("the model failed to answer")


def response_usage(usage: dict | None) -> dict[str, int] | None:
    """The Responses API's usage in the ledger's terms (its input tokens include cached ones)."""
    if usage is None:
        return None
    return {"prompt_tokens": usage.get("input_tokens") or 0, "completion_tokens": usage.get("output_tokens") or 0}
