"""What an orchestrator and Prometheus see, through HTTP: hardware info, and metrics that match
the requests that were made. Real engine and model."""

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, tags), value in samples.items() if sample == name and wanted <= tags)


def test_hardware_info_lists_the_nodes_and_gpus_ray_sees(client):
    import ray

    info = client.get("/hardware/info").json()
    assert info["pipeline"] == "llm" and info["model_id"] == "smollm2-135m-instruct"
    nodes = [node for node in ray.nodes() if node["Alive"]]
    gpus = [int(node["Resources"].get("GPU", 0)) for node in nodes]
    assert len(info["gpu_info"]) == sum(gpus)
    assert sorted(n["gpus"] for n in info["nodes"]) == sorted(gpus)
    assert len(info["nodes"]) == len(nodes) and all(n["cpus"] > 0 for n in info["nodes"])
    assert not any(node["NodeManagerAddress"] in str(info) for node in nodes)


def test_hardware_stats_are_valid_and_empty_on_a_cluster_without_gpus(client):
    stats = client.get("/hardware/stats")
    assert stats.status_code == 200
    assert stats.json() == {"pipeline": "llm", "model_id": "smollm2-135m-instruct", "gpu_stats": {}}
    assert client.get("/hardware/stats", headers={"Authorization": "Bearer nope"}).status_code == 401


def settled(metrics_url: str, timeout_s: float = 30) -> dict:
    """A scrape that stays the same over a few report intervals: requests that ended before this
    test have all been exported, so the deltas below are this test's alone."""
    deadline = time.monotonic() + timeout_s
    previous = scrape(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        current = scrape(metrics_url)
        if total(current, "ray_llm_requests_total") == total(previous, "ray_llm_requests_total"):
            return current
        previous = current
    raise AssertionError("metrics kept changing with no requests being made")


def test_metrics_count_what_the_requests_did(client, metrics_url):
    labels = {"model": "smollm2-135m-instruct", "key": "local", "endpoint": "/llm"}
    before = settled(metrics_url)
    usages = []
    for stream in (False, True, False):
        response = client.post("/llm", json={"messages": FRANCE, "temperature": 0, "max_tokens": 12, "stream": stream})
        assert response.status_code == 200
        if not stream:
            usages.append(response.json()["usage"])
    usages.append(usages[0])  # the stream is greedy too: same answer, same usage
    client.post("/llm", json={"messages": []})  # refused before any model is chosen: model "-"

    deadline = time.monotonic() + 30
    while True:
        after = scrape(metrics_url)
        done = total(after, "ray_llm_requests_total") - total(before, "ray_llm_requests_total")
        if done >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    def delta(name, **extra):
        return total(after, name, **(labels | extra)) - total(before, name, **(labels | extra))

    assert delta("ray_llm_requests_total", status="200") == 3
    assert delta("ray_llm_requests_total", status="400", model="-") == 1
    assert delta("ray_llm_completion_tokens_total") == sum(u["completion_tokens"] for u in usages[:3])
    assert delta("ray_llm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages[:3])
    assert delta("ray_llm_time_to_first_token_seconds_count") == 3
    assert delta("ray_llm_request_duration_seconds_count") == 3
    # One observation per stream (its mean gap between chunks of text); whole answers have none.
    assert delta("ray_llm_mean_token_gap_seconds_count") == 1
    assert delta("ray_llm_max_token_gap_seconds_count") == 1
    engine = {"model": "smollm2-135m-instruct"}
    assert total(after, "ray_llm_engine_request_duration_seconds_count", **engine) > total(
        before, "ray_llm_engine_request_duration_seconds_count", **engine
    )
    vllm = {
        name for name, tags in after if name.startswith("ray_vllm_") and ("model_name", "smollm2-135m-instruct") in tags
    }
    assert "ray_vllm_generation_tokens_total" in vllm, sorted(vllm)
