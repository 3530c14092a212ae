"""Placement on a multi-node cluster with declared GPUs, through Serve and the test engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "tests.multinode_placement"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_tensor_parallel_replica_gets_two_gpu_bundles_on_one_gpu_node(report):
    [group] = [g for g in report["placement_groups"] if sum(b.get("GPU", 0) for b in g["bundles"]) == 2]
    assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
    assert [b.get("GPU", 0) for b in group["bundles"]] == [0, 1, 1]
    assert len(group["nodes"]) == 1 and group["nodes"][0] in report["gpu_nodes"]
    assert report["states"]["tp2"]["running"] == 1


def test_single_gpu_model_lands_on_a_gpu_node(report):
    [(_name, node)] = [(n, node) for n, node in report["replica_nodes"].items() if "model-one-gpu" in n]
    assert node in report["gpu_nodes"]


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
