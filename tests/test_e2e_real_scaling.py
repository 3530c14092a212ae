"""The real small model on this machine, autoscaled on its engine's own signals: a first request
to it at zero replicas is answered (a replica starts meanwhile), requests waiting in the engine's
queue scale it from 1 to 2 replicas, and it scales back down once they are gone. Prints the
times. (Serve's own policy, on its count of requests, is tested on the test engine.)"""

import asyncio
import time

import httpx
import pytest
from ray import serve

from cluster.load import load
from cluster.schema import ClusterConfig, deployment_name
from serve_app.app import build_app
from tests.conftest import API_KEY, ROOT, delete_app

pytestmark = pytest.mark.e2e

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "smollm2-135m-instruct"


def _running() -> int:
    app = serve.status().applications["elastic"]
    return app.deployments[deployment_name(MODEL)].replica_states.get("RUNNING", 0)


async def test_real_model_starts_from_zero_and_scales_on_its_engines_signals_up_and_down(serve_url, llm_url):
    raw = load(ROOT / "configs" / "local.yaml").apps["llm"].model_dump()
    # Eager mode skips the engine's compile warm-up: replicas start faster, which is what this
    # test waits on, on a machine where a starting engine shares a core with a busy one.
    raw["models"][0]["engine"]["enforce_eager"] = True
    raw["usage"] = {"enabled": False}
    raw["ingress"]["colocate"] = False  # a model at zero replicas needs an ingress of its own
    # One sequence at a time: the engine's queue holds the rest, which is the signal scaled on.
    raw["models"][0]["engine"]["max_num_seqs"] = 1
    raw["models"][0]["deployment"] |= {
        "num_replicas": None,
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 2,
            "engine_signals": {"max_wait_s": 1},
            "upscale_delay_s": 0,
            "downscale_delay_s": 1,
            "look_back_period_s": 11,
        },
    }
    serve.run(build_app(ClusterConfig.model_validate(raw)), name="elastic", route_prefix="/elastic")
    try:
        assert _running() == 0
        async with httpx.AsyncClient(base_url=serve_url + "/elastic", headers=HEADERS, timeout=600) as client:
            started = time.monotonic()
            response = await client.post(
                "/llm",
                json={"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0},
            )
            cold_start_s = time.monotonic() - started
            assert response.status_code == 200 and "Paris" in response.json()["choices"][0]["message"]["content"]
            assert _running() == 1

            # Far more work than one replica finishes before a second one is up, two of the three
            # waiting in its engine's queue; left once it is.
            long = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 1900,
                "ignore_eos": True,
            }
            load_started = time.monotonic()
            requests = [asyncio.create_task(client.post("/v1/chat/completions", json=long)) for _ in range(3)]
            while _running() < 2:
                assert time.monotonic() - load_started < 300, "did not scale to 2 replicas under load"
                assert not any(r.done() for r in requests), "a request ended before a second replica came up"
                await asyncio.sleep(0.5)
            scale_up_s = time.monotonic() - load_started
            for request in requests:
                request.cancel()
            idle_from = time.monotonic()
            while _running() == 2:
                assert time.monotonic() - idle_from < 120, "did not scale down once idle"
                await asyncio.sleep(0.5)
            scale_down_s = time.monotonic() - idle_from
        print(
            f"\nreal model: first answer from zero replicas in {cold_start_s:.1f} s; "
            f"second replica running {scale_up_s:.1f} s after load began; "
            f"down from two {scale_down_s:.1f} s after the load left"
        )
    finally:
        delete_app("elastic")
