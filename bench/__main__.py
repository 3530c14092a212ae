"""`make bench` / `python -m bench`: bare vLLM, this stack and Ray Serve LLM on the same model and
engine settings, one after another on this machine, under the same streaming loads; then the
stack alone over a zero-cost engine. Writes bench/results/latest.{json,md,png}.

Each system runs alone. Measuring them in turns, with bare vLLM kept up beside each Ray system,
was tried and dropped: the idle neighbour slowed bare vLLM (inter-token latency at concurrency 1
here: 60 ms alone, 66 ms beside idle Ray Serve LLM, 90 ms beside our idle stack), which
flattered the Ray systems.

Longer runs on a GPU cluster: --config configs/gpu-cluster.yaml --concurrency 1 8 32 128
--output-len 256 --prompts-per-stream 16.
"""

import argparse
import asyncio
import os
import platform
from pathlib import Path

from bench import report, systems
from bench.load import LoadResult, sse_load, vllm_bench
from cluster import runtime
from cluster.load import load
from cluster.schema import ClusterConfig
from serve_app import model_source

GREEDY_LONG_ANSWER = "Write a long, detailed story about a lighthouse keeper and a storm."
VLLM_BENCH = "/v1 (vllm bench)"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/local.yaml", help="its first model is benchmarked")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts-per-stream", type=int, default=3,
                        help="requests per concurrent stream at each concurrency (at least 8 in all)")
    parser.add_argument("--systems", nargs="+", default=["bare", "ours", "ray-llm", "overhead"],
                        choices=["bare", "ours", "ray-llm", "overhead"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    all_cores = os.sched_getaffinity(0)
    split = runtime.core_split()
    if split is not None:
        # As `make serve` runs ours, for every system alike.
        runtime.pin(split)

    config = next(iter(load(args.config).apps.values()))
    config = config.model_copy(update={"models": config.models[:1], "default_model": None})
    model = config.models[0]
    model_path = model_source.resolve(model.source)
    logs = args.out / "logs"
    results: list[LoadResult] = []
    overhead: list[LoadResult] = []
    started: dict[str, float] = {}

    def measure(run: systems.Running, sse_path: str | None) -> None:
        started[run.name] = run.started_in_s
        for concurrency in args.concurrency:
            prompts = max(8, args.prompts_per_stream * concurrency)
            print(f"{run.name}: concurrency {concurrency}, {prompts} requests", flush=True)
            samples = vllm_bench(run, model_path, concurrency, prompts, args.input_len, args.output_len)
            results.append(LoadResult.of(run.name, VLLM_BENCH, concurrency, samples))
            if sse_path:
                body = _sse_body(sse_path, model.id, args.output_len)
                samples = asyncio.run(sse_load(run, sse_path, body, concurrency, prompts))
                results.append(LoadResult.of(run.name, sse_path, concurrency, samples))

    if "bare" in args.systems:
        with systems.bare_vllm(model, model_path, args.port, logs) as run:
            measure(run, "/v1/chat/completions")
    if "ours" in args.systems:
        with systems.our_stack(config, args.port, logs) as run:
            measure(run, "/llm")
    if "ray-llm" in args.systems:
        with systems.ray_serve_llm(model, model_path, args.port, logs) as run:
            measure(run, None)
    overhead_tokens = 64
    if "overhead" in args.systems:
        # A zero-cost engine needs no core of its own: the stack has them all, as beside a GPU.
        os.sched_setaffinity(0, all_cores)
        with systems.our_stack(_overhead_config(), args.port, logs, name="ours, zero-cost engine",
                               import_path="bench.overhead:build_app") as run:
            words = " ".join(f"w{i}" for i in range(overhead_tokens))
            for concurrency in sorted({*args.concurrency, 64}):
                prompts = max(50, 10 * concurrency)
                for path in ("/llm", "/v1/chat/completions"):
                    body = {"model": run.model, "messages": [{"role": "user", "content": words}],
                            "max_tokens": overhead_tokens, "stream": True}
                    samples = asyncio.run(sse_load(run, path, body, concurrency, prompts))
                    overhead.append(LoadResult.of(run.name, path, concurrency, samples))

    meta = {
        "model": model.id, "input_len": args.input_len, "output_len": args.output_len,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "layout": (f"vLLM's processes on cores {','.join(map(str, split.engine))}, everything else on core {split.ray}"
                   if split else "unpinned"),
        "started_in_s": started, "overhead_tokens": overhead_tokens,
    }
    print(report.write(results, overhead, meta, args.out))


def _sse_body(path: str, model_id: str, output_len: int) -> dict:
    """A prompt whose greedy answer runs past `output_len`, so every system generates exactly
    `output_len` tokens without `ignore_eos` (which `/llm` does not have)."""
    body = {"messages": [{"role": "user", "content": GREEDY_LONG_ANSWER}], "max_tokens": output_len,
            "temperature": 0, "stream": True}
    return body if path == "/llm" else body | {"model": model_id}


def _overhead_config() -> ClusterConfig:
    return ClusterConfig.model_validate({
        "auth": {"keys": [{"name": "bench", "env": "LLM_API_KEY"}]},
        "models": [{"id": "zero-cost", "source": {"path": "/nonexistent"},
                    "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 1024}}],
    })


if __name__ == "__main__":
    main()
