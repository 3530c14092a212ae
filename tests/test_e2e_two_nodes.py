"""Two Ray nodes on this machine, started as docs/operations.md tells an operator to start them
(`ray start --head`, then `ray start --address=…` on a worker, each with the environment of
`python -m cluster env` and Ray's token authentication), and `serve deploy` of a config with two
models of the real small engine, each pinned to one node by a custom resource the node declares.
Both answer through the head's proxy; the worker node is stopped (as `ray stop` stops a node's
processes, on that node's only: `ray stop` itself would stop this session's own cluster too); a new
config is rolled on meanwhile; the node is started again; `serve shutdown`, then the nodes
stopped, leave no process behind. Prints the times."""

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from cluster.schema import deployment_name
from serve_app.models import sources
from tests.conftest import ROOT
from tests.polling import until
from tests.processes import MARKER, Seen, alive, described, free_port, is_engine, kill_all, marked, record
from tests.sse import json_chunks

pytestmark = [pytest.mark.e2e, pytest.mark.real_engine]

MODELS = {"model-a": "node_a", "model-b": "node_b"}
"""Each model and the custom resource of the node it is pinned to."""
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
STOP_GRACE_S = 16
"""`ray stop`'s default grace period, shared by its three rounds."""
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Node:
    """One Ray node of the rehearsal: its `ray start` line run in bash with the walkthrough's
    environment, its processes found by their marker."""

    def __init__(self, scratch: Path, name: str, env: dict[str, str]) -> None:
        self.name, self.env, self.scratch = name, env, scratch
        self.marker = ""
        self.seen: Seen = set()
        self.forced = 0
        """Processes `ray stop` would have had to kill: still running after its grace period."""

    def start(self, flags: str) -> None:
        self.marker = secrets.token_hex(8)
        ports = (
            f"--dashboard-agent-listen-port={free_port()} --dashboard-agent-grpc-port={free_port()} "
            f"--runtime-env-agent-port={free_port()} --metrics-export-port={free_port()}"
        )
        sh(
            f"""export RAY_AUTH_MODE=token
            eval "$(python -m cluster env)"
            ray start {flags} {ports} --resources='{{"{self.name}": 1}}' --temp-dir={self.scratch / self.name}""",
            self.env | {MARKER: self.marker},
        )
        self.note()

    def note(self) -> None:
        record(marked(self.marker), self.seen)

    def stop(self) -> float:
        """The node's processes stopped as `ray stop` stops them: SIGTERM to the raylet, then to
        the rest, then to the GCS, each sent SIGKILL if still there after its share of the grace
        period. vLLM's engines are not among them (as `ray stop` does not match them): they must
        go with their replica. Every process of the node gone within 30 s."""
        self.note()
        started = time.monotonic()
        ours = [process for process in marked(self.marker) if not is_engine(process)]
        first = [process for process in ours if _name(process) == "raylet"]
        last = [process for process in ours if _name(process) == "gcs_server"]
        for bucket in (first, [p for p in ours if p not in first and p not in last], last):
            for process in bucket:
                with suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGTERM)
            _, left = psutil.wait_procs(bucket, timeout=STOP_GRACE_S / 3)
            kill_all(left)
            self.forced += len(left)
        try:
            until(lambda: not alive(self.seen) and not marked(self.marker), 30, f"{self.name}'s processes to exit")
        except AssertionError:
            left = [*alive(self.seen), *(process.pid for process in marked(self.marker))]
            pytest.fail(f"left running after {self.name} stopped: {described(left)}")
        return time.monotonic() - started

    def kill(self) -> None:
        kill_all(marked(self.marker))


def _name(process: psutil.Process) -> str:
    with suppress(psutil.Error):
        return process.name()
    return ""


def _replicas_and_engines(*nodes: Node) -> list[int]:
    found = []
    for process in [p for node in nodes for p in marked(node.marker)]:
        with suppress(psutil.Error):
            if is_engine(process) or "ServeReplica" in " ".join(process.cmdline()):
                found.append(process.pid)
    return found


def sh(script: str, env: dict[str, str], timeout_s: float = 180) -> str:
    """A walkthrough's lines, as an operator's shell runs them; what they print (stdout)."""
    return run(script, env, timeout_s).stdout


def run(script: str, env: dict[str, str], timeout_s: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-ec", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _config(scratch: Path, port: int) -> Path:
    """configs/local.yaml with two copies of its model, `model-a` pinned to the head and `model-b`
    to the worker, apart from the ingress; eager mode and small limits (two engines share this
    machine's two cores), checked every second (a lost replica is noticed soon), and a request to
    a model with no replica refused after 10 s."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]["args"]
    [model] = app.pop("models")
    model.pop("aliases")
    model["engine"] |= {"enforce_eager": True, "max_num_seqs": 2, "max_model_len": 512}
    model["deployment"] |= {
        "max_ongoing_requests": 4,
        "health_check_period_s": 1,
        "graceful_shutdown_timeout_s": 1,
        # A request to a model with no replica waits this long for one, then is refused.
        "first_output_timeout_s": 10,
    }
    app["models"] = [
        model
        | {
            "id": model_id,
            # The worker has no CPU to give: only what asks for none and for its resource runs there.
            "deployment": model["deployment"] | {"num_cpus": 0, "resources": {resource: 1}},
        }
        for model_id, resource in MODELS.items()
    ]
    app["default_model"] = "model-a"
    app["ingress"] = {"colocate": False, "max_tokens_limit": 512}
    app["usage"] = {"database": f"sqlite:///{scratch / 'usage.sqlite'}"}
    path = scratch / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _states(url: str, key: str) -> dict[str, str]:
    with suppress(httpx.HTTPError, ValueError, KeyError):
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        health = httpx.get(url + "/health", timeout=10).json()
        listed = {model["id"]: model["state"] for model in models["data"]}
        # Two requests: a change between them is read again, a standing disagreement never passes.
        return listed if listed == health["models"] else {}
    return {}


def _answer(url: str, key: str, model: str, stream: bool) -> bool:
    """A short answer from `model`, streamed or whole, checked as its client reads it (an answer in
    another shape, an error's, is no answer)."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": stream}
    with suppress(httpx.HTTPError, ValueError, LookupError):
        response = httpx.post(url + "/llm", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        if response.status_code != 200:
            return False
        if stream:
            chunks = json_chunks(response.text)
            return bool(chunks[-1]["choices"][0]["finish_reason"]) and chunks[0]["model"] == model
        return response.json()["model"] == model and bool(response.json()["choices"][0]["message"]["content"])
    return False


def _refused_over(url: str, key: str, max_tokens: int) -> bool:
    body = {"model": "model-a", "messages": QUESTION, "max_tokens": max_tokens}
    with suppress(httpx.HTTPError):
        response = httpx.post(url + "/llm", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        return response.status_code == 400 and "max_tokens" in response.text
    return False


def _replica_nodes(env: dict[str, str], dashboard: str) -> dict[str, set[str]]:
    """The node of each model's running replicas, by the resource that node declares, as Ray's
    state API tells it (`ray list nodes`, `ray list actors`)."""
    listed = f"--address={dashboard} --format=json --limit=1000"
    nodes = json.loads(sh(f"RAY_AUTH_MODE=token ray list nodes {listed} --filter state=ALIVE", env))
    declares = {
        node["node_id"]: next((r for r in MODELS.values() if r in node["resources_total"]), "") for node in nodes
    }
    actors = json.loads(sh(f"RAY_AUTH_MODE=token ray list actors {listed} --filter state=ALIVE", env))
    return {
        model_id: {
            declares.get(actor["node_id"], "")
            for actor in actors
            if actor["class_name"].endswith(f":{deployment_name(model_id)}")
        }
        for model_id in MODELS
    }


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short path: Ray's socket paths under a node's temp dir must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="llm-2n-") as folder:
        yield Path(folder)


def test_two_ray_nodes_serve_a_model_each_and_a_stopped_node_takes_only_its_own(scratch):
    begun = time.monotonic()
    key = "sk-two-" + secrets.token_hex(8)
    base = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    base |= {"PATH": f"{VENV_BIN}:{base['PATH']}"}
    # The head's shell: its own home, where `ray get-auth-token --generate` writes the token.
    home = scratch / "home"
    home.mkdir()
    # The host's converted model (~/.cache/llm-serve) kept, as the worker's shell keeps it: a node
    # converts the shipped model once, and this host's already has.
    head_env = base | {"HOME": str(home), "LLM_API_KEY": key, "LLM_SERVE_CACHE": str(sources.DEFAULT_CACHE_DIR)}
    head = Node(scratch, "node_a", head_env)
    worker = Node(scratch, "node_b", base)
    gcs, dashboard_port, http_port = free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    url = f"http://127.0.0.1:{http_port}"
    try:
        sh("ray get-auth-token --generate > /dev/null && chmod 600 ~/.ray/auth_token", head_env)
        token = (home / ".ray" / "auth_token").read_text().strip()
        head.start(
            f"--head --port={gcs} --num-gpus=0 --num-cpus=4 --dashboard-port={dashboard_port} "
            f"--ray-client-server-port={free_port()} --node-ip-address=127.0.0.1"
        )
        # A worker's shell: the head's token given in the environment, no token file.
        worker.env |= {"RAY_AUTH_TOKEN": token}
        worker.start(f"--address=127.0.0.1:{gcs} --num-gpus=0 --num-cpus=0 --node-ip-address=127.0.0.1")
        # `ray status` reads the autoscaler's view, which takes in a new node within seconds.
        status = f"RAY_AUTH_MODE=token ray status --address=127.0.0.1:{gcs}"
        until(lambda: "node_b" in sh(status, head_env), 60, "`ray status` to list the worker's resource", every_s=1)

        config = _config(scratch, http_port)
        sh(f"python -m cluster validate {config}", head_env)
        deployed = run(f"RAY_AUTH_MODE=token serve deploy {config} -a {dashboard}", head_env)
        assert "Sent deploy request successfully" in deployed.stdout + deployed.stderr
        until(lambda: _states(url, key) == dict.fromkeys(MODELS, "ready"), 600, "both models ready", every_s=1)
        deployed_s = time.monotonic() - begun
        status = yaml.safe_load(sh(f"RAY_AUTH_MODE=token serve status -a {dashboard}", head_env))
        assert status["applications"]["llm"]["status"] == "RUNNING", status
        for model_id in MODELS:
            assert _answer(url, key, model_id, stream=True) and _answer(url, key, model_id, stream=False), model_id
        assert _replica_nodes(head_env, dashboard) == {model: {resource} for model, resource in MODELS.items()}
        for node in (head, worker):
            node.note()

        # The worker node stopped: its model is not ready, the head's still answers.
        stopping = time.monotonic()
        worker_stop_s = worker.stop()
        until(lambda: _states(url, key).get("model-b") not in (None, "ready"), 120, "model-b reported not ready")
        not_ready_s = time.monotonic() - stopping
        assert _states(url, key)["model-a"] == "ready"
        assert _answer(url, key, "model-a", stream=True)
        refused = httpx.post(
            url + "/llm",
            json={"model": "model-b", "messages": QUESTION, "max_tokens": 8},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text

        # A new config rolled on while the worker is away, as an operator may: a change to `args`,
        # which replaces every replica, engines too (Serve versions an application by its args).
        # The head's model serves under it; the worker's waits for its node.
        rolled = yaml.safe_load(config.read_text())
        rolled["applications"][0]["args"]["ingress"]["max_tokens_limit"] = 256
        config.write_text(yaml.safe_dump(rolled))
        sh(f"python -m cluster validate {config}", head_env)
        rolling = time.monotonic()
        run(f"RAY_AUTH_MODE=token serve deploy {config} -a {dashboard}", head_env)
        until(lambda: _refused_over(url, key, 300), 300, "the new config's max_tokens_limit", every_s=1)
        [deployed_app] = yaml.safe_load_all(sh(f"RAY_AUTH_MODE=token serve config -a {dashboard}", head_env))
        assert deployed_app["args"]["ingress"]["max_tokens_limit"] == 256
        until(lambda: _answer(url, key, "model-a", stream=False), 600, "model-a under the new config", every_s=1)
        rolled_s = time.monotonic() - rolling
        assert _states(url, key)["model-b"] != "ready"

        # Started again: Serve places model-b's replica on it, under the new config, and it serves.
        restarted = time.monotonic()
        worker.start(f"--address=127.0.0.1:{gcs} --num-gpus=0 --num-cpus=0 --node-ip-address=127.0.0.1")
        until(lambda: _answer(url, key, "model-b", stream=True), 600, "model-b to answer again", every_s=1)
        served_again_s = time.monotonic() - restarted
        assert _replica_nodes(head_env, dashboard) == {model: {resource} for model, resource in MODELS.items()}

        # `serve shutdown` takes every replica and its engine with it; the nodes stay up.
        for node in (head, worker):
            node.note()
        sh(f"RAY_AUTH_MODE=token serve shutdown -y -a {dashboard}", head_env)
        try:
            until(lambda: not _replicas_and_engines(head, worker), 60, "no replica and no engine on either node")
        except AssertionError:
            pytest.fail(f"left running after `serve shutdown`: {described(_replicas_and_engines(head, worker))}")
        worker.stop()
        head.stop()
        print(
            f"\ntwo nodes: both models served {deployed_s:.1f} s after the first `ray start`; the worker "
            f"node's processes gone {worker_stop_s:.1f} s after the stop began, its model reported not "
            f"ready {not_ready_s:.1f} s after it began; a new config rolled on meanwhile and the head's "
            f"model serving under it in {rolled_s:.1f} s; the worker's model serving again "
            f"{served_again_s:.1f} s after the node was started again; "
            f"processes still running after `ray stop`'s grace period: {worker.forced + head.forced}; "
            f"the rehearsal took {time.monotonic() - begun:.1f} s"
        )
    finally:
        worker.kill()
        head.kill()
