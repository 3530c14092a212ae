"""A model's own Serve deployment (one replica, one engine) and the Serve options of the
replicas that hold a model's engine, all derived from its config: the autoscaler included, on
Serve's count of requests or on the engine's signals, which each replica reports."""

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingPolicy, BackpressureConfig

from cluster.schema import Autoscaling, ModelConfig, deployment_name
from serve_app.models.adapters import Adapters
from serve_app.models.autoscaling import EngineSignalPolicy
from serve_app.models.bounds import CONTROL_PLACES, colocated_bounds
from serve_app.models.engine import AdapterError, EngineFactory, vllm_engine
from serve_app.models.outputs import ModelError, ModelOutput
from serve_app.models.requests import EngineRequest
from serve_app.models.runner import ModelRunner

logger = logging.getLogger("ray.serve")


class ModelServer:
    """The model's own Serve deployment. A request for one of its LoRA adapters comes with the
    adapter's id as Serve's multiplexed model id: the replica loads it first if it has not (Serve's
    multiplexing keeps `lora.max_loaded` per replica, unloading the least recently used, and its
    default router sends an adapter's requests to the replicas that hold it)."""

    async def __init__(self, model: ModelConfig, engine_factory: EngineFactory = vllm_engine) -> None:
        self._runner = ModelRunner(model, engine_factory)
        await self._runner.start()
        self._adapters = Adapters(model.lora)
        if model.lora is not None:

            async def load(adapter_id: str) -> LoadedAdapter:
                path = self._adapters.path(adapter_id)
                if path is None:
                    raise AdapterError(404, f"model {model.id!r} has no adapter {adapter_id!r}")
                started = time.perf_counter()
                try:
                    await self._runner.load_adapter(adapter_id, path)
                except AdapterError as error:
                    # vLLM's words name the folder on the server: they go to the log.
                    logger.error("could not load LoRA adapter %s from %s: %s", adapter_id, path, error.message)
                    raise AdapterError(error.status, f"adapter {adapter_id!r} could not be loaded") from None
                logger.info("loaded LoRA adapter %s from %s in %.2f s", adapter_id, path, time.perf_counter() - started)
                return LoadedAdapter(self._runner, adapter_id)

            self._loaded = serve.multiplexed(max_num_models_per_replica=model.lora.max_loaded)(load)

    async def answer(self, request: EngineRequest) -> AsyncGenerator[ModelOutput, None]:
        """Every API's request, whatever its type: Serve awaits this and streams the runner's own
        generator, with no extra layer per chunk."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            try:
                await self._loaded(adapter_id)
            except AdapterError as error:
                return _refused(ModelError(error.status, error.message))
        return self._runner.answer(request)

    async def check_health(self) -> None:
        """Serve calls this periodically; a failing engine gets the replica replaced."""
        await self._runner.check_health()

    def num_unfinished_requests(self) -> int:
        return self._runner.num_unfinished_requests()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve samples this for its controller several times per look-back window when the
        model autoscales; `EngineSignalPolicy` reads it (Serve's own policy ignores it)."""
        return self._runner.load().metrics()

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.shutdown()


class LoadedAdapter:
    """What Serve's multiplexing holds per loaded adapter: it awaits the object's `__del__` when
    it drops the least recently used one. An instance attribute, not a method, so that the
    garbage collector never calls the coroutine function unawaited."""

    def __init__(self, runner: ModelRunner, adapter_id: str) -> None:
        self.__del__ = self._unload
        self._runner = runner
        self._adapter_id = adapter_id

    async def _unload(self) -> None:
        await self._runner.unload_adapter(self._adapter_id)
        logger.info("unloaded LoRA adapter %s (the least recently used)", self._adapter_id)


async def _refused(error: ModelError) -> AsyncGenerator[ModelOutput, None]:
    yield error


def colocated_options(model: ModelConfig) -> dict[str, Any]:
    """Serve options for the ingress replica that holds the model: the model's own and, when its
    bounds are the replica's, room for its running and waiting requests and for the other routes
    on top."""
    options = deployment_options(model)
    bounds = colocated_bounds(model)
    if bounds is None:
        return options
    return options | {"max_ongoing_requests": sum(bounds) + CONTROL_PLACES, "max_queued_requests": -1}


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
        options["autoscaling_config"] = autoscaling_config(settings.autoscaling)
    else:
        options["num_replicas"] = settings.num_replicas or 1
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if settings.resources:
        actor["resources"] = dict(settings.resources)
    if settings.env:
        actor["runtime_env"] = {"env_vars": dict(settings.env)}
    world = model.engine.world_size
    if world > 1:
        gpu_bundle: dict[str, float] = {"GPU": 1}
        if settings.accelerator_type:
            gpu_bundle[f"accelerator_type:{settings.accelerator_type}"] = 0.001
        options["placement_group_bundles"] = [{"CPU": settings.num_cpus} | settings.resources] + [gpu_bundle] * world
        # A tensor-parallel group needs one node's fast interconnect; pipeline stages may span nodes.
        options["placement_group_strategy"] = "STRICT_PACK" if model.engine.pipeline_parallel_size == 1 else "PACK"
    else:
        actor["num_gpus"] = settings.num_gpus
        if settings.accelerator_type:
            actor["accelerator_type"] = settings.accelerator_type
    options["ray_actor_options"] = actor
    return options


def autoscaling_config(autoscaling: Autoscaling) -> dict[str, Any]:
    """Serve's autoscaling config: its own policy on `target_ongoing_requests`, or ours on the
    engine's signals, with the thresholds as the policy's arguments."""
    config = autoscaling.model_dump(exclude={"engine_signals"})
    if autoscaling.engine_signals is not None:
        config["policy"] = AutoscalingPolicy(
            policy_function=EngineSignalPolicy,
            policy_kwargs=autoscaling.engine_signals.model_dump() | {"look_back_s": autoscaling.look_back_period_s},
        )
    return config
