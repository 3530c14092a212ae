"""Run by test_e2e_placement.py in its own process: a three-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a CPU head and two workers declaring 2 GPUs each, which need not
exist), our application on the test engine, and a JSON report of where Serve placed each model.
Its own process because a driver belongs to one Ray cluster, and the test session has its own."""

import json
import socket
import sys
import time

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.api import _run as deploy_without_waiting
from ray.util.state import list_actors

import tests.fake_engine
from cluster.schema import ClusterConfig, deployment_name
from serve_app.app import build_graph

MODELS = {
    "tp2": {"engine": {"tensor_parallel_size": 2}, "deployment": {"num_gpus": 1, "num_cpus": 0.1}},
    "one-gpu": {"deployment": {"num_gpus": 1, "num_cpus": 0.1, "accelerator_type": "A100"}},
    "too-big": {"engine": {"tensor_parallel_size": 4}, "deployment": {"num_gpus": 1, "num_cpus": 0.1}},
}


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:A100": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "models": [
                {"id": model_id, "source": {"path": "/models/fake"}} | spec for model_id, spec in MODELS.items()
            ],
        }
    )
    deploy_without_waiting(
        build_graph(config, tests.fake_engine.fake_engine), name="llm", route_prefix="/", _blocking=False
    )

    # Until the two that fit run and Serve has given up waiting quietly on the one that does not.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        app = serve.status().applications.get("llm")
        deployments = app.deployments if app else {}
        if len(deployments) == len(MODELS) + 1:
            running = {m: deployments[deployment_name(m)].replica_states.get("RUNNING", 0) for m in MODELS}
            if running["tp2"] and running["one-gpu"] and "scheduled" in deployments[deployment_name("too-big")].message:
                break
        time.sleep(0.5)
    status = serve.status().applications["llm"].deployments
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]
    groups = [
        {
            "bundles": [dict(b) for b in table["bundles"].values()],
            "nodes": sorted(set(table["bundles_to_node_id"].values())),
            "strategy": table["strategy"],
            "state": table["state"],
        }
        for table in ray.util.placement_group_table().values()
    ]
    replicas = {
        actor.name: actor.node_id
        for actor in list_actors(filters=[("state", "=", "ALIVE")])
        if actor.name and actor.name.startswith("SERVE_REPLICA::llm#model-")
    }
    report = {
        "gpu_nodes": [w.node_id for w in workers],
        "placement_groups": groups,
        "replica_nodes": replicas,
        "models": {m["id"]: m for m in models},
        "states": {
            m: {
                "status": str(status[deployment_name(m)].status.value),
                "running": status[deployment_name(m)].replica_states.get("RUNNING", 0),
                "message": status[deployment_name(m)].message,
            }
            for m in MODELS
        },
    }
    print("REPORT " + json.dumps(report), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
