"""The HTTP front: Livepeer `/llm`, OpenAI `/v1`, health and version.

A request's path: `_admit` names it and checks its token before the body is read, the body is
validated into a chat request, the router picks the model's handle, and the first item the model
returns decides between an error status, one JSON body, or an SSE stream written by `sse`.
"""

import asyncio
import logging
import time
import uuid
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.schema import ClusterConfig
from serve_app import livepeer, sse
from serve_app.auth import KeyRing
from serve_app.errors import (
    APIError,
    BadRequest,
    EngineFailure,
    Overloaded,
    error_response,
    from_validation,
    from_vllm,
)
from serve_app.hardware import hardware_info
from serve_app.model_state import livepeer_health, model_states
from serve_app.metrics import IngressMetrics
from serve_app.model_server import ModelOutput
from serve_app.protocol import (
    ChatCompletionRequest,
    ErrorResponse,
    LLMRequest,
    LLMResponse,
    StreamOptions,
)
from serve_app.request_log import CLIENT_CLOSED_REQUEST, RequestRecord
from serve_app.router import Route, Router

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


# Helpers sit above the class: serve.ingress pickles the app, and with it the routes' globals,
# at decoration time.
_KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _request_id(request: Request) -> str:
    """Serve's proxy keeps a client's x-request-id (or makes one), puts it in the request's
    headers and returns it on the response."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body") from None


def _check_messages(chat: ChatCompletionRequest) -> None:
    """vLLM's model accepts custom roles and an empty list; neither makes a chat prompt."""
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
) -> tuple[ModelOutput, DeploymentResponseGenerator]:
    """Reads the model's first item before any byte goes out, so that errors found there become
    real HTTP statuses. The wait is bounded (a model at zero replicas starts one meanwhile); a
    cancelled request (the client left) cancels the model's work."""
    outputs: DeploymentResponseGenerator = route.handle.chat.remote(chat)
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
        record.status = CLIENT_CLOSED_REQUEST
        record.finish()
        raise
    except BackPressureError:
        raise Overloaded(f"model {record.model!r} is at capacity; retry shortly") from None
    except Exception:
        logger.exception("model call failed (request id %s)", record.request_id)
        outputs.cancel()
        raise EngineFailure(f"the model engine failed (request id {record.request_id})") from None
    if isinstance(first, ErrorResponse):
        raise from_vllm(first)
    return first, outputs


def _stream(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=sse.HEADERS)


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """A bug of ours must still answer in the endpoint's shape, and never with a traceback."""
    logger.error("unhandled error on %s", request.url.path, exc_info=error)
    request_id = _request_id(request)
    return await _api_error(request, APIError(f"internal error (request id {request_id})"))


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ClusterConfig, handles: dict[str, DeploymentHandle]) -> None:
        self._config = config
        self._keys = KeyRing(config.auth)
        self._router = Router(config, handles)
        self._metrics = IngressMetrics()

    @app.post("/llm", response_model=LLMResponse)
    @app.post("/llm/", include_in_schema=False)
    async def llm(self, request: Request):
        record = self._admit(request, "/llm")
        body = _parse(LLMRequest, await request.body())
        route = self._router.resolve(body.model)
        record.route_to(route.model_id)
        chat = self._capped(body.to_chat_request(route.model_id, self._config.ingress.max_tokens_limit))
        first, rest = await _first_output(route, chat, record)
        if body.stream:
            return _stream(sse.livepeer_events(first, rest, record))
        result = livepeer.full_response(first)
        record.answered(result["usage"], result["choices"][0]["finish_reason"])
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        record = self._admit(request, "/v1/chat/completions")
        chat = _parse(ChatCompletionRequest, await request.body())
        _check_messages(chat)
        route = self._router.resolve(chat.model)
        record.route_to(route.model_id)
        wants_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        update: dict = {"model": route.model_id}
        if chat.stream:
            update["stream_options"] = (chat.stream_options or StreamOptions()).model_copy(
                update={"include_usage": True}
            )
        chat = self._capped(chat.model_copy(update=update))
        first, rest = await _first_output(route, chat, record)
        if chat.stream:
            return _stream(sse.openai_events(first, rest, record, wants_usage))
        record.answered(first.usage.model_dump(), first.choices[0].finish_reason if first.choices else None)
        return JSONResponse(first.model_dump())

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._admit(request, "/v1/models")
        created = int(time.time())
        states = await model_states(self._router.model_ids)
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "livepeer-llm-serve",
                "aliases": list(self._router.aliases[model_id]),
                "state": state.state,
                "replicas": state.replicas,
            }
            # Why a model is not ready (unschedulable, failing to start) is Serve's message.
            | ({"message": state.message} if state.state != "ready" and state.message else {})
            for model_id, state in states.items()
        ]
        return {"object": "list", "data": data}

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

    def _admit(self, request: Request, endpoint: str) -> RequestRecord:
        """Named and authenticated before anything else is done for the request."""
        record = RequestRecord(request_id=_request_id(request), endpoint=endpoint, metrics=self._metrics)
        request.state.record = record
        record.key_name = self._keys.authenticate(request.headers.get("authorization")).key_name
        return record

    def _capped(self, chat: ChatCompletionRequest) -> ChatCompletionRequest:
        """An honest max_tokens cap matters to operators: Livepeer prices by max_tokens."""
        limit = self._config.ingress.max_tokens_limit
        if limit is None:
            return chat
        asked = chat.max_completion_tokens or chat.max_tokens
        if asked is not None and asked > limit:
            raise BadRequest(f"max_tokens is {asked}, above this server's limit of {limit}")
        return chat if asked is not None else chat.model_copy(update={"max_tokens": limit})
