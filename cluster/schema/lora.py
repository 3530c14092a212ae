"""LoRA adapters on a base model: the adapters named in the config, a folder whose subfolders are
adapters found at request time, and how many one replica keeps loaded."""

from typing import Annotated

from pydantic import Field, model_validator

from cluster.schema.base import StrictModel, reject_duplicates
from cluster.schema.sources import PathSource


class PackageFolderSource(StrictModel):
    """A folder carried as package data by an installed Python package."""

    package: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$",
        description="the installed package's import name; found without importing it",
    )
    folder: str = Field(min_length=1, description="the adapter's folder, relative to the package's own")


AdapterSource = PathSource | PackageFolderSource


ADAPTER_ID = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
"""A model name without `:`, which separates a base model's name from its adapter's."""


class LoraAdapter(StrictModel):
    """One adapter of the model: the name requests give it and its weights."""

    id: str = Field(
        pattern=ADAPTER_ID,
        description="the name requests give it in `model` (or `<base id>:<id>`), and the one `/v1/models`, "
        "the ledger, metrics and logs show; unique across models and adapters",
    )
    source: AdapterSource = Field(
        description="a PEFT adapter folder (`adapter_config.json` and its weights): `path`, the same on every "
        "node that may run a replica, or `package` with `folder`"
    )


class LoraSettings(StrictModel):
    """Served by vLLM's LoRA support on the base model's engine; under Serve's default router
    (no `routing`), its model multiplexing sends a request for an adapter to a replica that has
    it loaded, where there is one."""

    adapters: list[LoraAdapter] = Field(default_factory=list, description="the adapters known at start")
    directory: str | None = Field(
        default=None,
        description="a folder (the same on every node) whose subfolders are adapters, each named by its "
        "folder's name, found when a request names one; `/v1/models` lists what it holds",
    )
    max_loaded: Annotated[int, Field(ge=1)] = Field(
        default=4,
        description="adapters one replica keeps loaded; past it the least recently used one is unloaded "
        "(and loaded again when a request names it)",
    )
    max_rank: Annotated[int, Field(ge=1)] = Field(
        default=16, description="the largest LoRA rank of any adapter (vLLM's `max_lora_rank`)"
    )

    @model_validator(mode="after")
    def _some_adapters(self) -> "LoraSettings":
        if not self.adapters and self.directory is None:
            raise ValueError("name adapters, a directory of adapters, or both")
        reject_duplicates("adapter id", [adapter.id for adapter in self.adapters])
        return self

    def to_vllm_args(self) -> dict[str, object]:
        """The adapters themselves are registered at run time; the engine keeps as many loaded
        as one replica may (vLLM's own least-recently-used cache)."""
        return {
            "enable_lora": True,
            "max_loras": self.max_loaded,
            "max_cpu_loras": self.max_loaded,
            "max_lora_rank": self.max_rank,
        }
