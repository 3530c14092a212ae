"""The HTTP front deployment (the ingress) and the logs of every deployment."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from cluster.schema.base import StrictModel

MAX_BODY_BYTES = 4 * 1024 * 1024


class IngressAutoscaling(StrictModel):
    """Serve's autoscaling for the ingress, on its count of the streams each replica relays: every
    token of every model passes through an ingress replica, so at GPU token rates one replica's core
    becomes the bound (docs/benchmarks.md). Its replicas start in seconds and hold no weights, so
    it scales sooner and keeps fewer idle replicas than a model does."""

    min_replicas: Annotated[int, Field(ge=1)] = Field(
        default=1, description="ingress replicas kept however idle (at least 1: it is the HTTP server)"
    )
    max_replicas: Annotated[int, Field(ge=1)] = Field(
        default=4, description="the most ingress replicas Serve starts; at least `min_replicas`"
    )
    target_ongoing_requests: Annotated[float, Field(gt=0)] = Field(
        default=64,
        description="requests (streams) per ingress replica Serve scales to keep: about what one core relays "
        "at a GPU engine's per-stream token rate",
    )
    look_back_period_s: Annotated[float, Field(gt=10)] = Field(
        default=30,
        description="the window Serve averages each replica's reports over; above the 10 s between a "
        "replica's reports, or a window could hold none",
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=5, description="how long a load above the target must last before a replica is added"
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        default=120, description="how long a load below the target must last before a replica is removed"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "IngressAutoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class IngressSettings(StrictModel):
    """The HTTP front deployment. It does no heavy work, so it asks for a sliver of a CPU and
    never blocks a model replica from being scheduled. With `colocate`, the model's `deployment`
    settings size the one deployment, and the sizes here do not apply."""

    num_replicas: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="a fixed count of ingress replicas; unset, `autoscaling` sizes it"
    )
    autoscaling: IngressAutoscaling = Field(
        default_factory=IngressAutoscaling,
        description="how the ingress scales on its load when `num_replicas` is unset",
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
    stream_keepalive_s: Annotated[float, Field(gt=0, le=60)] | None = Field(
        default=5.0,
        description="a stream whose first output has not come within this many seconds (a model starting from "
        "zero replicas, a full queue) gets its 200 and an SSE comment (`: keep-alive`) every this many seconds "
        "until it comes, so that proxies do not cut it as idle; a failure is then told inside the stream. "
        "`first_output_timeout_s` still bounds the wait. null: streams wait in silence, and an error found "
        "before the first output keeps its HTTP status",
    )
    max_body_bytes: Annotated[int, Field(ge=1)] = Field(
        default=MAX_BODY_BYTES,
        description="the largest request body taken, in bytes; past it the request is refused with 413 before "
        "its body is parsed, whether it declares its length or comes in chunks. 4 MiB of text is about a million "
        "tokens, more than a model's context; raise it for requests that carry images",
    )
    colocate: bool = Field(
        default=False,
        description="run the one model's engine inside the ingress's replicas: one hop less per "
        "request and per token; the model's deployment settings then apply to the ingress",
    )

    @model_validator(mode="after")
    def _one_sizing(self) -> "IngressSettings":
        if self.num_replicas is not None and "autoscaling" in self.model_fields_set:
            raise ValueError("set either num_replicas (a fixed count) or autoscaling, not both")
        return self


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
