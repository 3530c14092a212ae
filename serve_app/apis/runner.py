"""The routes a Livepeer orchestrator polls on a runner it registers: `/health`, `/hardware/info`
and `/version` (docs/livepeer-contract.md).

For `/hardware/info`, Ray knows each node's GPU count and accelerator type (the
`accelerator_type:<name>` resource it detects); it does not know device memory, so the route
reports what Ray can vouch for.
"""

import asyncio
from importlib.metadata import version
from typing import Any

import ray

from serve_app.models.state import ModelState, model_states

ACCELERATOR_PREFIX = "accelerator_type:"
LIVEPEER_STATUS = {"ready": "OK", "starting": "LOADING", "scaled_to_zero": "IDLE", "failed": "ERROR"}
VERSION = version("livepeer-llm-serve")


class RunnerInfo:
    """Each answer speaks for the default model, as a single-model runner's would."""

    def __init__(self, default_model: str, model_ids: list[str]) -> None:
        self._default_model = default_model
        self._model_ids = model_ids

    async def health(self) -> dict[str, Any]:
        return livepeer_health(self._default_model, await model_states(self._model_ids))

    async def hardware(self) -> dict[str, Any]:
        return await hardware_info(self._default_model)

    async def version(self) -> dict[str, str]:
        return {"pipeline": "llm", "model_id": self._default_model, "version": VERSION}


def livepeer_health(default_model: str, states: dict[str, ModelState]) -> dict[str, Any]:
    """`status` speaks for the default model; `models` tells the rest. Serve's own account of a
    failure is the `reason`."""
    default = states[default_model]
    body: dict = {"status": LIVEPEER_STATUS[default.state]}
    if default.state == "failed" and default.message:
        body["reason"] = default.message
    body["models"] = {model_id: s.state for model_id, s in states.items()}
    return body


async def hardware_info(model_id: str) -> dict[str, Any]:
    nodes = await asyncio.to_thread(ray.nodes)
    return {"pipeline": "llm", "model_id": model_id, **describe(nodes)}


def describe(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """`gpu_info` numbers GPUs across the cluster, as a runner numbers its local devices."""
    described = []
    gpu_info: dict[int, dict[str, Any]] = {}
    for node in sorted(nodes, key=lambda n: n["NodeManagerAddress"]):
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        kinds = [name.removeprefix(ACCELERATOR_PREFIX) for name in resources if name.startswith(ACCELERATOR_PREFIX)]
        accelerator = kinds[0] if kinds else None
        gpus = int(resources.get("GPU", 0))
        described.append(
            {
                "node_id": node["NodeID"],
                "address": node["NodeManagerAddress"],
                "cpus": resources.get("CPU", 0),
                "gpus": gpus,
                "accelerator_type": accelerator,
            }
        )
        for index in range(gpus):
            gpu_info[len(gpu_info)] = {
                "id": f"{node['NodeManagerAddress']}/{index}",
                "name": accelerator or "GPU",
                "node_id": node["NodeID"],
            }
    return {"gpu_info": gpu_info, "nodes": described}
