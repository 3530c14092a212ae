"""Render a cluster config into a Serve config file, everything inline under `args:` so that the
remote build task needs no file or environment of the submitting machine."""

from typing import Any

import yaml

from cluster.load import IMPORT_PATH
from cluster.schema import ClusterConfig


def serve_config(
    config: ClusterConfig, *, app_name: str = "llm", host: str = "0.0.0.0", port: int = 8000
) -> dict[str, Any]:
    return {
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": config.model_dump(mode="json", exclude_defaults=True),
            }
        ],
    }


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)
