"""What API keys, rate limits and the usage ledger add to a request: our stack over the
zero-cost test engine, deployed four ways side by side in one Serve instance, measured with the
same sequential non-streamed `/llm` requests taken in turn from each, so that the machine's
noise falls on all four alike. Prints each variant's latency (median, p90, p99) and its median's
difference from the variant without keys.

    python -m bench.auth_overhead [--requests 1000]
"""

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from bench import report, systems
from bench.load import percentile_ms
from cluster.schema import ClusterConfig

RESULTS = Path(__file__).resolve().parent / "results" / "auth_overhead.json"
KEY = {"name": "bench", "env": "LLM_API_KEY"}
# Limits far above what the run reaches: every request pays for the check, none is refused.
LIMITS = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9, "concurrent_requests": 10**4}
VARIANTS = {
    "no-keys": {},
    "key": {"auth": {"keys": [KEY]}},
    "key-and-limits": {"auth": {"keys": [KEY | {"limits": LIMITS}]}},
    "no-keys-no-ledger": {"usage": {"enabled": False}},
}
BASELINE = "no-keys"


def _config(extra: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "models": [{"id": "zero-cost", "source": {"path": "/nonexistent"}, "deployment": {"num_cpus": 0.1}}],
        }
        | extra
    )


def _measure(runs: list[systems.Running], requests: int, warmup: int) -> dict[str, list[float]]:
    body = {"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8}
    latencies: dict[str, list[float]] = {run.name: [] for run in runs}
    with httpx.Client(headers={"Authorization": f"Bearer {runs[0].api_key}"}, timeout=30) as client:
        for index in range(warmup + requests):
            for run in runs[index % len(runs) :] + runs[: index % len(runs)]:
                started = time.perf_counter()
                response = client.post(run.base_url + "/llm", json=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if index >= warmup:
                    latencies[run.name].append(elapsed)
    return latencies


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": percentile_ms(samples, 50),
        "p90_ms": percentile_ms(samples, 90),
        "p99_ms": percentile_ms(samples, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_overhead", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per variant")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    configs = {name: _config(extra) for name, extra in VARIANTS.items()}
    with (
        tempfile.TemporaryDirectory() as folder,
        systems.our_apps(configs, args.port, Path(folder), name="auth", import_path="bench.overhead:build_app") as runs,
    ):
        latencies = _measure(runs, args.requests, args.warmup)
    summaries = {name.removeprefix("auth "): _summary(samples) for name, samples in latencies.items()}
    base = summaries[BASELINE]["median_ms"]
    print(f"{'variant':<20} {'median ms':>10} {'p90 ms':>8} {'p99 ms':>8} {'median vs no-keys':>18}")
    for name, summary in summaries.items():
        summary["added_median_ms"] = summary["median_ms"] - base
        print(
            f"{name:<20} {summary['median_ms']:>10.2f} {summary['p90_ms']:>8.2f} {summary['p99_ms']:>8.2f} "
            f"{summary['added_median_ms']:>+17.2f}"
        )
    report.save({"requests_per_variant": args.requests, "variants": summaries}, RESULTS, show=False)


if __name__ == "__main__":
    main()
