"""`python -m bench.relay`: what a streamed token costs the serving layers in CPU time, on this
machine: bare vLLM's OpenAI server, our stack in both layouts (colocated as configs/local.yaml,
and ingress and model apart) and Ray Serve LLM, on the real small engine under the same streaming
load; then what one ingress replica relays per CPU core over the zero-cost engine.

CPU time, not wall time: on a shared machine a process's user and system seconds move far less
with the neighbours' load than its latency does, so CPU seconds per 1,000 streamed tokens is the
figure to compare. Each process of a system (those in the sessions the bench started it in,
`systems.Running.sessions`) is read before and after the load, by psutil, and put in one of:

- the serving layers: everything but vLLM's engine processes (`VLLM::EngineCore`,
  `VLLM::Worker…`): for bare vLLM its API server, for the Ray systems Serve's proxy, the measured
  application's replicas and the actors they made;
- Ray's daemons (raylet, GCS, agents, dashboard, log monitor, Serve's controller, `serve run`),
  reported apart;
- the engine, reported apart;
- idle: another application's replicas and engines in the same Serve instance (both of our
  layouts run side by side, measured one at a time), not counted.

A process started during the load is counted from zero; one that ended during it is lost.

    python -m bench.relay [--concurrency 1 16] [--output-len 64] [--requests-per-stream 4]
        [--systems bare ours ray-llm overhead]
"""

import argparse
import asyncio
import os
import platform
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench import report, systems
from bench.__main__ import OVERHEAD_LAYOUTS, benchmarked, overhead_configs, sse_body
from bench.load import sse_load
from cluster import runtime
from cluster.schema import ClusterConfig
from serve_app.ingress import Ingress
from serve_app.models.deployment import deployment_options

RESULTS = Path(__file__).resolve().parent / "results"
SERVING, RAY, ENGINE, IDLE = "serving", "ray", "engine", "idle"
PROXY = "Serve proxy"
API_SERVER = "vLLM API server"
BARE = "bare vLLM"
TARGET_RATIO = 1.25
TARGET_CONCURRENCIES = (1, 16)
RAY_DAEMONS = {  # a program's name: its label
    "gcs_server": "gcs_server",
    "raylet": "raylet",
    "log_monitor.py": "log_monitor",
    "monitor.py": "autoscaler monitor",
    "dashboard.py": "dashboard",
    "agent.py": "dashboard agent",
    "ray.util.client.server": "Ray client server",
    "serve": "serve run",
}
RAY_ACTORS = {"ServeController": "Serve controller", "IDLE": "idle Ray workers"}
"""Ray's own actors; any other actor (`ray::_Limits`, our rate limiter's) is the application's."""
METHOD = re.compile(r"\.[A-Za-z_]\w*$")
"""The method Ray appends to an actor's title while it runs one (`…:key-registry.handle_request`)."""


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    started: float
    """Its start time: a pid reused during the load is another process."""
    argv: tuple[str, ...]
    cpu_s: float
    """User and system seconds, all its threads."""


def snapshot(sessions: Iterable[int]) -> dict[int, Proc]:
    """Every live process of these sessions, by pid."""
    wanted = set(sessions)
    table = {}
    for process in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) not in wanted:
                continue
            with process.oneshot():
                times = process.cpu_times()
                argv = tuple(part for part in process.cmdline() if part) or (process.name(),)
                table[process.pid] = Proc(
                    process.pid, process.ppid(), process.create_time(), argv, times.user + times.system
                )
    return table


def cpu_deltas(before: Mapping[int, Proc], after: Mapping[int, Proc]) -> dict[int, float]:
    """Each live process's CPU seconds between the two snapshots; from zero for one that started
    between them, or whose pid an earlier process held."""
    deltas = {}
    for pid, proc in after.items():
        earlier = before.get(pid)
        deltas[pid] = proc.cpu_s - (earlier.cpu_s if earlier is not None and earlier.started == proc.started else 0.0)
    return deltas


def program(argv: tuple[str, ...]) -> str:
    """What a process runs, by name: an interpreter's script or module rather than the
    interpreter (`python -u …/log_monitor.py` is `log_monitor.py`), a binary's file name."""
    parts = list(argv)
    if parts and Path(parts[0]).name.startswith("python"):
        parts = parts[1:]
        while parts and parts[0].startswith("-") and parts[0] != "-m":
            parts = parts[1:]
        if parts[:1] == ["-m"]:
            return parts[1] if len(parts) > 1 else ""
    return Path(parts[0]).name if parts else ""


def replica(argv: tuple[str, ...]) -> tuple[str, str] | None:
    """A Serve replica's application and deployment, from its title (`ray::ServeReplica:app:name`)."""
    if not argv or not argv[0].startswith("ray::ServeReplica:"):
        return None
    app, _, deployment = argv[0].removeprefix("ray::ServeReplica:").partition(":")
    return app, METHOD.sub("", deployment)


def _titled(argv: tuple[str, ...]) -> tuple[str, str] | None:
    """The group and label a process's own title or program gives it; None for a process that is
    only known by what started it (a helper, a server's root process)."""
    title = argv[0] if argv else ""
    if title.startswith("VLLM::EngineCore"):
        return ENGINE, "EngineCore"
    if title.startswith("VLLM::Worker"):
        return ENGINE, "Worker"
    if title.startswith("ray::ProxyActor"):
        return SERVING, PROXY
    if (served := replica(argv)) is not None:
        return SERVING, f"replica {served[1]}"
    if title.startswith("ray::"):
        actor = METHOD.sub("", title.removeprefix("ray::"))
        if actor in RAY_ACTORS:
            return RAY, RAY_ACTORS[actor]
        if actor.endswith("Agent"):
            return RAY, actor
        return SERVING, f"actor {actor}"
    name = program(argv)
    if name in RAY_DAEMONS:
        return RAY, RAY_DAEMONS[name]
    return None


def role(pid: int, table: Mapping[int, Proc], app: str | None) -> tuple[str, str]:
    """A process's group and label. `app`: the Serve application measured, whose replicas, and the
    engines and helpers under them, are counted (those of any other application are idle); None
    for a system without Ray, whose processes but the engine's are its API server. A process
    without a title of its own counts as the nearest ancestor that has one."""
    chain = []
    current: int | None = pid
    while current is not None and current in table and current not in chain:
        chain.append(current)
        current = table[current].ppid
    owner = next((served for p in chain if (served := replica(table[p].argv)) is not None), None)
    if app is not None and owner is not None and owner[0] != app:
        return IDLE, f"{owner[0]}: {owner[1]}"
    for p in chain:
        titled = _titled(table[p].argv)
        if titled is not None:
            return titled
    return (SERVING, API_SERVER) if app is None else (IDLE, program(table[pid].argv) or "unknown")


def tally(before: Mapping[int, Proc], after: Mapping[int, Proc], app: str | None) -> dict[str, dict[str, float]]:
    """CPU seconds over the load, by group and label."""
    groups: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, seconds in cpu_deltas(before, after).items():
        group, label = role(pid, after, app)
        groups[group][label] += seconds
    return {group: dict(labels) for group, labels in groups.items()}


@dataclass
class Reading:
    system: str
    layout: str
    route: str
    concurrency: int
    requests: int
    errors: int
    tokens: int
    """Streamed content chunks the client received, one token each."""
    elapsed_s: float
    cpu_s: dict[str, dict[str, float]]

    def seconds(self, group: str, labels: Iterable[str] | None = None) -> float:
        spent = self.cpu_s.get(group, {})
        return sum(spent.values()) if labels is None else sum(spent.get(label, 0.0) for label in labels)

    def per_1k(self, group: str) -> float:
        return self.seconds(group) * 1000 / self.tokens if self.tokens else float("nan")

    @property
    def name(self) -> str:
        return f"{self.system}, {self.layout}" if self.layout else self.system


def measure(
    run: systems.Running,
    app: str | None,
    system: str,
    layout: str,
    path: str,
    body: dict,
    concurrency: int,
    prompts: int,
) -> Reading:
    """One load, its processes read around it: after a warm-up of one request per stream, so that
    one-time costs (a first request's imports, compilation, connections) stay out of it."""
    asyncio.run(sse_load(run, path, body, concurrency, concurrency, warm_up=False))
    before = snapshot(run.sessions)
    samples = asyncio.run(sse_load(run, path, body, concurrency, prompts, warm_up=False))
    after = snapshot(run.sessions)
    reading = Reading(
        system,
        layout,
        path,
        concurrency,
        samples.requests,
        samples.errors,
        samples.tokens,
        samples.elapsed_s,
        tally(before, after, app),
    )
    print(
        f"{reading.name} {path} c={concurrency}: {reading.tokens} tokens in {reading.elapsed_s:.1f} s, "
        f"serving {reading.per_1k(SERVING):.3f} s / 1k, Ray {reading.per_1k(RAY):.3f}, "
        f"engine {reading.per_1k(ENGINE):.3f}",
        flush=True,
    )
    return reading


def ratio_to_bare(readings: list[Reading], reading: Reading) -> float | None:
    """Serving CPU per token over bare vLLM's API server's at the same concurrency, in this run."""
    bare = next((r for r in readings if r.system == BARE and r.concurrency == reading.concurrency), None)
    if bare is None or reading.system == BARE:
        return None
    return reading.per_1k(SERVING) / bare.per_1k(SERVING)


def targets(readings: list[Reading]) -> list[str]:
    """Issue 20's targets, told, not asserted: each of our layouts at most 1.25 × bare vLLM's
    serving CPU per token, and below Ray Serve LLM's, at concurrency 1 and 16."""
    lines = []
    for reading in readings:
        if reading.system != "ours" or reading.concurrency not in TARGET_CONCURRENCIES:
            continue
        ratio = ratio_to_bare(readings, reading)
        peer = next((r for r in readings if r.system == "Ray Serve LLM" and r.concurrency == reading.concurrency), None)
        verdicts = []
        if ratio is not None:
            verdicts.append(f"{ratio:.2f} × bare vLLM's ({'met' if ratio <= TARGET_RATIO else 'missed'})")
        if peer is not None:
            below = reading.per_1k(SERVING) < peer.per_1k(SERVING)
            verdicts.append(
                f"{'below' if below else 'not below'} Ray Serve LLM's {peer.per_1k(SERVING):.3f} s "
                f"({'met' if below else 'missed'})"
            )
        if verdicts:
            lines.append(f"- {reading.name}, concurrency {reading.concurrency}: " + "; ".join(verdicts))
    return lines


def _by_process(reading: Reading) -> str:
    spent = sorted(reading.cpu_s.get(SERVING, {}).items(), key=lambda item: -item[1])
    return ", ".join(f"{label} {seconds * 1000 / reading.tokens:.3f}" for label, seconds in spent if seconds > 0)


def markdown(readings: list[Reading], relays: list[dict], meta: Mapping) -> str:
    lines = []
    if readings:
        lines += [
            f"Model `{meta['model']}`, {meta['output_len']}-token greedy answers streamed, "
            f"{meta['requests_per_stream']} requests per stream (at least 8); {meta['machine']}; {meta['layout']}. "
            "CPU: user + system seconds per 1,000 streamed tokens, by psutil, over the load.",
            "",
            "| system | route | conc. | streamed tokens | tok/s | serving layers CPU s / 1k tokens | vs bare vLLM "
            "| Ray daemons s / 1k | engine s / 1k | serving layers by process (s / 1k) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in readings:
            ratio = ratio_to_bare(readings, r)
            lines.append(
                f"| {r.name} | {r.route} | {r.concurrency} | {r.tokens} | {r.tokens / r.elapsed_s:.1f} | "
                f"{r.per_1k(SERVING):.3f} | {f'{ratio:.2f}×' if ratio is not None else ''} | "
                f"{'–' if r.system == BARE else f'{r.per_1k(RAY):.3f}'} | {r.per_1k(ENGINE):.3f} | {_by_process(r)} |"
            )
        if met := targets(readings):
            lines += ["", f"Targets (at most {TARGET_RATIO} × bare vLLM's, below Ray Serve LLM's):", "", *met]
    if relays:
        lines += [
            "",
            f"Relay capacity over the zero-cost engine ({meta['overhead_tokens']} tokens per request, `/llm`, "
            "every core open): streamed tokens per CPU-second of Serve's proxy and the ingress replica.",
            "",
            "| layout | conc. | streamed tokens | tok/s | proxy + ingress CPU s | tokens per CPU-s | "
            "serving layers s / 1k | serving layers by process (s / 1k) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for relay in relays:
            r = Reading(**relay["reading"])
            lines.append(
                f"| {r.layout} | {r.concurrency} | {r.tokens} | {r.tokens / r.elapsed_s:.0f} | "
                f"{relay['proxy_ingress_cpu_s']:.2f} | {relay['tokens_per_cpu_s']:.0f} | "
                f"{r.per_1k(SERVING):.3f} | {_by_process(r)} |"
            )
    return "\n".join(lines) + "\n"


def _layout(config: ClusterConfig, colocate: bool) -> ClusterConfig:
    return config.model_copy(update={"ingress": config.ingress.model_copy(update={"colocate": colocate})})


def _ingress(config: ClusterConfig) -> str:
    """The label of the replica that takes the requests: colocated, the model's deployment."""
    return f"replica {deployment_options(config.models[0])['name'] if config.ingress.colocate else Ingress.name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/local.yaml", help="its first model is served")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4, help="per concurrent stream (at least 8 in all)")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["bare", "ours", "ray-llm", "overhead"],
        choices=["bare", "ours", "ray-llm", "overhead"],
    )
    parser.add_argument("--overhead-concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--overhead-requests-per-stream", type=int, default=10)
    parser.add_argument("--port", type=int, default=8120)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    began = time.monotonic()
    all_cores = os.sched_getaffinity(0)
    split = runtime.core_split()
    if split is not None:
        runtime.pin(split)  # as `make serve` runs ours, for every system alike
    config, model_path = benchmarked(args.config)
    model = config.models[0]
    logs = args.out / "logs"
    readings: list[Reading] = []

    def loads(run: systems.Running, app: str | None, system: str, layout: str, path: str) -> None:
        body = sse_body(path, model.id, args.output_len)
        for concurrency in args.concurrency:
            prompts = max(8, args.requests_per_stream * concurrency)
            readings.append(measure(run, app, system, layout, path, body, concurrency, prompts))

    if "bare" in args.systems:
        with systems.bare_vllm(model, model_path, args.port, logs) as run:
            loads(run, None, BARE, "", "/v1/chat/completions")
    if "ours" in args.systems:
        layouts = {prefix: _layout(config, colocate) for prefix, (_, colocate) in OVERHEAD_LAYOUTS.items()}
        with systems.our_apps(layouts, args.port, logs, name="ours") as runs:
            for prefix, run in zip(layouts, runs, strict=True):
                loads(run, prefix, "ours", OVERHEAD_LAYOUTS[prefix][0], "/llm")
    if "ray-llm" in args.systems:
        with systems.ray_serve_llm(model, model_path, args.port, logs) as run:
            loads(run, "llm", "Ray Serve LLM", "", "/v1/chat/completions")
    relays = []
    overhead_tokens = 64
    if "overhead" in args.systems:
        # A zero-cost engine needs no core of its own: the stack has them all, as beside a GPU.
        os.sched_setaffinity(0, all_cores)
        zero_cost = overhead_configs()
        words = " ".join(f"w{i}" for i in range(overhead_tokens))
        with systems.our_apps(
            zero_cost, args.port, logs, name="zero-cost engine", import_path="bench.overhead:build_app"
        ) as runs:
            for concurrency in args.overhead_concurrency:
                for (prefix, layout_config), run in zip(zero_cost.items(), runs, strict=True):
                    body = {
                        "messages": [{"role": "user", "content": words}],
                        "max_tokens": overhead_tokens,
                        "stream": True,
                    }
                    prompts = args.overhead_requests_per_stream * concurrency
                    reading = measure(
                        run, prefix, "zero-cost engine", OVERHEAD_LAYOUTS[prefix][0], "/llm", body, concurrency, prompts
                    )
                    relayed = reading.seconds(SERVING, [PROXY, _ingress(layout_config)])
                    relays.append(
                        {
                            "reading": asdict(reading),
                            "ingress": _ingress(layout_config),
                            "proxy_ingress_cpu_s": relayed,
                            "tokens_per_cpu_s": reading.tokens / relayed if relayed else float("nan"),
                        }
                    )
    meta = {
        "model": model.id,
        "output_len": args.output_len,
        "requests_per_stream": args.requests_per_stream,
        "overhead_tokens": overhead_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "layout": (
            f"vLLM's processes on cores {','.join(map(str, split.engine))}, everything else on core {split.ray}"
            if split
            else "unpinned"
        ),
        "total_s": round(time.monotonic() - began),
    }
    table = markdown(readings, relays, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relay.md").write_text(table)
    result = {"meta": meta, "readings": [asdict(r) for r in readings], "relays": relays}
    report.save(result, args.out / "relay.json", show=False)
    print(f"whole bench: {meta['total_s']} s")


if __name__ == "__main__":
    main()
