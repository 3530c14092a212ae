"""Each model's state, read from Serve's view of its deployment: for the Livepeer `/health`
route (about the default model) and for `/v1/models` (about every model)."""

import asyncio
from dataclasses import dataclass

from ray import serve
from ray.serve.schema import DeploymentStatusOverview

from cluster.schema import deployment_name

FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


@dataclass(frozen=True)
class ModelState:
    state: str
    """ready (a replica serves), starting, scaled_to_zero, or failed (nothing serves)."""
    replicas: int
    message: str


async def model_states(model_ids: list[str]) -> dict[str, ModelState]:
    app_name = serve.get_replica_context().app_name
    # serve.status() blocks on a call to the controller; keep it off the event loop.
    status = await asyncio.to_thread(serve.status)
    app = status.applications.get(app_name)
    deployments = app.deployments if app else {}
    return {model_id: state_of(deployments.get(deployment_name(model_id))) for model_id in model_ids}


def state_of(deployment: DeploymentStatusOverview | None) -> ModelState:
    if deployment is None:
        return ModelState("starting", 0, "")
    running = deployment.replica_states.get("RUNNING", 0)
    if running > 0:
        state = "ready"
    elif deployment.status in FAILED:
        state = "failed"
    elif deployment.status == "HEALTHY":
        state = "scaled_to_zero"
    else:
        state = "starting"
    return ModelState(state, running, deployment.message)
