"""Render cluster configs: into a Serve config file (everything inline under `args:`, so that the
remote build task needs no file or environment of the submitting machine), and into a KubeRay
`RayService` manifest that embeds the same Serve config."""

import copy
import json
import math
import re
from importlib.metadata import version
from typing import Any

import yaml

from cluster.load import IMPORT_PATH, LoadedConfig
from cluster.runtime import NODE_ENV
from cluster.schema import ClusterConfig, ModelConfig

# KubeRay's `rayVersion`: the Ray this project is installed with (pyproject.toml pins it), as in
# the image built from it.
RAY_VERSION = version("ray")
# The image `make image-gpu` builds (docker/Dockerfile.gpu) and the manifest names by default:
# this project's name and version, as the Makefile reads them from pyproject.toml, then `-gpu`.
PROJECT = "livepeer-llm-serve"
IMAGE = f"{PROJECT}:{version(PROJECT)}-gpu"
SERVE_PORT = 8000


def serve_config(
    config: ClusterConfig, *, app_name: str = "llm", host: str = "0.0.0.0", port: int = SERVE_PORT
) -> dict[str, Any]:
    """A one-application Serve config for a config built in code."""
    return {
        "http_options": {"host": host, "port": port},
        "applications": [{"name": app_name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": _args(config)}],
    }


def normalized(loaded: LoadedConfig) -> dict[str, Any]:
    """The file as loaded, with our applications' args validated and spelled out."""
    document = copy.deepcopy(loaded.serve_config)
    for app in document["applications"]:
        if app.get("import_path") == IMPORT_PATH:
            app["args"] = _args(loaded.apps[app.get("name", "default")])
    return document


def kuberay(loaded: LoadedConfig, *, name: str, image: str, gpus_per_node: int | None = None) -> dict[str, Any]:
    """A RayService: a CPU-only head (ingress, controller, no model replicas) and GPU worker groups
    sized from the models' replica bounds, scaled by KubeRay's in-tree autoscaler."""
    models = [model for config in loaded.apps.values() for model in config.models]
    per_node = gpus_per_node or max(1, *(m.engine.tensor_parallel_size for m in models))
    # Ray's and Serve's settings, as `make serve` runs it.
    env = [{"name": name, "value": value} for name, value in NODE_ENV.items()] + [
        {"name": key.env, "valueFrom": {"secretKeyRef": {"name": f"{name}-api-keys", "key": key.env}}}
        for config in loaded.apps.values()
        for key in config.auth.keys
        if key.env
    ]
    serve_document = normalized(loaded)
    # A pod is reached on its own address: the proxy listens on every interface, whatever the
    # file says (or leaves to Serve), and the head pod exposes the port it listens on.
    http = serve_document.setdefault("http_options", {})
    http["host"] = "0.0.0.0"
    port = http.get("port", SERVE_PORT)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": to_yaml(serve_document),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"},
                    "template": _pod("ray-head", image, env, {"cpu": "8", "memory": "32Gi"}, serve_port=port),
                },
                "workerGroupSpecs": _worker_groups(models, per_node, image, env),
            },
        },
    }


def _worker_groups(models: list[ModelConfig], per_node: int, image: str, env: list[dict]) -> list[dict[str, Any]]:
    """One group for the models that ask for no custom resources, and one for each set of custom
    resources that pinned models ask for (`deployment.resources`), whose nodes declare them: no
    node declares a resource unless told to, so a pinned model would otherwise never be placed.
    Each group is sized from its own models' GPUs."""
    pinned: dict[tuple[str, ...], list[ModelConfig]] = {}
    for model in models:
        pinned.setdefault(tuple(sorted(model.deployment.resources)), []).append(model)
    unpinned = pinned.pop((), [])
    groups = [("gpu", unpinned, {})] if unpinned or not pinned else []
    for names, members in sorted(pinned.items()):
        declared = {
            resource: math.ceil(max(m.deployment.resources.get(resource, 0) * _per_node(m, per_node) for m in members))
            for resource in names
        }
        groups.append(("gpu-" + re.sub(r"[^a-z0-9]+", "-", "-".join(names).lower()).strip("-"), members, declared))
    return [_worker_group(group, members, declared, per_node, image, env) for group, members, declared in groups]


def _worker_group(
    group: str, models: list[ModelConfig], declared: dict[str, int], per_node: int, image: str, env: list[dict]
) -> dict[str, Any]:
    min_gpus = sum(_gpus(m) * _replica_range(m)[0] for m in models)
    max_gpus = sum(_gpus(m) * _replica_range(m)[1] for m in models)
    start: dict[str, str] = {"metrics-export-port": "8080"}
    if declared:
        # KubeRay's spelling of `ray start --resources`: the JSON object as a quoted string.
        start["resources"] = '"' + json.dumps(declared).replace('"', '\\"') + '"'
    return {
        "groupName": group,
        "replicas": math.ceil(min_gpus / per_node),
        "minReplicas": math.ceil(min_gpus / per_node),
        "maxReplicas": max(1, math.ceil(max_gpus / per_node)),
        "rayStartParams": start,
        "template": _pod(
            "ray-worker",
            image,
            env,
            {"cpu": str(8 * per_node), "memory": f"{64 * per_node}Gi", "nvidia.com/gpu": str(per_node)},
        ),
    }


def _per_node(model: ModelConfig, gpus_per_node: int) -> int:
    """How many of a model's replicas one node of `gpus_per_node` GPUs holds."""
    gpus = _gpus(model)
    return max(1, int(gpus_per_node // gpus)) if gpus else 1


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded Serve config stays readable) and no
    anchors or aliases, which Kubernetes tooling handles poorly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False)


def _args(config: ClusterConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_defaults=True)


def _gpus(model: ModelConfig) -> float:
    world = model.engine.world_size
    return world if world > 1 else model.deployment.num_gpus


def _replica_range(model: ModelConfig) -> tuple[int, int]:
    scaling = model.deployment.autoscaling
    if scaling is not None:
        return scaling.min_replicas, scaling.max_replicas
    count = model.deployment.num_replicas or 1
    return count, count


def _pod(
    name: str, image: str, env: list[dict], resources: dict[str, str], serve_port: int | None = None
) -> dict[str, Any]:
    """`serve_port` for the head: the ports KubeRay's services route to."""
    ports = [{"containerPort": 8080, "name": "metrics"}]
    if serve_port is not None:
        ports += [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": serve_port, "name": "serve"},
        ]
    return {
        "spec": {
            "containers": [
                {
                    "name": name,
                    "image": image,
                    "env": env,
                    "ports": ports,
                    "resources": {"limits": resources, "requests": resources},
                }
            ]
        }
    }
