"""The narrow engine interface a model replica needs, and its vLLM implementation.

The replica talks to an engine only through `Engine`, so plumbing tests can run a fake engine
without vLLM. The vLLM implementation reuses vLLM's own OpenAI serving layer (chat template,
sampling parameters, tools, logprobs, usage, tokenization) instead of re-implementing any of it.
"""

import argparse
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from typing import TYPE_CHECKING, Any, Protocol

from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

from cluster.runtime import schedulers_to_engine_cores
from cluster.schema import ModelConfig
from serve_app.models.autoscaling import EngineLoad
from serve_app.models.outputs import WholeAnswer
from serve_app.models.requests import EngineRequest

if TYPE_CHECKING:
    from serve_app.models.engine_load import SchedulerLoad

EngineResult = AsyncGenerator[str, None] | WholeAnswer | ErrorResponse
"""What vLLM's serving layer returns: SSE lines when streaming, else one response or an error."""


class Engine(Protocol):
    async def start(self) -> None: ...

    async def answer(self, request: EngineRequest) -> EngineResult: ...

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Raise `AdapterError` if it cannot be loaded."""

    async def unload_adapter(self, adapter_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    def num_unfinished_requests(self) -> int: ...

    def load(self) -> EngineLoad:
        """What the engine holds now, for autoscaling on its signals."""

    def shutdown(self) -> None: ...


class VLLMEngine:
    """One vLLM `AsyncLLM` with vLLM's serving layer on top: a serving class per request type."""

    def __init__(self, model_id: str, model: str, vllm_args: dict[str, Any]) -> None:
        self._model_id = model_id
        self._model = model
        self._vllm_args = vllm_args
        self._client: Any = None
        self._serving: dict[type, Callable[[Any], Awaitable[EngineResult]]] = {}
        self._models: Any = None
        self._loads: list[SchedulerLoad] = []

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        from serve_app.models.engine_load import SchedulerLoad

        def scheduler_load(config, engine_index: int) -> SchedulerLoad:
            self._loads.append(SchedulerLoad(config, engine_index))
            return self._loads[-1]

        with _serve_logs_kept():
            args = vllm_namespace(self._model_id, self._model, self._vllm_args)
            # vLLM's engine metrics go out through Ray's metrics, labelled with the model's id;
            # the scheduler's load is kept for autoscaling on it.
            self._client = AsyncLLM.from_engine_args(
                AsyncEngineArgs.from_cli_args(args), stat_loggers=[RayPrometheusStatLogger, scheduler_load]
            )
            schedulers_to_engine_cores(started_by=os.getpid())
            state = State()
            await init_app_state(self._client, state, args, supported_tasks=await self._client.get_supported_tasks())
            self._serving = _serving_methods(state)
            self._models = state.openai_serving_models

    async def answer(self, request: EngineRequest) -> EngineResult:
        """Client mistakes found while rendering the prompt (too long for the context, a bad
        template argument) and the engine's own refusals (its queue full, under `extra_args`'
        `max_num_queued_reqs`) are raised, not returned; they become the ErrorResponse with the
        status vLLM's server would give them. Anything else is a failure, logged with the request's
        id by the ingress; a dead engine's the model's runner tells as a 503 to retry."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import GracefulHTTPError, VLLMClientError

        serving = self._serving.get(type(request))
        if serving is None:
            # The client's mistake (a chat to an embedding model, say): a 400, not vLLM's 501.
            return create_error_response(f"model {self._model_id!r} does not serve this API")
        try:
            return await serving(request)
        except (ValueError, TypeError, OverflowError, NotImplementedError, VLLMClientError, GracefulHTTPError) as error:
            return create_error_response(error)

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Registered under its id, as vLLM's own `/v1/load_lora_adapter` does, and loaded into
        the engine at once, so that a bad adapter fails here and not in a request."""
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        result = await self._models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=adapter_id, lora_path=path))
        if isinstance(result, ErrorResponse):
            raise AdapterError(result.error.code, result.error.message)

    async def unload_adapter(self, adapter_id: str) -> None:
        """vLLM's unloading only forgets the name; the engine's copy is removed too, so that an
        evicted adapter's memory is freed."""
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        loaded = self._models.lora_requests.get(adapter_id)
        if loaded is None:
            return
        await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=adapter_id))
        await self._client.remove_lora(loaded.lora_int_id)

    async def check_health(self) -> None:
        await self._client.check_health()

    def num_unfinished_requests(self) -> int:
        return self._client.output_processor.get_num_unfinished_requests()

    def load(self) -> EngineLoad:
        """The scheduler's last word, unless the engine holds no request: a request aborted
        (its client gone) leaves no engine step after it to say so."""
        if self.num_unfinished_requests() == 0:
            return EngineLoad()
        stats = [load.last for load in self._loads]
        return EngineLoad(
            waiting=sum(s.num_waiting_reqs + s.num_skipped_waiting_reqs for s in stats),
            running=sum(s.num_running_reqs for s in stats),
            kv_cache_usage=sum(s.kv_cache_usage for s in stats) / len(stats),
        )

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.shutdown()


def _serving_methods(state: Any) -> dict[type, Callable[[Any], Awaitable[EngineResult]]]:
    """The method of vLLM's serving layer for each request type, as its own server's routes call
    them (without the HTTP request, which they read only for headers this server does not pass
    on). A serving class vLLM did not make for this model (completions for a model that only
    embeds, say) leaves its types out: `answer` then refuses them."""
    names = ("chat", "completion", "responses")
    chat, completion, responses = (getattr(state, f"openai_serving_{name}", None) for name in names)
    messages = getattr(state, "anthropic_serving_messages", None)
    embedding = getattr(state, "serving_embedding", None)
    tokenization = getattr(state, "serving_tokenization", None)
    methods: dict[type, Callable[[Any], Awaitable[EngineResult]]] = {}
    if chat is not None:
        methods[ChatCompletionRequest] = chat.create_chat_completion
    if completion is not None:
        methods[CompletionRequest] = completion.create_completion
    if responses is not None:
        methods[ResponsesRequest] = lambda request: _responses(responses, request)
    if messages is not None:
        methods[AnthropicMessagesRequest] = messages.create_messages
        methods[AnthropicCountTokensRequest] = messages.count_tokens
    if embedding is not None:
        methods[EmbeddingCompletionRequest] = methods[EmbeddingChatRequest] = lambda request: _embeddings(
            embedding, request
        )
    if tokenization is not None:
        methods[TokenizeCompletionRequest] = methods[TokenizeChatRequest] = lambda request: (
            tokenization.create_tokenize(request, None)
        )
        methods[DetokenizeRequest] = lambda request: tokenization.create_detokenize(request, None)
    return methods


async def _responses(serving: Any, request: ResponsesRequest) -> EngineResult:
    """A Responses stream's events come from vLLM's serving class as objects, which its own
    server's route frames as SSE (named events); they are framed the same way here."""
    from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events

    result = await serving.create_responses(request)
    return _convert_stream_to_sse_events(result) if isinstance(result, AsyncIterator) else result


async def _embeddings(serving: Any, request: Any) -> EngineResult:
    """vLLM's embedding serving class answers with the HTTP response its server sends, which is
    read back into its model here: what crosses to the ingress is the answer, not a response."""
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse

    response = await serving(request, None)
    model = ErrorResponse if response.status_code >= 400 else EmbeddingResponse
    return model.model_validate_json(response.body)


@contextmanager
def _serve_logs_kept() -> Iterator[None]:
    """vLLM applies its logging config with `dictConfig`, which closes every handler in the
    process: Serve's buffering handler then loses its log file, and the replica's log (our line
    per request included) goes nowhere. Its file is given back once the engine is up."""
    kept = [
        (handler, handler.target)
        for handler in logging.getLogger("ray.serve").handlers
        if isinstance(handler, MemoryHandler)
    ]
    try:
        yield
    finally:
        for handler, target in kept:
            handler.setTarget(target)


def vllm_namespace(model_id: str, model: str, vllm_args: dict[str, Any]):
    """The flat argument namespace `vllm serve` would build, so engine and front-end defaults are
    vLLM's own; raises ValueError naming any argument vLLM does not know, or a value its flag
    would not take (at build time, rather than in every replica as it starts)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([model])
    unknown = sorted(name for name in vllm_args if not hasattr(args, name))
    if unknown:
        raise ValueError(f"unknown vLLM argument(s) for model {model_id!r}: {', '.join(unknown)}")
    args.model = model
    args.served_model_name = [model_id]
    actions = {action.dest: action for action in parser._actions}
    for name, value in vllm_args.items():
        try:
            setattr(args, name, _as_flag_reads(actions.get(name), value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise ValueError(
                f"vLLM argument {name} of model {model_id!r}: {value!r} is not a value its flag takes ({error})"
            ) from None
    return args


def _as_flag_reads(action: argparse.Action | None, value: Any) -> Any:
    """A config value read as vLLM's parser reads its flag's text ("4k" tokens, a JSON object for
    a config, one of the flag's choices), so that a config takes what `vllm serve` takes."""
    if action is None or value is None:
        return value
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise TypeError("a switch: true or false")
        return value
    if action.nargs in ("*", "+"):
        if not isinstance(value, list):
            raise TypeError("a list")
        return [_one_flag_value(action, item) for item in value]
    return _one_flag_value(action, value)


def _one_flag_value(action: argparse.Action, value: Any) -> Any:
    if action.type is not None:
        value = action.type(json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"one of {', '.join(map(str, action.choices))}")
    return value


class AdapterError(Exception):
    """An adapter that cannot be loaded, with the status vLLM's server would answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


EngineFactory = Callable[[ModelConfig], Engine]


def vllm_engine(model: ModelConfig) -> Engine:
    from serve_app.models import sources

    vllm_args = model.engine.to_vllm_args() | (model.lora.to_vllm_args() if model.lora else {})
    if model.engine.world_size > 1:
        # Workers beyond the first GPU run as Ray actors in this replica's placement group.
        vllm_args.setdefault("distributed_executor_backend", "ray")
    return VLLMEngine(model.id, sources.resolve(model.source), vllm_args)
