"""The typed shape of a cluster config: the `args` of the Serve application.

Strict (`extra="forbid"`) so that a typo in a YAML key fails at deploy time with the field's path
instead of being silently ignored. No I/O here: a config is validated on whichever node builds the
application, so it must mean the same thing everywhere.
"""

import re
from collections.abc import Iterable
from datetime import date, datetime, time, timezone
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
ENV_VAR = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(StrictModel):
    """A Hugging Face model id, loaded by vLLM as usual (from its cache when offline)."""

    hf: str = Field(min_length=1)


class PathSource(StrictModel):
    """A checkpoint folder on every node that may run a replica."""

    path: str = Field(min_length=1)


class PackageGGUFSource(StrictModel):
    """A GGUF file carried as package data by an installed Python package.

    Converted once into an ordinary checkpoint in a cache folder, then loaded by vLLM.
    """

    package: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    file: str = Field(pattern=r"^[^/]+\.gguf$")


ModelSource = HubSource | PathSource | PackageGGUFSource


class EngineSettings(StrictModel):
    """vLLM engine settings. The common ones are typed; `extra_args` passes any other vLLM engine
    or OpenAI front-end argument through by its Python name (checked against vLLM when the
    application is built)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16", "half", "float"] = "auto"
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    max_num_seqs: Annotated[int, Field(gt=0)] | None = None
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    pipeline_parallel_size: Annotated[int, Field(ge=1)] = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = False
    trust_remote_code: bool = False
    seed: int | None = None
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def to_vllm_args(self) -> dict[str, Any]:
        """Only what the config sets, so that vLLM's own defaults apply to the rest."""
        args = self.model_dump(exclude={"extra_args"}, exclude_none=True, exclude_defaults=True)
        return args | self.extra_args


class Autoscaling(StrictModel):
    """Ray Serve autoscaling for one model; defaults suit engines that batch many sequences."""

    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 16
    upscale_delay_s: Annotated[float, Field(ge=0)] = 10
    downscale_delay_s: Annotated[float, Field(ge=0)] = 300

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentSettings(StrictModel):
    """How Ray Serve runs a model's replicas: count or autoscaling, resources, queue bounds."""

    num_replicas: Annotated[int, Field(ge=1)] | None = None
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 64
    max_queued_requests: Annotated[int, Field(ge=-1)] = -1
    num_cpus: Annotated[float, Field(ge=0)] = 1
    num_gpus: Annotated[float, Field(ge=0)] = 0
    accelerator_type: str | None = None
    env: dict[Annotated[str, Field(pattern=ENV_VAR)], str] = Field(default_factory=dict)
    health_check_period_s: Annotated[float, Field(gt=0)] = 10
    health_check_timeout_s: Annotated[float, Field(gt=0)] = 30
    first_output_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=300,
        description="how long a request may wait for the model's first output, a start from zero "
        "replicas included; past it the client gets 503 with Retry-After",
    )
    graceful_shutdown_timeout_s: Annotated[float, Field(ge=0)] = Field(
        # Serve's default is 20 s; an LLM's answer streams for longer, and a redeploy should not cut it.
        default=60,
        description="how long a replica being replaced (a redeploy, a scale-down) lets its "
        "streams finish before it is stopped; the ingress, which relays every model's streams, "
        "takes the longest of the models'",
    )
    max_surge_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        default=0,
        description="replicas a redeploy may start beyond the target, as a percentage of it: "
        "with room for them, old replicas serve until their successors are ready; 0 stops old "
        "replicas first",
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no bound) or at least 1; Serve refuses 0")
        return self


class ModelConfig(StrictModel):
    id: str = Field(pattern=MODEL_ID, description="the public model name clients send")
    aliases: list[Annotated[str, Field(pattern=MODEL_ID)]] = Field(default_factory=list)
    source: ModelSource
    engine: EngineSettings = Field(default_factory=EngineSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)

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


class KeyLimits(StrictModel):
    """Per-key limits, each over a sliding minute and enforced across the whole cluster. Unset
    means unlimited. Tokens are prompt plus completion; a request reserves its `max_tokens` when
    admitted and settles to its real count when it ends."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    concurrent_requests: Annotated[int, Field(ge=1)] | None = None

    @property
    def any(self) -> bool:
        """Asked on every request of a keyed caller, so read off the fields, not a dump."""
        return (self.requests_per_minute, self.tokens_per_minute, self.concurrent_requests) != (None, None, None)


Scope = Literal["chat", "admin"]


class ApiKey(StrictModel):
    """A bearer token, never in plain text: its sha256 hex digest, or the name of an environment
    variable that holds it on the nodes running the ingress. `models` are names or glob patterns
    (`llama-*`) matched against each model's id and aliases; `scopes` say which routes the key
    may call: `chat` the chat routes, `admin` the admin routes (any valid key may call the info
    routes: `/v1/models`, filtered to the key's models, `/version`, `/hardware/info`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    env: str | None = Field(default=None, pattern=ENV_VAR)
    expires_at: datetime | None = Field(default=None, description="refused from this instant on (UTC if no zone)")
    models: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["*"])
    scopes: list[Scope] = Field(default_factory=lambda: ["chat"], min_length=1)
    limits: KeyLimits = Field(default_factory=KeyLimits)

    @field_validator("expires_at", mode="before")
    @classmethod
    def _date_means_its_start(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, time.min)
        return value

    @field_validator("expires_at")
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> "ApiKey":
        if (self.sha256 is None) == (self.env is None):
            raise ValueError(f"key {self.name!r}: give exactly one of sha256 or env")
        return self

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of a model's names (id and aliases) matches one of the key's patterns."""
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.models)


class AuthConfig(StrictModel):
    """No keys means no auth: every route is open."""

    keys: list[ApiKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "AuthConfig":
        _reject_duplicates("key name", [key.name for key in self.keys])
        return self


class UsageSettings(StrictModel):
    """The usage ledger: one row per request that reached an engine. The database is a SQLAlchemy
    URL; SQLite (the default) lives on the head node, where the ledger's single writer runs, and
    `~` means that node's home folder. A `postgresql+psycopg://…` URL needs the `postgres` extra.
    Each ingress replica sends its rows once per `flush_interval_s`, in one call; a replica that
    dies loses the rows of that last interval."""

    enabled: bool = True
    database: str = Field(default="sqlite:///~/.local/state/llm-serve/usage.sqlite", min_length=1)
    flush_interval_s: float = Field(default=1.0, gt=0, le=60)

    @field_validator("database")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("must be a sqlite:///PATH or postgresql://… URL")
        return value


class IngressSettings(StrictModel):
    """The HTTP front deployment. It does no heavy work, so it asks for a sliver of a CPU and
    never blocks a model replica from being scheduled."""

    num_replicas: Annotated[int, Field(ge=1)] = 1
    num_cpus: Annotated[float, Field(ge=0)] = 0.1
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 1024
    max_tokens_limit: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="reject requests asking for more output tokens than this"
    )
    colocate: bool = Field(
        default=False,
        description="run the one model's engine inside the ingress's replicas: one hop less per "
        "request and per token; the model's deployment settings then apply to the ingress",
    )


class LoggingSettings(StrictModel):
    """Applied to every deployment through Serve's own logging config; JSON puts each request's
    fields (`llm_request`) into the record."""

    encoding: Literal["TEXT", "JSON"] = "TEXT"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = Field(
        default=False,
        description="Serve's own line per call in every replica, beside our line per request (which has more)",
    )

    def serve_logging_config(self) -> dict:
        return {"encoding": self.encoding, "log_level": self.log_level, "enable_access_log": self.access_log}


class ClusterConfig(StrictModel):
    models: list[ModelConfig] = Field(min_length=1)
    default_model: str | None = Field(
        default=None, description="served when a request names no model; the first model if unset"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _names_resolve(self) -> "ClusterConfig":
        names = [name for model in self.models for name in (model.id, *model.aliases)]
        _reject_duplicates("model id or alias", names)
        deployments: dict[str, str] = {}
        for model in self.models:
            name = deployment_name(model.id)
            other = deployments.setdefault(name, model.id)
            if other != model.id:
                raise ValueError(
                    f"model ids {other!r} and {model.id!r} would share the Serve deployment name {name!r}: rename one"
                )
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(
                f"default_model {self.default_model!r} is not a model id or alias "
                f"(models: {', '.join(names)})"
            )
        for index, key in enumerate(self.auth.keys):
            for pattern in key.models:
                # A plain name is a promise about this config; a glob may be about models to come.
                if not _is_glob(pattern) and pattern not in names:
                    raise ValueError(
                        f"auth.keys.{index}.models: {pattern!r} is not a model id or alias "
                        f"(models: {', '.join(names)}; glob patterns like 'llama-*' are allowed)"
                    )
        if self.ingress.colocate:
            if len(self.models) != 1:
                raise ValueError(f"ingress.colocate needs exactly one model, not {len(self.models)}")
            scaling = self.models[0].deployment.autoscaling
            if scaling is not None and scaling.min_replicas == 0:
                raise ValueError("ingress.colocate: the model cannot scale to zero (autoscaling.min_replicas: 0), "
                                 "or nothing would answer /health")
        return self

    @property
    def default_model_id(self) -> str:
        wanted = self.default_model or self.models[0].id
        return next(m.id for m in self.models if wanted in (m.id, *m.aliases))


def _reject_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} {name!r}")
        seen.add(name)


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def deployment_name(model_id: str) -> str:
    """Serve deployment names may not hold every character a model id may."""
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)
