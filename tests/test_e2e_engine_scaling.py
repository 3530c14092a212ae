"""Autoscaling on the engine's signals through HTTP on the test engine, whose requests held by
"WAIT" count as waiting in its queue: three waiting requests scale the model from 1 to 2 replicas
(Serve's own policy, at its default target of 16 ongoing requests per replica, would not), and
it comes back to 1 once they are answered and a replica sits idle."""

import asyncio
import threading

import httpx
import pytest
from ray import serve

from cluster.schema import ClusterConfig, deployment_name
from tests.conftest import REPLICA_START_S, delete_app, serve_fake
from tests.polling import until

pytestmark = pytest.mark.e2e

APP = "engine-scaling"


def _replicas() -> int:
    deployment = serve.status().applications[APP].deployments[deployment_name("elastic")]
    return deployment.replica_states.get("RUNNING", 0)


def test_waiting_requests_scale_up_and_an_idle_replica_goes(serve_url, tmp_path):
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "engine_signals": {"max_wait_s": 0.5},
        "upscale_delay_s": 0,
        "downscale_delay_s": 1,
        "look_back_period_s": 11,
    }
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "models": [
                {
                    "id": "elastic",
                    "source": {"path": "/models/elastic"},
                    "deployment": {"num_cpus": 0.05, "autoscaling": autoscaling},
                }
            ],
        }
    )
    serve_fake(config, APP)
    hold = tmp_path / "hold"
    hold.touch()
    body = {"messages": [{"role": "user", "content": f"WAIT {hold} x"}]}

    async def held() -> list[int]:
        async with httpx.AsyncClient(base_url=f"{serve_url}/{APP}", timeout=120) as client:
            return [r.status_code for r in await asyncio.gather(*(client.post("/llm", json=body) for _ in range(3)))]

    statuses: list[int] = []
    worker = threading.Thread(target=lambda: statuses.extend(asyncio.run(held())))
    try:
        assert _replicas() == 1
        worker.start()
        until(lambda: _replicas() == 2, REPLICA_START_S, "the waiting requests to bring a second replica")
        assert worker.is_alive(), "the held requests ended before the second replica came"
        hold.unlink()
        worker.join(60)
        assert statuses == [200, 200, 200]
        until(lambda: _replicas() == 1, 90, "the idle replica to go")
    finally:
        hold.unlink(missing_ok=True)
        worker.join(60)
        delete_app(APP)
