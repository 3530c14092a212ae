"""How fast overload is refused: our stack over the zero-cost test engine with one request slot
and one queue place per replica, both taken by held requests, then a burst of requests that must
all be refused. Prints the refusal latencies (p50, p99) in ms.

    python -m bench.overload [--requests 500] [--concurrency 20]
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from bench import systems
from bench.load import percentile_ms
from cluster.schema import ClusterConfig


async def _burst(run: systems.Running, requests: int, concurrency: int, held: dict) -> list[tuple[int, float]]:
    results: list[tuple[int, float]] = []
    headers = {"Authorization": f"Bearer {run.api_key}"}
    async with httpx.AsyncClient(base_url=run.base_url, headers=headers, timeout=60) as client:

        async def one() -> None:
            started = time.perf_counter()
            response = await client.post("/llm", json=held)
            results.append((response.status_code, time.perf_counter() - started))

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return results


async def _measure(run: systems.Running, hold: Path, requests: int, concurrency: int) -> list[tuple[int, float]]:
    held = {"messages": [{"role": "user", "content": f"WAIT {hold} x"}]}
    headers = {"Authorization": f"Bearer {run.api_key}"}
    async with httpx.AsyncClient(base_url=run.base_url, headers=headers, timeout=120) as client:
        occupying = [asyncio.create_task(client.post("/llm", json=held)) for _ in range(2)]
        while not hold.with_name(hold.name + ".waiting").exists():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the second one reaches the queue; the burst then finds it full
        results = await _burst(run, requests, concurrency, held)
        hold.unlink()
        await asyncio.gather(*occupying)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    config = ClusterConfig.model_validate(
        {
            "auth": {"keys": [{"name": "bench", "env": "LLM_API_KEY"}]},
            "models": [
                {
                    "id": "zero-cost",
                    "source": {"path": "/nonexistent"},
                    "deployment": {"num_cpus": 0.1, "max_ongoing_requests": 1, "max_queued_requests": 1},
                }
            ],
        }
    )
    with (
        tempfile.TemporaryDirectory() as folder,
        systems.our_stack(
            config, args.port, Path(folder), name="overload", import_path="bench.overhead:build_app"
        ) as run,
    ):
        hold = Path(folder) / "hold"
        hold.touch()
        results = asyncio.run(_measure(run, hold, args.requests, args.concurrency))
    refused = sorted(seconds for status, seconds in results if status == 503)
    others = [status for status, _ in results if status != 503]
    print(
        f"{len(refused)} of {len(results)} refused with 503 (others: {others}); "
        f"refusal latency p50 {percentile_ms(refused, 50):.1f} ms, p99 {percentile_ms(refused, 99):.1f} ms, "
        f"max {refused[-1] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
