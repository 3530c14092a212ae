"""The vLLM engine's settings of one model."""

from typing import Annotated, Any, Literal

from pydantic import Field

from cluster.schema.base import StrictModel


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
