"""Driving streaming load and reducing it to the figures we report.

The OpenAI route is driven by vLLM's own load generator (`vllm bench serve`), the same on every
system. `/llm` has no such tool, so `sse_load` is ours: it reads Server-Sent Events the way the
Livepeer gateway does and times each content chunk.
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.systems import ROOT, Running


@dataclass
class LoadResult:
    system: str
    api: str
    concurrency: int
    requests: int
    errors: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def vllm_bench(run: Running, tokenizer: str, concurrency: int, prompts: int, input_len: int,
               output_len: int) -> LoadResult:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "bench.vllm_cli", "bench", "serve",
            "--backend", "openai-chat", "--base-url", run.base_url, "--endpoint", "/v1/chat/completions",
            "--model", run.model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--ignore-eos",
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--num-warmups", str(min(concurrency, 2)), "--temperature", "0",
            "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", out, "--result-filename", "result.json", "--disable-tqdm",
        ]
        env = os.environ | ({"OPENAI_API_KEY": run.api_key} if run.api_key else {})
        subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
        raw = json.loads((Path(out) / "result.json").read_text())
    return LoadResult(
        system=run.name, api="/v1 (vllm bench)", concurrency=concurrency,
        requests=raw["completed"] + raw.get("failed", 0), errors=raw.get("failed", 0),
        output_tokens_per_s=raw["output_throughput"], requests_per_s=raw["request_throughput"],
        ttft_p50_ms=raw["p50_ttft_ms"], ttft_p99_ms=raw["p99_ttft_ms"],
        itl_p50_ms=raw["p50_itl_ms"], itl_p99_ms=raw["p99_itl_ms"],
    )


async def sse_load(run: Running, path: str, body: dict, concurrency: int, prompts: int) -> LoadResult:
    """`prompts` streaming requests, at most `concurrency` at once; `body` is sent as is."""
    headers = {"Authorization": f"Bearer {run.api_key}"} if run.api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    queue = list(range(prompts))
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    errors = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        started = time.perf_counter()
        last = None
        try:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    errors += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        errors += 1
                    choices = chunk.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            ttfts.append(now - started)
                        else:
                            itls.append(now - last)
                        last = now
                        tokens += 1
        except httpx.HTTPError:
            errors += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            await one(client)

    async with httpx.AsyncClient(base_url=run.base_url, headers=headers, limits=limits, timeout=300) as client:
        await one(client)  # warm-up, not counted
        ttfts.clear(), itls.clear()
        tokens = errors = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(
        system=run.name, api=path, concurrency=concurrency, requests=prompts, errors=errors,
        output_tokens_per_s=tokens / elapsed, requests_per_s=prompts / elapsed,
        ttft_p50_ms=percentile_ms(ttfts, 50), ttft_p99_ms=percentile_ms(ttfts, 99),
        itl_p50_ms=percentile_ms(itls, 50), itl_p99_ms=percentile_ms(itls, 99),
    )


def percentile_ms(values: list[float], q: int) -> float:
    """The q-th percentile of durations in seconds, in milliseconds."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000
