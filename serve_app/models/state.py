"""Each model's state, read from Serve's view of its deployment: for the Livepeer `/health`
route (about the default model) and for `/v1/models` (about every model).

Callers get a fixed reason per state, never Serve's own message: Serve builds that from the
replica's exception (a traceback, process ids, node addresses, file paths), and `/health` is
open to all. Serve's message is kept as `detail` for the server's log.
"""

import asyncio
from dataclasses import dataclass

from ray import serve
from ray.serve.schema import DeploymentStatusOverview

from cluster.schema import deployment_name

FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}
FAILURE_REASONS = {
    "REPLICA_STARTUP_FAILED": "the model's replicas failed to start; see the server logs",
    "HEALTH_CHECK_FAILED": "the model's replicas are failing their health checks; see the server logs",
}
UNSCHEDULED = "to be scheduled"
"""In Serve's message for replicas that no node has the resources for yet (the only sign of it;
`tests/test_e2e_placement.py` fails if Serve rewords it)."""
WAITING_FOR_RESOURCES = "the model's replicas are waiting for the resources they need to be scheduled"
REASONS = {
    "ready": "",
    "starting": "the model's replicas are starting",
    "scaled_to_zero": "the model is scaled to zero: a request starts a replica",
    "failed": "the model's deployment failed; see the server logs",
}


@dataclass(frozen=True)
class ModelState:
    state: str
    """ready (a replica serves), starting, scaled_to_zero, or failed (nothing serves)."""
    replicas: int
    reason: str
    """Fixed words for callers: why the model is not ready, or empty when it is."""
    detail: str
    """Serve's own account, which may hold internals: for the log only."""


async def model_states(model_ids: list[str]) -> dict[str, ModelState]:
    app_name = serve.get_replica_context().app_name
    # serve.status() blocks on a call to the controller; keep it off the event loop.
    status = await asyncio.to_thread(serve.status)
    app = status.applications.get(app_name)
    deployments = app.deployments if app else {}
    return {model_id: state_of(deployments.get(deployment_name(model_id))) for model_id in model_ids}


def state_of(deployment: DeploymentStatusOverview | None) -> ModelState:
    if deployment is None:
        return ModelState("starting", 0, REASONS["starting"], "")
    running = deployment.replica_states.get("RUNNING", 0)
    if running > 0:
        state = "ready"
    elif deployment.status in FAILED:
        state = "failed"
    elif deployment.status == "HEALTHY":
        state = "scaled_to_zero"
    else:
        state = "starting"
    return ModelState(state, running, _reason(state, deployment), deployment.message)


def _reason(state: str, deployment: DeploymentStatusOverview) -> str:
    if state == "failed":
        return FAILURE_REASONS.get(deployment.status_trigger, REASONS[state])
    if state == "starting" and UNSCHEDULED in deployment.message:
        return WAITING_FOR_RESOURCES
    return REASONS[state]
