"""A bounded soak: a mixed load against the real model through the whole stack, to see that
nothing leaks and nothing is miscounted over thousands of requests.

`configs/local.yaml` as shipped (the engine colocated in the ingress replica), with keys made
through the admin API per class of request, so that the ledger's totals can be set against what
the clients were told, per class. Classes, taken in turn at the given concurrency: whole `/llm`
answers, `/llm` streams, `/v1` streams, streams left after their first chunk (departed clients),
bad bodies (400), and an over-limit key (429 past its requests per minute). Reports the statuses
per class, errors by class (any status the class does not expect), the ingress replica's memory
(RSS, engine processes apart) at start and end, and whether the ledger holds exactly the usage
the clients were given.

    python -m bench.soak [--requests 3000] [--concurrency 16] [--max-minutes 60]
"""

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from bench import report, systems
from cluster.load import load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
CLASSES = ("whole", "stream", "openai_stream", "departed", "bad_input", "over_limit")
EXPECTED = {
    "whole": {"200"},
    "stream": {"200"},
    "openai_stream": {"200"},
    "departed": {"200"},
    "bad_input": {"400"},
    "over_limit": {"200", "429"},
}
PROMPT = [{"role": "user", "content": "Name three colours."}]


def _ingress_rss_mb() -> float:
    """The ingress replica's own memory: the engine's processes are its children, counted apart."""
    for process in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:llm:" in part for part in process.info["cmdline"] or []):
            return process.memory_info().rss / 2**20
    return float("nan")


async def _one(client: httpx.AsyncClient, kind: str, keys: dict[str, str], told: Counter) -> int:
    headers = {"Authorization": f"Bearer {keys[kind]}"}
    body = {"messages": PROMPT, "max_tokens": 16}
    if kind == "whole":
        response = await client.post("/llm", json=body, headers=headers)
        if response.status_code == 200:
            told[kind] += response.json()["usage"]["total_tokens"]
        return response.status_code
    if kind == "bad_input":
        return (await client.post("/llm", content=b'{"messages": "not a list"', headers=headers)).status_code
    if kind == "over_limit":
        return (await client.post("/llm", json=body, headers=headers)).status_code
    path, payload = "/llm", body | {"stream": True}
    if kind == "openai_stream":
        path = "/v1/chat/completions"
        payload |= {"model": "smollm2", "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=payload, headers=headers) as response:
        usage = None
        async for line in response.aiter_lines():
            if kind == "departed":
                break  # the client leaves after its first line
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        if usage is not None and kind != "departed":
            told[kind] += usage["total_tokens"]
        return response.status_code


async def _soak(url: str, keys: dict[str, str], requests: int, concurrency: int, deadline: float) -> dict:
    statuses: dict[str, Counter] = {kind: Counter() for kind in CLASSES}
    told: Counter = Counter()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(CLASSES[index % len(CLASSES)])

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            kind = queue.get_nowait()
            try:
                statuses[kind][str(await _one(client, kind, keys, told))] += 1
            except httpx.HTTPError as error:
                statuses[kind][type(error).__name__] += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {"statuses": {kind: dict(counts) for kind, counts in statuses.items()}, "told": dict(told)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-minutes", type=float, default=60)
    parser.add_argument("--port", type=int, default=8230)
    args = parser.parse_args()
    config = load(ROOT / "configs" / "local.yaml").apps["llm"]
    with (
        tempfile.TemporaryDirectory() as folder,
        systems.our_apps({"": config}, args.port, Path(folder), name="soak") as [run],
        httpx.Client(base_url=run.base_url, headers={"Authorization": f"Bearer {run.api_key}"}, timeout=60) as admin,
    ):
        keys = {}
        for kind in CLASSES:
            limits = {"requests_per_minute": 5} if kind == "over_limit" else {}
            made = admin.post("/admin/keys", json={"name": f"soak-{kind}", "limits": limits})
            made.raise_for_status()
            keys[kind] = made.json()["key"]
        time.sleep(1.5)  # every replica holds the new keys within a second (docs/design.md)
        rss_start = _ingress_rss_mb()
        started = time.monotonic()
        outcome = asyncio.run(
            _soak(run.base_url, keys, args.requests, args.concurrency, started + args.max_minutes * 60)
        )
        elapsed = time.monotonic() - started
        rss_end = _ingress_rss_mb()
        ledger = {
            row["key"]: row
            for row in admin.get("/admin/usage", params={"group_by": "key"}).json()["data"]
            if row["key"] and row["key"].startswith("soak-")
        }
    errors = {
        kind: {status: count for status, count in counts.items() if status not in EXPECTED[kind]}
        for kind, counts in outcome["statuses"].items()
    }
    matches = {
        kind: ledger.get(f"soak-{kind}", {}).get("total_tokens") == outcome["told"].get(kind)
        for kind in ("whole", "stream", "openai_stream")
    }
    result = {
        "requests": sum(sum(counts.values()) for counts in outcome["statuses"].values()),
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 1),
        "statuses": outcome["statuses"],
        "errors_by_class": errors,
        "ingress_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
        "tokens_told": outcome["told"],
        "ledger_tokens": {kind: ledger.get(f"soak-{kind}", {}).get("total_tokens") for kind in CLASSES},
        "ledger_rows": {kind: ledger.get(f"soak-{kind}", {}).get("requests") for kind in CLASSES},
        "ledger_equals_clients": matches,
    }
    report.save(result, RESULTS)


if __name__ == "__main__":
    main()
