"""One model and how Ray Serve runs its replicas: autoscaling (on Serve's count of requests or on the
engine's own signals), how requests are routed among them, resources, queue bounds, and the name of
its Serve deployment."""

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from cluster.schema.base import ENV_VAR, MODEL_ID, StrictModel
from cluster.schema.engine import EngineSettings
from cluster.schema.lora import LoraSettings
from cluster.schema.sources import ModelSource

RESOURCE = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"
RAY_RESOURCES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": None, "object_store_memory": None}
"""Ray's own resources, which are not custom ones: the fields that set them, where there is one."""


class EngineSignals(StrictModel):
    """Scaling on what each replica's engine reports (its waiting requests and KV-cache usage)
    instead of Serve's count of ongoing requests: one more replica while requests have waited for
    `max_wait_s` or the KV cache has stayed above `max_kv_cache_usage` for as long, one fewer
    when a replica's engine held no request through `look_back_period_s` (docs/design.md)."""

    max_wait_s: Annotated[float, Field(gt=0)] = Field(
        default=5,
        description="how long requests may wait, in an engine's queue or in Serve's for a replica with room, "
        "before the model wants one more replica (`upscale_delay_s` then runs as usual); replicas report "
        "every 10 s, so a wait is seen up to 10 s late and a shorter one may read as 10 s",
    )
    max_kv_cache_usage: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9,
        description="the share of the KV cache in use, averaged over the replicas, above which the model "
        "wants one more replica once it has lasted `max_wait_s`: past it the engine starts preempting "
        "sequences",
    )


class Autoscaling(StrictModel):
    """Ray Serve autoscaling for one model; defaults suit engines that batch many sequences."""

    min_replicas: Annotated[int, Field(ge=0)] = Field(
        default=1,
        description="replicas kept however idle; 0 scales the model to zero (a request then waits for a "
        "replica to start); not 0 with `ingress.colocate`",
    )
    max_replicas: Annotated[int, Field(ge=1)] = Field(
        default=1, description="the most replicas Serve starts; at least `min_replicas`"
    )
    target_ongoing_requests: Annotated[float, Field(gt=0)] = Field(
        default=16,
        description="requests per replica Serve scales to keep: an engine's throughput keeps growing with its "
        "batch well past a handful of sequences, so scaling at 1 or 2 would waste GPUs; not with "
        "`engine_signals`",
    )
    engine_signals: EngineSignals | None = Field(
        default=None,
        description="scale on the engines' own signals (requests waiting, KV-cache usage) instead of "
        "`target_ongoing_requests`; not with `ingress.colocate`",
    )
    look_back_period_s: Annotated[float, Field(gt=10)] = Field(
        default=30,
        description="the window Serve averages each replica's reports over; with `engine_signals`, a replica "
        "whose engine held no request through it counts as idle. Above the 10 s between a replica's "
        "reports, or a window could hold none",
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=10,
        description="how long a load above the target must last before a replica is added (an engine takes "
        "minutes to start)",
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=300,
        description="how long a load below the target must last before a replica is removed (one that took "
        "minutes to load is not dropped in a lull)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.engine_signals is not None and "target_ongoing_requests" in self.model_fields_set:
            raise ValueError(
                "set either target_ongoing_requests (Serve's count of requests) or engine_signals, not both"
            )
        return self


class PrefixEviction(StrictModel):
    """How the prefix router's record of the prompts each replica has seen is kept bounded: it
    lives in one actor per model and would otherwise grow with every prompt ever routed."""

    threshold_chars: Annotated[int, Field(ge=1)] = Field(
        default=400_000,
        description="a replica's share of the record, in characters of prompts, past which its least "
        "recently used prefixes are dropped",
    )
    target_chars: Annotated[int, Field(ge=0)] = Field(
        default=360_000, description="what a replica's share is cut down to; at most `threshold_chars`"
    )
    interval_s: Annotated[float, Field(gt=0)] = Field(default=10, description="how often the record is checked")

    @model_validator(mode="after")
    def _target_below_threshold(self) -> "PrefixEviction":
        if self.target_chars > self.threshold_chars:
            raise ValueError(f"target_chars ({self.target_chars}) is above threshold_chars ({self.threshold_chars})")
        return self


class PrefixCacheRouting(StrictModel):
    """Ray Serve LLM's `PrefixCacheAffinityRouter`: a request goes to the replica that served the
    longest prefix of its messages (whose engine likely holds it in its prefix cache) while the
    replicas' loads are within `imbalanced_threshold`, and by load otherwise."""

    policy: Literal["prefix_cache"] = Field(description="route by the prompt's prefix")
    imbalanced_threshold: Annotated[float, Field(ge=0)] = Field(
        default=16,
        description="how many more requests the busiest replica may hold than the idlest before requests "
        "go by load (power of two choices) instead of by prefix. Ray's own default never counts the load "
        "as imbalanced, so the replica holding a popular system prompt would take every request sharing "
        "it until it is full",
    )
    match_rate_threshold: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.1,
        description="the share of the prompt's characters a replica's record must match for the request to "
        "follow it; below it the request goes to the replica that has seen the fewest characters",
    )
    eviction: PrefixEviction = Field(
        default_factory=PrefixEviction, description="how the record of the prompts routed is kept bounded"
    )


class SessionRouting(StrictModel):
    """Requests of one session (an `x-session-id` header, else the OpenAI `user` field) go to the
    same replica while it lives, so that the turns of a conversation find their history in its
    engine's prefix cache; requests without a session, and those whose replica is overloaded, go
    by load. Replicas are found by consistent hashing: a replica added takes over its share of
    the sessions, one gone hands on only its own."""

    policy: Literal["session"] = Field(description="route by the request's session")
    imbalanced_threshold: Annotated[int, Field(ge=0)] = Field(
        default=16,
        description="how many more requests a session's replica may hold than the idlest replica before the "
        "session's request goes by load instead (a full replica always sends it by load)",
    )
    virtual_nodes: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=100,
        description="points per replica on the hash ring: more spread sessions more evenly over the replicas",
    )


Routing = Annotated[PrefixCacheRouting | SessionRouting, Field(discriminator="policy")]


class DeploymentSettings(StrictModel):
    """How Ray Serve runs a model's replicas: count or autoscaling, resources, queue bounds."""

    num_replicas: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="a fixed number of replicas (1 when neither this nor `autoscaling` is set); not with `autoscaling`",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Serve's autoscaler for this model, instead of a fixed `num_replicas`"
    )
    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        default=64, description="requests one replica works on at once: its engine batches them"
    )
    max_queued_requests: Annotated[int, Field(ge=-1)] = Field(
        default=-1,
        description="requests that may wait for a replica once all are at `max_ongoing_requests`; past it, "
        "503 with `Retry-After`. -1: no bound (a colocated model's one replica still refuses past 1,000 "
        "waiting); 0 is refused, as Serve refuses it",
    )
    num_cpus: Annotated[float, Field(ge=0)] = Field(
        default=1,
        description="logical CPUs Ray reserves for each replica (for its placement group's CPU bundle with "
        "tensor or pipeline parallelism, where it must be above 0)",
    )
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        default=0,
        description="GPUs per replica; with tensor or pipeline parallelism, per worker, and then 1 (each "
        "worker is a Ray actor on one GPU of the replica's placement group)",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="the kind of GPU the replica (or each of its workers) must be placed on, as Ray names it "
        "(`A100`, `H100`)",
    )
    resources: dict[Annotated[str, Field(pattern=RESOURCE)], Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="custom Ray resources each replica takes, as its nodes declare them "
        "(`ray start --resources='{\"pool_a\": 1}'`): a replica is placed only on a node with them free, "
        "so a model can be pinned to a node or a pool. With tensor or pipeline parallelism, the "
        "replica's own bundle takes them, not its workers'",
    )
    env: dict[Annotated[str, Field(pattern=ENV_VAR)], str] = Field(
        default_factory=dict,
        description="environment variables of the replicas (and of the engine processes they start)",
    )
    health_check_period_s: Annotated[float, Field(gt=0)] = Field(
        default=10, description="how often Serve asks each replica whether its engine is alive"
    )
    health_check_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=30,
        description="how long a health check may take before Serve counts it failed (a replica that fails "
        "its checks is replaced)",
    )
    first_output_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=300,
        description="how long a request may wait for the model's first output, a start from zero "
        "replicas included; past it the client gets 503 with Retry-After",
    )
    graceful_shutdown_timeout_s: Annotated[float, Field(ge=0)] = Field(
        default=60,
        description="how long a replica being replaced (a redeploy, a scale-down) lets its "
        "streams finish before it is stopped; the ingress, which relays every model's streams, "
        "takes the longest of the models'. Above Serve's own default of 20 s: an LLM's answer "
        "streams for longer, and a redeploy should not cut it",
    )
    max_surge_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        default=0,
        description="replicas a redeploy may start beyond the target, as a percentage of it: "
        "with room for them, old replicas serve until their successors are ready; 0 stops old "
        "replicas first",
    )

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, quantity in resources.items():
            if name in RAY_RESOURCES or name.startswith("accelerator_type:"):
                field = RAY_RESOURCES.get(name, "accelerator_type")
                instead = f"; set `{field}`" if field else ""
                raise ValueError(f"{name!r} is Ray's own resource, not a custom one{instead}")
            if quantity > 1 and not float(quantity).is_integer():
                # Ray takes a fraction of one unit, or whole units.
                raise ValueError(f"{name!r}: {quantity} is neither at most 1 nor a whole number, which Ray refuses")
        return resources

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no bound) or at least 1; Serve refuses 0")
        return self


class Price(StrictModel):
    """What a model's tokens cost, for the ledger's `cost`, `/admin/usage` and spend budgets."""

    prompt_per_million: float = Field(ge=0, allow_inf_nan=False, description="the price of a million prompt tokens")
    completion_per_million: float = Field(
        ge=0, allow_inf_nan=False, description="the price of a million completion tokens"
    )
    currency: str = Field(
        default="USD", pattern=r"^[A-Z]{3}$", description="an ISO 4217 code; one for every model of a config"
    )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million) / 1e6


class ModelConfig(StrictModel):
    """One model: its names, where its weights come from, its engine and its replicas."""

    id: str = Field(
        pattern=MODEL_ID,
        description="the public model name clients send, and the one `/v1/models` lists; it names the Serve "
        "deployment (`model-<id>`, with characters Serve does not take replaced by `-`)",
    )
    aliases: list[Annotated[str, Field(pattern=MODEL_ID)]] = Field(
        default_factory=list, description="other names requests may give the model by"
    )
    source: ModelSource = Field(
        description="where the weights come from: exactly one of `hf`, `path`, or `package` with `file` (a GGUF) "
        "or `archive` (a zipped checkpoint)"
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="the vLLM engine's settings")
    deployment: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="how Ray Serve runs the model's replicas"
    )
    price: Price | None = Field(
        default=None, description="what its tokens cost (unset: nothing; the ledger's cost is then empty)"
    )
    routing: Routing | None = Field(
        default=None,
        description="how requests are spread over the model's replicas, by `policy`: `prefix_cache` or "
        "`session`; unset, Serve's own (the less loaded of two replicas picked at random). Not with "
        "`ingress.colocate`",
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="LoRA adapters served on this model, each named like a model; not with `ingress.colocate`",
    )

    @model_validator(mode="after")
    def _gpus_cover_parallelism(self) -> "ModelConfig":
        world = self.engine.world_size
        # Each worker is a Ray actor on one GPU of its placement group; 0 would still ask GPUs.
        if world > 1 and self.deployment.num_gpus != 1:
            raise ValueError(
                f"with tensor/pipeline parallelism ({world} workers) num_gpus is per worker: "
                f"use 1, not {self.deployment.num_gpus:g}"
            )
        if world > 1 and self.deployment.num_cpus == 0:
            raise ValueError(
                f"with tensor/pipeline parallelism ({world} workers) the replica's placement group "
                "bundle needs num_cpus above 0 (Ray refuses a bundle of zeros)"
            )
        return self


def deployment_name(model_id: str) -> str:
    """Serve deployment names may not hold every character a model id may."""
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)
