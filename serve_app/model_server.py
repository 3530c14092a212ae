"""A model's engine behind the ingress: in a Serve deployment of its own (one replica, one
engine), or inside the ingress's own replica when the config colocates them.

Either way the model yields, per request, either one `ChatCompletionResponse` or `ErrorResponse`,
or a stream of chunk JSON payloads; the ingress decides from the first item whether the client
gets a JSON body, an error status or an SSE stream.
"""

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from typing import Any

from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from cluster.schema import ModelConfig, deployment_name
from serve_app.engine import ChatEngine, VLLMEngine
from serve_app.metrics import EngineMetrics
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse

EngineFactory = Callable[[ModelConfig], ChatEngine]
ModelOutput = ChatCompletionResponse | ErrorResponse | str


def vllm_engine(model: ModelConfig) -> ChatEngine:
    from serve_app import model_source

    vllm_args = model.engine.to_vllm_args()
    if model.engine.world_size > 1:
        # Workers beyond the first GPU run as Ray actors in this replica's placement group.
        vllm_args.setdefault("distributed_executor_backend", "ray")
    return VLLMEngine(model.id, model_source.resolve(model.source), vllm_args)


class Slots:
    """A colocated model's bounds, kept by the replica itself: at most `running` requests in the
    engine, at most `waiting` (-1: no bound) waiting for one of those places, the rest refused at
    once. Serve's own bounds would count `/health` and every other route's requests in the same
    places (an orchestrator's health poll would wait behind chat requests), and Serve's proxy
    refuses in plain text, not in the endpoint's error shape."""

    def __init__(self, running: int, waiting: int) -> None:
        self._free = asyncio.Semaphore(running)
        self._max_waiting = waiting
        self._waiting = 0

    @asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        """Refused as Serve refuses past a deployment's queue bound, so that the ingress answers
        both layouts alike."""
        if self._free.locked() and 0 <= self._max_waiting <= self._waiting:
            raise BackPressureError(num_queued_requests=self._waiting, max_queued_requests=self._max_waiting)
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._free.release()


class ModelRunner:
    """One engine, its metrics and its output stream per request; with `slots`, its own bounds on
    the requests it takes (colocated: Serve bounds a model deployment's requests itself)."""

    def __init__(self, model: ModelConfig, engine_factory: EngineFactory, slots: Slots | None = None) -> None:
        self._tags = {"model": model.id}
        self._metrics = EngineMetrics()
        self._engine = engine_factory(model)
        self._slots = slots

    async def start(self) -> None:
        await self._engine.start()

    async def chat(self, request: ChatCompletionRequest) -> AsyncGenerator[ModelOutput, None]:
        """A whole answer or an error gives its place back before it is handed on: the engine is
        done with it, and the caller need not read on for the place to be free."""
        async with self._slots.taken() if self._slots else nullcontext():
            started = time.perf_counter()
            try:
                result = await self._engine.chat(request)
                if isinstance(result, (ChatCompletionResponse, ErrorResponse)):
                    # A whole answer's one output is its first output too, as the ingress counts it.
                    self._metrics.ttft.observe(time.perf_counter() - started, self._tags)
                else:
                    first = True
                    async for payload in _payloads(result):
                        if first:
                            self._metrics.ttft.observe(time.perf_counter() - started, self._tags)
                            first = False
                        yield payload
                    return
            finally:
                self._metrics.duration.observe(time.perf_counter() - started, self._tags)
        yield result

    async def check_health(self) -> None:
        await self._engine.check_health()

    def num_unfinished_requests(self) -> int:
        return self._engine.num_unfinished_requests()

    def shutdown(self) -> None:
        self._engine.shutdown()


class ModelServer:
    """The model's own Serve deployment."""

    async def __init__(self, model: ModelConfig, engine_factory: EngineFactory = vllm_engine) -> None:
        self._runner = ModelRunner(model, engine_factory)
        await self._runner.start()

    async def chat(self, request: ChatCompletionRequest) -> AsyncGenerator[ModelOutput, None]:
        """Serve awaits this and streams the runner's own generator: no extra layer per chunk."""
        return self._runner.chat(request)

    async def check_health(self) -> None:
        """Serve calls this periodically; a failing engine gets the replica replaced."""
        await self._runner.check_health()

    def num_unfinished_requests(self) -> int:
        return self._runner.num_unfinished_requests()

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.shutdown()


class InProcessStream:
    """A colocated model's outputs for one request, with the handle stream's `cancel()`."""

    _closing: set[asyncio.Task] = set()

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


async def _payloads(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's chunks as their JSON, without SSE framing."""
    async for line in stream:
        payload = line.removeprefix("data: ").rstrip()
        if payload != "[DONE]":
            yield payload


CONTROL_PLACES = 32
"""Places in a colocated replica for requests that never reach the engine: `/health`, `/version`,
`/v1/models`, refusals."""

UNBOUNDED_WAITING = 1000
"""The bound on requests waiting for the engine in a colocated replica when the model's queue has
none (`max_queued_requests: -1`): past it they are refused, and the control places stay free."""


def colocated_options(model: ModelConfig) -> dict[str, Any]:
    """Serve options for the ingress replica that holds the model: the model's own and, when its
    bounds are the replica's, room for its running and waiting requests and for the other routes
    on top."""
    options = deployment_options(model)
    bounds = _replica_bounds(model)
    if bounds is None:
        return options
    return options | {"max_ongoing_requests": sum(bounds) + CONTROL_PLACES, "max_queued_requests": -1}


def colocated_slots(model: ModelConfig) -> Slots | None:
    bounds = _replica_bounds(model)
    return None if bounds is None else Slots(*bounds)


def _replica_bounds(model: ModelConfig) -> tuple[int, int] | None:
    """The requests a colocated replica keeps running and waiting itself, when it is the model's
    only replica; with more, Serve's proxy keeps one queue for all of them (a replica's own queue
    would hold its requests while another replica, a new one say, sits idle, and Serve's router
    prefers the replicas on its own node until they refuse)."""
    settings = model.deployment
    replicas = settings.autoscaling.max_replicas if settings.autoscaling is not None else settings.num_replicas or 1
    if replicas != 1:
        return None
    waiting = settings.max_queued_requests if settings.max_queued_requests >= 0 else UNBOUNDED_WAITING
    return settings.max_ongoing_requests, waiting


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Serve options for one model's deployment, all derived from its config."""
    settings = model.deployment
    options: dict[str, Any] = {
        "name": deployment_name(model.id),
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        # Where Serve's proxy refuses (a colocated model with several replicas), as we refuse.
        "backpressure_config": BackpressureConfig(retry_after_s=1),
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": settings.health_check_timeout_s,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "max_surge_percent": settings.max_surge_percent,
    }
    if settings.autoscaling is not None:
        options["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        options["num_replicas"] = settings.num_replicas or 1
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.env:
        actor["runtime_env"] = {"env_vars": dict(settings.env)}
    world = model.engine.world_size
    if world > 1:
        gpu_bundle: dict[str, float] = {"GPU": 1}
        if settings.accelerator_type:
            gpu_bundle[f"accelerator_type:{settings.accelerator_type}"] = 0.001
        options["placement_group_bundles"] = [{"CPU": settings.num_cpus}] + [gpu_bundle] * world
        # A tensor-parallel group needs one node's fast interconnect; pipeline stages may span nodes.
        options["placement_group_strategy"] = (
            "STRICT_PACK" if model.engine.pipeline_parallel_size == 1 else "PACK"
        )
    else:
        actor["num_gpus"] = settings.num_gpus
        if settings.accelerator_type:
            actor["accelerator_type"] = settings.accelerator_type
    options["ray_actor_options"] = actor
    return options
