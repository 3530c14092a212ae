"""The cluster's accelerators per node, from Ray's view, for the Livepeer `/hardware/info` route.

Ray knows each node's GPU count and accelerator type (the `accelerator_type:<name>` resource it
detects); it does not know device memory, so the route reports what Ray can vouch for.
"""

import asyncio
from typing import Any

import ray

ACCELERATOR_PREFIX = "accelerator_type:"


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
        described.append({
            "node_id": node["NodeID"], "address": node["NodeManagerAddress"],
            "cpus": resources.get("CPU", 0), "gpus": gpus, "accelerator_type": accelerator,
        })
        for index in range(gpus):
            gpu_info[len(gpu_info)] = {
                "id": f"{node['NodeManagerAddress']}/{index}", "name": accelerator or "GPU",
                "node_id": node["NodeID"],
            }
    return {"gpu_info": gpu_info, "nodes": described}
