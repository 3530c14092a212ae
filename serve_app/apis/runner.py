"""The routes a Livepeer orchestrator polls on a runner it registers: `/health`, `/hardware/info`,
`/hardware/stats` and `/version` (docs/livepeer-contract.md).

For `/hardware/info`, Ray knows each node's GPU count and accelerator type (the
`accelerator_type:<name>` resource it detects); it does not know device memory, so the route
reports what Ray can vouch for. It names nodes by Ray's node id, never by address: the contract
asks for GPUs, any valid key may call the route, and an operator has `ray list nodes` for the rest.
"""

import asyncio
import logging
from importlib.metadata import version
from typing import Any

import ray

from serve_app.apis.gpu_stats import cluster_gpu_stats
from serve_app.models.state import ModelState, model_states

logger = logging.getLogger("ray.serve")

ACCELERATOR_PREFIX = "accelerator_type:"
LIVEPEER_STATUS = {"ready": "OK", "starting": "LOADING", "scaled_to_zero": "IDLE", "failed": "ERROR"}
VERSION = version("livepeer-llm-serve")


class RunnerInfo:
    """Each answer speaks for the default model, as a single-model runner's would."""

    def __init__(self, default_model: str, model_ids: list[str]) -> None:
        self._default_model = default_model
        self._model_ids = model_ids
        self._failures = FailureLog()

    async def health(self) -> dict[str, Any]:
        states = await model_states(self._model_ids)
        self._failures.note(states)
        return livepeer_health(self._default_model, states)

    async def hardware(self) -> dict[str, Any]:
        return await hardware_info(self._default_model)

    async def hardware_stats(self) -> dict[str, Any]:
        nodes = await asyncio.to_thread(ray.nodes)
        return {"pipeline": "llm", "model_id": self._default_model, "gpu_stats": await cluster_gpu_stats(nodes)}

    async def version(self) -> dict[str, str]:
        return {"pipeline": "llm", "model_id": self._default_model, "version": VERSION}


class FailureLog:
    """Serve's account of a model's failure, which `/health` keeps from its callers, goes to the
    ingress's log instead: once per new account, since an orchestrator polls every few seconds."""

    def __init__(self) -> None:
        self._logged: dict[str, str] = {}

    def note(self, states: dict[str, ModelState]) -> None:
        for model_id, state in states.items():
            detail = state.detail if state.state == "failed" else ""
            if detail and self._logged.get(model_id) != detail:
                logger.warning("model %s failed; Serve's account: %s", model_id, detail)
            self._logged[model_id] = detail


def livepeer_health(default_model: str, states: dict[str, ModelState]) -> dict[str, Any]:
    """`status` speaks for the default model; `models` tells the rest. A failure's `reason` is a
    fixed phrase for its kind (`models.state`)."""
    default = states[default_model]
    body: dict = {"status": LIVEPEER_STATUS[default.state]}
    if default.state == "failed":
        body["reason"] = default.reason
    body["models"] = {model_id: s.state for model_id, s in states.items()}
    return body


async def hardware_info(model_id: str) -> dict[str, Any]:
    nodes = await asyncio.to_thread(ray.nodes)
    return {"pipeline": "llm", "model_id": model_id, **describe(nodes)}


def describe(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """`gpu_info` numbers GPUs across the cluster, as a runner numbers its local devices."""
    described = []
    gpu_info: dict[int, dict[str, Any]] = {}
    for node in sorted(nodes, key=lambda n: n["NodeID"]):
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        kinds = [name.removeprefix(ACCELERATOR_PREFIX) for name in resources if name.startswith(ACCELERATOR_PREFIX)]
        accelerator = kinds[0] if kinds else None
        gpus = int(resources.get("GPU", 0))
        described.append(
            {"node_id": node["NodeID"], "cpus": resources.get("CPU", 0), "gpus": gpus, "accelerator_type": accelerator}
        )
        for index in range(gpus):
            gpu_info[len(gpu_info)] = {
                "id": f"{node['NodeID']}/{index}",
                "name": accelerator or "GPU",
                "node_id": node["NodeID"],
            }
    return {"gpu_info": gpu_info, "nodes": described}
