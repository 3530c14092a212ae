"""Livepeer health states driven through real deployment lifecycles on the test engine:
LOADING while the default model starts, then OK; ERROR with a fixed reason when it cannot load;
IDLE when it is scaled to zero. And what a redeploy leaves serving while a new replica loads."""

import time

import httpx
import pytest
from ray import serve
from ray.serve.api import _run as deploy_without_waiting

import tests.fake_engine
from cluster.schema import ClusterConfig
from serve_app.app import build_graph
from tests.conftest import REPLICA_START_S, delete_app
from tests.polling import until

pytestmark = pytest.mark.e2e


def _app(source: str, **deployment) -> object:
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "models": [
                {
                    "id": "lifecycle",
                    "source": {"path": source},
                    "deployment": {"num_cpus": 0.1, "health_check_period_s": 1} | deployment,
                }
            ],
        }
    )
    return build_graph(config, tests.fake_engine.fake_engine)


def _health_until(url: str, wanted: str, timeout_s: float = REPLICA_START_S) -> dict:
    """Polls /health until it says `wanted`; the ingress itself may still be starting."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = httpx.get(url + "/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            seen = None
        if seen and seen["status"] == wanted:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"/health never said {wanted}; last: {seen}")


def test_loading_then_ok(serve_url, fake_url, tmp_path):
    source = tmp_path / "weights"
    hold = tmp_path / "weights.hold"
    hold.touch()
    deploy_without_waiting(_app(str(source)), name="loading", route_prefix="/loading", _blocking=False)
    try:
        _health_until(serve_url + "/loading", "LOADING")
        hold.unlink()
        _health_until(serve_url + "/loading", "OK")
    finally:
        delete_app("loading")


def test_model_that_cannot_load_is_error_with_a_fixed_reason(serve_url, fake_url):
    """Serve's own message (the replica's traceback, pid, address, the missing path) is not shown."""
    deploy_without_waiting(_app("/models/broken"), name="broken", route_prefix="/broken", _blocking=False)
    try:
        health = _health_until(serve_url + "/broken", "ERROR")
        assert health == {
            "status": "ERROR",
            "reason": "the model's replicas failed to start; see the server logs",
            "models": {"lifecycle": "failed"},
        }
    finally:
        delete_app("broken")


def test_scaled_to_zero_is_idle(serve_url, fake_url):
    autoscaling = {"min_replicas": 0, "max_replicas": 1}
    deploy_without_waiting(
        _app("/models/idle", autoscaling=autoscaling), name="idle", route_prefix="/idle", _blocking=False
    )
    try:
        _health_until(serve_url + "/idle", "IDLE")
    finally:
        delete_app("idle")


def _model_replicas(app: str) -> dict[str, int]:
    states = serve.status().applications[app].deployments["model-lifecycle"].replica_states
    return {state: states.get(state, 0) for state in ("STARTING", "RUNNING")}


@pytest.mark.parametrize("surge, old_ones_serving", [(0, 0), (100, 1)])
def test_a_redeploy_keeps_the_old_replica_serving_only_with_surge(
    serve_url, fake_url, tmp_path, surge, old_ones_serving
):
    """Every redeploy replaces the model's replicas (a new version); with `max_surge_percent` the
    old one answers until its successor has loaded, without it the model waits for the new one."""
    source = tmp_path / "weights"
    hold = tmp_path / "weights.hold"
    name = f"surge{surge}"
    app = _app(str(source), num_replicas=1, max_surge_percent=surge)
    deploy_without_waiting(app, name=name, route_prefix=f"/{name}", _blocking=False)
    try:
        _health_until(f"{serve_url}/{name}", "OK")
        hold.touch()  # the next replica keeps loading
        # The same application again: each deploy of it is a new version, as a changed config is.
        deploy_without_waiting(app, name=name, route_prefix=f"/{name}", _blocking=False)
        wanted = {"STARTING": 1, "RUNNING": old_ones_serving}
        until(lambda: _model_replicas(name) == wanted, 60, f"the new replica loading beside {old_ones_serving} old")
        if old_ones_serving:
            answer = httpx.post(
                f"{serve_url}/{name}/llm", json={"messages": [{"role": "user", "content": "still here"}]}, timeout=60
            )
            assert (answer.status_code, answer.json()["choices"][0]["message"]["content"]) == (200, "still here")
            assert _model_replicas(name) == wanted  # answered by the old replica: the new one still loads
        hold.unlink()
        until(lambda: _model_replicas(name) == {"STARTING": 0, "RUNNING": 1}, REPLICA_START_S, "the new replica alone")
    finally:
        hold.unlink(missing_ok=True)
        delete_app(name)
