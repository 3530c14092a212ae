"""A base model's LoRA adapters by id: those its config names, and the subfolders of its adapter
directory, found when a request names one (an adapter copied there later is served without a
redeploy). The ingress reads this to route and list adapters; the model's replica, to load them."""

import importlib.util
import logging
import re
from pathlib import Path

from cluster.schema import LoraSettings, PackageFolderSource, PathSource

logger = logging.getLogger("ray.serve")

ADAPTER_FILE = "adapter_config.json"
"""What makes a folder a PEFT adapter."""
FOLDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A directory adapter's id is its folder's name: one path step, never `..` or a hidden file."""


class Adapters:
    def __init__(self, lora: LoraSettings | None) -> None:
        self._static = {adapter.id: adapter.source for adapter in lora.adapters} if lora else {}
        self._directory = Path(lora.directory) if lora and lora.directory else None

    def path(self, adapter_id: str) -> str | None:
        """The adapter's folder, or None for an id that is no adapter of this model."""
        source = self._static.get(adapter_id)
        if source is not None:
            return _folder(source)
        if self._directory is None or not FOLDER_ID.fullmatch(adapter_id):
            return None
        folder = self._directory / adapter_id
        return str(folder) if (folder / ADAPTER_FILE).is_file() else None

    def ids(self) -> list[str]:
        """Static adapters first, then the directory's, in name order."""
        found = []
        if self._directory is not None and self._directory.is_dir():
            found = sorted(
                entry.name
                for entry in self._directory.iterdir()
                if FOLDER_ID.fullmatch(entry.name) and (entry / ADAPTER_FILE).is_file()
            )
        return list(self._static) + [name for name in found if name not in self._static]


def _folder(source: PathSource | PackageFolderSource) -> str | None:
    """None for a package missing on this node: the adapter is then not one it can serve."""
    if isinstance(source, PathSource):
        return source.path
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        logger.warning("LoRA adapter package %r is not installed on this node", source.package)
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / source.folder)
