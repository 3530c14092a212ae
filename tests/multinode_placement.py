"""Run by test_e2e_placement.py in its own process: a three-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a CPU head and two workers declaring 2 GPUs each, which need not
exist), our application on the test engine, and a JSON report of where Serve placed each model.
Its own process because a driver belongs to one Ray cluster, and the test session has its own.

Then, on the same cluster (a second one would cost the suite its start again), a worker node is
lost while it holds a replica of a two-replica model with requests in flight on it, and returns:
a second report says how each request ended, which replicas answered meanwhile, and how long the
failure and the recovery took. Placement is reported first, so that a failure here leaves it
standing."""

import asyncio
import json
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.api import _run as deploy_without_waiting
from ray.util.state import list_actors

import tests.fake_engine
from cluster.schema import ClusterConfig, deployment_name
from serve_app.app import build_graph
from tests.processes import free_port

SPREAD = "two-nodes"
MODELS = {
    "tp2": {"engine": {"tensor_parallel_size": 2}, "deployment": {"num_gpus": 1, "num_cpus": 0.1}},
    "one-gpu": {"deployment": {"num_gpus": 1, "num_cpus": 0.1, "accelerator_type": "A100"}},
    "too-big": {"engine": {"tensor_parallel_size": 4}, "deployment": {"num_gpus": 1, "num_cpus": 0.1}},
    # Only the workers have an L4, and each has room for one such replica (2 CPUs, the others
    # asking for 0.1): its two replicas are on the two workers, and a lost one can only come back
    # on a node that brings the resources back.
    SPREAD: {"deployment": {"num_replicas": 2, "num_cpus": 1.5, "accelerator_type": "L4"}},
}
WORKER = {"num_cpus": 2, "num_gpus": 2, "resources": {"accelerator_type:A100": 1, "accelerator_type:L4": 1}}
FAILURE_TIMEOUT_S = 60
"""How long a request in flight on the lost node may take to end: past it, it hangs."""


def main() -> None:
    # The dashboard, which Ray's state API goes through, on a port of its own: where another
    # cluster on this machine holds Ray's default one, Ray starts none and says so only in its log.
    head = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(**WORKER) for _ in range(2)]
    ray.init(address=cluster.address)
    port = free_port()
    # One proxy, on the head: each node's proxy would listen on this port of this one machine, and a
    # request taken by the lost node's proxy would test the proxy, not the replica.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    scratch = Path(tempfile.mkdtemp(prefix="node-loss-"))
    config = ClusterConfig.model_validate(
        {
            "usage": {"database": f"sqlite:///{scratch}/usage.sqlite", "spill_directory": str(scratch / "spill")},
            "models": [
                {"id": model_id, "source": {"path": "/models/fake"}} | spec for model_id, spec in MODELS.items()
            ],
        }
    )
    deploy_without_waiting(
        build_graph(config, tests.fake_engine.fake_engine), name="llm", route_prefix="/", _blocking=False
    )

    # Until the ones that fit run and Serve has given up waiting quietly on the one that does not;
    # on a loaded machine this cluster starts slowly.
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        app = serve.status().applications.get("llm")
        deployments = app.deployments if app else {}
        if len(deployments) >= len(MODELS) + 1:
            running = {m: _running(m) for m in MODELS}
            if (
                running["tp2"]
                and running["one-gpu"]
                and running[SPREAD] == 2
                and "scheduled" in deployments[deployment_name("too-big")].message
            ):
                break
        time.sleep(0.5)
    status = serve.status().applications["llm"].deployments
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]
    hardware_stats = httpx.get(f"http://127.0.0.1:{port}/hardware/stats", timeout=30).json()
    groups = [
        {
            "bundles": [dict(b) for b in table["bundles"].values()],
            "nodes": sorted(set(table["bundles_to_node_id"].values())),
            "strategy": table["strategy"],
            "state": table["state"],
        }
        for table in ray.util.placement_group_table().values()
    ]
    report = {
        "gpu_nodes": [w.node_id for w in workers],
        "placement_groups": groups,
        "replica_nodes": {
            actor.name: actor.node_id
            for actor in _live_actors()
            if actor.name and actor.name.startswith("SERVE_REPLICA::llm#model-")
        },
        "models": {m["id"]: m for m in models},
        "hardware_stats": hardware_stats,
        "gpu_nodes_read": _gpu_nodes_read(len(workers)),
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
    print("NODE_LOSS " + json.dumps(asyncio.run(node_loss(cluster, workers, port, scratch))), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)


def _gpu_nodes_read(expected: int) -> list[str]:
    """The nodes `/hardware/stats` sent its NVML task to, by the ingress's log: these simulated GPUs
    have no NVML to read, so each node's task fails and the ingress names the node it asked."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"

    def asked() -> list[str]:
        text = "\n".join(path.read_text() for path in logs.glob("replica_llm_ingress_*.log"))
        return sorted(set(re.findall(r"could not read the GPUs of node (\w+)", text)))

    deadline = time.monotonic() + 30
    while len(asked()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return asked()


def _running(model_id: str) -> int:
    app = serve.status().applications.get("llm")
    deployment = app.deployments.get(deployment_name(model_id)) if app else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def _live_actors() -> list:
    return list_actors(filters=[("state", "=", "ALIVE")])


def _replicas(deployment: str) -> dict[str, str]:
    """A deployment's live replicas, by replica id, and the node each is on."""
    prefix = f"SERVE_REPLICA::llm#{deployment}#"
    return {
        actor.name.rsplit("#", 1)[1]: actor.node_id
        for actor in _live_actors()
        if actor.name and actor.name.startswith(prefix)
    }


@dataclass
class Held:
    """A request held by the test engine (its prompt's "HOLD" or "WAIT") until `hold` is removed."""

    kind: str
    request_id: str
    hold: Path
    node: str = ""
    status: int = 0
    body: str = ""
    ended_at: float = 0.0
    error: str = ""
    task: "asyncio.Task[None] | None" = field(default=None, repr=False)

    def outcome(self, since: float) -> dict:
        return {
            "kind": self.kind,
            "request_id": self.request_id,
            "node": self.node,
            "status": self.status,
            "body": self.body,
            "error": self.error,
            "seconds": round(self.ended_at - since, 2) if self.ended_at else None,
        }


KINDS = {
    "llm_stream": ("/llm", True, "HOLD"),
    "v1_stream": ("/v1/chat/completions", True, "HOLD"),
    "llm_whole": ("/llm", False, "WAIT"),
}


async def _send(client: httpx.AsyncClient, held: Held) -> None:
    path, stream, verb = KINDS[held.kind]
    body = {
        "model": SPREAD,
        "messages": [{"role": "user", "content": f"{verb} {held.hold} one two three four"}],
        "stream": stream,
    }
    try:
        async with client.stream("POST", path, json=body, headers={"x-request-id": held.request_id}) as response:
            held.status = response.status_code
            async for text in response.aiter_text():
                held.body += text
    except httpx.HTTPError as error:  # a cut connection, or no answer within the client's timeout
        held.error = repr(error)
    held.ended_at = time.monotonic()


async def _arrival(held: Held) -> str:
    """The node the request is held on, once it is held there."""
    waiting = held.hold.with_name(held.hold.name + ".waiting")
    deadline = time.monotonic() + 30
    while not waiting.exists() or not (node := waiting.read_text()):
        if (held.task is not None and held.task.done()) or time.monotonic() > deadline:
            return ""
        await asyncio.sleep(0.05)
    return node


async def _hold_on(client: httpx.AsyncClient, kind: str, target: str, scratch: Path, others: list[Held]) -> Held:
    """A request of this kind held on the target node. Serve sends each to the less loaded of the
    two replicas, so one held on the other node sends the next to the target; those stay held
    there too (in `others`), and must end well once released."""
    for attempt in range(6):
        held = Held(kind, f"node-loss-{kind}-{attempt}", scratch / f"{kind}-{attempt}")
        held.hold.touch()
        held.task = asyncio.create_task(_send(client, held))
        held.node = await _arrival(held)
        if held.node == target:
            return held
        others.append(held)
    raise AssertionError(f"no {kind} request reached the node to remove: {[h.outcome(0) for h in others]}")


async def _answers(client: httpx.AsyncClient, count: int) -> list[dict]:
    """Whole `/v1` answers (the test engine names its replica in `system_fingerprint`) and `/llm`
    streams, alternately."""
    answers = []
    for index in range(count):
        body = {"model": SPREAD, "messages": [{"role": "user", "content": "are you there"}]}
        if index % 2:
            response = await client.post("/llm", json=body | {"stream": True})
            answers.append({"status": response.status_code, "replica": None, "done": "[DONE]" in response.text})
        else:
            response = await client.post("/v1/chat/completions", json=body)
            replica = response.json().get("system_fingerprint") if response.status_code == 200 else None
            answers.append({"status": response.status_code, "replica": replica, "done": True})
    return answers


async def _until(condition: Callable[[], object], timeout_s: float) -> bool:
    """Whether the condition (a blocking look at the cluster, run off the loop) came true in time;
    the report says so, where `tests.polling.until` would fail the run."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


def _ledger_rows(database: Path, request_ids: list[str]) -> dict[str, dict]:
    if not database.exists():
        return {}
    marks = ",".join("?" * len(request_ids))
    with sqlite3.connect(database) as db:
        query = f"select request_id, status, finish_reason from usage where request_id in ({marks})"
        rows = db.execute(query, request_ids).fetchall()
    return {request_id: {"status": status, "finish_reason": finish} for request_id, status, finish in rows}


async def node_loss(cluster: Cluster, workers: list, port: int, scratch: Path) -> dict:
    began = time.monotonic()
    before = _replicas(deployment_name(SPREAD))
    ingress_nodes = set(_replicas("ingress").values())
    # The ingress's node must stay: its loss is not this scenario's.
    target = next(w for w in workers if w.node_id in before.values() and w.node_id not in ingress_nodes)
    [survivor] = [replica for replica, node in before.items() if node != target.node_id]
    timeout = httpx.Timeout(FAILURE_TIMEOUT_S, connect=10)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
        others: list[Held] = []
        held = [await _hold_on(client, kind, target.node_id, scratch, others) for kind in KINDS]
        removed_at = time.monotonic()
        # As a node is lost, not drained: its processes killed, with nothing told beforehand.
        await asyncio.to_thread(cluster.remove_node, target, allow_graceful=False)
        await asyncio.wait([h.task for h in held], timeout=FAILURE_TIMEOUT_S)
        after_removal = await _answers(client, 6)
        for other in others:
            other.hold.unlink()
        await asyncio.wait([h.task for h in others], timeout=FAILURE_TIMEOUT_S)

        returned_at = time.monotonic()
        new = cluster.add_node(**WORKER)  # in the main thread, where Ray sets its signal handlers
        back = await _until(
            lambda: _running(SPREAD) == 2 and new.node_id in _replicas(deployment_name(SPREAD)).values(),
            180,
        )
        two_replicas_s = time.monotonic() - returned_at
        after_return = await _answers(client, 6)
    request_ids = [h.request_id for h in held]
    database = scratch / "usage.sqlite"
    await _until(lambda: len(_ledger_rows(database, request_ids)) == len(request_ids), 15)
    return {
        "target_node": target.node_id,
        "survivor_replica": survivor,
        "replicas_before": before,
        "in_flight": {h.kind: h.outcome(removed_at) for h in held},
        "removal_to_failures_s": max((h.ended_at or float("inf")) - removed_at for h in held),
        "others_in_flight": [h.outcome(removed_at) for h in others],
        "after_removal": after_removal,
        "new_node": new.node_id,
        "back_to_two": back,
        "return_to_two_replicas_s": round(two_replicas_s, 2),
        "replicas_after": _replicas(deployment_name(SPREAD)),
        "after_return": after_return,
        "ledger": _ledger_rows(database, request_ids),
        "scenario_s": round(time.monotonic() - began, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
