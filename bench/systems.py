"""Starting and stopping each system under test as its own processes, on one machine.

Every system serves the same model with the same engine settings: bare `vllm serve` (the
baseline), this stack (`serve run` of a rendered config), and Ray Serve LLM (`serve run` of
`ray.serve.llm:build_openai_app`). Ray is started fresh for each Ray system, with extra logical
CPUs so that light deployments are never starved of scheduling.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from cluster import render, runtime
from cluster.schema import ClusterConfig, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVE = str(Path(sys.executable).parent / "serve")
RAY = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class Running:
    name: str
    base_url: str
    model: str
    api_key: str | None
    started_in_s: float
    sessions: tuple[int, ...] = ()
    """The sessions its processes run in (every process the bench starts leads a session of its
    own): how its processes are told from everything else on the host (bench/relay.py)."""


def vllm_cli_args(model: ModelConfig) -> list[str]:
    """The same engine settings as our config, spelled as `vllm serve` flags."""
    args = []
    for name, value in model.engine.to_vllm_args().items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


@contextmanager
def bare_vllm(model: ModelConfig, model_path: str, port: int, log_dir: Path) -> Iterator[Running]:
    command = [
        PYTHON,
        "-m",
        "bench.vllm_cli",
        "serve",
        model_path,
        "--served-model-name",
        model.id,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
        *vllm_cli_args(model),
    ]
    env = os.environ | dict(model.deployment.env)
    with _process(command, env, log_dir / "bare-vllm.log") as server:
        started = time.monotonic()
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, model.id, None)
        # Our replicas do this themselves (serve_app/models/engine.py): the same engine layout for all.
        runtime.schedulers_to_engine_cores(started_by=server.pid)
        yield Running("bare vLLM", url, model.id, None, time.monotonic() - started, (server.pid,))


@contextmanager
def our_stack(
    config: ClusterConfig, port: int, log_dir: Path, name: str = "ours", import_path: str = "serve_app.app:build_app"
) -> Iterator[Running]:
    with our_apps({"": config}, port, log_dir, name, import_path) as [run]:
        yield run


@contextmanager
def our_apps(
    configs: dict[str, ClusterConfig], port: int, log_dir: Path, name: str, import_path: str = "serve_app.app:build_app"
) -> Iterator[list[Running]]:
    """Configs side by side in one Serve instance, each its own application at `/<key>` (an
    empty key is `/`), so that they are measured on the same Ray under the same noise."""
    api_key = "sk-bench"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    applications = []
    for prefix, config in configs.items():
        # The run's usage ledgers stay with its logs, out of the operator's own.
        usage = config.usage.model_copy(
            update={"database": f"sqlite:///{log_dir.resolve()}/{slug}-{prefix}-usage.sqlite"}
        )
        [app] = render.serve_config(config.model_copy(update={"usage": usage}))["applications"]
        applications.append(app | {"name": prefix or "llm", "route_prefix": f"/{prefix}", "import_path": import_path})
    document = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": applications}
    # Ray Serve LLM runs with Serve's defaults, as its users get it; these settings are ours.
    env = os.environ | runtime.NODE_ENV | {"LLM_API_KEY": api_key}
    with _ray(env) as ray, _serve_run(document, ray, log_dir / f"{slug}.log") as driver:
        started = time.monotonic()
        runs = []
        for prefix, config in configs.items():
            url = f"http://127.0.0.1:{port}" + (f"/{prefix}" if prefix else "")
            _wait_ready(url, config.models[0].id, api_key)
            elapsed = time.monotonic() - started
            runs.append(
                Running(
                    f"{name} {prefix}".strip(), url, config.models[0].id, api_key, elapsed, (ray.session, driver.pid)
                )
            )
        yield runs


@contextmanager
def ray_serve_llm(model: ModelConfig, model_path: str, port: int, log_dir: Path) -> Iterator[Running]:
    llm_config = {
        "model_loading_config": {"model_id": model.id, "model_source": model_path},
        "engine_kwargs": model.engine.to_vllm_args(),
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "runtime_env": {"env_vars": dict(model.deployment.env)},
        "deployment_config": {"num_replicas": 1},
    }
    document = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "llm",
                "route_prefix": "/",
                "import_path": "ray.serve.llm:build_openai_app",
                "args": {"llm_configs": [llm_config]},
            }
        ],
    }
    with _ray(os.environ) as ray, _serve_run(document, ray, log_dir / "ray-serve-llm.log") as driver:
        started = time.monotonic()
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, model.id, None)
        # Our replicas do this themselves (serve_app/models/engine.py): the same engine layout for all.
        runtime.schedulers_to_engine_cores()
        yield Running("Ray Serve LLM", url, model.id, None, time.monotonic() - started, (ray.session, driver.pid))


@dataclass(frozen=True)
class _RayNode:
    session: int
    """The session of `ray start`, which its daemons and workers (and their engines) stay in."""
    address: str
    env: dict[str, str]
    """The node's environment, which its drivers need too."""


@contextmanager
def _ray(env) -> Iterator[_RayNode]:
    """Ray in a session of its own, on ports of its own, so that it runs beside any other cluster on
    the host (a test suite's, say) and stops without touching them: `ray stop` stops every Ray
    process on the host, and leaves vLLM's engine processes behind when it kills the replica that
    started them (an orphaned engine spins on a core through the next system's run). Everything in
    the session goes instead. No token authentication, for the node and its drivers alike: with a
    token in ~/.ray (which a local `ray.init` makes), `ray start` turns it on and `serve run` sends
    none."""
    env = dict(env) | {"RAY_AUTH_MODE": "disabled"}
    gcs, client, agent, agent_grpc, runtime_env, metrics = (free_port() for _ in range(6))
    start = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--num-cpus=8",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if start.wait() != 0:
            raise RuntimeError("ray start failed")
        yield _RayNode(start.pid, f"127.0.0.1:{gcs}", env)
    finally:
        _kill_session(start.pid)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kill_session(session: int) -> None:
    left = []
    for process in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == session:
                process.kill()
                left.append(process)
    psutil.wait_procs(left, timeout=10)


@contextmanager
def _serve_run(document: dict, ray: _RayNode, log: Path) -> Iterator[subprocess.Popen]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(document, file)
    # The bench's own packages (bench/, tests/) are not installed: workers find them here. The
    # address by name: "auto" takes the host's latest cluster, which need not be this one.
    env = ray.env | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray.address}
    with _process([SERVE, "run", file.name], env, log) as driver:
        yield driver


@contextmanager
def _process(command: list[str], env, log: Path) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            os.killpg(process.pid, sig)
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue


def _wait_ready(base_url: str, model: str, api_key: str | None, timeout_s: float = 900) -> None:
    """Ready means a one-token answer: a route list can come up before the engine has."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s")
