"""Placement on a multi-node cluster with declared GPUs, through Serve and the test engine; then,
on the same cluster, a worker node lost with requests in flight on its replica, and its return."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sse import json_chunks

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.multinode_placement"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def _report(run: subprocess.CompletedProcess, prefix: str) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.startswith(prefix)]
    assert lines, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix(prefix))


@pytest.fixture(scope="module")
def report(run) -> dict:
    return _report(run, "REPORT ")


@pytest.fixture(scope="module")
def node_loss(run) -> dict:
    return _report(run, "NODE_LOSS ")


def test_tensor_parallel_replica_gets_two_gpu_bundles_on_one_gpu_node(report):
    [group] = [g for g in report["placement_groups"] if sum(b.get("GPU", 0) for b in g["bundles"]) == 2]
    assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
    assert [b.get("GPU", 0) for b in group["bundles"]] == [0, 1, 1]
    assert len(group["nodes"]) == 1 and group["nodes"][0] in report["gpu_nodes"]
    assert report["states"]["tp2"]["running"] == 1


def test_single_gpu_model_lands_on_a_gpu_node(report):
    [(_name, node)] = [(n, node) for n, node in report["replica_nodes"].items() if "model-one-gpu" in n]
    assert node in report["gpu_nodes"]


def test_hardware_stats_asks_each_gpu_node_and_only_those(report):
    """The fan-out: an NVML task on each node Ray counts GPUs on (the head has none). Declared
    GPUs have no NVML behind them, so each node's reading fails, is logged naming the node, and
    is left out of a still valid answer."""
    assert report["gpu_nodes_read"] == sorted(report["gpu_nodes"])
    assert report["hardware_stats"] == {"pipeline": "llm", "model_id": "tp2", "gpu_stats": {}}


def test_a_model_that_fits_nowhere_is_reported(report):
    state = report["states"]["too-big"]
    assert state["running"] == 0
    assert state["status"] == "UPDATING"
    card = report["models"]["too-big"]
    assert card["state"] == "starting" and card["replicas"] == 0
    # Why, in fixed words: Serve's own message (the resources asked and the cluster's) is not shown.
    assert card["message"] == "the model's replicas are waiting for the resources they need to be scheduled"
    assert report["models"]["tp2"]["state"] == "ready" and "message" not in report["models"]["tp2"]
    groups = [g for g in report["placement_groups"] if sum(b.get("GPU", 0) for b in g["bundles"]) == 4]
    assert groups and all(g["state"] == "PENDING" for g in groups)


def _clean(text: str) -> None:
    """Nothing of the cluster's insides in what a client reads."""
    for internal in ("Traceback", "Actor", "ray.", "grpc", "Rpc", "Socket"):
        assert internal not in text, text


def test_requests_in_flight_on_a_lost_node_end_in_their_endpoints_shape(node_loss):
    print(f"\nnode lost: its requests in flight ended {node_loss['removal_to_failures_s']:.2f} s after its removal")
    flights = node_loss["in_flight"]
    assert {f["node"] for f in flights.values()} == {node_loss["target_node"]}
    assert node_loss["removal_to_failures_s"] < 30, flights  # well within the client's own timeout: no hang

    llm = flights["llm_stream"]
    assert llm["status"] == 200 and not llm["error"]
    *chunks, final = json_chunks(llm["body"])
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert final["choices"][0]["finish_reason"] == "error"
    assert f"request id {llm['request_id']}" in final["error"]["message"]
    _clean(llm["body"])

    v1 = flights["v1_stream"]
    assert v1["status"] == 200 and not v1["error"]
    *chunks, failure = json_chunks(v1["body"])
    assert chunks and all("error" not in c for c in chunks)
    assert failure["request_id"] == v1["request_id"] and failure["error"]["code"] >= 500
    assert set(failure["error"]) == {"message", "type", "param", "code"}
    _clean(v1["body"])

    whole = flights["llm_whole"]
    assert 500 <= whole["status"] < 600 and not whole["error"]
    body = json.loads(whole["body"])
    assert body["detail"]["request_id"] == whole["request_id"] and whole["request_id"] in body["detail"]["msg"]
    _clean(whole["body"])

    # Recorded as failed, each one, the whole answer's too.
    ledger = node_loss["ledger"]
    assert {f["request_id"]: ledger.get(f["request_id"], {}).get("status") for f in flights.values()} == {
        f["request_id"]: f["status"] if f["kind"] == "llm_whole" else 500 for f in flights.values()
    }


def test_the_remaining_replica_serves_while_the_node_is_lost(node_loss):
    # Those held on the other replica when the node went finished whole.
    for other in node_loss["others_in_flight"]:
        assert other["status"] == 200 and other["node"] != node_loss["target_node"], other
        assert other["body"].endswith("data: [DONE]\n\n") if "stream" in other["kind"] else json.loads(other["body"])
    answers = node_loss["after_removal"]
    assert all(a["status"] == 200 and a["done"] for a in answers), answers
    assert {a["replica"] for a in answers if a["replica"]} == {node_loss["survivor_replica"]}


def test_the_lost_replica_is_rescheduled_on_the_returning_node(node_loss):
    print(
        f"\nnode returned: the model had two replicas again {node_loss['return_to_two_replicas_s']:.1f} s later "
        f"(the scenario took {node_loss['scenario_s']:.0f} s)"
    )
    assert node_loss["back_to_two"]
    replicas = node_loss["replicas_after"]
    assert len(replicas) == 2 and node_loss["survivor_replica"] in replicas
    assert sorted(replicas.values()) == sorted(
        [node_loss["new_node"], node_loss["replicas_before"][node_loss["survivor_replica"]]]
    )
    assert all(a["status"] == 200 and a["done"] for a in node_loss["after_return"]), node_loss["after_return"]
