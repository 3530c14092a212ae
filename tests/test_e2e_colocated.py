"""`ingress.colocate`: the one model's engine runs inside the ingress's replicas, so that a request
crosses one Ray hop (proxy to replica) instead of two. The API must not notice."""

import asyncio
import json

import httpx
import pytest
from ray import serve

from cluster.schema import ClusterConfig, deployment_name
from tests.conftest import delete_app, serve_fake
from tests.polling import until

pytestmark = pytest.mark.e2e

APP = "colocated"


@pytest.fixture(scope="module")
def colocated_url(serve_url, fake_url):
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "ingress": {"colocate": True},
            "models": [
                {
                    "id": "echo",
                    "aliases": ["e"],
                    "source": {"path": "/models/echo"},
                    "deployment": {"num_cpus": 0.1, "num_replicas": 1},
                }
            ],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _unfinished() -> int:
    return serve.get_deployment_handle(deployment_name("echo"), app_name=APP).num_unfinished_requests.remote().result()


def test_one_deployment_serves_http_and_the_model(colocated_url):
    deployments = serve.status().applications[APP].deployments
    assert list(deployments) == [deployment_name("echo")]
    assert httpx.get(colocated_url + "/health").json() == {"status": "OK", "models": {"echo": "ready"}}
    [model] = httpx.get(colocated_url + "/v1/models").json()["data"]
    assert (model["id"], model["state"], model["replicas"]) == ("echo", "ready", 1)


def test_answers_and_streams_as_the_two_hop_app_does(colocated_url):
    whole = httpx.post(colocated_url + "/llm", json={"messages": [{"role": "user", "content": "one two three"}]})
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == "one two three"
    with httpx.stream(
        "POST",
        colocated_url + "/v1/chat/completions",
        json={
            "model": "e",
            "stream": True,
            "messages": [{"role": "user", "content": "one two three"}],
        },
    ) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "one two three "
    failed = httpx.post(
        colocated_url + "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "FAIL AT START"}]},
    )
    assert failed.status_code == 500 and "request id" in failed.json()["error"]["message"]


async def test_a_client_leaving_stops_the_colocated_engine(colocated_url):
    assert await asyncio.to_thread(_unfinished) == 0
    body = {"stream": True, "messages": [{"role": "user", "content": "STALL one two three"}]}
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", colocated_url + "/llm", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    # Checked inside the loop: leaving it closes the connection.
                    assert await asyncio.to_thread(_unfinished) == 1
                    break
    await asyncio.to_thread(until, lambda: _unfinished() == 0, 10, "the engine to drop the abandoned stream")


def test_colocation_takes_one_model_that_stays_up():
    model = {"id": "a", "source": {"path": "/m"}}
    with pytest.raises(ValueError, match="exactly one model"):
        ClusterConfig.model_validate({"ingress": {"colocate": True}, "models": [model, model | {"id": "b"}]})
    with pytest.raises(ValueError, match="cannot scale to zero"):
        ClusterConfig.model_validate(
            {
                "ingress": {"colocate": True},
                "models": [model | {"deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}}],
            }
        )
