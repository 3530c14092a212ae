"""`make bench` / `python -m bench`: this stack and Ray Serve LLM, each beside bare vLLM on the same
model and engine settings, on this machine, under the same streaming loads; then the stack alone
over a zero-cost engine. Writes bench/results/latest.{json,md,png}, and the table with a link to
the plot into docs/benchmarks.md, between its bench:begin and bench:end markers.

Bare vLLM stays up through both contenders' turns, and each contender is measured in turns with
it (bare, contender, contender, bare at each load), the turns pooled: this machine's speed drifts
by tens of percent over minutes, which one system after the other reads as a difference between
them; in turns, drift moves both columns alike and their ratio holds. Bare vLLM beside an idle
contender read no slower than alone (docs/benchmarks.md).

Longer runs on a GPU cluster: --config configs/gpu-cluster.yaml --concurrency 1 8 32 128
--output-len 256 --prompts-per-stream 16.
"""

import argparse
import asyncio
import os
import platform
from collections import defaultdict
from pathlib import Path

from bench import report, systems
from bench.load import FIRST_TOKEN, LoadResult, Samples, first_tokens, sse_load, vllm_bench
from cluster import runtime
from cluster.load import load
from cluster.schema import ClusterConfig
from serve_app.models import sources as model_source

GREEDY_LONG_ANSWER = "Write a long, detailed story about a lighthouse keeper and a storm."
VLLM_BENCH = "/v1 (vllm bench)"
OVERHEAD_LAYOUTS = {  # route prefix: (the table's label, whether the ingress holds the engine)
    "colocated": ("colocated, as configs/local.yaml", True),
    "two-deployments": ("ingress and model apart", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/local.yaml", help="its first model is benchmarked")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--prompts-per-stream",
        type=int,
        default=2,
        help="requests per concurrent stream in each turn (at least 4 per turn)",
    )
    parser.add_argument(
        "--first-token-blocks",
        type=int,
        default=8,
        help="blocks of one-token requests per system and route, for the time to first token at "
        "concurrency 1 (0: none)",
    )
    parser.add_argument(
        "--systems", nargs="+", default=["ours", "ray-llm", "overhead"], choices=["ours", "ray-llm", "overhead"]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--docs",
        type=Path,
        default=report.DOCS,
        help="the page whose marked section gets the table (default: %(default)s)",
    )
    parser.add_argument(
        "--no-docs",
        dest="docs",
        action="store_const",
        const=None,
        help="leave the docs alone (a run on other hardware, say)",
    )
    parser.add_argument(
        "--port", type=int, default=8100, help="the contenders' and the zero-cost run's; bare vLLM takes the next"
    )
    args = parser.parse_args()
    if args.docs is not None:
        report.check_docs(args.docs)
    all_cores = os.sched_getaffinity(0)
    split = runtime.core_split()
    if split is not None:
        # As `make serve` runs ours, for every system alike.
        runtime.pin(split)

    config, model_path = benchmarked(args.config)
    model = config.models[0]
    logs = args.out / "logs"
    results: list[LoadResult] = []
    overhead: list[LoadResult] = []
    started: dict[str, float] = {}

    def turns(bare: systems.Running, contender: systems.Running, sse_path: str | None) -> None:
        started[contender.name] = contender.started_in_s
        for concurrency in args.concurrency:
            in_turns(bare, contender, sse_path, concurrency)
        # The first token at concurrency 1 is the figure a 10 ms gap is read on; whole answers
        # give too few of them in a run this short.
        if args.first_token_blocks:
            routes = ["/v1/chat/completions", *([sse_path] if sse_path else [])]
            print(f"{bare.name} and {contender.name}: first tokens", flush=True)
            pooled = first_tokens(
                [(bare, routes[0]), *((contender, route) for route in routes)], args.first_token_blocks
            )
            results.extend(
                LoadResult.of(
                    name, route + FIRST_TOKEN, 1, samples, compared_with=contender.name if name == bare.name else ""
                )
                for (name, route), samples in pooled.items()
            )

    def in_turns(bare: systems.Running, contender: systems.Running, sse_path: str | None, concurrency: int) -> None:
        prompts = max(4, args.prompts_per_stream * concurrency)
        pooled: dict[tuple[str, str], Samples] = defaultdict(Samples)
        for run in (bare, contender, contender, bare):
            print(f"{run.name}: concurrency {concurrency}, {prompts} requests", flush=True)
            pooled[run.name, VLLM_BENCH] += vllm_bench(
                run, model_path, concurrency, prompts, args.input_len, args.output_len
            )
            if sse_path:
                path = sse_path if run is contender else "/v1/chat/completions"
                body = sse_body(path, model.id, args.output_len)
                pooled[run.name, path] += asyncio.run(sse_load(run, path, body, concurrency, prompts))
        results.extend(
            LoadResult.of(name, api, concurrency, samples, compared_with=contender.name if name == bare.name else "")
            for (name, api), samples in pooled.items()
        )

    if {"ours", "ray-llm"} & set(args.systems):
        with systems.bare_vllm(model, model_path, args.port + 1, logs) as bare:
            started[bare.name] = bare.started_in_s
            if "ours" in args.systems:
                with systems.our_stack(config, args.port, logs) as run:
                    turns(bare, run, "/llm")
            if "ray-llm" in args.systems:
                with systems.ray_serve_llm(model, model_path, args.port, logs) as run:
                    turns(bare, run, None)
    overhead_tokens = 64
    if "overhead" in args.systems:
        # A zero-cost engine needs no core of its own: the stack has them all, as beside a GPU.
        os.sched_setaffinity(0, all_cores)
        configs = overhead_configs()
        with systems.our_apps(
            configs, args.port, logs, name="zero-cost engine", import_path="bench.overhead:build_app"
        ) as runs:
            words = " ".join(f"w{i}" for i in range(overhead_tokens))
            for concurrency in sorted({*args.concurrency, 64}):
                prompts = max(50, 10 * concurrency)
                for prefix, run in zip(configs, runs, strict=False):
                    for path in ("/llm", "/v1/chat/completions"):
                        body = {
                            "model": run.model,
                            "messages": [{"role": "user", "content": words}],
                            "max_tokens": overhead_tokens,
                            "stream": True,
                        }
                        samples = asyncio.run(sse_load(run, path, body, concurrency, prompts))
                        overhead.append(LoadResult.of(OVERHEAD_LAYOUTS[prefix][0], path, concurrency, samples))

    meta = {
        "model": model.id,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "layout": (
            f"vLLM's processes on cores {','.join(map(str, split.engine))}, everything else on core {split.ray}"
            if split
            else "unpinned"
        ),
        "started_in_s": started,
        "overhead_tokens": overhead_tokens,
    }
    print(report.write(results, overhead, meta, args.out, args.docs))


def benchmarked(config_path: str) -> tuple[ClusterConfig, str]:
    """A config's first application cut to its first model, the one benchmarked, and the path of
    that model's weights (bare vLLM and Ray Serve LLM are given the same files)."""
    config = next(iter(load(config_path).apps.values()))
    config = config.model_copy(update={"models": config.models[:1], "default_model": None})
    return config, model_source.resolve(config.models[0].source)


def sse_body(path: str, model_id: str, output_len: int) -> dict:
    """A prompt whose greedy answer runs past `output_len`, so every system generates exactly
    `output_len` tokens without `ignore_eos` (which `/llm` does not have)."""
    body = {
        "messages": [{"role": "user", "content": GREEDY_LONG_ANSWER}],
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
    }
    return body if path == "/llm" else body | {"model": model_id}


def overhead_configs() -> dict[str, ClusterConfig]:
    """The two layouts our configs take, side by side in one Serve instance: the one model's engine
    in the ingress's replica, and the ingress calling a model deployment."""
    config = {
        "auth": {"keys": [{"name": "bench", "env": "LLM_API_KEY"}]},
        "models": [
            {
                "id": "zero-cost",
                "source": {"path": "/nonexistent"},
                "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 1024},
            }
        ],
    }
    # One ingress replica, not autoscaled: what one replica relays is the figure.
    return {
        prefix: ClusterConfig.model_validate(config | {"ingress": {"colocate": colocate, "num_replicas": 1}})
        for prefix, (_, colocate) in OVERHEAD_LAYOUTS.items()
    }


if __name__ == "__main__":
    main()
