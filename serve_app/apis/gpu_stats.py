"""Each GPU node's devices as NVIDIA's management library (NVML, the `nvidia-ml-py` package of
the `gpu` extra) reads them, for the Livepeer runner's `GET /hardware/stats`: a task with no
resources of its own runs on each node that Ray counts GPUs on, since only there can NVML see
them; a CPU-only cluster has no such node and nothing to read."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger("ray.serve")

READ_TIMEOUT_S = 5.0
"""A node that does not answer in time (busy, or going away) is left out of the answer."""


@ray.remote(num_cpus=0)
def _node_devices() -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [device_stats(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def device_stats(nvml: Any, index: int) -> dict[str, Any]:
    """One device, in the runner's `GPUUtilizationInfo` terms: memory in bytes, utilization in
    percent over NVML's last sample period."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "memory_total": memory.total,
        "memory_free": memory.free,
        "utilization_compute": rates.gpu,
        "utilization_memory": rates.memory,
    }


async def cluster_gpu_stats(
    nodes: list[dict[str, Any]], read: "Callable[[str], Awaitable[list[dict[str, Any]]]] | None" = None
) -> dict[int, dict[str, Any]]:
    """Numbered across the cluster by node, as `/hardware/info` numbers them, each with its
    node's id; a node whose reading fails is logged and left out. `read` reads one node's
    devices (a task on that node, unless a test gives its own)."""
    read = read or _read
    gpu_nodes = sorted(
        node["NodeID"] for node in nodes if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0
    )
    readings = await asyncio.gather(*(read(node_id) for node_id in gpu_nodes))
    stats: dict[int, dict[str, Any]] = {}
    for node_id, devices in zip(gpu_nodes, readings, strict=True):
        for index, device in enumerate(devices):
            stats[len(stats)] = {"id": f"{node_id}/{index}", **device, "node_id": node_id}
    return stats


async def _read(node_id: str) -> list[dict[str, Any]]:
    task = _node_devices.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        return await asyncio.wait_for(task, READ_TIMEOUT_S)
    except Exception:
        logger.warning("could not read the GPUs of node %s", node_id, exc_info=True)
        ray.cancel(task, force=True)
        return []
