"""What the runner routes tell callers, without Ray: `/health` and `/v1/models` give fixed words
for a model's state and never Serve's own message, which is logged once instead; `/hardware/info`
never gives a node's address; `/hardware/stats` numbers the GPU nodes' devices across the
cluster."""

import logging
from types import SimpleNamespace

import pytest
from ray.serve.schema import DeploymentStatusOverview

from serve_app.apis.gpu_stats import cluster_gpu_stats, device_stats
from serve_app.apis.runner import FailureLog, describe, livepeer_health
from serve_app.models.state import ModelState, state_of
from tests.captured_logs import serve_records

# What Serve builds from a replica's exception: a traceback, a pid, a node's address, a path.
SERVE_MESSAGE = (
    "The deployment failed to start 3 times in a row. Error: ray::ServeReplica:llm:model-m.initialize_and_get_metadata"
    "() (pid=4242, ip=10.0.3.17, actor_id=ab12) Traceback (most recent call last):\n"
    '  File "/home/ray/app/serve_app/models/sources.py", line 40, in resolve\n'
    "FileNotFoundError: weights missing at /models/secret-path"
)
INTERNALS = ("pid=", "10.0.3.17", "Traceback", "/home/ray", "/models/secret-path")


def _deployment(status: str, trigger: str, running: int = 0, message: str = SERVE_MESSAGE):
    return DeploymentStatusOverview(
        status=status, status_trigger=trigger, replica_states={"RUNNING": running} if running else {}, message=message
    )


@pytest.mark.parametrize(
    "status, trigger, state, reason",
    [
        (
            "DEPLOY_FAILED",
            "REPLICA_STARTUP_FAILED",
            "failed",
            "the model's replicas failed to start; see the server logs",
        ),
        (
            "UNHEALTHY",
            "HEALTH_CHECK_FAILED",
            "failed",
            "the model's replicas are failing their health checks; see the server logs",
        ),
        ("UNHEALTHY", "INTERNAL_ERROR", "failed", "the model's deployment failed; see the server logs"),
        ("UPDATING", "CONFIG_UPDATE_STARTED", "starting", "the model's replicas are starting"),
        ("HEALTHY", "DOWNSCALE_COMPLETED", "scaled_to_zero", "the model is scaled to zero: a request starts a replica"),
    ],
)
def test_a_state_has_fixed_words_and_keeps_serves_message_for_the_log(status, trigger, state, reason):
    model = state_of(_deployment(status, trigger))
    assert (model.state, model.replicas, model.reason, model.detail) == (state, 0, reason, SERVE_MESSAGE)


def test_a_model_no_node_can_take_yet_is_starting_for_want_of_resources():
    message = (
        "Deployment 'model-m' in application 'llm' has 1 replicas that have taken more than 30s to be scheduled. "
        'Resources required for each replica: {"GPU": 1.0}, total resources available: {"CPU": 8.0}.'
    )
    model = state_of(_deployment("UPDATING", "CONFIG_UPDATE_STARTED", message=message))
    assert (model.state, model.reason, model.detail) == (
        "starting",
        "the model's replicas are waiting for the resources they need to be scheduled",
        message,
    )


def test_a_model_with_a_running_replica_is_ready_whatever_else_serve_says():
    model = state_of(_deployment("UNHEALTHY", "HEALTH_CHECK_FAILED", running=1))
    assert (model.state, model.replicas, model.reason) == ("ready", 1, "")


def test_health_of_a_failed_default_model_gives_the_reason_and_no_internals():
    failed = state_of(_deployment("DEPLOY_FAILED", "REPLICA_STARTUP_FAILED"))
    states = {"m": failed, "n": ModelState("ready", 1, "", "")}
    body = livepeer_health("m", states)
    assert body == {
        "status": "ERROR",
        "reason": "the model's replicas failed to start; see the server logs",
        "models": {"m": "failed", "n": "ready"},
    }
    assert not any(internal in str(body) for internal in INTERNALS)


def test_serves_account_of_a_failure_is_logged_once_per_new_account():
    failed = {"m": ModelState("failed", 0, "r", SERVE_MESSAGE)}
    with serve_records() as log:
        failure_log = FailureLog()
        for _ in range(3):  # an orchestrator polling
            failure_log.note(failed)
        failure_log.note({"m": ModelState("ready", 1, "", "")})
        failure_log.note(failed)  # failing again, after a recovery
        failure_log.note({"m": ModelState("failed", 0, "r", "another account")})
    warnings = [record.getMessage() for record in log.at(logging.WARNING)]
    assert warnings == [f"model m failed; Serve's account: {SERVE_MESSAGE}"] * 2 + [
        "model m failed; Serve's account: another account"
    ]


def test_hardware_info_names_nodes_by_id_never_by_address():
    nodes = [
        {
            "NodeID": "b" * 56,
            "Alive": True,
            "NodeManagerAddress": "10.0.3.18",
            "Resources": {"CPU": 8.0, "GPU": 2.0, "accelerator_type:A100": 1.0},
        },
        {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.3.17", "Resources": {"CPU": 4.0}},
        {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.3.19", "Resources": {"GPU": 8.0}},
    ]
    info = describe(nodes)
    assert info == {
        "gpu_info": {
            0: {"id": "b" * 56 + "/0", "name": "A100", "node_id": "b" * 56},
            1: {"id": "b" * 56 + "/1", "name": "A100", "node_id": "b" * 56},
        },
        "nodes": [
            {"node_id": "a" * 56, "cpus": 4.0, "gpus": 0, "accelerator_type": None},
            {"node_id": "b" * 56, "cpus": 8.0, "gpus": 2, "accelerator_type": "A100"},
        ],
    }
    assert "10.0.3." not in str(info)


class _NVML:
    """NVML's answers for two devices, as `nvidia-ml-py` gives them (names as bytes on older
    drivers' bindings, str on newer)."""

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return [b"NVIDIA A100-SXM4-80GB", "NVIDIA L4"][handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 2**30 + handle, free=2**30 + handle, used=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=97 - handle, memory=41 + handle)


async def test_hardware_stats_number_each_gpu_nodes_devices_across_the_cluster():
    nodes = [
        {"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 4.0}},  # no GPU: not asked
        {"NodeID": "d" * 56, "Alive": True, "Resources": {"GPU": 2.0}},  # its reading fails
        {"NodeID": "c" * 56, "Alive": False, "Resources": {"GPU": 8.0}},
    ]
    asked = []

    async def read(node_id: str) -> list[dict]:
        asked.append(node_id)
        return [] if node_id == "d" * 56 else [device_stats(_NVML(), 0), device_stats(_NVML(), 1)]

    stats = await cluster_gpu_stats(nodes, read)
    assert asked == ["b" * 56, "d" * 56]
    assert stats == {
        0: {
            "id": "b" * 56 + "/0",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_total": 80 * 2**30,
            "memory_free": 2**30,
            "utilization_compute": 97,
            "utilization_memory": 41,
            "node_id": "b" * 56,
        },
        1: {
            "id": "b" * 56 + "/1",
            "name": "NVIDIA L4",
            "memory_total": 80 * 2**30 + 1,
            "memory_free": 2**30 + 1,
            "utilization_compute": 96,
            "utilization_memory": 42,
            "node_id": "b" * 56,
        },
    }
    assert await cluster_gpu_stats([nodes[1]], read) == {}
