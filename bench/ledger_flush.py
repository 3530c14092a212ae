"""What sending usage ledger rows costs the first token, on the real engine: bare vLLM and our
stack as `configs/local.yaml` runs it, once with rows sent as each request ends (a flush interval
of 1 ms) and once with the default interval, both applications side by side in one Serve instance.
One-token streamed requests at concurrency 1 (`/llm` for ours, `/v1/chat/completions` for bare
vLLM), in blocks taken from each system in turn, as `make bench` reads the first token
(`bench.load.first_tokens`). Prints each system's median time to the first token and its difference
from bare vLLM's.

    python -m bench.ledger_flush [--blocks 12]
"""

import argparse
import json
from pathlib import Path

from bench import systems
from bench.load import first_tokens, percentile_ms
from cluster import runtime
from cluster.load import load
from cluster.schema import ClusterConfig
from serve_app.models import sources as model_source

RESULTS = Path(__file__).resolve().parent / "results" / "ledger_flush.json"


def _with_interval(config: ClusterConfig, seconds: float) -> ClusterConfig:
    return config.model_copy(update={"usage": config.usage.model_copy(update={"flush_interval_s": seconds})})


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger_flush", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=12, help="blocks per system")
    parser.add_argument("--block", type=int, default=15, help="requests per block")
    parser.add_argument("--dropped", type=int, default=5, help="requests not counted at the start of a block")
    parser.add_argument("--port", type=int, default=8300, help="ours; bare vLLM takes the next")
    args = parser.parse_args()
    split = runtime.core_split()
    if split is not None:
        runtime.pin(split)
    config = next(iter(load("configs/local.yaml").apps.values()))
    model = config.models[0]
    default_s = config.usage.flush_interval_s
    configs = {"per-request": _with_interval(config, 0.001), "batched": _with_interval(config, default_s)}
    logs = RESULTS.parent / "logs"
    with (
        systems.bare_vllm(model, model_source.resolve(model.source), args.port + 1, logs) as bare,
        systems.our_apps(configs, args.port, logs, "ledger") as ours,
    ):
        runs = [(bare, "/v1/chat/completions"), *((run, "/llm") for run in ours)]
        measured = first_tokens(runs, args.blocks, args.block, args.dropped)
    samples = {name: pooled.ttfts for (name, _), pooled in measured.items()}
    medians = {name: percentile_ms(times, 50) for name, times in samples.items()}
    summary = {
        name: {
            "median_ms": medians[name],
            "p90_ms": percentile_ms(times, 90),
            "vs_bare_ms": medians[name] - medians[bare.name],
            "requests": len(times),
        }
        for name, times in samples.items()
    }
    print(f"{'system':<22} {'median ms':>10} {'p90 ms':>8} {'vs bare vLLM':>13}")
    for name, figures in summary.items():
        print(f"{name:<22} {figures['median_ms']:>10.1f} {figures['p90_ms']:>8.1f} {figures['vs_bare_ms']:>+13.1f}")
    RESULTS.write_text(
        json.dumps({"flush_interval_s": {"per-request": 0.001, "batched": default_s}, "systems": summary}, indent=2)
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
