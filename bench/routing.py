"""`python -m bench.routing` (`make bench-routing`): what each routing policy leaves to vLLM's
prefix cache, on the real small engine with two replicas.

One multi-turn chat workload (conversations sharing one long system prompt, their turns
interleaved: turn 1 of every conversation, then turn 2, ...) is run against the same model four
times: two replicas under Serve's default router, under `prefix_cache` and under `session`, and
one replica alone, which holds every conversation's history and is the upper bound of the hit
rate. Each run gets a fresh deployment, so every run starts with cold caches.

The hit rate is vLLM's own: its `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits`
counters (prompt tokens looked up, and found, in the prefix cache), which every replica's engine
exports through Ray's metrics with the replica's id (`ReplicaId`), read from Ray's Prometheus
endpoint before and after each run. TTFT is the client's: from sending the streamed request to
its first content chunk.

Writes bench/results/routing.{json,md} and the table into docs/benchmarks.md between its
bench-routing:begin and bench-routing:end markers.

    python -m bench.routing [--conversations 12] [--turns 6] [--no-docs]
"""

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import report, systems
from bench.load import percentile_ms
from cluster import runtime
from cluster.load import load
from cluster.schema import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN = "<!-- bench-routing:begin -->"
END = "<!-- bench-routing:end -->"
APP = "routing"
QUERIES = "vllm_prefix_cache_queries"
HITS = "vllm_prefix_cache_hits"
POLICIES: dict[str, tuple[int, dict[str, Any] | None]] = {  # run: (replicas, routing)
    "default": (2, None),
    "prefix_cache": (2, {"policy": "prefix_cache"}),
    "session": (2, {"policy": "session"}),
    "one replica": (1, None),
}
TOPICS = (
    "lighthouses",
    "bread",
    "volcanoes",
    "chess",
    "rivers",
    "bees",
    "trains",
    "glaciers",
    "violins",
    "deserts",
    "comets",
    "gardens",
    "bridges",
    "owls",
    "tides",
    "maps",
)
FOLLOW_UPS = (
    "Tell me one fact about {topic}.",
    "Why does that matter?",
    "Give an example.",
    "Say it more simply.",
    "What is a common mistake about it?",
    "Sum it up in one sentence.",
    "What should I read next?",
    "Ask me a question about it.",
)


# The workload


def system_prompt(rules: int) -> str:
    """A long, fixed system prompt shared by every conversation (a product's instructions): about
    27 tokens of SmolLM2's tokenizer per rule. Deterministic, so that runs compare."""
    lines = ["You are a careful assistant for a museum's visitors. Follow these house rules."]
    lines += [
        f"Rule {index}: answer in plain words, keep to the visitor's question, and never invent a date ({index})."
        for index in range(1, rules + 1)
    ]
    return "\n".join(lines)


def user_turns(conversations: int, turns: int) -> list[list[str]]:
    """Each conversation's user messages, one per turn; conversations differ from their first
    user message on, so that only the system prompt is shared between them."""
    if turns > len(FOLLOW_UPS):
        raise ValueError(f"at most {len(FOLLOW_UPS)} turns")
    return [
        [
            FOLLOW_UPS[turn].format(topic=TOPICS[index % len(TOPICS)]) + (f" (visitor {index})" if turn == 0 else "")
            for turn in range(turns)
        ]
        for index in range(conversations)
    ]


def interleaved(conversations: int, turns: int) -> list[list[int]]:
    """The order requests are sent in, round by round: turn t of every conversation is sent before
    turn t+1 of any, which is what scatters a conversation's turns under a load-based router."""
    return [list(range(conversations)) for _ in range(turns)]


# The counters


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _metric(name: str) -> str:
    """Ray names vLLM's `vllm:prefix_cache_hits` `ray_vllm_prefix_cache_hits(_total)`."""
    name = name.removeprefix("ray_")
    return name.removesuffix("_total")


def per_replica(samples: Samples, metric: str) -> dict[str, float]:
    """A counter's value per Serve replica (its engines summed: one per replica here)."""
    totals: dict[str, float] = {}
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if _metric(name) == metric and "ReplicaId" in tags:
            totals[tags["ReplicaId"]] = totals.get(tags["ReplicaId"], 0.0) + value
    return totals


@dataclass(frozen=True)
class CacheFigures:
    queries: float
    hits: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else float("nan")


def cache_deltas(before: Samples, after: Samples, replicas: Iterable[str]) -> dict[str, CacheFigures]:
    """What each of `replicas` looked up and found in its prefix cache between two scrapes. A
    replica absent from `before` (its engine had not exported yet) counts from zero."""
    queries = (per_replica(before, QUERIES), per_replica(after, QUERIES))
    hits = (per_replica(before, HITS), per_replica(after, HITS))
    return {
        replica: CacheFigures(
            queries=queries[1].get(replica, 0.0) - queries[0].get(replica, 0.0),
            hits=hits[1].get(replica, 0.0) - hits[0].get(replica, 0.0),
        )
        for replica in replicas
    }


def overall(figures: Mapping[str, CacheFigures]) -> CacheFigures:
    """Token-weighted over the replicas: hits over queries summed, not a mean of their rates."""
    return CacheFigures(queries=sum(f.queries for f in figures.values()), hits=sum(f.hits for f in figures.values()))


# One run


@dataclass
class RunResult:
    name: str
    replicas: int
    started_in_s: float
    seconds: float
    requests: int
    errors: int
    ttfts: list[float]
    per_replica: dict[str, CacheFigures]
    system_tokens: int
    total: CacheFigures = field(init=False)

    def __post_init__(self) -> None:
        self.total = overall(self.per_replica)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "replicas": self.replicas,
            "started_in_s": round(self.started_in_s, 1),
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "errors": self.errors,
            "ttft_p50_ms": round(percentile_ms(self.ttfts, 50), 1),
            "ttft_p99_ms": round(percentile_ms(self.ttfts, 99), 1),
            "ttft_mean_ms": round(statistics.fmean(self.ttfts) * 1000, 1) if self.ttfts else None,
            "hit_rate": _rate(self.total),
            "queries": self.total.queries,
            "hits": self.total.hits,
            "per_replica": {replica: asdict(f) | {"hit_rate": _rate(f)} for replica, f in self.per_replica.items()},
        }


def _rate(figures: CacheFigures) -> float | None:
    """JSON has no NaN: a replica that was asked nothing has no rate."""
    return None if math.isnan(figures.hit_rate) else figures.hit_rate


async def _turn(
    client: httpx.AsyncClient, model: str, conversation: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float | None, str]:
    """One streamed turn: its time to first content chunk and its whole answer (the next turn's
    history). The session id goes with every policy's requests; only `session` reads it."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.monotonic()
    first: float | None = None
    answer = []
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-session-id": conversation}
    ) as response:
        if response.status_code != 200:
            await response.aread()
            raise httpx.HTTPStatusError(response.text, request=response.request, response=response)
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    first = first if first is not None else time.monotonic() - started
                    answer.append(text)
    return first, "".join(answer)


async def workload(
    base_url: str, model: str, prompt: str, turns: list[list[str]], concurrency: int, max_tokens: int
) -> tuple[list[float], int]:
    """Every conversation's turns, round by round, at most `concurrency` requests at once."""
    histories = [[{"role": "system", "content": prompt}] for _ in turns]
    ttfts: list[float] = []
    errors = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, index: int, turn: int) -> None:
        nonlocal errors
        history = histories[index]
        history.append({"role": "user", "content": turns[index][turn]})
        async with gate:
            try:
                ttft, answer = await _turn(client, model, f"conversation-{index}", history, max_tokens)
            except httpx.HTTPError as error:
                print(f"  conversation {index} turn {turn}: {error!r}", flush=True)
                errors += 1
                answer, ttft = "", None
        if ttft is not None:
            ttfts.append(ttft)
        history.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for turn, order in enumerate(interleaved(len(turns), len(turns[0]))):
            await asyncio.gather(*(one(client, index, turn) for index in order))
    return ttfts, errors


def _config(replicas: int, routing: dict[str, Any] | None, args: argparse.Namespace) -> ClusterConfig:
    """configs/local.yaml's model with its engine settings, deployed apart from the ingress (a
    routing policy needs it: docs/design.md), without keys or a ledger, which routing does not
    touch. Eager mode by default: it skips torch.compile's warm-up, so that four deployments of up
    to two engines each start sooner; every run has the same engine either way."""
    raw = load(ROOT / "configs" / "local.yaml").apps["llm"].model_dump()
    model = raw["models"][0]
    raw["auth"] = {"keys": []}
    raw["usage"] = {"enabled": False}
    raw["ingress"]["colocate"] = False
    model["engine"]["enforce_eager"] = args.eager
    model["engine"]["enable_prefix_caching"] = True
    # vLLM's CPU build caches in blocks of 128 tokens, against 16 on a GPU: a hit rate over
    # prompts of a few hundred tokens would be mostly rounding.
    model["engine"]["extra_args"] = dict(model["engine"].get("extra_args") or {}) | {"block_size": args.block_size}
    model["deployment"] |= {"num_replicas": replicas, "autoscaling": None}
    model["routing"] = routing
    return ClusterConfig.model_validate(raw)


def scrape(metrics_url: str) -> Samples:
    return parse_metrics(httpx.get(metrics_url, timeout=10).text)


def settled(metrics_url: str, timeout_s: float = 60) -> Samples:
    """A scrape whose prefix-cache counters hold still over a few report intervals: every step the
    engines took has been exported, so that a run's delta is all of its own."""
    deadline = time.monotonic() + timeout_s
    previous = scrape(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(3)
        current = scrape(metrics_url)
        if per_replica(current, QUERIES) == per_replica(previous, QUERIES) and per_replica(
            current, HITS
        ) == per_replica(previous, HITS):
            return current
        previous = current
    raise RuntimeError("vLLM's prefix-cache counters kept changing with no requests being made")


def new_replicas(samples: Samples, seen: set[str], expected: int) -> list[str]:
    """The replicas of the run just made: those whose counters no earlier run showed (every run
    deploys afresh, and Ray keeps exporting a deleted replica's last values). A replica that
    never exported (no request reached it) is listed as a placeholder, so that it shows."""
    fresh = sorted(set(per_replica(samples, QUERIES)) - seen)
    return fresh + [f"(replica {index + 1}: no requests)" for index in range(len(fresh), expected)]


def run_policy(
    name: str,
    serve_url: str,
    metrics_url: str,
    args: argparse.Namespace,
    prompt: str,
    turns: list[list[str]],
    seen: set[str],
) -> RunResult:
    from ray import serve

    from serve_app.app import build_app

    replicas, routing = POLICIES[name]
    config = _config(replicas, routing, args)
    started = time.monotonic()
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    base_url = f"{serve_url}/{APP}"
    # Answer-ready, on every replica: short prompts, below a cache block, leave nothing to hit.
    asyncio.run(workload(base_url, config.models[0].id, "Be brief.", [["Hi"]] * 4 * replicas, 4, 1))
    started_in_s = time.monotonic() - started
    system_tokens = _count_tokens(base_url, config.models[0].id, prompt)
    before = settled(metrics_url)
    print(f"{name}: {replicas} replica(s) up in {started_in_s:.0f} s; running the workload", flush=True)
    began = time.monotonic()
    ttfts, errors = asyncio.run(
        workload(base_url, config.models[0].id, prompt, turns, args.concurrency, args.max_tokens)
    )
    seconds = time.monotonic() - began
    after = settled(metrics_url)
    ids = new_replicas(after, seen, replicas)
    seen.update(ids)
    serve.delete(APP)
    result = RunResult(
        name=name,
        replicas=replicas,
        started_in_s=started_in_s,
        seconds=seconds,
        requests=sum(len(t) for t in turns),
        errors=errors,
        ttfts=ttfts,
        per_replica=cache_deltas(before, after, ids),
        system_tokens=system_tokens,
    )
    print(markdown([result], {}), flush=True)
    return result


# Reporting


def markdown(results: list[RunResult], meta: Mapping[str, Any]) -> str:
    lines = []
    if meta:
        lines += [
            f"Model `{meta['model']}` ({meta['engine']}); {meta['conversations']} conversations of "
            f"{meta['turns']} turns, interleaved, sharing a {meta['system_tokens']}-token system prompt; "
            f"{meta['max_tokens']}-token greedy answers, at most {meta['concurrency']} requests at once; "
            f"{meta['machine']}; {meta['layout']}. Each run on a fresh deployment (cold caches); "
            f"the whole bench took {meta['total_s']} s. Hit rate: vLLM's prefix-cache hits over queries "
            "(prompt tokens), per replica and overall; prefilled: the prompt tokens not found in a cache.",
            "",
        ]
    lines += [
        "| routing | replicas | hit rate overall | of one replica's | prefilled tokens | "
        "hit rate per replica (hits / queries tokens) | TTFT p50 / p99 ms | requests | errors | run s |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    bound = next((r for r in results if r.replicas == 1), None)
    for r in results:
        replicas = ", ".join(_replica_cell(f) for _, f in sorted(r.per_replica.items()))
        share = f"{r.total.hit_rate / bound.total.hit_rate:.0%}" if bound and bound.total.hits else ""
        lines.append(
            f"| {r.name} | {r.replicas} | {r.total.hit_rate:.1%} | {share} | {r.total.queries - r.total.hits:.0f} | "
            f"{replicas} | {percentile_ms(r.ttfts, 50):.0f} / {percentile_ms(r.ttfts, 99):.0f} | {r.requests} | "
            f"{r.errors} | {r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _replica_cell(figures: CacheFigures) -> str:
    if not figures.queries:
        return "no requests"
    return f"{figures.hit_rate:.1%} ({figures.hits:.0f} / {figures.queries:.0f})"


def docs_section(table: str) -> str:
    note = "<!-- Written by `make bench-routing` (bench/routing.py): edit outside the markers. -->"
    return f"{BEGIN}\n{note}\n\n{table}{END}"


def _count_tokens(base_url: str, model: str, text: str) -> int:
    response = httpx.post(f"{base_url}/tokenize", json={"model": model, "prompt": text}, timeout=60)
    response.raise_for_status()
    return int(response.json()["count"])


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rules", type=int, default=15, help="lines of the system prompt (~27 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=24, help="each answer's length")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32, help="vLLM's KV-cache block, in tokens")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--runs", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=report.DOCS)
    parser.add_argument("--no-docs", dest="docs", action="store_const", const=None)
    args = parser.parse_args()
    if args.docs is not None:
        report.marked_section(args.docs.read_text(), "", BEGIN, END)  # before the run, not after it

    import ray
    from ray import serve

    split = runtime.core_split()
    if split is not None:
        # As `make serve` runs it: both replicas' engines on the engine's cores, the rest apart.
        runtime.pin(split)
    os.environ.update(runtime.NODE_ENV)
    metrics_port = systems.free_port()
    began = time.monotonic()
    # A cluster of this process's own (`address="local"`), never one already on the host, with
    # metrics reported every second rather than every ten so that a run's counters settle soon.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    results: list[RunResult] = []
    try:
        port = systems.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_url = f"http://127.0.0.1:{port}"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        prompt = system_prompt(args.rules)
        turns = user_turns(args.conversations, args.turns)
        seen: set[str] = set()
        for name in args.runs:
            results.append(run_policy(name, serve_url, metrics_url, args, prompt, turns, seen))
    finally:
        serve.shutdown()
        ray.shutdown()
    model_config = _config(1, None, args).models[0]
    meta = {
        "model": model_config.id,
        "engine": f"vLLM CPU, {'eager' if args.eager else 'compiled'}, prefix caching on, "
        f"{args.block_size}-token blocks",
        "conversations": args.conversations,
        "turns": args.turns,
        "system_tokens": results[0].system_tokens if results else 0,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "layout": (
            f"both replicas' engines on core(s) {','.join(map(str, split.engine))}, everything else on core {split.ray}"
            if split
            else "unpinned"
        ),
        "total_s": round(time.monotonic() - began),
    }
    table = markdown(results, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(
        json.dumps({"meta": meta, "runs": [r.as_dict() for r in results]}, indent=2) + "\n"
    )
    (args.out / "routing.md").write_text(table)
    if args.docs is not None:
        args.docs.write_text(report.marked_section(args.docs.read_text(), docs_section(table), BEGIN, END))
    print(table)
    print(f"whole bench: {meta['total_s']} s")


if __name__ == "__main__":
    main()
