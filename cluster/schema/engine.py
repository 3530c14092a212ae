"""The vLLM engine's settings of one model."""

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from cluster.schema.base import StrictModel

VLLM_SERVER_ARGS = frozenset(
    {
        "allow_credentials",
        "allowed_headers",
        "allowed_methods",
        "allowed_origins",
        "api_key",
        "api_server_count",
        "config",
        "data_parallel_supervisor_port",
        "disable_access_log_for_endpoints",
        "disable_fastapi_docs",
        "disable_uvicorn_access_log",
        "dp_supervisor_probe_failure_threshold",
        "dp_supervisor_probe_interval_s",
        "dp_supervisor_probe_timeout_s",
        "enable_flash_late_interaction",
        "enable_offline_docs",
        "enable_request_id_headers",
        "enable_ssl_refresh",
        "grpc",
        "grpc_port",
        "h11_max_header_count",
        "h11_max_incomplete_event_size",
        "headless",
        "host",
        "middleware",
        "model_tag",
        "port",
        "root_path",
        "ssl_ca_certs",
        "ssl_cert_reqs",
        "ssl_certfile",
        "ssl_ciphers",
        "ssl_keyfile",
        "uds",
        "uvicorn_log_level",
    }
)
"""The arguments of `vllm serve` that only its own HTTP server and launcher read (its address,
TLS, CORS, API keys, middleware, processes): here Serve's proxy and the ingress answer HTTP, so
these would do nothing, and an `api_key` would leave the operator believing the server is
protected. Spelled out rather than read off vLLM's parser: that import takes seconds, and the
limiter's and ledger's replicas, which load this schema, must not load vLLM at all.
`tests/test_vllm_server_args.py` derives the set from the parser and fails when vLLM adds one."""


class EngineSettings(StrictModel):
    """vLLM engine settings. The common ones are typed; `extra_args` passes any other vLLM engine
    or OpenAI front-end argument through by its Python name (checked against vLLM when the
    application is built), except those of vLLM's own HTTP server, which does not run here."""

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
        "checked against vLLM's parser when the application is built. Not the flags of vLLM's own HTTP "
        "server (`api_key`, `host`, `port`, `ssl_*`, `allowed_origins`, `middleware`, …), which does not run "
        "here: API keys are `auth.keys`",
    )

    @field_validator("extra_args")
    @classmethod
    def _no_server_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(VLLM_SERVER_ARGS.intersection(value))
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: flags of vLLM's own HTTP server, which does not run here (Serve's proxy "
                "and this application's ingress answer HTTP), so they would do nothing. API keys are set under "
                "auth.keys; the address, port and TLS of the HTTP server under the Serve config's http_options"
            )
        return value

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def to_vllm_args(self) -> dict[str, Any]:
        """Only what the config sets, so that vLLM's own defaults apply to the rest."""
        args = self.model_dump(exclude={"extra_args"}, exclude_none=True, exclude_defaults=True)
        return args | self.extra_args
