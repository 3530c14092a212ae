"""The Livepeer runner health states, read from Serve's view of the default model's deployment."""

import asyncio

from ray import serve
from ray.serve.schema import DeploymentStatusOverview

from cluster.schema import deployment_name

FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


async def livepeer_health(model_id: str) -> dict[str, str]:
    """`{"status": …}`, with Serve's own account of the failure as `reason` on ERROR."""
    app_name = serve.get_replica_context().app_name
    # serve.status() blocks on a call to the controller; keep it off the event loop.
    status = await asyncio.to_thread(serve.status)
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name(model_id)) if app else None
    state = health_state(deployment)
    if state == "ERROR" and deployment is not None and deployment.message:
        return {"status": state, "reason": deployment.message}
    return {"status": state}


def health_state(deployment: DeploymentStatusOverview | None) -> str:
    """OK while any replica serves; IDLE when scaled to zero; ERROR when it failed and nothing
    serves; LOADING while replicas start."""
    if deployment is None:
        return "LOADING"
    running = deployment.replica_states.get("RUNNING", 0)
    if running > 0:
        return "OK"
    if deployment.status in FAILED:
        return "ERROR"
    if deployment.status == "HEALTHY":
        return "IDLE"
    return "LOADING"
