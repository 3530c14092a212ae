"""How fast a key change reaches every ingress replica, and what a key made at runtime costs a
request against one from the config.

Propagation: an application with two ingress replicas over the zero-cost test engine; keys are
made through `/admin/keys` one at a time; each change's commit time (its audit row) is set against
the time each replica's log says it holds that revision. Latency: sequential non-streamed `/llm`
requests with the config's key and with a runtime key, taken in turn.

    python -m bench.key_propagation [--changes 50] [--requests 1000]
"""

import argparse
import re
import tempfile
import time
from pathlib import Path

import httpx

from bench import report, systems
from bench.load import percentile_ms
from cluster.schema import ClusterConfig

RESULTS = Path(__file__).resolve().parent / "results" / "key_propagation.json"
APPLIED = re.compile(r"runtime keys at revision (\d+) \(\d+ keys\) t=([\d.]+)")


def _config() -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "auth": {"keys": [{"name": "bench", "env": "LLM_API_KEY", "scopes": ["chat", "admin"]}]},
            "ingress": {"num_replicas": 2, "num_cpus": 0.1},
            "models": [{"id": "zero-cost", "source": {"path": "/nonexistent"}, "deployment": {"num_cpus": 0.1}}],
        }
    )


def _applied(logs: Path) -> dict[str, dict[int, float]]:
    """Per ingress replica log: revision → the unix time it was applied."""
    found: dict[str, dict[int, float]] = {}
    for path in logs.glob("replica_keys_ingress_*.log"):
        for match in APPLIED.finditer(path.read_text()):
            found.setdefault(path.name, {})[int(match[1])] = float(match[2])
    return found


def _propagation(client: httpx.Client, url: str, changes: int) -> list[float]:
    for index in range(changes):
        client.post(url + "/admin/keys", json={"name": f"p{index}"}).raise_for_status()
        time.sleep(0.1)
    time.sleep(2)
    audit = sorted(client.get(url + "/admin/audit", params={"limit": 1000}).json()["data"], key=lambda a: a["id"])
    committed = {revision: entry["time"] for revision, entry in enumerate(audit, start=1)}
    logs = Path(sorted(Path("/tmp/ray").glob("session_2*"))[-1]) / "logs" / "serve"
    replicas = _applied(logs)
    assert len(replicas) == 2, f"expected two ingress replicas' logs, found {sorted(replicas)}"
    delays = []
    for revision, at in committed.items():
        # A replica may take two quick changes in one snapshot: the first revision it holds
        # at or past this one is when this change reached it.
        reached = [min(t for r, t in applied.items() if r >= revision) for applied in replicas.values()]
        delays.append(max(reached) - at)
    return delays


def _latency(client: httpx.Client, url: str, tokens: dict[str, str], requests: int) -> dict[str, list[float]]:
    body = {"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8}
    samples: dict[str, list[float]] = {name: [] for name in tokens}
    for index in range(requests + 50):
        for name in list(tokens)[index % 2 :] + list(tokens)[: index % 2]:
            started = time.perf_counter()
            response = client.post(url + "/llm", json=body, headers={"Authorization": f"Bearer {tokens[name]}"})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if index >= 50:
                samples[name].append(elapsed)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.key_propagation", description=__doc__)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--port", type=int, default=8210)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as folder,
        systems.our_apps(
            {"keys": _config()}, args.port, Path(folder), name="keys", import_path="bench.overhead:build_app"
        ) as [run],
        httpx.Client(headers={"Authorization": f"Bearer {run.api_key}"}, timeout=30) as client,
    ):
        delays = _propagation(client, run.base_url, args.changes)
        runtime_key = client.post(run.base_url + "/admin/keys", json={"name": "runtime"}).json()["key"]
        time.sleep(1)
        latencies = _latency(client, run.base_url, {"config": run.api_key, "runtime": runtime_key}, args.requests)
    result = {
        "changes": len(delays),
        "propagation_p50_ms": percentile_ms(delays, 50),
        "propagation_max_ms": max(delays) * 1000,
        "requests_per_key": args.requests,
        "config_key_median_ms": percentile_ms(latencies["config"], 50),
        "runtime_key_median_ms": percentile_ms(latencies["runtime"], 50),
    }
    result["runtime_key_added_median_ms"] = result["runtime_key_median_ms"] - result["config_key_median_ms"]
    report.save(result, RESULTS)


if __name__ == "__main__":
    main()
