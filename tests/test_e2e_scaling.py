"""Scaling and overload through HTTP on the test engine, each scenario its own application on the
session's Ray cluster: fast 503s past a model's queue bound while admitted requests complete and
`/health` still answers (in both layouts), a first request to a model at zero replicas (streams
kept alive meanwhile), the bound on that wait, and two models and the ingress scaling up and down
independently under load."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from livepeer_ai.models import components
from livepeer_ai.utils import unmarshal_json
from livepeer_ai.utils.eventstreaming import stream_events
from ray import serve

import tests.fake_engine
from cluster.schema import ClusterConfig, deployment_name
from serve_app.app import build_graph
from tests.conftest import REPLICA_START_S, delete_app
from tests.polling import until

pytestmark = pytest.mark.e2e


def _app(*models: dict, colocate: bool = False, ingress: dict | None = None):
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "ingress": {"colocate": colocate} | (ingress or {}),
            "models": [
                {"source": {"path": "/models/fake"}} | m | {"deployment": {"num_cpus": 0.05} | m.get("deployment", {})}
                for m in models
            ],
        }
    )
    return build_graph(config, tests.fake_engine.fake_engine)


def _ask(text: str, model: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": text}]} | ({"model": model} if model else {})


def _replicas(app: str, model: str | None) -> int:
    """Running replicas of a model's deployment, or of the ingress's (None)."""
    deployment = serve.status().applications[app].deployments["ingress" if model is None else deployment_name(model)]
    return deployment.replica_states.get("RUNNING", 0)


async def _timed_post(client: httpx.AsyncClient, path: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post(path, json=body)
    return response, time.monotonic() - started


def _message(response: httpx.Response) -> str:
    body = response.json()
    return body["detail"]["msg"] if "detail" in body else body["error"]["message"]


@pytest.mark.parametrize("colocate", [False, True], ids=["two deployments", "colocated"])
async def test_overload_gets_fast_503s_and_admitted_requests_complete(serve_url, fake_url, tmp_path, colocate):
    hold = tmp_path / "hold"
    hold.touch()
    serve.run(
        _app({"id": "busy", "deployment": {"max_ongoing_requests": 1, "max_queued_requests": 1}}, colocate=colocate),
        name="overload",
        route_prefix="/overload",
    )
    held = _ask(f"WAIT {hold} one two")
    try:
        async with httpx.AsyncClient(base_url=serve_url + "/overload", timeout=60) as client:
            first = asyncio.create_task(_timed_post(client, "/llm", held))
            # Its only slot is taken once the engine has the request (a stats call through the
            # model's handle would queue behind it).
            while not (tmp_path / "hold.waiting").exists():
                await asyncio.sleep(0.02)
            # One more request fits the queue; the other three must be refused while both wait.
            others = [
                asyncio.create_task(_timed_post(client, path, held))
                for path in ("/llm", "/llm", "/v1/chat/completions", "/llm")
            ]
            refused_while_held = 0
            for next_done in asyncio.as_completed(others, timeout=30):
                response, _ = await next_done
                refused_while_held += response.status_code == 503
                if refused_while_held == 3:
                    break
            # An orchestrator's health poll is not a chat request: it is answered meanwhile.
            health = await client.get("/health")
            assert (health.status_code, health.json()["status"]) == (200, "OK")
            hold.unlink()
            results = await asyncio.gather(first, *others)
    finally:
        delete_app("overload")
    statuses = sorted(response.status_code for response, _ in results)
    assert statuses == [200, 200, 503, 503, 503]
    for response, seconds in results:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "at capacity" in _message(response)
            assert seconds < 2, f"a refusal took {seconds:.2f} s"


async def _raw_stream(client: httpx.AsyncClient, body: dict, kept_alive: asyncio.Event) -> tuple[int, bytes]:
    """A `/llm` stream's status and bytes; `kept_alive` is set at its first keep-alive comment."""
    raw = b""
    async with client.stream("POST", "/llm", json=body | {"stream": True}) as response:
        async for part in response.aiter_raw():
            raw += part
            if b": keep-alive\n\n" in raw:
                kept_alive.set()
    return response.status_code, raw


async def _sdk_stream_text(base_url: str, text: str) -> str:
    sdk = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    stream = await sdk.chat.completions.create(model="cold", messages=[{"role": "user", "content": text}], stream=True)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])


async def test_first_request_to_a_model_at_zero_replicas_is_answered(serve_url, fake_url, tmp_path):
    """Whole answers wait; streams get their 200 and keep-alive comments while the replica starts,
    then their answer, read whole by the OpenAI SDK and by the Livepeer SDK's own SSE reader."""
    source = tmp_path / "weights"
    hold = tmp_path / "weights.hold"
    hold.touch()
    autoscaling = {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0}
    serve.run(
        _app(
            {"id": "cold", "source": {"path": str(source)}, "deployment": {"autoscaling": autoscaling}},
            ingress={"stream_keepalive_s": 0.2},
        ),
        name="cold",
        route_prefix="/cold",
    )
    try:
        async with httpx.AsyncClient(base_url=serve_url + "/cold", timeout=120) as client:
            models = (await client.get("/v1/models")).json()["data"]
            assert [(m["id"], m["state"], m["replicas"]) for m in models] == [("cold", "scaled_to_zero", 0)]
            request = asyncio.create_task(client.post("/llm", json=_ask("hello from zero")))
            sdk = asyncio.create_task(_sdk_stream_text(serve_url + "/cold", "streamed from zero"))
            kept_alive = asyncio.Event()
            stream = asyncio.create_task(_raw_stream(client, _ask("kept alive from zero"), kept_alive))
            while (await client.get("/health")).json()["status"] != "LOADING":
                await asyncio.sleep(0.1)
            await asyncio.wait_for(kept_alive.wait(), 30)
            assert not request.done() and not stream.done()
            hold.unlink()
            response = await request
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "hello from zero"
            assert await sdk == "streamed from zero "
            status, raw = await stream
            assert status == 200 and raw.startswith(b": keep-alive\n\n")
            chunks = list(
                stream_events(
                    httpx.Response(200, content=raw),
                    # The SDK's reader hands on each event as JSON, its payload under `data`.
                    lambda event: unmarshal_json(json.dumps(json.loads(event)["data"]), components.LLMResponse),
                    sentinel="[DONE]",
                )
            )
            assert "".join(chunk.choices[0].delta.content for chunk in chunks) == "kept alive from zero "
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert (await client.get("/health")).json()["status"] == "OK"
    finally:
        delete_app("cold")


async def test_waiting_for_a_cold_start_is_bounded(serve_url, fake_url, tmp_path):
    source = tmp_path / "weights"
    (tmp_path / "weights.hold").touch()
    deployment = {
        "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0},
        "first_output_timeout_s": 2,
    }
    serve.run(
        _app({"id": "slow", "source": {"path": str(source)}, "deployment": deployment}),
        name="slow",
        route_prefix="/slow",
    )
    try:
        async with httpx.AsyncClient(base_url=serve_url + "/slow", timeout=60) as client:
            response, seconds = await _timed_post(client, "/v1/chat/completions", _ask("hi", "slow"))
    finally:
        delete_app("slow")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "starting from zero replicas" in _message(response)
    assert 2 <= seconds < 5


def test_models_and_the_ingress_scale_up_under_load_and_back_down_independently(serve_url, fake_url, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    # Serve averages each replica's load over look_back_period_s: the shortest the config takes,
    # so that the load's end shows soon.
    scaling = {"upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 11}
    # Both models alike; only one is loaded.
    deployment = {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1} | scaling}
    # The ingress scales on its own load too, to 2 under the 6 requests.
    ingress = {"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 2} | scaling}
    serve.run(
        _app({"id": "elastic", "deployment": deployment}, {"id": "steady", "deployment": deployment}, ingress=ingress),
        name="scaling",
        route_prefix="/scaling",
    )
    url = serve_url + "/scaling/llm"

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            requests = [client.post(url, json=_ask(f"WAIT {hold} x", "elastic")) for _ in range(6)]
            return [r.status_code for r in await asyncio.gather(*requests)]

    try:
        statuses: list[int] = []
        worker = threading.Thread(target=lambda: statuses.extend(asyncio.run(load())))
        worker.start()
        until(lambda: _replicas("scaling", "elastic") == 2, REPLICA_START_S, "elastic to scale up to its maximum of 2")
        until(lambda: _replicas("scaling", None) == 2, REPLICA_START_S, "the ingress to scale up to its maximum of 2")
        assert _replicas("scaling", "steady") == 1
        hold.unlink()
        worker.join(60)
        assert statuses == [200] * 6
        until(lambda: _replicas("scaling", "elastic") == 1, 60, "elastic to scale back down to 1")
        until(lambda: _replicas("scaling", None) == 1, 60, "the ingress to scale back down to 1")
        assert _replicas("scaling", "steady") == 1
    finally:
        delete_app("scaling")
