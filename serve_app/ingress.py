"""The HTTP front: Livepeer `/llm`, OpenAI `/v1`, health and version.

A request's path: `_admit` names it and checks its token and scope before the body is read, the
body is validated into a chat request, the router picks the model's handle among those the key
may use, `_start` takes a lease from the rate limiter and calls the model, and the first item the
model returns decides between an error status, one JSON body, or an SSE stream written by `sse`.
When the request ends, its record releases the lease and hands its row to the usage ledger's
client, which sends the rows of each flush interval together.
"""

import asyncio
import logging
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from vllm.exceptions import VLLMClientError

from cluster.schema import ClusterConfig, Scope
from serve_app import livepeer, sse
from serve_app.auth import Caller, KeyRing
from serve_app.errors import (
    APIError,
    BadRequest,
    EngineFailure,
    NotFound,
    Overloaded,
    error_response,
    from_validation,
    from_vllm,
)
from serve_app.hardware import hardware_info
from serve_app.limiter import LimitGate
from serve_app.model_state import livepeer_health, model_states
from serve_app.metrics import IngressMetrics
from serve_app.model_server import EngineFactory, ModelOutput, ModelRunner, colocated_slots
from serve_app.protocol import (
    ChatCompletionRequest,
    ErrorResponse,
    LLMRequest,
    LLMResponse,
    StreamOptions,
)
from serve_app.request_log import CLIENT_CLOSED_REQUEST, RequestRecord
from serve_app.router import ModelStream, Route, Router
from serve_app.usage import LedgerClient

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Livepeer LLM on Ray Serve", version=version("livepeer-llm-serve"))


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    record: RequestRecord | None = getattr(request.state, "record", None)
    request_id = record.request_id if record else _request_id(request)
    if record is not None:
        record.status = error.status
        record.finish()
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    api = "openai" if path.startswith("/v1/") else "livepeer"
    return error_response(api, error, request_id)


@app.exception_handler(HTTPException)
async def _no_route(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own answers (no such path, a method the path does not take) in the endpoint's
    shape too, instead of `{"detail": "Not Found"}`."""
    cls = NotFound if error.status_code == 404 else BadRequest if error.status_code < 500 else APIError
    api_error = cls(f"{request.method} {request.url.path}: {error.detail}", headers=dict(error.headers or {}))
    api_error.status = error.status_code
    return await _api_error(request, api_error)


# Helpers sit above the class: serve.ingress pickles the app, and with it the routes' globals,
# at decoration time.
_KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _request_id(request: Request) -> str:
    """Serve's proxy keeps a client's x-request-id (or makes one), puts it in the request's
    headers and returns it on the response."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _parse(model, body: bytes):
    """vLLM's request model raises its own error for checks across fields (stream_options
    without stream, an empty tools list); pydantic does not wrap it."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body") from None
    except VLLMClientError as error:
        raise BadRequest(f"invalid request body: {error}") from None


def _check_chat(chat: ChatCompletionRequest) -> None:
    """vLLM's model accepts custom roles, an empty list of messages, and counts below 1 (its
    sampling parameters refuse those later, after a negative reservation against the key's
    tokens-per-minute budget would have let other requests through)."""
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = getattr(chat, name)
        if value is not None and value < 1:
            raise BadRequest(f"invalid request body: {name}: must be at least 1, not {value}")
    if not chat.messages:
        raise BadRequest("invalid request body: messages: must hold at least one message")
    for index, message in enumerate(chat.messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in _KNOWN_ROLES:
            raise BadRequest(
                f"invalid request body: messages.{index}.role: {role!r} is not one of "
                f"{', '.join(sorted(_KNOWN_ROLES))}"
            )


async def _first_output(
    route: Route, chat: ChatCompletionRequest, record: RequestRecord
) -> tuple[ModelOutput, ModelStream]:
    """Reads the model's first item before any byte goes out, so that errors found there become
    real HTTP statuses. The wait is bounded (a model at zero replicas starts one meanwhile); a
    cancelled request (the client left) cancels the model's work."""
    outputs = route.call(chat)
    try:
        first = await asyncio.wait_for(outputs.__anext__(), route.first_output_timeout_s)
    except asyncio.TimeoutError:
        outputs.cancel()
        raise Overloaded(
            f"model {route.model_id!r} gave no output within {route.first_output_timeout_s:g} s "
            "(it may be starting from zero replicas); retry shortly",
            retry_after_s=5,
        ) from None
    except asyncio.CancelledError:
        outputs.cancel()
        # Sent, and perhaps begun: the ledger records it, with the tokens known (none).
        record.reached_engine = True
        record.status = CLIENT_CLOSED_REQUEST
        record.finish()
        raise
    except BackPressureError:
        raise Overloaded(f"model {record.model!r} is at capacity; retry shortly") from None
    except Exception:
        logger.exception("model call failed (request id %s)", record.request_id)
        outputs.cancel()
        raise EngineFailure(f"the model engine failed (request id {record.request_id})") from None
    record.reached_engine = True
    if isinstance(first, str) and first.startswith('{"error"'):
        # vLLM's stream reports a failure before its first token as an error event.
        outputs.cancel()
        first = ErrorResponse.model_validate_json(first)
    if isinstance(first, ErrorResponse):
        raise from_vllm(first)
    return first, outputs


class _EventStream(StreamingResponse):
    """Starlette never closes a body it did not finish, and never starts one whose client left
    first: the stream is closed here, and a request it never started is ended as departed, so
    that its record is written and the model's work cancelled either way."""

    def __init__(self, events, rest: ModelStream, record: RequestRecord, headers: dict[str, str]):
        super().__init__(sse.closed(events, record), media_type="text/event-stream", headers=sse.HEADERS | headers)
        self._rest = rest
        self._record = record

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if not self._record.finished:
                self._rest.cancel()
                self._record.status = CLIENT_CLOSED_REQUEST
                self._record.finish()


def _instant(text: str | None, name: str) -> float | None:
    """A query's time bound: ISO 8601 (UTC unless zoned) or unix seconds."""
    if text is None:
        return None
    try:
        instant = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= instant < 253402300800:  # 0001-01-01 ≤ t < 10000-01-01, NaN excluded
            raise BadRequest(f"{name}: {text!r} is not a time this server can represent")
        return instant
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name}: {text!r} is neither an ISO 8601 time nor unix seconds") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _iso(instant: float | None) -> str | None:
    return None if instant is None else datetime.fromtimestamp(instant, timezone.utc).isoformat()


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """A bug of ours must still answer in the endpoint's shape, and never with a traceback."""
    logger.error("unhandled error on %s", request.url.path, exc_info=error)
    request_id = _request_id(request)
    return await _api_error(request, APIError(f"internal error (request id {request_id})"))


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        config: ClusterConfig,
        handles: dict[str, DeploymentHandle],
        limiter: DeploymentHandle | None = None,
        ledger: DeploymentHandle | None = None,
        colocated_engine: EngineFactory | None = None,
    ) -> None:
        """With `colocated_engine`, the config's one model runs in this replica (no handle)."""
        self._config = config
        self._keys = KeyRing(config.auth)
        self._runners: dict[str, ModelRunner] = {}
        if colocated_engine is not None:
            self._runners = {
                model.id: ModelRunner(model, colocated_engine, colocated_slots(model)) for model in config.models
            }
            for runner in self._runners.values():
                await runner.start()
        self._router = Router(config, handles | self._runners)
        self._metrics = IngressMetrics()
        self._gate = LimitGate(limiter)
        self._ledger = LedgerClient(ledger, config.usage.flush_interval_s)

    @app.post("/llm", response_model=LLMResponse)
    @app.post("/llm/", include_in_schema=False)
    async def llm(self, request: Request):
        record, caller = self._admit(request, "/llm", "chat")
        body = _parse(LLMRequest, await request.body())
        route = self._router.resolve(body.model, caller)
        record.route_to(route.model_id)
        chat = self._capped(body.to_chat_request(route.model_id, self._config.ingress.max_tokens_limit))
        first, rest, headers = await self._start(route, chat, record, caller)
        if body.stream:
            return _EventStream(sse.livepeer_events(first, rest, record), rest, record, headers)
        result = livepeer.full_response(first)
        record.answered(result["usage"], result["choices"][0]["finish_reason"])
        return JSONResponse(result, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        record, caller = self._admit(request, "/v1/chat/completions", "chat")
        chat = _parse(ChatCompletionRequest, await request.body())
        _check_chat(chat)
        route = self._router.resolve(chat.model, caller)
        record.route_to(route.model_id)
        asked = chat.stream_options or StreamOptions()
        update: dict = {"model": route.model_id}
        if chat.stream:
            # Usage on every chunk, whatever the client asked: an abandoned stream is recorded
            # with the tokens generated until it was abandoned.
            update["stream_options"] = asked.model_copy(update={"include_usage": True, "continuous_usage_stats": True})
        chat = self._capped(chat.model_copy(update=update))
        first, rest, headers = await self._start(route, chat, record, caller)
        if chat.stream:
            events = sse.openai_events(first, rest, record, bool(asked.include_usage), bool(asked.continuous_usage_stats))
            return _EventStream(events, rest, record, headers)
        record.answered(first.usage.model_dump(), first.choices[0].finish_reason if first.choices else None)
        return JSONResponse(first.model_dump(), headers=headers)

    @app.get("/v1/models")
    async def models(self, request: Request):
        _, caller = self._admit(request, "/v1/models")
        return {"object": "list", "data": await self._model_entries(self._router.models_for(caller))}

    @app.get("/v1/models/{name:path}")
    async def model(self, request: Request, name: str):
        """One model by id or alias, as OpenAI's SDK retrieves it."""
        _, caller = self._admit(request, "/v1/models")
        if not name:  # the router reads an empty name as the default model's
            raise NotFound("name a model after /v1/models/, or GET /v1/models for the list")
        [entry] = await self._model_entries([self._router.resolve(name, caller).model_id])
        return entry

    async def _model_entries(self, model_ids: list[str]) -> list[dict]:
        created = int(time.time())
        states = await model_states(model_ids)
        return [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "livepeer-llm-serve",
                "aliases": list(self._router.names[model_id][1:]),
                "state": state.state,
                "replicas": state.replicas,
            }
            # Why a model is not ready (unschedulable, failing to start) is Serve's message.
            | ({"message": state.message} if state.state != "ready" and state.message else {})
            for model_id, state in states.items()
        ]

    @app.get("/health")
    async def health(self):
        states = await model_states(self._router.model_ids)
        return livepeer_health(self._config.default_model_id, states)

    @app.get("/hardware/info")
    async def hardware(self, request: Request):
        self._admit(request, "/hardware/info")
        return await hardware_info(self._config.default_model_id)

    @app.get("/version")
    async def version(self, request: Request):
        self._admit(request, "/version")
        return {
            "pipeline": "llm",
            "model_id": self._config.default_model_id,
            "version": app.version,
        }

    @app.get("/admin/usage")
    async def usage(self, request: Request):
        """Totals per key and model from the ledger, over `since` ≤ time < `until` (either may be
        left out), optionally for one `key` or `model`."""
        self._admit(request, "/admin/usage", "admin")
        if not self._ledger.enabled:
            raise NotFound("the usage ledger is off in this config (usage.enabled: false)")
        query = request.query_params
        since, until = _instant(query.get("since"), "since"), _instant(query.get("until"), "until")
        totals = await self._ledger.totals(since, until, query.get("key"), query.get("model"))
        return {"object": "usage", "since": _iso(since), "until": _iso(until), "data": totals}

    def _admit(self, request: Request, endpoint: str, scope: Scope | None = None) -> tuple[RequestRecord, Caller]:
        """Named, authenticated and checked for the route's scope before anything else is done."""
        record = RequestRecord(request_id=_request_id(request), endpoint=endpoint, metrics=self._metrics)
        request.state.record = record
        caller = self._keys.authenticate(request.headers.get("authorization"))
        record.key_name = caller.key_name
        if scope is not None:
            caller.require(scope)
        return record, caller

    async def _start(
        self, route: Route, chat: ChatCompletionRequest, record: RequestRecord, caller: Caller
    ) -> tuple[ModelOutput, ModelStream, dict[str, str]]:
        """The last check, the rate limits, then the model. From here on the request counts: its
        lease is released and its ledger row kept when it ends, however it ends."""
        reserve = (chat.max_completion_tokens or chat.max_tokens or 0) * (chat.n or 1)
        admission = await self._gate.admit(caller, reserve)
        if admission is not None:
            record.on_finish.append(lambda done: self._gate.release(admission, done.prompt_tokens + done.completion_tokens))
        record.on_finish.append(self._ledger.record)
        first, rest = await _first_output(route, chat, record)
        return first, rest, admission.decision.headers if admission is not None else {}

    async def check_health(self) -> None:
        """Serve calls this periodically; a failing colocated engine gets the replica replaced."""
        for runner in self._runners.values():
            await runner.check_health()

    def num_unfinished_requests(self) -> int:
        return sum(runner.num_unfinished_requests() for runner in self._runners.values())

    async def __del__(self) -> None:
        """Serve awaits this on a graceful stop, once requests have drained (its ingress wrapper
        awaits a coroutine `__del__`, and only calls a plain one): the ledger rows this replica
        holds are stored before it goes."""
        if hasattr(self, "_ledger"):
            await self._ledger.close()
        for runner in getattr(self, "_runners", {}).values():
            runner.shutdown()

    def _capped(self, chat: ChatCompletionRequest) -> ChatCompletionRequest:
        """An honest max_tokens cap matters to operators: Livepeer prices by max_tokens."""
        limit = self._config.ingress.max_tokens_limit
        if limit is None:
            return chat
        asked = chat.max_completion_tokens or chat.max_tokens
        if asked is not None and asked > limit:
            raise BadRequest(f"max_tokens is {asked}, above this server's limit of {limit}")
        return chat if asked is not None else chat.model_copy(update={"max_tokens": limit})
