"""How the processes of a Ray node should run for this application: the Ray and Serve settings
that Ray reads only from the environment of the processes it starts, and on a host without a GPU,
which cores the engine keeps to itself. `make serve`, the tests, the benchmark and the KubeRay manifest
all take them from here; on a cluster of your own, `python -m cluster env` prints them as exports
to run before `ray start` on every node."""

import os
import re
import shutil
import signal
import subprocess
from contextlib import suppress
from dataclasses import dataclass

import psutil

NODE_ENV = {
    # Serve's HTTP proxy reaches the ingress over gRPC rather than Ray actor calls (the ingress
    # reaches the models over gRPC too, in code: serve_app/routing/router.py).
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    # Requests, replica routing and user code on one event loop per process instead of three
    # threads handing every request and every streamed chunk to each other.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Replica logs go to their files under the session's logs/serve/ only, not also through
    # stderr, Ray's log monitor and the GCS to the driver's terminal for every request.
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # Ray starts its workers at nice 15, below its own daemons (dashboard, agents, GCS) and
    # anything else on the host. Our workers are the server: the replicas, and the vLLM processes
    # they start, whose scheduler loop is on the path of every token.
    "RAY_worker_niceness": "0",
    # A replica's vLLM engine (`VLLM::EngineCore` and its `VLLM::Worker`) runs in child
    # processes of the replica's worker that nothing else tracks: a worker that dies without
    # shutting its engine down (killed, crashed, stopped while starting it) would leave the engine
    # running, reparented to init, with its weights, KV cache and GPU memory. With this, Ray starts
    # each worker in a process group of its own and kills the group when the worker exits. It is
    # Ray 2.60's default, pinned because a clean stop rests on it and Ray's documentation still
    # calls it off by default; the older alternative, a subreaper raylet, Ray now deprecates.
    "RAY_process_group_cleanup_enabled": "1",
}
"""Without the process-group cleanup a replica's engine can outlive its replica; without the others
everything works, only slower: what they buy together is measured in docs/design.md."""


@dataclass(frozen=True)
class CoreSplit:
    engine: list[int]
    ray: int


def core_split() -> CoreSplit | None:
    """On a host without a GPU, vLLM's processes get every core but the last and Ray's processes
    (proxy, ingress, controller, ...) the last. Left to the scheduler, they preempt the engine's
    threads, and every token waits for the slowest of them (docs/design.md)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or has_gpu():
        return None
    return CoreSplit(engine=cores[:-1], ray=cores[-1])


def has_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pin(split: CoreSplit) -> None:
    """Binds vLLM's compute threads (through the environment) and this process to their cores;
    whatever this process starts (Ray, `serve run`, a load generator) inherits both."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, split.engine))
    os.sched_setaffinity(0, {split.ray})


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def take_stop_signals() -> None:
    """Ctrl-C and SIGTERM stop the server however it was started. A shell without job control (a
    script, `make serve &` in one) starts its background jobs with SIGINT ignored; `exec` keeps an
    ignored or blocked signal, and Python installs its KeyboardInterrupt only over the default, so
    `serve run` would ignore every Ctrl-C for good. A server takes its stop signals, ignored or
    not, as uvicorn and `vllm serve` do (they set their handlers): so the script's Ctrl-C stops
    this server too, which is how an operator stops it."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def engine_cores() -> set[int] | None:
    """The cores vLLM's compute threads are bound to, as `pin` left them in the environment that
    every process of the node inherits; None where vLLM places them itself."""
    cores: set[int] = set()
    for part in re.split(r"[,|]", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")):
        first, _, last = part.partition("-")
        if not (first.isdigit() and (last.isdigit() or not last)):
            return None
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def schedulers_to_engine_cores(started_by: int | None = None) -> None:
    """Moves vLLM's scheduler processes (`VLLM::EngineCore`; those started by process
    `started_by`, else all) to the engine's cores. A scheduler inherits the cores of the process
    that starts it, the one left to Ray's processes; it spin-waits on its workers between steps,
    and there it starved the proxy, the replica and local clients (one on that core received
    whole answers in one late burst). Its threads are moved one by one: affinity is per thread."""
    cores = engine_cores()
    if cores is None:
        return
    processes = psutil.Process(started_by).children(recursive=True) if started_by else psutil.process_iter()
    for process in processes:
        with suppress(psutil.Error):
            if (process.cmdline() or [""])[0].startswith("VLLM::EngineCore"):
                for thread in process.threads():
                    os.sched_setaffinity(thread.id, cores)
