"""What a LoRA adapter costs on this machine: the time a replica takes to load one (from the
replica's own log line), and the first-token time of a loaded adapter against its base model's,
the same prompt streamed in turns (median and p90 over `--requests` each).

The shipped model apart from the ingress (adapters are routed by Serve's multiplexing) with one
adapter made here by `peft`, on a Ray cluster of this process's own (other clusters on the host
are left alone).

    python -m bench.lora [--requests 50]
"""

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from bench import report
from cluster.load import load
from cluster.runtime import NODE_ENV
from cluster.schema import ClusterConfig
from serve_app.app import build_app
from serve_app.models import sources
from tests.lora_adapters import make_adapter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "lora.json"
BASE = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Name three colours."}]
LOADED = re.compile(r"loaded LoRA adapter (\S+) from \S+ in ([0-9.]+) s")


def _first_token_s(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
    raise RuntimeError(f"no token from {model}")


def _load_times() -> list[float]:
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    text = "\n".join(path.read_text() for path in logs.glob("replica_lora_*.log"))
    return [float(seconds) for _, seconds in LOADED.findall(text)]


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--port", type=int, default=8240)
    args = parser.parse_args()
    os.environ.update(NODE_ENV)
    api_key = "sk-bench-lora"
    os.environ["LLM_API_KEY"] = api_key
    raw = load(ROOT / "configs" / "local.yaml").apps["llm"].model_dump()
    with tempfile.TemporaryDirectory() as folder:
        make_adapter(sources.resolve(ClusterConfig.model_validate(raw).models[0].source), Path(folder) / "a", seed=1)
        raw["ingress"]["colocate"] = False
        raw["usage"] = {"enabled": False}
        raw["models"][0]["lora"] = {"adapters": [{"id": "adapter", "source": {"path": f"{folder}/a"}}], "max_loaded": 1}
        ray.init(
            address="local", num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"LLM_API_KEY": api_key}}
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            serve.run(build_app(ClusterConfig.model_validate(raw)), name="lora", route_prefix="/")
            headers = {"Authorization": f"Bearer {api_key}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", headers=headers, timeout=300) as client:
                first_with_load = _first_token_s(client, "adapter")
                _first_token_s(client, BASE)  # both warm before the turns
                base, adapter = [], []
                for _ in range(args.requests):
                    base.append(_first_token_s(client, BASE))
                    adapter.append(_first_token_s(client, "adapter"))
            loads = _load_times()
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {
        "requests_each": args.requests,
        "adapter_load_s": loads,
        "first_adapter_request_first_token_ms": round(first_with_load * 1000, 1),
        "first_token": {"base": _summary(base), "adapter": _summary(adapter)},
        "adapter_over_base_median": round(statistics.median(adapter) / statistics.median(base), 2),
    }
    report.save(result, RESULTS)


if __name__ == "__main__":
    main()
